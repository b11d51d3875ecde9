"""The studies, run as optimizer comparisons must be (Wen et al. 2025, "Fantastic
Pretraining Optimizers and Where to Find Them"): every optimizer tuned on its own,
compared at the end of training at several run lengths, paired by seed; 3 seeds;
probes against a random encoder.

The built-in study (config/study.py; each optimizer's peak lr tuned):

    python scripts/study.py sweep     # 1. each optimizer's lr sweep at the short length, widened till the best is inside
    python scripts/study.py lengths   # 2. AdamW and Muon at 4x the length (AdamW also at 2x), 3 lrs around each best;
                                      #    then the 4x best of each at the other seeds
    python scripts/study.py long      #    AdamW at 16x the length, at its 4x best lr (one seed)
    python scripts/study.py tables    # 3. the blog's rows, the probe experiment, the papers' flags: 3 seeds, probed
    python scripts/study.py seeds     # one setting (e.g. the quick start's) over seeds, against a random encoder
    python scripts/study.py report    # tables and plots of what has finished -> results/study/

The tuned study (config/fmnist.py; every optimizer tuned beyond the lr, docs/study.md):

    python scripts/study.py tune --config=config/fmnist.py --length=300 --optimizers=adamw   # (and muon) KNOBS,
                                      #    one at a time, until each best is inside its grid
    python scripts/study.py scale ...  # the lr re-tuned at 4x and 16x, 3 seeds each, probed; one check per knob
    python scripts/study.py rows ...   # the blog's rows at 4x, each optimizer at its tuned setting there
    python scripts/study.py report_tuned ...   # -> the --results folder's study.md

Every run is `train_mae.py CONFIG --optimizer=.. --lr=.. --max_iters=.. --seed=..`
plus a row's or a setting's flags, on one core. When it finishes, its summary
(val-loss curve, wall time, later its probe results) goes to <results>/runs/<run>.json,
and a run with a summary is never run again: stop a phase at any time and run it
again to go on; an interrupted run resumes from its checkpoint in <out>/<run>/. Two
processes may work on one phase at once (a run in progress is locked). To test an
idea, fork: change the config or the rows below, pass --results and --out, and run
the same commands.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import train_mae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ('adamw', 'muon', 'lamb', 'adafactor')
LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)  # the first sweep, a factor of 2 apart; widened by 2x at an edge
SEEDS = (0, 1, 2)


class Row(NamedTuple):
    name: str
    optimizer: str  # the row runs at this optimizer's tuned lr
    flags: tuple = ()  # train_mae.py flags on top of config, optimizer and lr
    probe: tuple = ()  # probe.py flags on top of --probe_config
    blog: str = ''  # the blog's ViT-S/16 ImageNet figure, for reference


TABLES = {  # the first row of each table is its baseline
    'blog': [Row('AdamW, bias, GELU, LN', 'adamw', blog='0.34891'),
             Row('Muon, no bias, GELU, LN', 'muon', ('--bias=False',), blog='0.34579'),
             Row('Muon, bias, GELU, LN', 'muon', blog='0.34571'),
             Row('Muon, no bias, SwiGLU, RMSNorm', 'muon', ('--bias=False', '--swiglu=True', '--norm=rmsnorm'),
                 blog='0.34497'),
             Row('Muon, bias, SwiGLU, RMSNorm', 'muon', ('--swiglu=True', '--norm=rmsnorm'), blog='0.34494'),
             Row('Muon, bias, SwiGLU, LN', 'muon', ('--swiglu=True',), blog='0.34484')],
    'probe_optimizer': [Row('AdamW probe', 'muon', ('--swiglu=True',), blog='top-1 0.554'),
                        Row('Muon probe', 'muon', ('--swiglu=True',), ('--probe_optimizer=muon',), blog='top-1 0.567')],
    'papers': [Row('Muon', 'muon'),
               Row('conv stem', 'muon', ('--stem=conv',)),
               Row('conv stem, convs on Muon', 'muon', ('--stem=conv', '--muon_conv=True')),
               Row('LAMB', 'lamb'),
               Row('Adafactor', 'adafactor'),
               Row('wsd schedule', 'muon', ('--schedule=wsd',)),
               Row('rsqrt schedule', 'muon', ('--schedule=rsqrt',)),
               Row('bf16 Muon momentum', 'muon', ('--state_dtype=bfloat16',))],
}


class Run(NamedTuple):
    optimizer: str
    lr: float
    iters: int
    seed: int = 0
    flags: tuple = ()

    @property
    def name(self):
        extra = ''.join('_' + re.sub(r'[^\w.]+', '-', f.lstrip('-')) for f in sorted(self.flags))
        return f"{self.optimizer}_lr{self.lr:g}_len{self.iters}{extra}_seed{self.seed}"

    def argv(self, config):
        return [config, f'--optimizer={self.optimizer}', f'--lr={self.lr!r}', f'--max_iters={self.iters}',
                f'--seed={self.seed}', *self.flags]


# -----------------------------------------------------------------------------
# running: a run is done when its summary exists

def summary_path(a, run):
    return os.path.join(a.results, 'runs', run.name + '.json')


def load(a, run):
    path = summary_path(a, run)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save(a, run, summary):
    path = summary_path(a, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(summary, f, indent=1)
    os.replace(path + '.tmp', path)
    if a.commit:  # each summary lands as it is made: a machine that goes away loses at most the runs in progress
        for attempt in range(10):  # the repository may be busy (another commit holds its index lock)
            git = subprocess.run(['git', 'add', path], cwd=a.results, capture_output=True)
            git = git.returncode or subprocess.run(['git', 'commit', '-q', '-m', f"study: {run.name}", '--', path],
                                                    cwd=a.results, capture_output=True).returncode
            if not git:
                break
            time.sleep(5)
        else:
            print(f"warning: could not commit {path}", file=sys.stderr)


def execute(a, script, args):
    """Run a script of the repository on one core; returns its wall time in seconds."""
    cmd = [sys.executable, script, *args]
    print('$', shlex.join(cmd), flush=True)
    if a.dry_run:
        return 0.0
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}).returncode:
        sys.exit(f"error: failed: {shlex.join(cmd)}")
    return time.time() - t0


def locked(a, run):
    """Take run's lock (a file holding our pid); False if a live process holds it."""
    path = os.path.join(a.out, run.name + '.lock')
    os.makedirs(a.out, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(open(path).read() or 0), 0)
            return False  # another study process is on it
        except (ProcessLookupError, ValueError):
            os.remove(path)  # its process died: take over
            return locked(a, run)
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    return True


def unlock(a, run):
    os.remove(os.path.join(a.out, run.name + '.lock'))


def train(a, run):
    """Train run unless it has a summary; returns the summary (None if another process has it)."""
    summary = load(a, run)
    if summary is not None:
        return summary
    if a.dry_run:
        execute(a, 'train_mae.py', run.argv(a.config))
        return None
    if not locked(a, run):
        print(f"in progress elsewhere: {run.name}")
        return None
    try:
        out_dir = os.path.join(a.out, run.name)
        resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
        spent = spent_before(out_dir) if resume else 0.0
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'spent_s.json'), 'w') as f:
            json.dump(dict(spent=spent, started=time.time()), f)
        seconds = execute(a, 'train_mae.py', run.argv(a.config) + [f'--out_dir={out_dir}'] +
                          (['--init_from=resume'] if resume else []) + a.train_args)
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            curve = {r['step']: r['val_loss'] for r in map(json.loads, f) if 'val_loss' in r}
        if max(curve, default=0) != run.iters:  # stopped by a signal: train_mae.py saved and exited
            sys.exit(f"error: {run.name} stopped at step {max(curve, default=0)} of {run.iters}; run the phase again")
        summary = dict(run._asdict(), name=run.name, config=os.path.relpath(a.config, ROOT),
                       curve=curve, final_val=curve[max(curve)], train_s=spent + seconds, probes={})
        save(a, run, summary)
        return summary
    finally:
        unlock(a, run)


