"""The blog's table at small scale: pretrain a set of configurations over a few
seeds, probe every encoder, print one markdown table with mean ± std per row.

    python scripts/blog_table.py                        # the blog's six rows (+ a random encoder), 3 seeds, CPU
    python scripts/blog_table.py --set=papers           # the papers' flags: conv stem, LAMB, Adafactor, schedules, ...
    python scripts/blog_table.py --set=probe_optimizer  # one encoder, probed with AdamW and with Muon
    python scripts/blog_table.py --out=out/table_gpu -- --compile=True --num_workers=8   # after --: train_mae.py keys

A run lives in OUT/<flags>/seed<S>/ ('default', 'optimizer-adamw', ...), so sets
share the runs they have in common, and a run whose probe_results.json exists is
not done again: running the command again resumes the table. Writes OUT/<set>.md
and the val-loss curves OUT/<set>_val_loss.png (when matplotlib is installed).
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Row(NamedTuple):
    name: str
    train: tuple  # train_mae.py flags on top of the config file; None: no training (the random encoder)
    probe: tuple = ()  # probe.py flags on top of --probe_args
    blog: str = ''  # the blog's figure (ViT-S/16, ImageNet), for reference


SETS = {  # the first row of each set is its baseline
    'blog': [Row('AdamW, bias, GELU, LN', ('--optimizer=adamw',), blog='val 0.34891'),
             Row('Muon, no bias, GELU, LN', ('--bias=False',), blog='val 0.34579'),
             Row('Muon, bias, GELU, LN', (), blog='val 0.34571'),
             Row('Muon, no bias, SwiGLU, RMSNorm', ('--bias=False', '--swiglu=True', '--norm=rmsnorm'), blog='val 0.34497'),
             Row('Muon, bias, SwiGLU, RMSNorm', ('--swiglu=True', '--norm=rmsnorm'), blog='val 0.34494'),
             Row('Muon, bias, SwiGLU, LN', ('--swiglu=True',), blog='val 0.34484'),
             Row('extra: random encoder', None)],  # what the probe reads from the architecture alone
    'papers': [Row('Muon', ()),
               Row('conv stem', ('--stem=conv',)),
               Row('conv stem, convs on Muon', ('--stem=conv', '--muon_conv=True')),
               Row('LAMB', ('--optimizer=lamb',)),
               Row('Adafactor', ('--optimizer=adafactor',)),
               Row('wsd schedule', ('--schedule=wsd',)),
               Row('rsqrt schedule', ('--schedule=rsqrt',)),
               Row('bf16 Muon momentum', ('--state_dtype=bfloat16',))],
    'probe_optimizer': [Row('AdamW probe', ('--swiglu=True',), blog='top-1 0.554'),  # probe.py's default
                        Row('Muon probe', ('--swiglu=True',), ('--probe_optimizer=muon',), blog='top-1 0.567')],
}


def slug(flags):
    return re.sub(r'[^\w.]+', '-', '_'.join(f.lstrip('-') for f in flags)) or 'default'


def run_dirs(row, seed, out):
    """(the encoder's run dir, the dir its probe_results.json goes to)"""
    run_dir = os.path.join(out, 'random' if row.train is None else slug(row.train), f'seed{seed}')
    return run_dir, os.path.join(run_dir, slug(row.probe)) if row.probe else run_dir


def random_encoder_flags(config, train_args):
    """The config file's model and data keys as probe.py flags, parsed as train_mae.py parses them."""
    sys.path.insert(0, ROOT)
    import harness, probe, train_mae
    c = harness.configure([config] + train_args, train_mae.CONFIG)
    return [f"--{k}={c[k] if isinstance(c[k], str) else repr(c[k]).replace(' ', '')}"
            for k in probe.MODEL_KEYS + ('data_dir',)]


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def execute(cmd, dry_run):
    """Run a script of the repository from its root; returns the wall time in seconds."""
    cmd = [sys.executable] + cmd
    print('$', shlex.join(cmd), flush=True)
    t0 = time.time()
    if not dry_run and subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit(f"error: failed: {shlex.join(cmd)}")
    return time.time() - t0


def save_times(run_dir, times, dry_run):
    if not dry_run:
        with open(os.path.join(run_dir, 'time.json'), 'w') as f:
            json.dump(times, f)


def run_row(row, seed, a, random_flags):
    """Pretrain (unless done) and probe (unless done) one row at one seed. The run dir's
    time.json keeps the wall times (train_s, probe_s per probe) and the config's name."""
    run_dir, probe_dir = run_dirs(row, seed, a.out)
    times = a.times.setdefault(run_dir, read_json(os.path.join(run_dir, 'time.json'),
                                                  dict(config=os.path.basename(a.config), probe_s={})))
    if times['config'] != os.path.basename(a.config):
        sys.exit(f"error: {run_dir} was trained with {times['config']}, not {a.config}: pass another --out")
    if os.path.exists(os.path.join(probe_dir, 'probe_results.json')):
        print(f"done already: {probe_dir}")
        return
    if row.train is not None and 'train_s' not in times:
        times['train_s'] = execute(['train_mae.py', a.config, f'--out_dir={run_dir}', f'--seed={seed}',
                                    *row.train, *a.train_args], a.dry_run)
        save_times(run_dir, times, a.dry_run)  # a failed probe does not train again
    ckpt = '' if row.train is None else os.path.join(run_dir, 'ckpt.pt')
    times['probe_s'][slug(row.probe)] = execute(['probe.py', f'--ckpt={ckpt}', f'--out_dir={probe_dir}', f'--seed={seed}',
                                                 *random_flags, *a.probe_args, *row.probe], a.dry_run)
    save_times(run_dir, times, a.dry_run)


def collect(row, seeds, out):
    """Per seed: the best val loss and val-loss curve of the encoder's run, the probe's best top-1 and warning."""
    stats = dict(val=[], curves=[], top1=[], warnings=0)
    for seed in seeds:
        run_dir, probe_dir = run_dirs(row, seed, out)
        probe = read_json(os.path.join(probe_dir, 'probe_results.json'))
        stats['top1'].append(probe['best']['top1'])
        stats['warnings'] += 'warning' in probe
        if row.train is not None:
            with open(os.path.join(run_dir, 'log.jsonl')) as f:
                curve = {r['step']: r['val_loss'] for r in map(json.loads, f) if 'val_loss' in r}
            stats['curves'].append(curve)
            stats['val'].append(min(curve.values()))
    return stats


def wall_time(rows, seeds, out):
    """Seconds: each encoder's pretraining once, plus every probe of the set, as time.json recorded them."""
    times = {d: read_json(os.path.join(d, 'time.json'), dict(probe_s={})) for d in
             {run_dirs(row, seed, out)[0] for row in rows for seed in seeds}}
    return sum(t.get('train_s', 0.0) for t in times.values()) + sum(
        times[run_dirs(row, seed, out)[0]]['probe_s'].get(slug(row.probe), math.nan) for row in rows for seed in seeds)


def mean_std(xs):  # sample std (ddof 1); nan for one seed
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan, len(xs)) if xs else None


