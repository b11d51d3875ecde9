# The built-in default: a small MAE on the built-in synthetic data, ~7 minutes on a 2-core CPU.
# python train_mae.py config/quickstart.py
data_dir = 'synthetic'
out_dir = 'out/quickstart'
synthetic_size = (10000, 1000)
img_size = 64
patch_size = 8
enc_dim, enc_depth, enc_heads = 128, 6, 4
dec_dim, dec_depth, dec_heads = 128, 2, 4
batch_size = 128
micro_batch_size = 128
max_iters = 600
epochs, warmup_epochs = 10, 1
optimizer = 'adamw'  # at this budget AdamW's encoder probed better than Muon's (one seed: docs/quickstart_notes.md)
lr = 2e-3
eval_interval = 200
log_interval = 10
num_workers = 1
compile = False