def spent_before(out_dir):
    """Wall seconds of a run's earlier attempts: each attempt that died counts from its start
    to the last write of its log (within a log interval of its end). spent_s.json holds the
    seconds before the latest attempt and that attempt's start (a bare number: older files,
    whose dead attempts went uncounted)."""
    path, log = os.path.join(out_dir, 'spent_s.json'), os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict):
        return float(record)
    return record['spent'] + (max(0.0, os.path.getmtime(log) - record['started']) if os.path.exists(log) else 0.0)


def probe(a, run, flags=(), random_encoder=False):
    """Probe run's encoder (or, random_encoder, the same architecture freshly drawn)
    with --probe_config + flags, unless done; the best top-1 per head goes into the summary."""
    key = '_'.join(['random'] * random_encoder + [f.lstrip('-') for f in flags]) or 'default'
    summary = load(a, run)
    if summary is None or key in summary['probes'] or not locked(a, run):
        return
    try:
        out_dir = os.path.join(a.out, run.name, 'probe_' + key)
        seconds = execute(a, 'probe.py', [a.probe_config, f'--ckpt={os.path.join(a.out, run.name, "ckpt.pt")}',
                                          f'--out_dir={out_dir}', f'--seed={run.seed}',
                                          f'--random_encoder={random_encoder}', *flags, *a.probe_args])
        if a.dry_run:
            return
        with open(os.path.join(out_dir, 'probe_results.json')) as f:
            results = json.load(f)
        best = {head: max(r['top1'] for r in results['results'] if r['head'] == head)
                for head in {r['head'] for r in results['results']}}
        summary['probes'][key] = dict(best, warning=results.get('warning', ''), probe_s=seconds)
        save(a, run, summary)
    finally:
        unlock(a, run)


# -----------------------------------------------------------------------------
# the phases

# the bracketing rule, for the lr and every other tuned knob

class Knob(NamedTuple):
    """A tuned hyperparameter: its train_mae.py key ('lr' is the Run's own), its first grid
    (a tuple, or a function of the current setting), and the value nothing lies beyond (a
    weight decay of 0: a best there counts as inside). beta2 is widened in 1 - beta2."""
    key: str
    grid: object
    floor: float = None


def beyond(knob, values, edge):
    """The next value past values' edge (min or max) at the ratio of the two values there,
    or None where the edge is the knob's floor."""
    if edge == min(values) and edge == knob.floor:
        return None
    to, back = (lambda v: 1 - v, lambda t: 1 - t) if knob.key == 'beta2' else (lambda v: v, lambda t: t)
    ordered = sorted(values, key=to)  # increasing in the space the grid is geometric in
    first, second = (ordered[0], ordered[1]) if to(edge) == to(ordered[0]) else (ordered[-1], ordered[-2])
    return float(f"{back(to(first) ** 2 / to(second)):.6g}")


def bracket(knob, finals):
    """finals {value: final val loss} of a sweep: (best value, inside, the value to try next).
    The best is inside when values lie on both sides of it, or it sits on the knob's floor;
    else the next value lies past the edge that holds it. The study's one bracketing rule."""
    best = min(finals, key=finals.get)
    inside = len(finals) > 1 and (min(finals) < best < max(finals) or best == knob.floor)
    return best, inside, None if inside or len(finals) < 2 else beyond(knob, list(finals), best)


LR = Knob('lr', LRS)


def summaries(a):
    """Every finished run's summary, in name order."""
    folder = os.path.join(a.results, 'runs')
    done = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            done.append(json.load(f))
    return done


def sweep_runs(a, optimizer, iters):
    """The finished seed-0 runs of optimizer at length iters without other flags: {lr: summary}."""
    return {s['lr']: s for s in summaries(a)
            if (s['optimizer'], s['iters'], s['seed'], tuple(s['flags'])) == (optimizer, iters, 0, ())}


def tuned_lr(a, optimizer, iters):
    """The best lr of the optimizer's sweep at iters steps if it lies inside the sweep, else None
    (not run yet, or still being widened)."""
    runs = sweep_runs(a, optimizer, iters)
    return best_run(runs)[0] if runs and best_run(runs)[2] else None


def best_lr(a, optimizer, iters):
    best = tuned_lr(a, optimizer, iters)
    if best is None:
        sys.exit(f"error: the {optimizer} sweep at {iters} steps is unfinished (its best lr is not inside it): "
                 f"run or finish the sweep phase first")
    return best


def tune(a, optimizer, iters, lrs):
    """Train optimizer at iters steps (seed 0) at each of lrs, then one more lr 2x
    beyond the edge while the best lies on it, so the best ends inside."""
    lrs = sorted(set(lrs) | set(sweep_runs(a, optimizer, iters)))
    while True:
        for lr in lrs:
            train(a, Run(optimizer, lr, iters))
        done = sweep_runs(a, optimizer, iters)
        if a.dry_run or set(lrs) - set(done):
            return  # other processes are still on some
        best, inside, more = bracket(LR, {lr: done[lr]['final_val'] for lr in lrs})
        if inside or more is None or not 1e-6 <= more <= 1.0:
            print(f"{optimizer}: best lr {best:g} of {', '.join(f'{lr:g}' for lr in lrs)} at {iters} steps")
            return
        lrs = sorted(lrs + [more])


def sweep(a):
    """Each optimizer's peak lr at the short length: the grid LRS, widened until the best is inside."""
    for optimizer in a.optimizers:
        tune(a, optimizer, a.length, a.lrs)


def lengths(a):
    """AdamW and Muon at 4x the length (AdamW also at 2x, for the speedup's
    interpolation), each at half, at and twice its best at the short length,
    widened until the best is inside; then both at their 4x best for the other seeds,
    every seed's encoder probed (the tables probe the short length's)."""
    for optimizer, f in (('adamw', 4), ('muon', 4), ('adamw', 2)):
        best = best_lr(a, optimizer, a.length)
        tune(a, optimizer, f * a.length, (best, best / 2, best * 2))
    best = {optimizer: tuned_lr(a, optimizer, 4 * a.length) for optimizer in ('adamw', 'muon')}
    for seed in a.seeds:
        for optimizer, lr in best.items():
            if lr is not None:  # else its sweep is still being widened by another process
                run = Run(optimizer, lr, 4 * a.length, seed)
                train(a, run)
                probe(a, run)


def long(a):
    """AdamW at 16x the short length, at its 4x best lr, seed 0: whether AdamW reaches Muon's
    4x loss late or never (the speedup's upper end)."""
    train(a, Run('adamw', best_lr(a, 'adamw', 4 * a.length), 16 * a.length))