def cell(m, digits):  # 'mean ± std (n)'
    return '–' if m is None else f"{m[0]:.{digits}f}" + (f" ± {m[1]:.{digits}f}" if m[2] > 1 else '') + f" ({m[2]})"


def delta(m, base, digits):
    """m - base, marked * where it exceeds the noise: 2 * sqrt(s1²/n1 + s2²/n2)."""
    if m is None or base is None:
        return '–'
    noise = 2 * math.sqrt(m[1] ** 2 / m[2] + base[1] ** 2 / base[2])  # nan (no mark) with one seed
    return f"{m[0] - base[0]:+.{digits}f}" + (' *' if abs(m[0] - base[0]) > noise else '')


def table(name, rows, stats, a, wall_s):
    probe_label = 'probe top-1 (AdamW probe, this encoder)' if name != 'probe_optimizer' else "probe top-1 (the row's probe)"
    lines = [f"| row | flags | best val loss, mean ± std (n) | Δ val loss | {probe_label}, mean ± std (n) | Δ top-1 "
             f"| blog | probe best on grid edge |", '|' + '---|' * 8]
    base = stats[0]
    for i, (row, s) in enumerate(zip(rows, stats)):
        flags = 'probe `--ckpt=`' if row.train is None else f"`{' '.join(row.train)}`" if row.train else '(defaults)'
        flags += f"; probe `{' '.join(row.probe)}`" if row.probe else ''
        val, top1 = mean_std(s['val']), mean_std(s['top1'])
        dv = 'baseline' if i == 0 else delta(val, mean_std(base['val']), 5)
        dt = 'baseline' if i == 0 else delta(top1, mean_std(base['top1']), 3)
        lines.append(f"| {row.name} | {flags} | {cell(val, 5)} | {dv} | {cell(top1, 3)} | {dt} | {row.blog or '–'} "
                     f"| {s['warnings']}/{len(s['top1'])} |")
    config = os.path.relpath(a.config, ROOT) if a.config.startswith(ROOT + os.sep) else a.config
    lines += ['', f"Config {config}, seeds 0..{a.seeds - 1}, probe `{' '.join(a.probe_args)}`. "
              "Best val loss: the lowest val_loss in the run's log.jsonl; top-1: probe_results.json's best over "
              "the lr x wd grid. Δ is against the first row; * marks |Δ mean| > 2·sqrt(s1²/n1 + s2²/n2) "
              "(about 95%, Welch-style; no mark with one seed). Blog: its ViT-S/16 ImageNet figure, "
              "for reference only.", '', f"Total wall time of the set: {wall_s / 60:.1f} min "
              "(each encoder's pretraining once, every probe; from the runs' time.json)."]
    return '\n'.join(lines) + '\n'


