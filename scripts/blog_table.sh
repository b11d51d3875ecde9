#!/usr/bin/env bash
# The blog's table at small scale: configurations pretrained on the built-in data
# (config/blog_small.py), each probed with the full lr x wd sweep, then one table.
#   bash scripts/blog_table.sh                      # the blog's six configurations, CPU
#   RUNS=papers bash scripts/blog_table.sh          # the papers' flags: conv stem, Muon on convs, LAMB, schedules
#   OUT=out/table_gpu bash scripts/blog_table.sh --compile=True --num_workers=8   # extra train_mae.py keys
# The row `random` probes the same encoder untrained: what the probe reads from architecture alone.
# A run whose probe_results.json exists is not done again: the sets share the Muon and random rows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/table}
PROBE=${PROBE:---epochs=10 --warmup_epochs=1 --batch_size=256 --num_workers=1 --compile=False}
case ${RUNS:-blog} in
  blog) runs=("random"
              "adamw --optimizer=adamw"
              "muon"
              "muon_nobias --bias=False"
              "muon_swiglu --swiglu=True"
              "muon_nobias_swiglu --bias=False --swiglu=True"
              "muon_nobias_swiglu_rmsnorm --bias=False --swiglu=True --norm=rmsnorm") ;;
  papers) runs=("random"
                "muon"
                "muon_convstem --stem=conv"
                "muon_convstem_muonconv --stem=conv --muon_conv=True"
                "lamb --optimizer=lamb"
                "muon_wsd --schedule=wsd"
                "muon_rsqrt --schedule=rsqrt"
                "muon_bf16state --state_dtype=bfloat16") ;;
  *) echo "error: RUNS=$RUNS: must be blog or papers" >&2; exit 1 ;;
esac
names=()
for run in "${runs[@]}"; do
  name=${run%% *}
  flags=${run#"$name"}
  names+=("$name")
  [ -f "$OUT/$name/probe_results.json" ] && continue
  if [ "$name" = random ]; then  # the config file's model and data keys, as probe.py flags
    # shellcheck disable=SC2046
    python probe.py --ckpt= --out_dir="$OUT/random" $PROBE $(python -c "import probe, train_mae as T
c = T.configure(['config/blog_small.py'], T.CONFIG)
print(' '.join(f'--{k}={c[k]!r}'.replace(' ', '') for k in probe.MODEL_KEYS + ('data_dir',)))")
    continue
  fi
  # shellcheck disable=SC2086
  python train_mae.py config/blog_small.py --out_dir="$OUT/$name" $flags "$@"
  # shellcheck disable=SC2086
  python probe.py --ckpt="$OUT/$name/ckpt.pt" $PROBE
done
python - "$OUT" "${names[@]}" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"{'run':<28} {'best val loss':>13} {'probe top-1':>11}")
for name in sys.argv[2:]:
    log = os.path.join(out, name, 'log.jsonl')
    val = f"{min(json.loads(l).get('val_loss', 1e9) for l in open(log)):.4f}" if os.path.exists(log) else '-'
    best = json.load(open(os.path.join(out, name, 'probe_results.json')))['best']
    print(f"{name:<28} {val:>13} {best['top1']:>11.3f}")
PY