def seeds(a):
    """One setting (--optimizers, --lrs and --length, all single) over the seeds, each
    probed (probe seed = its seed) against a random encoder of the same seed, and the
    first seed's encoder under every other probe seed too: whether the probes' spread
    comes from pretraining or from the probe. Writes seeds.md to --results."""
    if len(a.optimizers) != 1 or len(a.lrs) != 1:
        sys.exit("error: the seeds phase runs one setting: give one --optimizers and one --lrs")
    runs = [Run(a.optimizers[0], a.lrs[0], a.length, seed) for seed in a.seeds]
    for run in runs:
        train(a, run)
        probe(a, run)
        probe(a, run, random_encoder=True)
    for seed in a.seeds[1:]:
        probe(a, runs[0], (f'--seed={seed}',))
    done = [s for s in (load(a, r) for r in runs) if s and {'default', 'random'} <= set(s['probes'])]
    if not a.dry_run and done:
        report_seeds(a, done)


def report_seeds(a, done):
    heads = ('attentive', 'linear')
    lines = [f"# `{os.path.relpath(a.config, ROOT)}` over {len(done)} seeds", '',
             f"{done[0]['optimizer']}, lr {done[0]['lr']:g}, {done[0]['iters']} steps; probes "
             f"`{' '.join((a.probe_config, *a.probe_args))}`, probe seed = pretraining seed. "
             "Made by `python scripts/study.py seeds`.", '',
             '| seed | final val loss | attentive | random encoder | margin | linear | random encoder | margin |',
             '|---|---|---|---|---|---|---|---|']
    margin = {h: [s['probes']['default'][h] - s['probes']['random'][h] for s in done] for h in heads}
    for i, s in enumerate(done):
        cells = [str(s['seed']), f"{s['final_val']:.4f}"]
        for h in heads:
            cells += [f"{s['probes']['default'][h]:.3f}", f"{s['probes']['random'][h]:.3f}", f"{margin[h][i]:+.3f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    cells = ['mean ± SD', fmt(mean_sd([s['final_val'] for s in done]), 4)]
    for h in heads:
        cells += [fmt(mean_sd([s['probes'][k][h] for s in done]), 3) for k in ('default', 'random')]
        cells.append(fmt(mean_sd(margin[h]), 3))
    lines += ['| ' + ' | '.join(cells) + ' |', '']
    first = done[0]
    same = {k: v for k, v in first['probes'].items() if k == 'default' or k.startswith('seed=')}
    if len(same) > 1:
        lines += [f"Seed {first['seed']}'s encoder under {len(same)} probe seeds (probe weights, data order, "
                  "and the built-in data set's draw):", '']
        for h in heads:
            probe_sd = mean_sd([p[h] for p in same.values()])
            total_sd = mean_sd([s['probes']['default'][h] for s in done])
            lines.append(f"- {h}: {', '.join(f'{p[h]:.3f}' for p in same.values())}; SD {probe_sd[1]:.3f} "
                         f"against {total_sd[1]:.3f} across pretraining seeds (pretraining and probe seed both "
                         f"changing): the probe seed alone accounts for roughly "
                         f"{min(1.0, probe_sd[1] ** 2 / total_sd[1] ** 2):.0%} of the variance (a ratio of two "
                         f"variances from {probe_sd[2]} and {total_sd[2]} values: a rough share).")
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, 'seeds.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def floor_probes(a):
    """The probes' floor, {seed: probes} per seed that has it: a random encoder of the Muon
    row's architecture (fresh weights), probed beside that seed's Muon run at the short length."""
    lr = tuned_lr(a, 'muon', a.length)
    runs = [load(a, Run('muon', lr, a.length, s)) for s in a.seeds] if lr else []
    return {r['seed']: r['probes']['random'] for r in runs if r and 'random' in r['probes']}


def table_runs(a, row, seed):
    return Run(row.optimizer, best_lr(a, row.optimizer, a.length), a.length, seed, row.flags)


def tables(a):
    """Each table's rows at 3 seeds, each probed; a random encoder per seed (the Muon
    run's architecture, fresh weights) as the probes' floor. Seed 0 of a row
    without flags is its sweep's best run."""
    for name in a.tables:
        for seed in a.seeds:
            for row in TABLES[name]:
                run = table_runs(a, row, seed)
                train(a, run)
                probe(a, run, row.probe)
            if name != 'probe_optimizer':
                probe(a, table_runs(a, TABLES['papers'][0], seed), random_encoder=True)


# -----------------------------------------------------------------------------
# tuning beyond the lr (the real-data study): coordinate-wise, one hyperparameter at a time

KNOBS = {  # in the order they are tuned; what is held fixed: report's HELD
    'adamw': (Knob('lr', (1e-3, 2e-3, 4e-3, 8e-3)), Knob('beta2', (0.95, 0.99, 0.999)),
              Knob('weight_decay', (0.0, 0.05, 0.1, 0.2), floor=0.0), Knob('warmup_epochs', (0.5, 1.0, 2.0))),
    'muon': (Knob('lr', (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
             Knob('adamw_lr', lambda best: (best['lr'] / 4, best['lr'] / 2, best['lr'])),
             Knob('muon_weight_decay', (0.0, 0.05, 0.1, 0.2), floor=0.0), Knob('warmup_epochs', (0.5, 1.0, 2.0))),
}


def defaults(a, optimizer):
    """The config's value of every knob of optimizer: the untuned setting."""
    c = harness.configure([a.config, f'--optimizer={optimizer}'], train_mae.CONFIG)
    return dict(lr=c['lr'], beta2=c['betas'][1], weight_decay=c['weight_decay'], warmup_epochs=c['warmup_epochs'],
                adamw_lr=c['adamw_lr'], muon_weight_decay=c['muon_weight_decay'], beta1=c['betas'][0])


def setting_run(a, optimizer, setting, iters, seed=0):
    """The Run of a setting {knob: value}: a flag for each knob off the config's value (an
    adamw_lr equal to the lr is the tied default), so the untuned setting is the plain run."""
    base, flags = defaults(a, optimizer), []
    for knob in KNOBS[optimizer][1:]:
        value = setting[knob.key]
        if value == base[knob.key] or knob.key == 'adamw_lr' and value == setting['lr']:
            continue
        flags.append(f"--betas=({base['beta1']!r},{value!r})" if knob.key == 'beta2' else f"--{knob.key}={value!r}")
    return Run(optimizer, setting['lr'], iters, seed, tuple(sorted(flags)))


def sweep_knob(a, optimizer, iters, setting, knob, values, wait, make=None):
    """Train setting with knob at each of values (make(setting, value) -> the setting of a
    value; by default the knob set to it), widened while the best lies on an edge.
    Returns (best value, {value: summary}); (None, the finished ones) while runs are missing:
    in a report (wait=False), or never when waiting (another process's runs are polled)."""
    values = sorted({float(f"{v:.6g}") for v in values})
    make = make or (lambda setting, v: {**setting, knob.key: v})
    while True:
        runs = {v: setting_run(a, optimizer, make(setting, v), iters) for v in values}
        done = {v: train(a, run) if wait else load(a, run) for v, run in runs.items()}  # None: another process's
        if any(s is None for s in done.values()):
            if not wait or a.dry_run:
                return None, {v: s for v, s in done.items() if s}
            time.sleep(30)
            continue
        best, inside, more = bracket(knob, {v: s['final_val'] for v, s in done.items()})
        if inside or more is None:
            return best, done
        values.append(more)


def coordinate_tune(a, optimizer, iters, wait=True, trace=None):
    """One hyperparameter at a time, each swept holding the others at their current best,
    bracketed; passes repeat (each knob at its best and its neighbours in the previous
    pass's grid) until a pass changes nothing. Returns the tuned setting, or None while
    unfinished. trace: a list that receives (pass, knob, {value: summary}, best)."""
    base = defaults(a, optimizer)
    setting = {knob.key: base[knob.key] for knob in KNOBS[optimizer]}
    grids = {}
    for n in range(1, 6):
        changed = False
        for knob in KNOBS[optimizer]:
            if n == 1:
                values = knob.grid(setting) if callable(knob.grid) else knob.grid
            else:  # the best and its neighbours in the previous pass's values
                ladder = sorted(grids[knob.key], key=lambda v: 1 - v if knob.key == 'beta2' else v)
                i = ladder.index(setting[knob.key]) if setting[knob.key] in ladder else None
                values = ladder[max(0, i - 1):i + 2] if i is not None else [setting[knob.key]]
            best, done = sweep_knob(a, optimizer, iters, setting, knob, values, wait)
            if trace is not None:
                trace.append((n, knob.key, done, best))
            if best is None:
                return None
            grids[knob.key] = sorted(set(grids.get(knob.key, [])) | set(done))
            tied = knob.key == 'adamw_lr' and setting[knob.key] == 0 and best == setting['lr']  # the same runs
            changed |= best != setting[knob.key] and not tied
            setting[knob.key] = best
        if not changed:
            return setting
    return setting


def tune_all(a):
    """Each of --optimizers tuned at the short length (coordinate_tune)."""
    for optimizer in a.optimizers:
        setting = coordinate_tune(a, optimizer, a.length)
        print(f"{optimizer} at {a.length} steps: {setting}")


def with_lr(setting, lr):
    """setting with its peak lr moved to lr; an untied AdamW side moves with it (its ratio kept)."""
    side = setting.get('adamw_lr')
    return {**setting, 'lr': lr, **({'adamw_lr': float(f"{side * lr / setting['lr']:.6g}")} if side else {})}


def length_settings(a, optimizer, wait=True, trace=None):
    """{iters: the tuned setting} at the short length and at 4x and 16x it: the short length's
    tuned setting with its lr re-tuned at each longer length (from half, once and twice the
    previous length's best, bracketed). Stops at the first length not finished (report)."""
    setting = coordinate_tune(a, optimizer, a.length, wait, trace)
    out = {a.length: setting} if setting else {}
    for iters in (4 * a.length, 16 * a.length):
        if setting is None:
            break
        lr = setting['lr']
        best, done = sweep_knob(a, optimizer, iters, setting, KNOBS[optimizer][0], (lr / 2, lr, 2 * lr), wait,
                                make=with_lr)
        if trace is not None:
            trace.append((iters, 'lr', done, best))
        setting = with_lr(setting, best) if best is not None else None
        if setting:
            out[iters] = setting
    return out


def checks(a, optimizer, tuned, trace):
    """At the longest length, one run per knob besides the lr: the knob moved to its
    runner-up side at the short length (the neighbour with the lower loss there; up from a
    floor). {knob: Run}."""
    last = {key: (done, best) for _, key, done, best in trace}  # each knob's final sweep at the short length
    out = {}
    for knob in KNOBS[optimizer][1:]:
        done, best = last[knob.key]
        ladder = sorted(done, key=lambda v: 1 - v if knob.key == 'beta2' else v)
        i = ladder.index(best)
        sides = [ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder)]
        value = min(sides, key=lambda v: done[v]['final_val'])
        out[knob.key] = setting_run(a, optimizer, {**tuned, knob.key: value}, 16 * a.length)
    return out


def row_run(a, row, seed, settings):
    """A table row in the tuned study: its optimizer's tuned setting at 4x the short length
    (settings: {optimizer: setting}), plus the row's flags."""
    run = setting_run(a, row.optimizer, settings[row.optimizer], 4 * a.length, seed)
    return run._replace(flags=tuple(sorted(run.flags + row.flags)))


def tuned_at(a, iters):
    """{optimizer: its tuned setting at iters steps} of AdamW and Muon, None where unfinished."""
    return {o: length_settings(a, o, wait=False).get(iters) for o in ('adamw', 'muon')}


def rows(a):
    """The tuned study's tables (--tables; the blog's rows and its probe experiment) at 4x the
    short length, each row at its optimizer's tuned setting there, --seeds seeds, probed."""
    settings = tuned_at(a, 4 * a.length)
    if None in settings.values():
        sys.exit(f"error: AdamW's or Muon's setting at {4 * a.length} steps is not tuned yet: run tune and scale first")
    for seed in a.seeds:
        for name in a.tables:
            for row in TABLES[name]:
                run = row_run(a, row, seed, settings)
                train(a, run)
                probe(a, run, row.probe)


def scale(a):
    """The real-data protocol after tune, for each of --optimizers: the lr re-tuned at 4x and
    16x the short length; every length's tuned setting at --seeds seeds, each encoder probed
    (and, beside AdamW's short runs, per seed, a random encoder and the pixels: the floors);
    then, at 16x, one check of each other tuned knob."""
    for optimizer in a.optimizers:
        settings = length_settings(a, optimizer)
        for iters, setting in settings.items():
            for seed in a.seeds:
                run = setting_run(a, optimizer, setting, iters, seed)
                train(a, run)
                probe(a, run)
                if iters == a.length and optimizer == 'adamw':  # the floors, once per seed (beside AdamW's runs)
                    probe(a, run, random_encoder=True)
                    probe(a, run, ('--pixels=True', '--head=linear'))
        if 16 * a.length in settings:
            trace = []
            coordinate_tune(a, optimizer, a.length, wait=False, trace=trace)
            for run in checks(a, optimizer, settings[16 * a.length], trace).values():
                train(a, run)


# -----------------------------------------------------------------------------
# the report

def mean_sd(xs):
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan, len(xs))


def fmt(m, digits):
    return '–' if m is None else f"{m[0]:.{digits}f}" + (f" ± {m[1]:.{digits}f}" if m[2] > 1 else '') + f" ({m[2]})"


def pooled_sd(sds):
    """Rows' seed SDs pooled (root mean square), leaving out rows of one seed (nan)."""
    sds = [s for s in sds if not math.isnan(s)]
    return math.sqrt(np.mean(np.square(sds))) if sds else math.nan


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228}  # Student's t quantile 0.975 by degrees of freedom: a two-sided 5% test


