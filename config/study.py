# The small-scale study (scripts/study.py): the blog's recipe (mask 0.6, AdamW betas (0.9, 0.95)
# wd 0.05, Muon wd 0.1 match_rms_adamw, warmup from lr/3 over 1/10 of the run, cosine to 0) on
# the built-in data with a small ViT, sized for one CPU core per run: 64 px, patch 8 (64 tokens,
# as the quick start), a 128-d x 4 encoder, 4,096 training images at batch 128. The run length
# and the lr are the study's variables: scripts/study.py sets --max_iters and --lr per run.
data_dir = 'synthetic'
synthetic_size = (4096, 1000)
img_size = 64
patch_size = 8
enc_dim, enc_depth, enc_heads = 128, 4, 4
dec_dim, dec_depth, dec_heads = 64, 2, 2
batch_size = 128
micro_batch_size = 128
epochs, warmup_epochs = 10, 1  # with max_iters: warmup is 1/10 of the run, as the blog's 40 of 400 epochs
max_iters = 320
lr = 2e-3
eval_interval = 80  # 4 val points per short run: 1,000 val images cost ~10 s each
log_interval = 20
num_workers = 0
compile = False
