#!/bin/bash
# the "below pixels" diagnosis: pooling (flatten vs mean) and the probe's budget (40 epochs), seed 0, from /work/wt-diag
cd /work/wt-diag
O=/work/main/out/fmnist
A=$O/adamw_lr0.004_len300_warmup_epochs-8.0_weight_decay-0.8_seed0/ckpt.pt
M=$O/muon_lr0.016_len300_muon_weight_decay-0.8_warmup_epochs-2.0_seed0/ckpt.pt
F="config/probe_fmnist.py --head=linear --linear_pool=flatten --lrs=(1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,0.1) --wds=(0.0,0.05,0.5)"
B="config/probe_fmnist.py --head=linear --epochs=40 --warmup_epochs=4 --lrs=(3e-3,1e-2,3e-2,0.1,0.3,1.0,3.0)"
run() { name=$1; shift; [ -f $O/diag/$name/probe_results.json ] && return; OMP_NUM_THREADS=1 python probe.py "$@" --out_dir=$O/diag/$name > $O/diag/$name.log 2>&1 || echo "failed $name"; }
run flatten_random $F --ckpt=$A --random_encoder=True
run flatten2_adamw300 $F --ckpt=$A
run flatten2_muon300 $F --ckpt=$M
run mean40_pixels $B --ckpt=$A --pixels=True
run mean40_adamw300 $B --ckpt=$A
echo done