def resolution(sds, n):
    """The smallest difference of two rows' means that the paired test below marks, with the
    table's pooled seed SD and independent seeds: t(0.975, n-1) * sqrt(2 / n) * sd."""
    return T_975[n - 1] * math.sqrt(2 / n) * pooled_sd(sds) if n > 1 else math.nan


def by_seed(runs, get):
    """{seed: get(summary)} over the runs (summaries) where get finds a value."""
    return {r['seed']: v for r in runs for v in [get(r)] if v is not None}


def delta(xs, ys, digits):
    """The mean of xs - ys over the seeds both have ({seed: value} each), marked * where a
    paired t-test rejects a zero mean at 5% two-sided: |mean| > t(0.975, n-1) * SD / sqrt(n).
    Runs of one seed share initial weights, data order and masks, so pairing removes what
    they share; when nothing differs, 1 comparison in 20 is marked by chance."""
    d = [xs[s] - ys[s] for s in sorted(set(xs) & set(ys))]
    if not d:
        return '–'
    marked = len(d) > 1 and abs(np.mean(d)) > T_975[len(d) - 1] * np.std(d, ddof=1) / math.sqrt(len(d))
    return f"{np.mean(d):+.{digits}f}" + (' *' if marked else '')


METRICS = (('val', 5), ('attentive', 3), ('linear', 3))  # a table's columns: key, digits
HEADS = ('attentive', 'linear')


