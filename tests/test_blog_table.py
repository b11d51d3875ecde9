"""scripts/blog_table.py end to end on a tiny config: the table's numbers are the
run files' numbers, and a second invocation skips the finished runs."""
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np

from conftest import ROOT

TINY_CONFIG = """data_dir = 'synthetic'
synthetic_size = (64, 32)
img_size, patch_size = 32, 8
enc_dim, enc_depth, enc_heads = 64, 2, 2
dec_dim, dec_depth, dec_heads = 32, 1, 2
batch_size = micro_batch_size = 16
max_iters, eval_interval, log_interval = 4, 2, 2
compile = False
num_workers = 0
"""
PROBE = '--epochs=1 --batch_size=16 --lrs=(1e-3,) --wds=(0.0,) --num_workers=0 --compile=False'


def blog_table(args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'blog_table.py')] + args, capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def table_rows(markdown):
    lines = [l for l in markdown.splitlines() if l.startswith('| ')][1:]  # past the header
    return {cells[0]: cells for cells in ([c.strip() for c in l.strip('|').split('|')] for l in lines)}


def mean_std(xs, digits):
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f} ({len(xs)})"


def test_probe_optimizer_set_end_to_end_and_resume(tmp_path):
    config, out = tmp_path / 'tiny.py', tmp_path / 'table'
    config.write_text(TINY_CONFIG)
    args = [f'--config={config}', f'--out={out}', '--set=probe_optimizer', '--seeds=2', f'--probe_args={PROBE}']
    printed = blog_table(args)
    markdown = (out / 'probe_optimizer.md').read_text()
    assert markdown in printed
    rows = table_rows(markdown)
    assert list(rows) == ['AdamW probe', 'Muon probe']

    runs = [out / 'swiglu-True' / f'seed{s}' for s in (0, 1)]  # one encoder per seed, probed twice
    val = [min(json.loads(l)['val_loss'] for l in open(r / 'log.jsonl') if 'val_loss' in l) for r in runs]
    top1 = {name: [json.load(open(r / sub / 'probe_results.json'))['best']['top1'] for r in runs]
            for name, sub in (('AdamW probe', ''), ('Muon probe', 'probe_optimizer-muon'))}
    for name, cells in rows.items():
        assert cells[2] == mean_std(val, 5) and cells[4] == mean_std(top1[name], 3), cells
        assert cells[7] == '0/2'  # one lr and one wd: no grid edge
    assert rows['AdamW probe'][3] == rows['AdamW probe'][5] == 'baseline'
    d = np.mean(top1['Muon probe']) - np.mean(top1['AdamW probe'])
    noise = 2 * math.sqrt(sum(np.var(x, ddof=1) / 2 for x in top1.values()))
    assert rows['Muon probe'][5] == f"{d:+.3f}" + (' *' if abs(d) > noise else '')
    assert rows['Muon probe'][3] == '+0.00000'  # the same encoder
    assert rows['Muon probe'][6] == 'top-1 0.567'
    times = [json.load(open(r / 'time.json')) for r in runs]
    wall = sum(t['train_s'] + sum(t['probe_s'].values()) for t in times)
    assert f"Total wall time of the set: {wall / 60:.1f} min" in markdown
    if importlib.util.find_spec('matplotlib'):
        assert (out / 'probe_optimizer_val_loss.png').stat().st_size > 0
    else:
        assert 'plot skipped' in printed

    done = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.name in ('ckpt.pt', 'probe_results.json', 'time.json')}
    printed = blog_table(args)  # everything done: nothing runs, the same table
    assert '$ ' not in printed and printed.count('done already') == 4
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert (out / 'probe_optimizer.md').read_text() == markdown


def test_blog_set_commands(tmp_path):
    """--dry_run: the blog's rows in their run dirs; the random encoder's flags are the config's model keys."""
    printed = blog_table(['--dry_run', '--seeds=1', f'--out={tmp_path}'])
    commands = [shlex.split(l[2:]) for l in printed.splitlines() if l.startswith('$ ')]
    assert not any(tmp_path.iterdir())
    train = [c for c in commands if c[1] == 'train_mae.py']
    assert [c[3].split('/')[-2] for c in train] == ['optimizer-adamw', 'bias-False', 'default', 'bias-False_swiglu-True_norm-rmsnorm',
                                                     'swiglu-True_norm-rmsnorm', 'swiglu-True']
    random = commands[-1]
    assert random[1] == 'probe.py' and '--ckpt=' in random and f'--out_dir={tmp_path}/random/seed0' in random
    import harness, probe, train_mae
    c, _ = probe.load_config(random[2:])  # probe.py accepts them, and builds the config file's encoder
    config = harness.configure([os.path.join(ROOT, 'config', 'blog_small.py')], train_mae.CONFIG)
    assert all(getattr(c, k) == config[k] for k in probe.MODEL_KEYS + ('data_dir',))
    assert (c.enc_dim, c.data_dir) == (128, 'synthetic')
