# The probe of the real-data study's encoders (config/fmnist.py): the tokens of centre crops computed
# once (augment=False: 60,000 x 64 x 128 floats, 2 GB), 10 epochs at batch 256 (2,340 steps), an lr
# grid a factor of ~3 apart and two weight decays, both heads.
# python probe.py config/probe_fmnist.py --ckpt=out/fmnist/<run>/ckpt.pt
augment = False
epochs, warmup_epochs = 10, 1
batch_size = 256
lrs = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
wds = (0.0, 5e-2)
head = 'both'
num_workers = 0
compile = False
