# The real-data study (scripts/study.py --config=config/fmnist.py): Fashion-MNIST (60,000 train,
# 10,000 val grey 28x28 photos of clothing, 10 classes; scripts/prepare_fashion_mnist.py pads them
# to 32 px) with the study's small ViT: patch 4 (64 tokens, as config/study.py), a 128-d x 4
# encoder, a 64-d x 2 decoder, batch 128, mask 0.6, the blog's optimizer settings as the starting
# point of the tuning. The study sets --max_iters, --lr and the tuned keys per run.
data_dir = 'data/fashion_mnist'
img_size = 32
patch_size = 4
enc_dim, enc_depth, enc_heads = 128, 4, 4
dec_dim, dec_depth, dec_heads = 64, 2, 2
batch_size = 128
micro_batch_size = 128
epochs, warmup_epochs = 10, 1  # with max_iters: warmup is 1/10 of the run, as the blog's 40 of 400 epochs
max_iters = 300
lr = 2e-3
eval_interval = 300  # 10,000 val images cost ~12 s: one point at the short length, 16 at the longest
log_interval = 20
num_workers = 0
compile = False
