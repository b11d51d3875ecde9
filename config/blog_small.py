# The blog's recipe scaled down to a CPU: the same recipe (mask 0.6, AdamW betas (0.9, 0.95) wd 0.05,
# Muon wd 0.1 match_rms_adamw, lr 8e-4 scaled up for the small batch, cosine, 10% warmup) on the
# built-in data with a small ViT. scripts/blog_table.sh runs the six configurations and probes each.
data_dir = 'synthetic'
synthetic_size = (8192, 1024)
img_size = 32
patch_size = 4
enc_dim, enc_depth, enc_heads = 128, 4, 2
dec_dim, dec_depth, dec_heads = 96, 2, 4
batch_size = 128
micro_batch_size = 128
epochs, warmup_epochs = 10, 1
lr = 2e-3
eval_interval = 200
log_interval = 20
num_workers = 1
compile = False
