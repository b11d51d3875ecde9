#!/usr/bin/env bash
# The blog's table at small scale: the six configurations pretrained on the built-in data
# (config/blog_small.py), each probed with the full lr x wd sweep, then one table.
#   bash scripts/blog_table.sh                      # CPU, the small config
#   OUT=out/table_gpu bash scripts/blog_table.sh --compile=True --num_workers=8   # extra train_mae.py keys
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/table}
PROBE=${PROBE:---epochs=10 --warmup_epochs=1 --batch_size=256 --num_workers=1 --compile=False}
runs=("adamw --optimizer=adamw"
      "muon"
      "muon_nobias --bias=False"
      "muon_swiglu --swiglu=True"
      "muon_nobias_swiglu --bias=False --swiglu=True"
      "muon_nobias_swiglu_rmsnorm --bias=False --swiglu=True --norm=rmsnorm")
for run in "${runs[@]}"; do
  name=${run%% *}
  flags=${run#"$name"}
  # shellcheck disable=SC2086
  python train_mae.py config/blog_small.py --out_dir="$OUT/$name" $flags "$@"
  # shellcheck disable=SC2086
  python probe.py --ckpt="$OUT/$name/ckpt.pt" $PROBE
done
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"{'run':<28} {'best val loss':>13} {'probe top-1':>11}")
for name in sorted(os.listdir(out), key=lambda n: (n != 'adamw', len(n), n)):
    log = [json.loads(l) for l in open(os.path.join(out, name, 'log.jsonl'))]
    best = json.load(open(os.path.join(out, name, 'probe_results.json')))['best']
    print(f"{name:<28} {min(r['val_loss'] for r in log if 'val_loss' in r):>13.4f} {best['top1']:>11.3f}")
PY