def report_table(a, name, run_of=None, floor=None):
    """A table's text and stats: run_of(row, seed) -> its Run (default: the built-in study's
    table_runs), floor: {seed: random-encoder probes} (default: floor_probes)."""
    run_of = run_of or (lambda row, seed: table_runs(a, row, seed))
    rows, lines = TABLES[name], []
    stats = []
    for row in rows:
        runs = [load(a, run_of(row, seed)) for seed in a.seeds]
        runs = [r for r in runs if r is not None]
        key = '_'.join(f.lstrip('-') for f in row.probe) or 'default'
        seeds = dict(val=by_seed(runs, lambda r: r['final_val']),
                     **{head: by_seed(runs, lambda r: r['probes'].get(key, {}).get(head)) for head in HEADS})
        probes = [r['probes'][key] for r in runs if key in r['probes']]
        stats.append(dict(row=row, runs=runs, seeds=seeds, edge=sum(bool(p['warning']) for p in probes),
                          probe_s=sum(p['probe_s'] for p in probes)))
    if name != 'probe_optimizer':
        floor = floor_probes(a) if floor is None else floor
        stats.append(dict(row=Row('random encoder (floor)', 'muon'), runs=[], edge=0,
                          probe_s=sum(p['probe_s'] for p in floor.values()),
                          seeds=dict(val={}, **{head: {s: p[head] for s, p in floor.items()} for head in HEADS})))
    for s in stats:  # mean ± SD (n) of each metric, None where no seed has it
        s.update({key: mean_sd(list(s['seeds'][key].values())) if s['seeds'][key] else None for key, _ in METRICS})
    base = stats[0]
    lines += ['| row | optimizer, lr | final val loss | Δ | attentive top-1 | Δ | linear top-1 | Δ | blog |',
              '|' + '---|' * 9]
    for i, s in enumerate(stats):
        row = s['row']
        lr = f"{row.optimizer} {run_of(row, 0).lr:g}" if s['runs'] else '–'
        cells = [row.name + (f" (`{' '.join(row.flags + row.probe)}`)" if row.flags or row.probe else ''), lr]
        for key, digits in METRICS:
            cells += [fmt(s[key], digits), 'baseline' if i == 0 else delta(s['seeds'][key], base['seeds'][key], digits)]
        lines.append('| ' + ' | '.join(cells + [row.blog or '–']) + ' |')
    n = min((s['val'][2] for s in stats if s['val']), default=0)  # the seeds every row has so far
    train_s = {r['name']: r['train_s'] for s in stats for r in s['runs']}  # a run in two rows trained once
    res = {key: resolution([s[key][1] for s in stats if s[key]], n) for key, _ in METRICS}
    lines += ['', f"Mean ± sample SD over seeds (n); final val loss = at the last step. Δ against the first row, "
              f"the mean of the differences seed by seed; * where a paired t-test rejects no difference at 5% "
              f"two-sided (|Δ| > t·SD/√n of the seed differences, t = {T_975.get(n - 1, math.nan)} at {n} seeds), so "
              f"about 1 comparison in 20 is marked when nothing differs. With {n} seeds and this table's pooled seed "
              f"SD, the smallest difference of two rows it marks (t·sqrt(2/n)·SD) is **{res['val']:.5f}** in val loss, "
              f"**{res['attentive']:.3f}** attentive and **{res['linear']:.3f}** linear top-1 (the blog's architecture "
              f"effects: 0.0001-0.0009 in val loss). Probe best on the grid's edge: "
              f"{sum(s['edge'] for s in stats)} of {sum(len(s['runs']) for s in stats)} encoders. Machine time: "
              f"{sum(train_s.values()) / 60:.0f} min training, {sum(s['probe_s'] for s in stats) / 60:.0f} min probing, "
              "one core per run (a run shared with another table counted in each)."]
    floor = stats[-1] if name != 'probe_optimizer' else None
    below = [f"{s['row'].name} ({head})" for s in stats[:-1] for head in ('attentive', 'linear')
             if floor and s[head] and floor[head] and s[head][0] <= floor[head][0]]
    if below:
        lines.append(f"Not above the random encoder's mean, so no evidence of a learnt representation: "
                     f"{', '.join(below)}.")
    rows = [s for s in stats[1:] if s['runs']]  # the pairs the Δ column leaves out: rows other than the baseline
    pairs = [f"{t['row'].name} - {s['row'].name}: {key} {delta(t['seeds'][key], s['seeds'][key], digits)}"
             for key, digits in METRICS
             for i, s in enumerate(rows) for t in rows[i + 1:]
             if delta(t['seeds'][key], s['seeds'][key], digits).endswith('*')]
    tried = len(METRICS) * len(rows) * (len(rows) - 1) // 2
    if tried:
        lines.append(f"Pairs of the other rows marked by the same paired test, of {tried} comparisons ({tried // 3} "
                     f"each in val loss, attentive and linear top-1; about {tried / 20:.1f} marked by chance when "
                     f"nothing differs): {'; '.join(pairs) if pairs else 'none'}.")
    return '\n'.join(lines), stats


def best_run(runs):
    """runs {lr: summary} of a sweep: (best lr, its final val loss, whether it is inside)."""
    best, inside, _ = bracket(LR, {lr: r['final_val'] for lr, r in runs.items()})
    return best, runs[best]['final_val'], inside


INTERPOLATIONS = {  # (x of a length, y of a loss) in which a curve is a straight line between two lengths
    'log-linear': (math.log, lambda v: v),  # the loss linear in log(steps)
    'linear': (lambda n: n, lambda v: v),  # linear in steps
    'power law': (math.log, math.log),  # log(loss) linear in log(steps)
}


def steps_to_reach(points, target, rule='log-linear'):
    """The run length at which a curve of (length, final val loss) points, decreasing
    with length, reaches target: interpolated between the two lengths around it, straight
    in the coordinates of INTERPOLATIONS[rule]. None if no length reaches it (and the
    longest is a lower bound), 0 if all do."""
    fx, fy = INTERPOLATIONS[rule]
    points = sorted(points)
    if points[0][1] <= target:
        return 0.0
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if v0 > target >= v1:
            x = fx(n0) + (fy(v0) - fy(target)) / (fy(v0) - fy(v1)) * (fx(n1) - fx(n0))
            return math.exp(x) if fx is math.log else x
    return None


