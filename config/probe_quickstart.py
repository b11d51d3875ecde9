# The probe for the quick start's encoder (and the built-in data at large). Small data, so the
# probes train on centre crops whose tokens are computed once (augment=False), with small batches
# for many steps and lrs high enough (README, quick start: close to converged; 100 epochs add
# about 0.03 attentive, 0.01 linear). The ImageNet recipe is probe.py's defaults: the blog's
# 10 lrs x 3 wds, 10 epochs.
# python probe.py config/probe_quickstart.py --ckpt=out/quickstart/ckpt.pt
augment = False
epochs, warmup_epochs = 50, 1
batch_size = 64
lrs = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
wds = (0.0, 5e-2)
head = 'both'
num_workers = 1
compile = False
