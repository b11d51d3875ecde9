# The blog's recipe scaled down to a 2-core CPU, for scripts/blog_table.py: the same recipe
# (mask 0.6, AdamW betas (0.9, 0.95) wd 0.05, Muon wd 0.1 match_rms_adamw, cosine, warmup 1/5
# of the run as 40/400 is 1/10) on the built-in data with a small ViT, sized so that a table of
# 3 seeds x ~14 configurations fits in about an hour: ~1 minute per run on one core.
data_dir = 'synthetic'
synthetic_size = (4096, 512)
img_size = 32
patch_size = 4
enc_dim, enc_depth, enc_heads = 128, 4, 2
dec_dim, dec_depth, dec_heads = 64, 1, 2
batch_size = 128
micro_batch_size = 128
epochs, warmup_epochs = 5, 1
lr = 2e-3  # 8e-4 is the blog's at batch 4096; this small batch and short run take a larger step
eval_interval = 16
log_interval = 16
num_workers = 0
compile = False