def lengths_section(a, sweeps):
    """AdamW against Muon at each length, each at its best lr, and Muon's speedup."""
    L = a.length
    lines = ['## 2. AdamW vs Muon at the end of training, each at its own best lr', '',
             '| steps | AdamW: best lr, final val (seed 0) | Muon: best lr, final val (seed 0) '
             '| AdamW at its best lr, seeds | Muon at its best lr, seeds | Muon - AdamW |', '|---|---|---|---|---|---|']
    mean, tuned = {}, set()  # (optimizer, iters) -> mean_sd of the final val over the seeds at the best lr
    finals = {}  # (optimizer, iters) -> {seed: final val}
    probed = {}  # (optimizer, iters) -> {head: mean_sd of the best top-1 over the probed seeds}
    for iters in (L, 2 * L, 4 * L):
        cells = []
        for optimizer in ('adamw', 'muon'):
            if (optimizer, iters) in sweeps:
                lr, v, inside = best_run(sweeps[optimizer, iters])
                tuned |= {(optimizer, iters)} if inside else set()
                cells.append(f"{lr:g}, {v:.4f}" + ('' if inside else ' (best on the edge)'))
                runs = [r for r in (load(a, Run(optimizer, lr, iters, s)) for s in a.seeds) if r]
                finals[optimizer, iters] = by_seed(runs, lambda r: r['final_val'])
                mean[optimizer, iters] = mean_sd(list(finals[optimizer, iters].values()))
                probes = [r['probes']['default'] for r in runs if 'default' in r['probes']]
                if probes:
                    probed[optimizer, iters] = {h: mean_sd([p[h] for p in probes]) for h in ('attentive', 'linear')}
            else:
                cells.append('–')
        cells += [fmt(mean.get((o, iters)), 4) for o in ('adamw', 'muon')]
        both = ('muon', iters) in mean and ('adamw', iters) in mean
        cells.append(delta(finals['muon', iters], finals['adamw', iters], 4) if both else '–')
        lines.append(f"| {iters} | {' | '.join(cells)} |")
    lines += ['', "The lr is the seed-0 sweep's best; the seed columns are mean ± sample SD (n) at that lr; "
              "Δ is the mean of the seed-by-seed differences, marked * where a paired t-test rejects no difference "
              "at 5% two-sided."]
    lines += probes_by_length(a, probed)
    adamw = [(n, mean[o, n][0]) for o, n in sorted(tuned) if o == 'adamw']
    if ('muon', L) not in mean or not adamw:
        return lines
    sd = pooled_sd([m[1] for m in mean.values()])  # one run's seed noise, pooled over the rows above
    n_target, n_adamw = mean['muon', L][2], min(mean[o, n][2] for o, n in tuned if o == 'adamw')
    target, noise = mean['muon', L][0], 2 * sd * math.sqrt(1 / n_target + 1 / n_adamw)
    lines += ['', f"**Muon's speedup**: the AdamW run length (each length at its own best lr) that reaches Muon's "
              f"mean final val loss at {L} steps ({target:.4f}, {n_target} seeds), over {L}; interpolated linearly in "
              f"log(steps) between the seed means of AdamW's lengths whose sweep has its best inside "
              f"({', '.join(str(n) for n, _ in adamw)}; seeds each: at least {n_adamw}). "
              f"Its range moves the target by ±2·SD·sqrt(1/{n_target} + 1/{n_adamw}) = ±{noise:.4f}, SD = {sd:.4f} "
              f"the seed SD of one run's final val loss pooled over the rows above that have seeds."]

    def speedup(t):
        e = steps_to_reach(adamw, t)
        return (f"more than {max(n for n, _ in adamw) / L:g}x (no AdamW length reaches it)" if e is None else
                f"at most {min(n for n, _ in adamw) / L:g}x (every AdamW length reaches it)" if e == 0 else
                f"{e / L:.2f}x")
    lines.append(f"Estimate: **{speedup(target)}**" + ('' if math.isnan(sd) else
                 f" (from {speedup(target + noise)} with the target up by the noise to {speedup(target - noise)} "
                 f"with it down)") + '.')
    longest = max(n for n, _ in adamw)
    for iters in (2 * L, 4 * L):
        if ('muon', iters) in mean and steps_to_reach(adamw, mean['muon', iters][0]) is None:
            lines.append(f"Muon's mean final val loss at {iters} steps ({mean['muon', iters][0]:.4f}): no AdamW run "
                         f"length reaches it (the longest, {longest} steps, ends at {dict(adamw)[longest]:.4f}).")
    lines += long_run(a, {n: mean['muon', n][0] for n in (L, 4 * L) if ('muon', n) in mean})
    return lines


def long_run(a, targets):
    """The `long` phase's AdamW run (16x, at the 4x best lr, seed 0) against Muon's seed means
    targets {length: loss}: where along its val curve it first reaches each."""
    lr = tuned_lr(a, 'adamw', 4 * a.length)
    run = load(a, Run('adamw', lr, 16 * a.length)) if lr else None
    if run is None:
        return []
    curve = sorted((int(k), v) for k, v in run['curve'].items())
    reached = [f"Muon's {n}-step mean ({t:.4f}) " + next((f"first at step {k}" for k, v in curve if v <= t),
                                                         "never") for n, t in sorted(targets.items())]
    return ['', f"**AdamW at {16 * a.length} steps** (lr {lr:g}, the {4 * a.length}-step best; seed 0; "
            f"{run['train_s'] / 3600:.1f} core-hours): final val loss {run['final_val']:.4f}; along its val curve "
            f"(every {curve[1][0] - curve[0][0]} steps) it reaches " + '; '.join(reached) + '.']


def probes_by_length(a, probed):
    """The same runs' encoders probed: whether the loss's ordering holds for the representation."""
    if not probed:
        return []
    lines = ['', '| steps | attentive: AdamW | attentive: Muon | linear: AdamW | linear: Muon |', '|---|---|---|---|---|']
    for iters in sorted({n for _, n in probed}):
        cells = [fmt(probed.get((o, iters), {}).get(h), 3) for h in ('attentive', 'linear') for o in ('adamw', 'muon')]
        lines.append(f"| {iters} | {' | '.join(cells)} |")
    floor = floor_probes(a)
    lines += ['', "Best probe top-1 (`" + ' '.join((a.probe_config, *a.probe_args)) + "`), mean ± sample SD (n), of the "
              "runs above" + (f"; a random encoder: attentive {fmt(mean_sd([p['attentive'] for p in floor.values()]), 3)}, "
                              f"linear {fmt(mean_sd([p['linear'] for p in floor.values()]), 3)}" if floor else '') + '.']
    return lines


def unready_tables(a):
    """{table: the optimizers without a tuned lr at the short length} for the tables that cannot run yet."""
    missing = {name: sorted({r.optimizer for r in TABLES[name] if tuned_lr(a, r.optimizer, a.length) is None})
               for name in a.tables}
    return {name: m for name, m in missing.items() if m}