def plot(name, rows, stats, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot skipped: matplotlib is not importable ({e}); pip install matplotlib for {path}")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = set()
    for row, s in zip(rows, stats):
        if row.train is None or row.train in drawn:  # rows that share an encoder share a curve
            continue
        drawn.add(row.train)
        label = ' = '.join(r.name for r in rows if r.train == row.train)
        steps = sorted(set.intersection(*(set(c) for c in s['curves'])))
        v = np.array([[c[step] for step in steps] for c in s['curves']])  # [seeds, evals]
        line, = ax.plot(steps, v.mean(0), label=label)
        if len(v) > 1:
            ax.fill_between(steps, v.min(0), v.max(0), color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xlabel='optimizer step', ylabel='val loss', title=f"{name}: val loss, mean over seeds (band: min-max)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"plot: {path}")


def main(argv):
    argv, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog='after --: train_mae.py flags')
    p.add_argument('--set', choices=SETS, default='blog')
    p.add_argument('--seeds', type=int, default=3, help='seeds 0..n-1')
    p.add_argument('--config', default=os.path.join(ROOT, 'config', 'blog_small.py'))
    p.add_argument('--out', default=os.path.join(ROOT, 'out', 'table'))
    p.add_argument('--probe_args', default='--epochs=10 --warmup_epochs=1 --batch_size=256 --num_workers=1 --compile=False')
    p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
    a = p.parse_args(argv)
    a.config, a.out = os.path.abspath(a.config), os.path.abspath(a.out)
    a.probe_args, a.train_args, a.times = shlex.split(a.probe_args), train_args, {}  # times: run dir -> time.json
    rows, seeds = SETS[a.set], range(a.seeds)
    random_flags = random_encoder_flags(a.config, train_args) if any(r.train is None for r in rows) else []
    for row in rows:
        for seed in seeds:
            run_row(row, seed, a, random_flags if row.train is None else [])
    if a.dry_run:
        return
    stats = [collect(row, seeds, a.out) for row in rows]
    markdown = table(a.set, rows, stats, a, wall_time(rows, seeds, a.out))
    print('\n' + markdown)
    with open(os.path.join(a.out, f'{a.set}.md'), 'w') as f:
        f.write(markdown)
    plot(a.set, rows, stats, os.path.join(a.out, f'{a.set}_val_loss.png'))


if __name__ == '__main__':
    main(sys.argv[1:])