def report(a):
    os.makedirs(a.results, exist_ok=True)
    parts = ['# The small-scale study', '', f"Config `{os.path.relpath(a.config, ROOT)}`, short length {a.length} "
             f"steps; probes `{' '.join((a.probe_config, *a.probe_args))}`. Made by `python scripts/study.py report`. "
             "Wall times: one core per run, as measured, on whatever else the machine was doing.", '']
    done = summaries(a)
    parts += [f"Machine time of all {len(done)} runs so far: {sum(r['train_s'] for r in done) / 3600:.1f} core-hours "
              f"training, {sum(p['probe_s'] for r in done for p in r['probes'].values()) / 3600:.1f} probing.", '']
    sweeps = {}
    parts += ['## 1. Peak-lr sweeps (seed 0, final val loss)', '']
    for iters in (a.length, 2 * a.length, 4 * a.length):
        for optimizer in OPTIMIZERS:
            runs = sweep_runs(a, optimizer, iters)
            if runs:
                sweeps[optimizer, iters] = runs
                best, _, inside = best_run(runs)
                cells = [f"{'**' if lr == best else ''}{lr:g}: {runs[lr]['final_val']:.4f}{'**' if lr == best else ''}"
                         for lr in sorted(runs)]
                inside = 'inside' if inside else 'ON THE EDGE'
                minutes = sum(r['train_s'] for r in runs.values()) / 60
                parts.append(f"- {optimizer}, {iters} steps: {', '.join(cells)} (best {inside}; {minutes:.0f} min)")
    parts.append('')
    unready = unready_tables(a)
    tables = {name: report_table(a, name) for name in a.tables if name not in unready}  # name -> (text, stats)
    parts += lengths_section(a, sweeps) + ['']
    for name, (text, _) in tables.items():
        parts += [f"## {name}", '', text, '']
    parts += [f"## {name}\n\nNot run yet: it needs the sweeps of {', '.join(missing)}.\n"
              for name, missing in unready.items()]
    with open(os.path.join(a.results, 'study.md'), 'w') as f:
        f.write('\n'.join(parts) + '\n')
    print('\n'.join(parts))
    plots(a, sweeps, {name: stats for name, (_, stats) in tables.items()})


HELD = {  # what the tuned protocol holds fixed, besides the config's model, data, batch and mask ratio
    'adamw': "beta1 0.9, eps 1e-8, warmup from lr/3 then cosine to 0",
    'muon': ("momentum 0.95, Nesterov, 5 Newton-Schulz steps, lr adjusted match_rms_adamw; its AdamW side's betas "
             "(0.9, beta2 of the config) and weight decay (0.05 of the config, which there reaches only the patch "
             "conv: norms, biases and the mask token never decay); warmup from lr/3 then cosine to 0"),
}


def report_tuned(a):
    """The real-data study's report (tune, scale): results/<...>/study.md."""
    os.makedirs(a.results, exist_ok=True)
    L = a.length
    parts = [f"# The tuned study: `{os.path.relpath(a.config, ROOT)}`", '',
             f"Short length {L} steps, then {4 * L} and {16 * L}; probes `{' '.join((a.probe_config, *a.probe_args))}`. "
             "Made by `python scripts/study.py report_tuned`. Wall times: one core per run, as measured, two runs at a "
             "time.", '']
    done = summaries(a)
    parts += [f"Machine time of all {len(done)} runs so far: {sum(r['train_s'] for r in done) / 3600:.1f} core-hours "
              f"training, {sum(p['probe_s'] for r in done for p in r['probes'].values()) / 3600:.1f} probing.", '']
    settings, traces = {}, {}
    parts += ['## 1. Tuning at the short length (seed 0, final val loss)', '',
              "One hyperparameter at a time, holding the others at their best so far; each grid widened at the edge "
              "holding its best until the best is inside (or on a floor: a weight decay of 0); passes repeat, each "
              "knob over its best and its neighbours, until a pass changes nothing.", '']
    for optimizer in KNOBS:
        trace = []
        settings[optimizer] = length_settings(a, optimizer, wait=False, trace=trace)
        traces[optimizer] = trace
        for n, key, runs, best in trace:
            if key == 'lr' and isinstance(n, int) and n > L:
                continue  # a longer length's lr sweep: section 2
            cells = [f"{'**' if v == best else ''}{v:g}: {r['final_val']:.4f}{'**' if v == best else ''}"
                     for v, r in sorted(runs.items())]
            parts.append(f"- {optimizer}, pass {n}, {key}: {', '.join(cells)}" + ('' if best is not None else
                         ' (unfinished)'))
        tuned = settings[optimizer].get(L)
        parts += ['', f"{optimizer} tuned at {L} steps: " + (', '.join(f"{k} {v:g}" for k, v in tuned.items())
                  if tuned else 'unfinished') + f". Held fixed: {HELD[optimizer]}.", '']
    floors = tuned_floors(a, settings)
    parts += lengths_tuned(a, settings, traces, floors)
    at = {o: settings[o].get(4 * L) for o in ('adamw', 'muon')}
    for name in (n for n in a.tables if n != 'papers'):
        if None not in at.values():
            text, _ = report_table(a, name, lambda row, seed: row_run(a, row, seed, at), floors['random'])
            parts += [f"## {name}, at {4 * L} steps", '', text, '']
    with open(os.path.join(a.results, 'study.md'), 'w') as f:
        f.write('\n'.join(parts) + '\n')
    print('\n'.join(parts))


def tuned_floors(a, settings):
    """The probes' floors of the tuned study, {'random': {seed: probes}, 'pixels': {seed: probes}}:
    probed beside AdamW's runs at its tuned short-length setting (scale)."""
    setting = settings['adamw'].get(a.length)
    runs = [r for r in (load(a, setting_run(a, 'adamw', setting, a.length, s)) for s in a.seeds) if r] if setting else []
    return {name: {r['seed']: r['probes'][key] for r in runs if key in r['probes']}
            for name, key in (('random', 'random'), ('pixels', 'pixels=True_head=linear'))}


def lengths_tuned(a, settings, traces, floor):
    """Section 2: AdamW against Muon at each length, each at its tuned setting, paired by seed;
    the lr sweeps of the longer lengths, the checks at the longest, the speedup, the probes."""
    L = a.length
    lines = ['## 2. AdamW vs Muon at each length, each at its own tuned setting', '',
             '| steps | AdamW: lr, final val (seeds) | Muon: lr, final val (seeds) | Muon - AdamW (paired) |',
             '|---|---|---|---|']
    finals, runs_at = {}, {}
    for iters in (L, 4 * L, 16 * L):
        cells = []
        for optimizer in ('adamw', 'muon'):
            setting = settings[optimizer].get(iters)
            runs = [r for r in (load(a, setting_run(a, optimizer, setting, iters, s)) for s in a.seeds) if r] \
                if setting else []
            runs_at[optimizer, iters] = runs
            finals[optimizer, iters] = by_seed(runs, lambda r: r['final_val'])
            cells.append(f"{setting['lr']:g}, {fmt(mean_sd(list(finals[optimizer, iters].values())), 4)}"
                         if runs else '–')
        lines.append(f"| {iters} | {' | '.join(cells)} | {delta(finals['muon', iters], finals['adamw', iters], 4)} |")
    lines += ['', "Each length's lr re-tuned around the previous length's best (half, once, twice; widened at an "
              "edge), the other knobs held at the short length's tuned values (an untied AdamW-side lr keeps its "
              "ratio to Muon's):", '']
    for optimizer, trace in traces.items():
        for iters, key, runs, best in trace:
            if key == 'lr' and iters > L:
                lines.append(f"- {optimizer}, {iters} steps: " + ', '.join(
                    f"{'**' if v == best else ''}{v:g}: {r['final_val']:.4f}{'**' if v == best else ''}"
                    for v, r in sorted(runs.items())))
    checked = []
    for optimizer, trace in traces.items():
        longest = settings[optimizer].get(16 * L)
        base = load(a, setting_run(a, optimizer, longest, 16 * L)) if longest else None
        short = [t for t in trace if not (t[1] == 'lr' and t[0] > L)]
        if base is None or len(short) < len(KNOBS[optimizer]):
            continue
        for key, run in checks(a, optimizer, longest, short).items():
            s = load(a, run)
            if s:
                verdict = 'holds' if s['final_val'] > base['final_val'] else 'DOES NOT HOLD'
                checked.append(f"- {optimizer}, {key}: {run.name}: {s['final_val']:.4f} against the tuned "
                               f"{base['final_val']:.4f} (seed 0): the short length's value {verdict}")
    if checked:
        lines += ['', f"Checks at {16 * L} steps, each tuned knob moved one grid step to its runner-up side:", ''] + checked
    adamw = [(n, mean_sd(list(finals['adamw', n].values()))[0]) for n in (L, 4 * L, 16 * L) if finals['adamw', n]]
    if finals['muon', L] and adamw:
        target = mean_sd(list(finals['muon', L].values()))[0]
        estimates = {rule: steps_to_reach(adamw, target, rule) for rule in INTERPOLATIONS}

        def show(e):
            return (f"more than {max(n for n, _ in adamw) / L:g}x" if e is None else
                    f"at most {min(n for n, _ in adamw) / L:g}x" if e == 0 else f"{e / L:.2f}x")
        lines += ['', f"**Muon's speedup**: the AdamW run length that reaches Muon's mean final val loss at {L} steps "
                  f"({target:.4f}), over {L}, by rule of interpolation between AdamW's seed means at "
                  f"{', '.join(str(n) for n, _ in adamw)} steps: " +
                  '; '.join(f"{rule} {show(e)}" for rule, e in estimates.items()) + '.']
    probed = {k: [r['probes']['default'] for r in runs if 'default' in r['probes']] for k, runs in runs_at.items()}
    if any(probed.values()):
        lines += ['', '| steps | attentive: AdamW | attentive: Muon | linear: AdamW | linear: Muon |',
                  '|---|---|---|---|---|']
        for iters in (L, 4 * L, 16 * L):
            cells = [fmt(mean_sd([p[h] for p in probed['adamw' if o == 'adamw' else 'muon', iters]]), 3)
                     if probed[o, iters] else '–' for h in HEADS for o in ('adamw', 'muon')]
            lines.append(f"| {iters} | {' | '.join(cells)} |")
        lines += ['', "Best probe top-1, mean ± sample SD (n). Floors, per seed: a random encoder (attentive "
                  f"{fmt(mean_sd([p['attentive'] for p in floor['random'].values()]), 3) if floor['random'] else '–'}, "
                  f"linear {fmt(mean_sd([p['linear'] for p in floor['random'].values()]), 3) if floor['random'] else '–'})"
                  f" and the pixels through the linear probe (a logistic regression: "
                  f"{fmt(mean_sd([p['linear'] for p in floor['pixels'].values()]), 3) if floor['pixels'] else '–'}). "
                  "Margins over the floors, paired by seed:", '']
        for (optimizer, iters), runs in runs_at.items():
            mine = {h: by_seed(runs, lambda r: r['probes'].get('default', {}).get(h)) for h in HEADS}
            if not mine['linear']:
                continue
            vs = [f"random {h} {delta(mine[h], {s: p[h] for s, p in floor['random'].items()}, 3)}" for h in HEADS]
            vs.append(f"pixels linear {delta(mine['linear'], {s: p['linear'] for s, p in floor['pixels'].items()}, 3)}")
            lines.append(f"- {optimizer}, {iters} steps: {'; '.join(vs)}")
    return lines + ['']


def plots(a, sweeps, tables):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plots skipped: matplotlib is not importable ({e})")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (optimizer, iters), runs in sorted(sweeps.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lrs = sorted(runs)
        ax.plot(lrs, [runs[lr]['final_val'] for lr in lrs], 'o-' if iters == a.length else 's--',
                label=f"{optimizer}, {iters} steps")
    ax.set(xscale='log', xlabel='peak lr', ylabel='final val loss', title='lr sensitivity (seed 0)')
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(a.results, 'lr_sensitivity.png'), dpi=120, bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (optimizer, iters), runs in sorted(sweeps.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lr, _, _ = best_run(runs)
        curve = {int(k): v for k, v in runs[lr]['curve'].items()}
        ax.plot(sorted(curve), [curve[k] for k in sorted(curve)], '-' if optimizer == 'muon' else '--',
                label=f"{optimizer}, {iters} steps, lr {lr:g}")
    ax.set(xlabel='optimizer step', ylabel='val loss', yscale='log', title='each length at its best lr (seed 0)')
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(a.results, 'lengths_val_loss.png'), dpi=120, bbox_inches='tight')
    for name, stats in tables.items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for s in stats:
            if not s['runs']:
                continue
            steps = sorted(set.intersection(*(set(map(int, r['curve'])) for r in s['runs'])))
            v = np.array([[r['curve'][str(k)] for k in steps] for r in s['runs']])
            line, = ax.plot(steps, v.mean(0), label=s['row'].name)
            ax.fill_between(steps, v.min(0), v.max(0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set(xlabel='optimizer step', ylabel='val loss', yscale='log', title=f"{name}: mean over seeds, band min-max")
        ax.legend(fontsize=8)
        fig.savefig(os.path.join(a.results, f'{name}_val_loss.png'), dpi=120, bbox_inches='tight')


def main(argv):
    argv, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog='after --: extra train_mae.py flags')
    p.add_argument('phase', choices=('sweep', 'lengths', 'long', 'tables', 'report', 'seeds', 'tune', 'scale', 'rows', 'report_tuned'))
    p.add_argument('--config', default=os.path.join(ROOT, 'config', 'study.py'))
    p.add_argument('--length', type=int, default=320, help='the short run length in optimizer steps')
    p.add_argument('--lrs', default=','.join(f'{lr:g}' for lr in LRS), help='the first sweep grid')
    p.add_argument('--optimizers', default=','.join(OPTIMIZERS))
    p.add_argument('--tables', default=','.join(TABLES))
    p.add_argument('--seeds', type=int, default=len(SEEDS))
    p.add_argument('--probe_config', default='config/probe_quickstart.py', help="probe.py's config file (the probe budget)")
    p.add_argument('--probe_args', default='', help='extra probe.py flags (after --probe_config)')
    p.add_argument('--results', default=os.path.join(ROOT, 'results', 'study'), help='summaries, tables, plots')
    p.add_argument('--out', default=os.path.join(ROOT, 'out', 'study'), help='checkpoints and logs of the runs')
    p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
    p.add_argument('--commit', action='store_true', help='git-commit each summary as it is written (--results in a repository)')
    a = p.parse_args(argv)
    a.config, a.results, a.out = map(os.path.abspath, (a.config, a.results, a.out))
    a.lrs = [float(x) for x in a.lrs.split(',')]
    a.optimizers, a.tables = a.optimizers.split(','), a.tables.split(',')
    a.seeds, a.train_args, a.probe_args = range(a.seeds), train_args, shlex.split(a.probe_args)
    for value, allowed, flag in ((a.optimizers, OPTIMIZERS, 'optimizers'), (a.tables, TABLES, 'tables')):
        if set(value) - set(allowed):
            sys.exit(f"error: --{flag}={','.join(value)}: choose from {','.join(allowed)}")
    dict(sweep=sweep, lengths=lengths, tables=tables, report=report, seeds=seeds, tune=tune_all, scale=scale, rows=rows, long=long, report_tuned=report_tuned)[a.phase](a)


if __name__ == '__main__':
    main(sys.argv[1:])
