"""The studies, run as optimizer comparisons must be (Wen et al. 2025, "Fantastic
Pretraining Optimizers and Where to Find Them"): every optimizer tuned on its own,
compared at the end of training at several run lengths, paired by seed; 3 seeds;
probes against a random encoder.

The built-in study (config/study.py; each optimizer's peak lr tuned: LrStudy):

    python scripts/study.py sweep     # 1. each optimizer's lr sweep at the short length, widened till the best is inside
    python scripts/study.py lengths   # 2. AdamW and Muon at 4x the length (AdamW also at 2x), 3 lrs around each best;
                                      #    then the 4x best of each at the other seeds
    python scripts/study.py long      #    AdamW at 16x the length, at its 4x best lr (one seed)
    python scripts/study.py tables    # 3. the blog's rows, the probe experiment, the papers' flags: 3 seeds, probed
    python scripts/study.py seeds     # one setting (e.g. the quick start's) over seeds, against a random encoder
    python scripts/study.py report    # tables and plots of what has finished -> results/study/

The tuned study (config/fmnist.py; every optimizer tuned beyond the lr, docs/study.md: TunedStudy):

    python scripts/study.py tune --config=config/fmnist.py --length=300 --optimizers=adamw   # (and muon) KNOBS,
                                      #    one at a time, until each best is inside its grid
    python scripts/study.py scale ...  # lr and weight decay re-tuned at 4x and 16x, 3 seeds each, probed;
                                      #    one check per other knob
    python scripts/study.py probes ... # scale's probes alone (a probe added after scale started)
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

In the code: Study holds one study's settings and its runs; LrStudy and TunedStudy are the
two studies, their methods the phases. Statistics return numbers; the fmt_ functions write them.
"""
import argparse
import contextlib
import dataclasses
import itertools
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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import muon  # noqa: E402
import train_mae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ('adamw', 'muon', 'lamb', 'adafactor')
LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)  # the first sweep, a factor of 2 apart; widened by 2x at an edge
HEADS = ('attentive', 'linear')  # the probe's heads
PIXELS = ('--pixels=True', '--head=linear')  # the pixels through the linear probe: a floor of the tuned study
FLATTEN = ('--linear_pool=flatten', '--head=linear')  # the linear probe on all tokens: like for like with PIXELS


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


def probe_key(flags=(), random_encoder=False):
    """The key of a probe's results in its run's summary: its flags, 'random' for a random encoder."""
    return '_'.join(['random'] * random_encoder + [f.lstrip('-') for f in flags]) or 'default'


def read_json(path):
    with open(path) as f:
        return json.load(f)


def spent_before(out_dir):
    """Wall seconds of a run's earlier attempts: each attempt that died counts from its start
    to the last write of its log (within a log interval of its end). spent_s.json holds the
    seconds before the latest attempt and that attempt's start."""
    path, log = os.path.join(out_dir, 'spent_s.json'), os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        return 0.0
    record = read_json(path)
    if not isinstance(record, dict):  # older runners wrote the seconds alone, at the attempt's start
        record = dict(spent=float(record), started=os.path.getmtime(path))
    return record['spent'] + (max(0.0, os.path.getmtime(log) - record['started']) if os.path.exists(log) else 0.0)


def read_log(path):
    """A run's log.jsonl as records; none if the run never wrote it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def val_curve(records):
    """{step: val loss} of a run's log records, the finite ones."""
    return {r['step']: r['val_loss'] for r in records if math.isfinite(r.get('val_loss', math.nan))}


def machine():
    """What a run's floats depend on besides its seed and code: the CPU, the kernels torch picked
    for it (AVX2, AVX512...), the dtype muon_ns_dtype='auto' gives Newton-Schulz there (bf16 on
    CPUs with native bf16) and torch's version. The same run on another machine rounds differently, and a long run
    carries the difference to its final loss."""
    return dict(cpu=harness.cpu_info('model name'), kernels=torch.backends.cpu.get_cpu_capability(),
                ns_dtype=str(muon.ns_dtype('cpu')).removeprefix('torch.'), torch=torch.__version__)


def diverged_at(records):
    """The step of the first non-finite loss in a run's log records (train_mae.py logs it, then stops), else None."""
    return next((r['step'] for r in records if not all(math.isfinite(r[k]) for k in ('loss', 'val_loss') if k in r)),
                None)


# -----------------------------------------------------------------------------
# the bracketing rule, for the lr and every other tuned knob

class Knob(NamedTuple):
    """A tuned hyperparameter: its train_mae.py key ('lr' is the Run's own), its first grid
    (a tuple, or a function of the current setting), and the value nothing lies beyond (a
    weight decay of 0: a best there counts as inside). beta2 is widened in 1 - beta2."""
    key: str
    grid: object
    floor: float = None

    def geometric(self, value):
        """value in the space the knob's grid is geometric in (1 - beta2 for beta2; its own inverse)."""
        return 1 - value if self.key == 'beta2' else value


def bracket(knob, finals):
    """finals {value: final val loss} of a sweep: (best value, inside, the value to try next).
    The best is inside when values lie on both sides of it, or it sits on the knob's floor;
    else the next value lies past the edge that holds it, at the ratio of the two values
    there. The study's one bracketing rule."""
    best = min(finals, key=finals.get)
    inside = len(finals) > 1 and (min(finals) < best < max(finals) or best == knob.floor)
    if inside or len(finals) < 2:
        return best, inside, None
    g = knob.geometric
    ordered = sorted(finals, key=g)  # increasing in the space the grid is geometric in
    first, second = (ordered[0], ordered[1]) if g(best) == g(ordered[0]) else (ordered[-1], ordered[-2])
    return best, False, float(f"{g(g(first) ** 2 / g(second)):.6g}")


LR = Knob('lr', LRS)


def sweep_best(runs):
    """runs {lr: summary} of a sweep: (best lr, its final val loss, whether it is inside)."""
    best, inside, _ = bracket(LR, {lr: r['final_val'] for lr, r in runs.items()})
    return best, runs[best]['final_val'], inside


# -----------------------------------------------------------------------------
# statistics: numbers only

def mean_sd(xs):
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan, len(xs))


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


def top1(probes, head):
    """{seed: best top-1 of head} of probes {seed: a probe's results}, where the head was probed."""
    return {seed: p[head] for seed, p in probes.items() if head in p}


def paired_difference(xs, ys):
    """The mean of xs - ys over the seeds both have ({seed: value} each), and whether a paired
    t-test rejects a zero mean at 5% two-sided: |mean| > t(0.975, n-1) * SD / sqrt(n); a mean
    of None where no seed is shared. Runs of one seed share initial weights, data order and masks, so
    pairing removes what they share; when nothing differs, 1 comparison in 20 is marked by chance."""
    d = [xs[s] - ys[s] for s in sorted(set(xs) & set(ys))]
    if not d:
        return None, False
    return np.mean(d), len(d) > 1 and abs(np.mean(d)) > T_975[len(d) - 1] * np.std(d, ddof=1) / math.sqrt(len(d))


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


# -----------------------------------------------------------------------------
# text: the statistics written out

def fmt(m, digits):
    """A mean_sd: mean ± SD (n); '–' for None."""
    return '–' if m is None else f"{m[0]:.{digits}f}" + (f" ± {m[1]:.{digits}f}" if m[2] > 1 else '') + f" ({m[2]})"


def fmt_mean(values, digits):
    """mean ± SD (n) of values; '–' if there are none."""
    return fmt(mean_sd(list(values)), digits) if values else '–'


def fmt_delta(xs, ys, digits):
    """The paired difference of xs and ys ({seed: value} each), marked * where the test rejects no difference."""
    mean, marked = paired_difference(xs, ys)
    return '–' if mean is None else f"{mean:+.{digits}f}" + (' *' if marked else '')


def fmt_sweep(runs, best):
    """A sweep's values and final val losses, runs {value: summary}, the best in bold."""
    return ', '.join(f"**{v:g}: {runs[v]['final_val']:.4f}**" if v == best else f"{v:g}: {runs[v]['final_val']:.4f}"
                     + (f" (diverged at step {runs[v]['diverged_at']})" if 'diverged_at' in runs[v] else '')
                     for v in sorted(runs))


def fmt_speedup(steps, short, lengths):
    """steps_to_reach's answer over the short length; None and 0 as bounds of the AdamW lengths."""
    if steps is None:
        return f"more than {max(lengths) / short:g}x"
    if steps == 0:
        return f"at most {min(lengths) / short:g}x"
    return f"{steps / short:.2f}x"


def core_hours(done):
    """The summaries done's (training, probing) time in hours; a restored encoder's re-run counted."""
    return (sum(r['train_s'] + r.get('retrain_s', 0) for r in done) / 3600,
            sum(p['probe_s'] for r in done for p in r['probes'].values()) / 3600)


def fmt_machine_time(done):
    train, probe = core_hours(done)
    return f"Machine time of all {len(done)} runs so far: {train:.1f} core-hours training, {probe:.1f} probing."


def markdown_table(header, rows):
    """A markdown table's lines; header and each row a list of cells."""
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def probe_table(probed, lengths, flat=None):
    """AdamW's and Muon's best top-1 per head at each length; probed {(optimizer, length): {seed: probes}};
    flat: the same of the linear probe on all tokens, as two more columns."""
    names = (('adamw', 'AdamW'), ('muon', 'Muon'))
    columns = [(f'{h}: {name}', probed, o, h) for h in HEADS for o, name in names]
    if flat is not None:
        columns += [(f'all tokens, linear: {name}', flat, o, 'linear') for o, name in names]
    return markdown_table(['steps'] + [c[0] for c in columns],
                          [[str(n)] + [fmt_mean(top1(p.get((o, n), {}), h).values(), 3) for _, p, o, h in columns]
                           for n in lengths])


def versus_lines(at, lengths):
    """AdamW against Muon at each of lengths, each at its own tuned lr, paired by seed; then Muon's
    speedup. at {(optimizer, length): dict(lr, inside: its sweep's best is inside, finals: {seed: final val})}."""
    rows = []
    for n in lengths:
        adamw, muon = (at.get((o, n)) for o in ('adamw', 'muon'))
        rows.append([str(n)] + [f"{s['lr']:g}{'' if s['inside'] else ' (best on the edge)'}, "
                                f"{fmt_mean(s['finals'].values(), 4)}" if s else '–' for s in (adamw, muon)] +
                    [fmt_delta(muon['finals'], adamw['finals'], 4) if adamw and muon else '–'])
    mean = {k: mean_sd(list(s['finals'].values())) for k, s in at.items() if s['finals']}
    sd = pooled_sd([m[1] for m in mean.values()])  # one run's seed noise
    shared = [len(set(at['adamw', n]['finals']) & set(at['muon', n]['finals'])) for n in lengths
              if ('adamw', n) in at and ('muon', n) in at]  # the seeds each comparison pairs
    paired = max(shared, default=0)
    lines = [*markdown_table(['steps', 'AdamW: lr, final val (seeds)', 'Muon: lr, final val (seeds)',
                              'Muon - AdamW (paired)'], rows),
             '', "Final val loss at the lr, mean ± sample SD (n); Muon - AdamW is the mean of the seed-by-seed "
             "differences, * where a paired t-test rejects no difference at 5% two-sided (1 in 20 when nothing "
             f"differs; comparisons made: {len(shared)})." + (f" With {paired} seeds and the seed SD pooled over the cells "
             f"({sd:.4f}), it marks differences above about {resolution([sd], paired):.4f}." if paired > 1 else '')]
    adamw = [(n, mean['adamw', n][0]) for n in lengths if ('adamw', n) in mean and at['adamw', n]['inside']]
    targets = [n for n in lengths if ('muon', n) in mean]
    if not adamw or not targets:
        return lines
    adamw_lengths, n_adamw = [n for n, _ in adamw], min(mean['adamw', n][2] for n, _ in adamw)
    lines += ['', f"**Muon's speedup**: the AdamW run length that reaches Muon's mean final val loss at a length, "
              f"over that length, interpolated between AdamW's seed means at {', '.join(map(str, adamw_lengths))} "
              f"steps (seeds each: at least {n_adamw}) by each rule: log-linear (the loss straight in log(steps)), "
              "linear, power law (log(loss) straight in log(steps)). In brackets the log-linear answer with the "
              f"target moved up and down by the seed noise, 2·SD·sqrt(1/n + 1/{n_adamw}), n Muon's seeds and SD = "
              f"{sd:.4f} the seed SD of one run's final val loss pooled over the cells above with seeds:", '']
    for n in targets:
        target, _, seeds = mean['muon', n]
        noise = 2 * sd * math.sqrt(1 / seeds + 1 / n_adamw)

        def speedup(t, rule='log-linear'):
            return fmt_speedup(steps_to_reach(adamw, t, rule), n, adamw_lengths)
        rules = [f"{rule} {speedup(target, rule)}" for rule in INTERPOLATIONS]
        if not math.isnan(noise):
            rules[0] += f" ({speedup(target + noise)} to {speedup(target - noise)})"
        if steps_to_reach(adamw, target) is None:  # the rules agree on whether a length reaches it
            rules = [f"no AdamW length reaches it (the longest, {adamw[-1][0]} steps, ends at {adamw[-1][1]:.4f})"]
        lines.append(f"- Muon at {n} steps ({target:.4f}, n = {seeds}): {'; '.join(rules)}")
    return lines


METRICS = (('val', 5), ('attentive', 3), ('linear', 3))  # a table's columns: key, digits


def fmt_table(stats, floor):
    """A table's text from its stats (Study.table_stats); floor: whether the last row is the random encoder,
    as in the tables of encoders. The probe table's rows (no floor) probe one encoder: its val loss compares nothing."""
    compared = {key for key, _ in METRICS if floor or key != 'val'}  # the probe table's val loss is one encoder's
    base, rows = stats[0], []
    for i, s in enumerate(stats):
        row = s['row']
        cells = [row.name + (f" (`{' '.join(row.flags + row.probe)}`)" if row.flags or row.probe else ''),
                 f"{row.optimizer} {s['lr']:g}" if s['runs'] else '–']
        for key, digits in METRICS:
            delta = ('–' if key not in compared else 'baseline' if i == 0 else
                     fmt_delta(s['seeds'][key], base['seeds'][key], digits))
            cells += [fmt(s[key], digits), delta]
        rows.append(cells + [row.blog or '–'])
    lines = markdown_table(['row', 'optimizer, lr', 'final val loss', 'Δ', 'attentive top-1', 'Δ', 'linear top-1', 'Δ',
                            'blog'], rows)
    n = min((s['val'][2] for s in stats if s['val']), default=0)  # the seeds every row has so far
    train_s = {r['name']: r['train_s'] for s in stats for r in s['runs']}  # a run in two rows trained once
    res = {key: resolution([s[key][1] for s in stats if s[key]], n) for key in compared}
    marks = [f"**{res[key]:.{digits}f}** {name}" for (key, digits), name in
             zip(METRICS, ('in val loss', 'attentive', 'linear top-1')) if key in compared and not math.isnan(res[key])]
    marks = ', '.join(marks[:-1]) + ' and ' + marks[-1] if len(marks) > 1 else ''.join(marks)
    tested = (f"* where a paired t-test rejects no difference at 5% two-sided (|Δ| > t·SD/√n of the seed "
              f"differences, t = {T_975.get(n - 1)} at {n} seeds), so about 1 comparison in 20 is marked when nothing "
              f"differs. With {n} seeds and this table's pooled seed SD, the smallest difference of two rows it marks "
              f"(t·sqrt(2/n)·SD) is {marks}" if n > 1 and marks
              else "no difference is tested until every row has 2 seeds")
    lines += ['', f"Mean ± sample SD over seeds (n); final val loss = at the last step. Δ against the first row, "
              f"the mean of the differences seed by seed; {tested}"
              + (" (the blog's architecture effects: 0.0001-0.0009 in val loss)" if floor else '')
              + ". Probe best on the grid's edge: "
              f"{sum(s['edge'] for s in stats)} of {sum(len(s['runs']) for s in stats)} encoders. Machine time: "
              f"{sum(train_s.values()) / 60:.0f} min training, {sum(s['probe_s'] for s in stats) / 60:.0f} min probing, "
              "one core per run (a run shared with another table counted in each)."]
    below = [f"{s['row'].name} ({head})" for s in stats[:-1] for head in HEADS
             if floor and s[head] and stats[-1][head] and s[head][0] <= stats[-1][head][0]]
    if below:
        lines.append(f"Not above the random encoder's mean, so no evidence of a learnt representation: "
                     f"{', '.join(below)}.")
    others = [s for s in stats[1:] if s['runs']]  # the pairs the Δ column leaves out: rows other than the baseline
    pairs = [f"{t['row'].name} - {s['row'].name}: {key} {fmt_delta(t['seeds'][key], s['seeds'][key], digits)}"
             for key, digits in METRICS for i, s in enumerate(others) for t in others[i + 1:]
             if paired_difference(t['seeds'][key], s['seeds'][key])[1]]
    tried = len(METRICS) * len(others) * (len(others) - 1) // 2
    if tried:
        lines.append(f"Pairs of the other rows marked by the same paired test, of {tried} comparisons ({tried // 3} "
                     f"each in val loss, attentive and linear top-1; about {tried / 20:.1f} marked by chance when "
                     f"nothing differs): {'; '.join(pairs) if pairs else 'none'}.")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# a study: its runs (a run is done when its summary exists)

@dataclasses.dataclass
class Study:
    config: str  # train_mae.py's config file
    results: str  # summaries, tables, plots
    out: str  # checkpoints and logs of the runs
    length: int  # the short run length in optimizer steps
    lrs: tuple  # the first sweep grid
    optimizers: tuple
    tables: tuple  # names in TABLES
    seeds: range
    probe_config: str  # probe.py's config file (the probe budget)
    probe_args: tuple = ()  # extra probe.py flags
    train_args: tuple = ()  # extra train_mae.py flags
    dry_run: bool = False  # print the commands, run nothing
    commit: bool = False  # git-commit each summary as it is written
    restored: set = dataclasses.field(default_factory=set)  # the runs a dry run printed restore's command of

    @property
    def config_name(self):
        return os.path.relpath(self.config, ROOT)

    @property
    def probe_command(self):
        return ' '.join((self.probe_config, *self.probe_args))

    def summary_path(self, run):
        return os.path.join(self.results, 'runs', run.name + '.json')

    def summary(self, run):
        """run's summary, None if it has not finished."""
        path = self.summary_path(run)
        return read_json(path) if os.path.exists(path) else None

    def summaries(self):
        """Every finished run's summary, in name order."""
        folder = os.path.join(self.results, 'runs')
        names = sorted(n for n in os.listdir(folder) if n.endswith('.json')) if os.path.isdir(folder) else []
        return [read_json(os.path.join(folder, name)) for name in names]  # not a .json.tmp being written

    def seed_summaries(self, run):
        """The summaries of run at each of the seeds, where it has finished."""
        return [s for s in (self.summary(run._replace(seed=seed)) for seed in self.seeds) if s]

    def save(self, run, summary):
        path = self.summary_path(run)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            json.dump(summary, f, indent=1)
        os.replace(path + '.tmp', path)
        if self.commit:  # each summary lands as it is made: a machine that goes away loses at most the runs in progress
            git = (['git', 'add', path], ['git', 'commit', '-q', '-m', f"study: {run.name}", '--', path])
            for attempt in range(10):  # the repository may be busy (another commit holds its index lock)
                if not any(subprocess.run(cmd, cwd=self.results, capture_output=True).returncode for cmd in git):
                    break
                time.sleep(5)
            else:
                print(f"warning: could not commit {path}", file=sys.stderr)

    def execute(self, script, args, failure_ok=lambda: False):
        """Run a script of the repository on one core; returns its wall time in seconds. A failure
        ends the phase, unless failure_ok() finds it a result (a run that diverged)."""
        cmd = [sys.executable, script, *args]
        print('$', shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0.0
        t0 = time.time()
        if subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}).returncode and not failure_ok():
            sys.exit(f"error: failed: {shlex.join(cmd)}")
        return time.time() - t0

    @contextlib.contextmanager
    def lock(self, run):
        """Holds run's lock (a file holding our pid) for the block; yields False if a live process holds it."""
        path = os.path.join(self.out, run.name + '.lock')
        os.makedirs(self.out, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    os.kill(int(open(path).read() or 0), 0)
                except (ProcessLookupError, ValueError):
                    os.remove(path)  # its process died: take over
                    continue
            yield False  # another study process is on it
            return
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            os.remove(path)

    def train(self, run):
        """Train run unless it has a summary; returns the summary (None if another process has it)."""
        summary = self.summary(run)
        if summary is not None:
            return summary
        if self.dry_run:
            self.execute('train_mae.py', run.argv(self.config))
            return None
        with self.lock(run) as mine:
            if not mine:
                print(f"in progress elsewhere: {run.name}")
                return None
            curve, diverged, seconds = self.fit(run)
            summary = dict(run._asdict(), name=run.name, config=self.config_name, curve=curve,  # diverged: worst
                           final_val=math.inf if diverged else curve[max(curve)], train_s=seconds, probes={},
                           machine=machine(),
                           **({'diverged_at': diverged} if diverged else {}))
            self.save(run, summary)
            return summary

    def fit(self, run):
        """train_mae.py on run in its out dir, from its checkpoint if it has one (the caller holds
        run's lock): (val curve {step: loss}, the step it diverged at or None, wall seconds of
        every attempt). A run stopped before its end (by a signal: saved and exited) ends the phase."""
        out_dir = os.path.join(self.out, run.name)
        resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
        spent = spent_before(out_dir) if resume else 0.0
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'spent_s.json'), 'w') as f:
            json.dump(dict(spent=spent, started=time.time()), f)
        log = os.path.join(out_dir, 'log.jsonl')
        seconds = self.execute('train_mae.py', run.argv(self.config) + [f'--out_dir={out_dir}'] +
                               (['--init_from=resume'] if resume else []) + list(self.train_args),
                               failure_ok=lambda: diverged_at(read_log(log)) is not None)
        records = read_log(log)
        diverged = diverged_at(records)
        curve = val_curve(records)
        if diverged is None and max(curve, default=0) != run.iters:
            sys.exit(f"error: {run.name} stopped at step {max(curve, default=0)} of {run.iters}; run the phase again")
        return curve, diverged, spent + seconds

    def restore(self, run):
        """The encoder of a finished run, trained again where its checkpoint is missing or
        unfinished (the out dir stays on the machine that trained it; the summary is what lands):
        a probe needs it. The summary keeps its figures and gains the re-run's final val loss
        (retrained_val: bit for bit on the same machine; another CPU rounds differently, so a
        mismatch is printed with both machines), wall time (retrain_s) and machine (retrain_machine)."""
        out_dir = os.path.join(self.out, run.name)
        log = os.path.join(out_dir, 'log.jsonl')
        if os.path.exists(os.path.join(out_dir, 'ckpt.pt')) and max(val_curve(read_log(log)), default=0) == run.iters:
            return
        if self.dry_run:  # printed once per run, not once per probe
            if run.name not in self.restored:
                self.restored.add(run.name)
                self.execute('train_mae.py', run.argv(self.config))
            return
        with self.lock(run) as mine:
            if not mine:
                return
            curve, diverged, seconds = self.fit(run)
            summary = self.summary(run)
            summary.update(retrained_val=math.inf if diverged else curve[max(curve)],
                           retrain_s=summary.get('retrain_s', 0.0) + seconds, retrain_machine=machine())
            self.save(run, summary)
            if abs(summary['retrained_val'] - summary['final_val']) > 1e-4:
                print(f"warning: {run.name} trained again ends at {summary['retrained_val']:.4f}, "
                      f"not {summary['final_val']:.4f} (machine then: {summary.get('machine', 'not recorded')}; now: "
                      f"{summary['retrain_machine']}); its probes read the new encoder", file=sys.stderr)

    def probe(self, run, flags=(), random_encoder=False):
        """Probe run's encoder (or, random_encoder, the same architecture freshly drawn)
        with --probe_config + flags, unless done; the best top-1 per head goes into the summary.
        An encoder whose checkpoint is gone is trained again first (restore)."""
        key = probe_key(flags, random_encoder)
        summary = self.summary(run)
        if summary is None or key in summary['probes']:
            return
        self.restore(run)
        out_dir = os.path.join(self.out, run.name, 'probe_' + key)
        args = [self.probe_config, f'--ckpt={os.path.join(self.out, run.name, "ckpt.pt")}', f'--out_dir={out_dir}',
                f'--seed={run.seed}', f'--random_encoder={random_encoder}', *flags, *self.probe_args]
        if self.dry_run:  # print it; take no lock (a dry run must not hide a run another process is probing)
            self.execute('probe.py', args)
            return
        with self.lock(run) as mine:
            summary = self.summary(run)  # as it is now: another process may have saved a probe since
            if not mine or key in summary['probes']:
                return
            seconds = self.execute('probe.py', args)
            results = read_json(os.path.join(out_dir, 'probe_results.json'))
            best = {head: max(r['top1'] for r in results['results'] if r['head'] == head)
                    for head in {r['head'] for r in results['results']}}
            summary['probes'][key] = dict(best, warning=results.get('warning', ''), probe_s=seconds)
            self.save(run, summary)

    def sweep_until_inside(self, knob, values, run_of, wait=True):
        """Train run_of(value) at each of values (seed 0), widened while the best lies on an edge.
        Returns (best value, {value: summary}); (None, the finished ones) while runs are missing:
        in a report (wait=False), or never when waiting (another process's runs are polled)."""
        values = sorted({float(f"{v:.6g}") for v in values})
        fetch = self.train if wait else self.summary  # None: unfinished, or another process's
        while True:
            done = {v: fetch(run_of(v)) for v in values}
            if any(s is None for s in done.values()):
                if not wait or self.dry_run:
                    return None, {v: s for v, s in done.items() if s}
                time.sleep(30)
                continue
            best, inside, more = bracket(knob, {v: s['final_val'] for v, s in done.items()})
            if inside or more is None:
                return best, done
            values.append(more)

    def write(self, name, lines):
        """A report's lines, to <results>/name and the terminal."""
        os.makedirs(self.results, exist_ok=True)
        with open(os.path.join(self.results, name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print('\n'.join(lines))

    def table_stats(self, name, run_of, floor):
        """A table's rows, each {row, lr, runs, probes: {seed: probes}, seeds: {metric: {seed: value}}, metric: its
        mean_sd or None, edge: probes best on their grid's edge, probe_s}; run_of(row) -> its Run; floor {seed:
        random-encoder probes}: a last row, but in the probe table."""
        stats = []
        for row in TABLES[name]:
            run, key = run_of(row), probe_key(row.probe)
            runs = self.seed_summaries(run)
            stats.append(dict(row=row, lr=run.lr, runs=runs, probes=by_seed(runs, lambda r: r['probes'].get(key))))
        if name != 'probe_optimizer':
            stats.append(dict(row=Row('random encoder (floor)', 'muon'), lr=None, runs=[], probes=floor))
        for s in stats:
            runs, probes = s['runs'], s['probes']
            s['seeds'] = dict(val=by_seed(runs, lambda r: r['final_val']), **{h: top1(probes, h) for h in HEADS})
            s.update({key: mean_sd(list(v.values())) if v else None for key, v in s['seeds'].items()},
                     edge=sum(bool(p['warning']) for p in probes.values()) if runs else 0,  # not the floor's
                     probe_s=sum(p['probe_s'] for p in probes.values()))
        return stats


# -----------------------------------------------------------------------------
# the built-in study: each optimizer's peak lr tuned

class LrStudy(Study):
    def sweep_summaries(self, optimizer, iters):
        """The finished seed-0 runs of optimizer at length iters without other flags: {lr: summary}."""
        return {s['lr']: s for s in self.summaries()
                if (s['optimizer'], s['iters'], s['seed'], tuple(s['flags'])) == (optimizer, iters, 0, ())}

    def tuned_lr(self, optimizer, iters):
        """The best lr of the sweep at iters steps if it is inside, else None (not run yet, or being widened)."""
        runs = self.sweep_summaries(optimizer, iters)
        if not runs:
            return None
        best, _, inside = sweep_best(runs)
        return best if inside else None

    def best_lr(self, optimizer, iters):
        """tuned_lr, or an exit where it is unfinished."""
        best = self.tuned_lr(optimizer, iters)
        if best is None:
            sys.exit(f"error: the {optimizer} sweep at {iters} steps is unfinished (its best lr is not inside it): "
                     f"run or finish the sweep phase first")
        return best

    def table_run(self, row, seed=0):
        return Run(row.optimizer, self.best_lr(row.optimizer, self.length), self.length, seed, row.flags)

    def floor_probes(self):
        """The probes' floor, {seed: probes} per seed that has it: a random encoder of the Muon
        row's architecture (fresh weights), probed beside that seed's Muon run at the short length."""
        lr = self.tuned_lr('muon', self.length)
        return by_seed(self.seed_summaries(Run('muon', lr, self.length)), lambda r: r['probes'].get('random')) if lr else {}

    def unready_tables(self):
        """{table: the optimizers without a tuned lr at the short length} for the tables that cannot run yet."""
        missing = {name: sorted({r.optimizer for r in TABLES[name] if self.tuned_lr(r.optimizer, self.length) is None})
                   for name in self.tables}
        return {name: m for name, m in missing.items() if m}

    # the phases

    def sweep(self):
        """Each optimizer's peak lr at the short length: the grid LRS, widened until the best is inside."""
        for optimizer in self.optimizers:
            best, done = self.sweep_until_inside(LR, self.lrs, lambda lr: Run(optimizer, lr, self.length))
            if best is not None:
                print(f"{optimizer}: best lr {best:g} of {', '.join(f'{lr:g}' for lr in done)} at {self.length} steps")

    def lengths(self):
        """AdamW and Muon at 4x the length (AdamW also at 2x, for the speedup's
        interpolation), each at half, at and twice its best at the short length,
        widened until the best is inside; then both at their 4x best for the other seeds,
        every seed's encoder probed (the tables probe the short length's)."""
        for optimizer, f in (('adamw', 4), ('muon', 4), ('adamw', 2)):
            best = self.best_lr(optimizer, self.length)
            self.sweep_until_inside(LR, (best, best / 2, best * 2), lambda lr: Run(optimizer, lr, f * self.length))
        best = {optimizer: self.tuned_lr(optimizer, 4 * self.length) for optimizer in ('adamw', 'muon')}
        for seed in self.seeds:
            for optimizer, lr in best.items():
                if lr is not None:  # else its sweep is still being widened by another process
                    run = Run(optimizer, lr, 4 * self.length, seed)
                    self.train(run)
                    self.probe(run)

    def long(self):
        """AdamW at 16x the short length, at its 4x best lr, seed 0: whether AdamW reaches Muon's
        4x loss late or never (the speedup's upper end)."""
        self.train(Run('adamw', self.best_lr('adamw', 4 * self.length), 16 * self.length))

    def train_tables(self):
        """Each table's rows at 3 seeds, each probed; a random encoder per seed (the Muon
        run's architecture, fresh weights) as the probes' floor. Seed 0 of a row
        without flags is its sweep's best run."""
        for name in self.tables:
            for seed in self.seeds:
                for row in TABLES[name]:
                    run = self.table_run(row, seed)
                    self.train(run)
                    self.probe(run, row.probe)
                if name != 'probe_optimizer':
                    self.probe(self.table_run(TABLES['papers'][0], seed), random_encoder=True)

    def train_seeds(self):
        """One setting (--optimizers, --lrs and --length, all single) over the seeds, each
        probed (probe seed = its seed) against a random encoder of the same seed, and the
        first seed's encoder under every other probe seed too: whether the probes' spread
        comes from pretraining or from the probe. Writes seeds.md to --results."""
        if len(self.optimizers) != 1 or len(self.lrs) != 1:
            sys.exit("error: the seeds phase runs one setting: give one --optimizers and one --lrs")
        runs = [Run(self.optimizers[0], self.lrs[0], self.length, seed) for seed in self.seeds]
        for run in runs:
            self.train(run)
            self.probe(run)
            self.probe(run, random_encoder=True)
        for seed in self.seeds[1:]:
            self.probe(runs[0], (f'--seed={seed}',))
        done = [s for s in map(self.summary, runs) if s and {'default', 'random'} <= set(s['probes'])]
        if not self.dry_run and done:
            self.write('seeds.md', self.seeds_report(done))

    def seeds_report(self, done):
        """seeds.md: each seed against its random encoder, then the first seed's encoder under every probe seed."""
        columns = []  # per head, each a value per seed: the encoder's top-1, the random encoder's, the margin
        for h in HEADS:
            top, floor = ([s['probes'][k][h] for s in done] for k in ('default', 'random'))
            columns += [(top, '.3f'), (floor, '.3f'), ([t - f for t, f in zip(top, floor)], '+.3f')]
        rows = [[str(s['seed']), f"{s['final_val']:.4f}"] + [f"{c[i]:{spec}}" for c, spec in columns]
                for i, s in enumerate(done)]
        mean = ['mean ± SD', fmt_mean([s['final_val'] for s in done], 4)] + [fmt_mean(c, 3) for c, _ in columns]
        lines = [f"# `{self.config_name}` over {len(done)} seeds", '',
                 f"{done[0]['optimizer']}, lr {done[0]['lr']:g}, {done[0]['iters']} steps; probes "
                 f"`{self.probe_command}`, probe seed = pretraining seed. Made by `python scripts/study.py seeds`.", '',
                 *markdown_table(['seed', 'final val loss', 'attentive', 'random encoder', 'margin', 'linear',
                                  'random encoder', 'margin'], rows + [mean]), '']
        first = done[0]
        same = {k: v for k, v in first['probes'].items() if k == 'default' or k.startswith('seed=')}
        if len(same) > 1:
            lines += [f"Seed {first['seed']}'s encoder under {len(same)} probe seeds (probe weights, data order, "
                      "and the built-in data set's draw):", '']
            for h in HEADS:
                probe_sd = mean_sd([p[h] for p in same.values()])
                total_sd = mean_sd([s['probes']['default'][h] for s in done])
                lines.append(f"- {h}: {', '.join(f'{p[h]:.3f}' for p in same.values())}; SD {probe_sd[1]:.3f} "
                             f"against {total_sd[1]:.3f} across pretraining seeds (pretraining and probe seed both "
                             f"changing): the probe seed alone accounts for roughly "
                             f"{min(1.0, probe_sd[1] ** 2 / total_sd[1] ** 2):.0%} of the variance (a ratio of two "
                             f"variances from {probe_sd[2]} and {total_sd[2]} values: a rough share).")
        return lines

    # the report

    def report(self):
        lines = ['# The small-scale study', '', f"Config `{self.config_name}`, short length {self.length} "
                 f"steps; probes `{self.probe_command}`. Made by `python scripts/study.py report`. "
                 "Wall times: one core per run, as measured, on whatever else the machine was doing.", '',
                 fmt_machine_time(self.summaries()), '', '## 1. Peak-lr sweeps (seed 0, final val loss)', '']
        sweeps = {}
        for iters in (self.length, 2 * self.length, 4 * self.length):
            for optimizer in OPTIMIZERS:
                runs = self.sweep_summaries(optimizer, iters)
                if runs:
                    sweeps[optimizer, iters] = runs
                    best, _, inside = sweep_best(runs)
                    lines.append(f"- {optimizer}, {iters} steps: {fmt_sweep(runs, best)} "
                                 f"(best {'inside' if inside else 'ON THE EDGE'}; "
                                 f"{sum(r['train_s'] for r in runs.values()) / 60:.0f} min)")
        lines.append('')
        unready = self.unready_tables()
        tables = {name: self.table_stats(name, self.table_run, self.floor_probes())
                  for name in self.tables if name not in unready}
        lines += self.lengths_section(sweeps) + ['']
        for name, stats in tables.items():
            lines += [f"## {name}", '', fmt_table(stats, name != 'probe_optimizer'), '']
        lines += [f"## {name}\n\nNot run yet: it needs the sweeps of {', '.join(missing)}.\n"
                  for name, missing in unready.items()]
        self.write('study.md', lines)
        self.plots(sweeps, tables)

    def lengths_section(self, sweeps):
        """Section 2: AdamW against Muon at each length, each at its sweep's best lr; Muon's speedup;
        the encoders' probes; the long run."""
        L, at = self.length, {}
        for (optimizer, iters), sweep in sweeps.items():
            if optimizer in ('adamw', 'muon'):
                lr, _, inside = sweep_best(sweep)
                runs = self.seed_summaries(Run(optimizer, lr, iters))
                at[optimizer, iters] = dict(lr=lr, inside=inside, finals=by_seed(runs, lambda r: r['final_val']),
                                            probes=by_seed(runs, lambda r: r['probes'].get('default')))
        lines = ['## 2. AdamW vs Muon at the end of training, each at its own best lr', '',
                 *versus_lines(at, (L, 2 * L, 4 * L))]
        probed = {k: s['probes'] for k, s in at.items() if s['probes']}
        if probed:
            floor = self.floor_probes()
            lines += ['', *probe_table(probed, sorted({n for _, n in probed})),
                      '', f"Best probe top-1 (`{self.probe_command}`), mean ± sample SD (n), of the runs above" +
                      (f"; a random encoder: attentive {fmt_mean(top1(floor, 'attentive').values(), 3)}, "
                       f"linear {fmt_mean(top1(floor, 'linear').values(), 3)}" if floor else '') + '.']
        targets = {n: mean_sd(list(at['muon', n]['finals'].values()))[0] for n in (L, 4 * L) if ('muon', n) in at}
        return lines + self.long_section(targets)

    def long_section(self, targets):
        """The `long` phase's AdamW run (16x, at the 4x best lr, seed 0) against Muon's seed means
        targets {length: loss}: where along its val curve it first reaches each."""
        lr = self.tuned_lr('adamw', 4 * self.length)
        run = self.summary(Run('adamw', lr, 16 * self.length)) if lr else None
        if run is None:
            return []
        curve = sorted((int(k), v) for k, v in run['curve'].items())
        reached = [f"Muon's {n}-step mean ({t:.4f}) " + next((f"first at step {k}" for k, v in curve if v <= t),
                                                             "never") for n, t in sorted(targets.items())]
        return ['', f"**AdamW at {16 * self.length} steps** (lr {lr:g}, the {4 * self.length}-step best; seed 0; "
                f"{run['train_s'] / 3600:.1f} core-hours): final val loss {run['final_val']:.4f}; along its val curve "
                f"(every {curve[1][0] - curve[0][0]} steps) it reaches " + '; '.join(reached) + '.']

    def plots(self, sweeps, tables):
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError as e:
            print(f"plots skipped: matplotlib is not importable ({e})")
            return

        def save(fig, ax, name, **labels):
            ax.set(**labels)
            ax.legend(fontsize=8)
            fig.savefig(os.path.join(self.results, name), dpi=120, bbox_inches='tight')
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (optimizer, iters), runs in sorted(sweeps.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lrs = sorted(runs)
            ax.plot(lrs, [runs[lr]['final_val'] for lr in lrs], 'o-' if iters == self.length else 's--',
                    label=f"{optimizer}, {iters} steps")
        save(fig, ax, 'lr_sensitivity.png', xscale='log', xlabel='peak lr', ylabel='final val loss',
             title='lr sensitivity (seed 0)')
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (optimizer, iters), runs in sorted(sweeps.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            lr, _, _ = sweep_best(runs)
            curve = {int(k): v for k, v in runs[lr]['curve'].items()}
            ax.plot(sorted(curve), [curve[k] for k in sorted(curve)], '-' if optimizer == 'muon' else '--',
                    label=f"{optimizer}, {iters} steps, lr {lr:g}")
        save(fig, ax, 'lengths_val_loss.png', xlabel='optimizer step', ylabel='val loss', yscale='log',
             title='each length at its best lr (seed 0)')
        for name, stats in tables.items():
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for s in stats:
                if not s['runs']:
                    continue
                steps = sorted(set.intersection(*(set(map(int, r['curve'])) for r in s['runs'])))
                v = np.array([[r['curve'][str(k)] for k in steps] for r in s['runs']])
                line, = ax.plot(steps, v.mean(0), label=s['row'].name)
                ax.fill_between(steps, v.min(0), v.max(0), color=line.get_color(), alpha=0.2, lw=0)
            save(fig, ax, f'{name}_val_loss.png', xlabel='optimizer step', ylabel='val loss', yscale='log',
                 title=f"{name}: mean over seeds, band min-max")


# -----------------------------------------------------------------------------
# the tuned study (real data): every optimizer tuned coordinate-wise, one hyperparameter at a time

KNOBS = {  # in the order they are tuned; what is held fixed: HELD
    'adamw': (Knob('lr', (1e-3, 2e-3, 4e-3, 8e-3)), Knob('beta2', (0.95, 0.99, 0.999)),
              Knob('weight_decay', (0.0, 0.05, 0.1, 0.2), floor=0.0), Knob('warmup_epochs', (0.5, 1.0, 2.0))),
    'muon': (Knob('lr', (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
             Knob('adamw_lr', lambda best: (best['lr'] / 4, best['lr'] / 2, best['lr'])),
             Knob('muon_weight_decay', (0.0, 0.05, 0.1, 0.2), floor=0.0), Knob('warmup_epochs', (0.5, 1.0, 2.0))),
}

RETUNED = {o: (LR, next(k for k in KNOBS[o] if k.key.endswith('weight_decay'))) for o in KNOBS}  # at every length

HELD = {  # what the tuned protocol holds fixed, besides the config's model, data, batch and mask ratio
    'adamw': "beta1 0.9, eps 1e-8, warmup from lr/3 then cosine to 0",
    'muon': ("momentum 0.95, Nesterov, 5 Newton-Schulz steps, lr adjusted match_rms_adamw; its AdamW side's betas "
             "(0.9, beta2 of the config) and weight decay (0.05 of the config, which there reaches only the patch "
             "conv: norms, biases and the mask token never decay); warmup from lr/3 then cosine to 0"),
}


def final_vals(settings, runs_at):
    """versus_lines' input from a tuned study: {(optimizer, iters): dict(lr, inside, finals {seed: final val})}."""
    return {(o, n): dict(lr=settings[o][n]['lr'], inside=True, finals=by_seed(runs, lambda r: r['final_val']))
            for (o, n), runs in runs_at.items() if runs}


def timescale(optimizer, setting):
    """The steps decoupled weight decay averages the weights over at the peak lr, 1/(lr·wd)
    (Wang & Aitchison 2025): the decay of the weights RETUNED holds (Muon's on Muon's matrices)."""
    rate = setting['lr'] * setting[RETUNED[optimizer][1].key]
    return 1 / rate if rate else math.inf


def fmt_timescales(settings):
    """Each tuned setting's timescale, settings {optimizer: {iters: setting}}."""
    each = [f"{o} " + ', '.join(f"{timescale(o, s):.0f} ({timescale(o, s) / n:.2f}) at {n} steps" for n, s in by_length.items())
            for o, by_length in settings.items() if by_length]
    return ("The weight decay's averaging timescale at the peak lr (decoupled decay keeps about the last 1/(lr·wd) "
            f"updates) of each tuned setting, in steps and as a fraction of its run: {'; '.join(each)}.")


def with_lr(setting, lr):
    """setting with its peak lr moved to lr; an untied AdamW side moves with it (its ratio kept)."""
    side = setting.get('adamw_lr')
    return {**setting, 'lr': lr, **({'adamw_lr': float(f"{side * lr / setting['lr']:.6g}")} if side else {})}


class TunedStudy(Study):
    def defaults(self, optimizer):
        """The config of optimizer, its betas apart: every knob's untuned value."""
        c = harness.configure([self.config, f'--optimizer={optimizer}'], train_mae.CONFIG)
        return dict(c, beta1=c['betas'][0], beta2=c['betas'][1])

    def setting_run(self, optimizer, setting, iters, seed=0):
        """The Run of a setting {knob: value}: a flag for each knob off the config's value (an
        adamw_lr equal to the lr is the tied default), so the untuned setting is the plain run."""
        base, flags = self.defaults(optimizer), []
        for knob in KNOBS[optimizer][1:]:
            value = setting[knob.key]
            if value == base[knob.key] or knob.key == 'adamw_lr' and value == setting['lr']:
                continue
            flags.append(f"--betas=({base['beta1']!r},{value!r})" if knob.key == 'beta2' else f"--{knob.key}={value!r}")
        return Run(optimizer, setting['lr'], iters, seed, tuple(sorted(flags)))

    def coordinate_tune(self, optimizer, iters, wait=True, trace=None):
        """One hyperparameter at a time, each swept holding the others at their current best,
        bracketed; passes repeat (each knob at its best and its neighbours in the previous
        pass's grid) until a pass changes nothing. Returns the tuned setting, or None while
        unfinished. trace: a list that receives (pass, knob, {value: summary}, best)."""
        base = self.defaults(optimizer)
        setting = {knob.key: base[knob.key] for knob in KNOBS[optimizer]}
        grids = {}
        for n in range(1, 6):
            changed = False
            for knob in KNOBS[optimizer]:
                if n == 1:
                    values = knob.grid(setting) if callable(knob.grid) else knob.grid
                else:  # the best and its neighbours in the previous pass's values
                    ladder = sorted(grids[knob.key], key=knob.geometric)
                    i = ladder.index(setting[knob.key])  # the best is one of the values swept
                    values = ladder[max(0, i - 1):i + 2]
                def run_of(v):
                    return self.setting_run(optimizer, {**setting, knob.key: v}, iters)
                best, done = self.sweep_until_inside(knob, values, run_of, wait)
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

    def length_settings(self, optimizer, wait=True, trace=None, sweeps=None, retuned=None):
        """{iters: the tuned setting} at the short length and at 4x and 16x it. At each longer
        length the previous length's setting has its lr and its weight decay re-tuned in turn
        (RETUNED), each from half, once and twice its best so far (from its first grid's two
        lowest at 0), bracketed, until a sweep after the first moves nothing: decoupled decay
        averages the weights over about 1 / (lr * wd) steps, a timescale that should grow
        with the run, so neither knob holds across lengths alone. Stops at the first length
        not finished (report). trace: coordinate_tune's; sweeps: a list that receives
        (iters, key, {value: summary}, best); retuned: the knobs re-tuned, if not RETUNED's
        ((LR,): the protocol before b5b6415)."""
        setting = self.coordinate_tune(optimizer, self.length, wait, trace)
        if setting is None:
            return {}
        out = {self.length: setting}
        knobs = retuned or RETUNED[optimizer]
        for iters in (4 * self.length, 16 * self.length):
            for n, knob in enumerate(itertools.islice(itertools.cycle(knobs), 6)):
                v = setting[knob.key]
                def run_of(x):
                    return self.setting_run(optimizer, with_lr(setting, x) if knob is LR else {**setting, knob.key: x},
                                            iters)
                best, done = self.sweep_until_inside(knob, (v / 2, v, 2 * v) if v else knob.grid[:2], run_of, wait)
                if sweeps is not None:
                    sweeps.append((iters, knob.key, done, best))
                if best is None:
                    return out
                setting = with_lr(setting, best) if knob is LR else {**setting, knob.key: best}
                if len(knobs) == 1 or n and best == v:  # (one knob: its one sweep is bracketed)
                    break
            out[iters] = setting
        return out

    def tuned_at(self, iters):
        """{optimizer: its tuned setting at iters steps} of AdamW and Muon, None where unfinished."""
        return {o: self.length_settings(o, wait=False).get(iters) for o in ('adamw', 'muon')}

    def check_runs(self, optimizer, tuned, trace, retuned=None):
        """At the longest length, one run per knob not re-tuned there: the knob moved to its
        runner-up side at the short length (the neighbour with the lower loss there; up from a
        floor; an AdamW-side lr by the same ratio to the tuned one). {knob: Run}. retuned: as length_settings'."""
        last = {key: (done, best) for _, key, done, best in trace}  # each knob's final sweep at the short length
        out = {}
        for knob in KNOBS[optimizer][1:]:
            if knob in (retuned or RETUNED[optimizer]):
                continue  # tuned at every length
            done, best = last[knob.key]
            ladder = sorted(done, key=knob.geometric)
            i = ladder.index(best)
            sides = [ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder)]
            value = min(sides, key=lambda v: done[v]['final_val'])
            if knob.key == 'adamw_lr':  # moves with the lr: the runner-up's setting carried to the tuned lr
                value = with_lr({'lr': done[value]['lr'], 'adamw_lr': value}, tuned['lr'])['adamw_lr']
            out[knob.key] = self.setting_run(optimizer, {**tuned, knob.key: value}, 16 * self.length)
        return out

    def row_run(self, row, settings, seed=0):
        """A table row in the tuned study: its optimizer's tuned setting at 4x the short length
        (settings: {optimizer: setting}), plus the row's flags."""
        run = self.setting_run(row.optimizer, settings[row.optimizer], 4 * self.length, seed)
        return run._replace(flags=tuple(sorted(run.flags + row.flags)))

    # the phases

    def tune(self):
        """Each of --optimizers tuned at the short length (coordinate_tune)."""
        for optimizer in self.optimizers:
            setting = self.coordinate_tune(optimizer, self.length)
            print(f"{optimizer} at {self.length} steps: {setting}")

    def scale(self):
        """The real-data protocol after tune, for each of --optimizers: the lr and the weight decay
        re-tuned at 4x and 16x the short length (length_settings); every length's tuned setting at
        --seeds seeds, each encoder probed (probe_final), the lengths already tuned first; then, at
        16x, one check of each other tuned knob."""
        for optimizer in self.optimizers:
            trace, done = [], []
            for wait in (False, True):  # the lengths tuned so far first: a longer length's sweep holds back no seed
                settings = self.length_settings(optimizer, wait, trace if wait else None)
                for run in self.final_runs(optimizer, settings):
                    if run not in done:
                        self.train(run)
                        self.probe_final(run)
                        done.append(run)
            if 16 * self.length in settings:
                for run in self.check_runs(optimizer, settings[16 * self.length], trace).values():
                    self.train(run)

    def probes(self):
        """scale's probes alone, of every final encoder finished so far: for a probe added to the
        protocol after scale started (run it from its own worktree beside scale's)."""
        for optimizer in self.optimizers:
            for run in self.final_runs(optimizer, self.length_settings(optimizer, wait=False)):
                self.probe_final(run)

    def final_runs(self, optimizer, settings):
        """The runs of each length's tuned setting (settings {iters: setting}) at every seed, length by length."""
        return [self.setting_run(optimizer, setting, iters, seed) for iters, setting in settings.items()
                for seed in self.seeds]

    def probe_final(self, run):
        """A final encoder probed: both heads, and the linear head on all its tokens (FLATTEN); beside
        AdamW's short runs, per seed, the floors: a random encoder read both ways, and the pixels."""
        probes = [((), False), (FLATTEN, False)]
        if run.optimizer == 'adamw' and run.iters == self.length:
            probes += [((), True), (FLATTEN, True), (PIXELS, False)]
        for flags, random_encoder in probes:
            self.probe(run, flags, random_encoder)

    def rows(self):
        """The tuned study's tables (--tables; the blog's rows and its probe experiment) at 4x the
        short length, each row at its optimizer's tuned setting there, --seeds seeds, probed."""
        settings = self.tuned_at(4 * self.length)
        if None in settings.values():
            sys.exit(f"error: AdamW's or Muon's setting at {4 * self.length} steps is not tuned yet: run tune and scale first")
        for seed in self.seeds:
            for name in self.tables:
                for row in TABLES[name]:
                    run = self.row_run(row, settings, seed)
                    self.train(run)
                    self.probe(run, row.probe)

    # the report

    def report_tuned(self):
        """The real-data study's report (tune, scale): results/<...>/study.md."""
        L = self.length
        lines = [f"# The tuned study: `{self.config_name}`", '',
                 f"Short length {L} steps, then {4 * L} and {16 * L}; probes `{self.probe_command}`. "
                 "Made by `python scripts/study.py report_tuned`. Wall times: one thread per run, as measured, however "
                 "many runs shared the cores (an upper bound on each run's CPU time, except for runs restarted under "
                 "runners older than 2c52e6d, which counted only their last attempt: docs/study.md).", '',
                 fmt_machine_time(done := self.summaries()), '']
        settings, traces, sweeps = {}, {}, {}
        earlier, earlier_sweeps = {}, {o: [] for o in KNOBS}  # the protocol before b5b6415, from the runs it made
        for optimizer in KNOBS:
            traces[optimizer], sweeps[optimizer] = [], []
            settings[optimizer] = self.length_settings(optimizer, False, traces[optimizer], sweeps[optimizer])
            earlier[optimizer] = self.length_settings(optimizer, False, sweeps=earlier_sweeps[optimizer], retuned=(LR,))
        runs_at, earlier_at = self.final_summaries(settings), self.final_summaries(earlier)
        lines += [self.phase_times(done, (settings, earlier), (runs_at, earlier_at), traces, (sweeps, earlier_sweeps)),
                  '',
                  '## 1. Tuning at the short length (seed 0, final val loss)', '',
                  "One hyperparameter at a time, holding the others at their best so far; each grid widened at the edge "
                  "holding its best until the best is inside (or on a floor: a weight decay of 0); passes repeat, each "
                  "knob over its best and its neighbours, until a pass changes nothing.", '']
        for optimizer in KNOBS:
            for n, key, runs, best in traces[optimizer]:
                lines.append(f"- {optimizer}, pass {n}, {key}: {fmt_sweep(runs, best)}"
                             + ('' if best is not None else ' (unfinished)'))
            tuned = settings[optimizer].get(L)
            lines += ['', f"{optimizer} tuned at {L} steps: " + (', '.join(f"{k} {v:g}" for k, v in tuned.items())
                      if tuned else 'unfinished') + f". Held fixed: {HELD[optimizer]}.", '']
        floors = {name: by_seed(runs_at['adamw', L], lambda r: r['probes'].get(key))  # probed beside these (scale)
                  for name, key in (('random', probe_key(random_encoder=True)), ('pixels', probe_key(PIXELS)),
                                    ('random_flat', probe_key(FLATTEN, random_encoder=True)))}
        moved = earlier != settings  # the per-length re-tune moved a weight decay: both protocols are reported
        lines += self.results_lines(settings, runs_at, traces, sweeps, floors, elsewhere=moved)
        if moved:
            lines += ['# Before the weight decay was re-tuned per length', '',
                      f"Until commit b5b6415 each longer length re-tuned the lr alone; every other knob, the weight "
                      f"decay included, kept its {L}-step value. The runs of those settings:", '',
                      *self.results_lines(earlier, earlier_at, traces, earlier_sweeps, floors, (LR,))]
        self.write('study.md', lines)

    def phase_times(self, done, protocols, finals, traces, sweeps):
        """The machine time of each phase of the summaries done, both protocols' runs together
        (protocols: the current settings and the lr-only ones; finals, sweeps: each one's
        final_summaries and length sweeps); a run in several phases (a sweep's best is a final
        run's seed 0) counted in the first that has it."""
        L, checks, rows = self.length, [], []
        for p, retuned in zip(protocols, (None, (LR,))):
            for o, trace in traces.items():
                if 16 * L in p[o] and len(trace) >= len(KNOBS[o]):  # the short length's tuning finished
                    checked = self.check_runs(o, p[o][16 * L], trace, retuned).values()
                    checks += [r._replace(seed=seed).name for r in checked for seed in self.seeds]  # any more seeds too
            at = {o: p[o].get(4 * L) for o in ('adamw', 'muon')}
            rows += [self.row_run(row, at, seed).name for seed in self.seeds for name in self.tables
                     for row in TABLES[name]] if None not in at.values() else []
        phases = [("each length's tuned setting at every seed, probed, and the floors",
                   [s['name'] for runs_at in finals for runs in runs_at.values() for s in runs]),
                  (f"the other settings tuned at {L} steps", [s['name'] for t in traces.values()
                                                              for *_, runs, _ in t for s in runs.values()]),
                  (f"the other settings re-tuned at {4 * L} and {16 * L} steps",
                   [s['name'] for by_optimizer in sweeps for sw in by_optimizer.values() for *_, runs, _ in sw
                    for s in runs.values()]),
                  (f"the checks at {16 * L} steps", checks), (f"the tables' rows at {4 * L} steps", rows)]
        left, parts = {s['name']: s for s in done}, []
        for what, names in phases + [('other runs', list(left))]:
            runs = [left.pop(name) for name in dict.fromkeys(names) if name in left]
            parts.append(f"{what}: {len(runs)} runs, " + '{:.1f} training, {:.1f} probing'.format(*core_hours(runs)))
        return 'By phase, in core-hours (a run in the first phase that has it): ' + '; '.join(parts) + '.'

    def final_summaries(self, settings):
        """{(optimizer, iters): the summaries of its setting's runs at every seed}; settings {optimizer: {iters: setting}}."""
        return {(o, n): self.seed_summaries(self.setting_run(o, settings[o][n], n)) if n in settings[o] else []
                for n in (self.length, 4 * self.length, 16 * self.length) for o in ('adamw', 'muon')}

    def results_lines(self, settings, runs_at, traces, sweeps, floors, retuned=None, elsewhere=False):
        """Sections 2 on of a protocol's settings {optimizer: {iters: setting}} (runs_at: final_summaries'):
        the lengths, the checks, the probes, then --tables at 4x the short length (none while a setting
        there is missing); elsewhere: the earlier protocol's part follows, which has the rows not run here."""
        lines = (self.lengths_section(settings, runs_at, sweeps, retuned)
                 + self.checks_section(settings, traces, runs_at, retuned) + self.probes_section(runs_at, floors) + [''])
        at = {o: settings[o].get(4 * self.length) for o in ('adamw', 'muon')}
        for name in self.tables if None not in at.values() else ():
            stats = self.table_stats(name, lambda row: self.row_run(row, at), floors['random'])
            lines += [f"## {name}, at {4 * self.length} steps", '', fmt_table(stats, name != 'probe_optimizer'), '']
            if elsewhere and not all(s['runs'] for s in stats if s['lr'] is not None):  # the floor row has no lr
                lines += ["A row with no runs (–) was not run at these settings; the part before the weight decay "
                          "was re-tuned per length, below, has the rows run at its settings.", '']
        return lines

    def lengths_section(self, settings, runs_at, sweeps, retuned=None):
        """Section 2: AdamW against Muon at each length, each at its tuned setting, paired by seed;
        Muon's speedup; each setting's weight-decay timescale; the sweeps of the longer lengths."""
        how = ("the lr and the weight decay in turn, each around its best so far (half, once, twice; widened at an "
               "edge), until a sweep after the first moves nothing" if retuned is None else
               "the lr around the previous length's best (half, once, twice; widened at an edge)")
        return ['## 2. AdamW vs Muon at each length, each at its own tuned setting', '',
                *versus_lines(final_vals(settings, runs_at), (self.length, 4 * self.length, 16 * self.length)),
                '', fmt_timescales(settings),
                '', f"Each longer length re-tunes {how}; the other knobs stay at the short length's tuned values (an "
                "untied AdamW-side lr keeps its ratio to Muon's):",
                '', *(f"- {o}, {n} steps, {key}: " + (fmt_sweep(runs, best) or 'none finished')
                      + ('' if best is not None else ' (unfinished)')
                      for o, trace in sweeps.items() for n, key, runs, best in trace)]

    def checks_section(self, settings, traces, runs_at, retuned=None):
        """Each check at the longest length against the tuned setting there (seed 0), beside the
        seed SD of a final run there (pooled over both optimizers' seeds)."""
        checked, n = [], 16 * self.length
        sd = pooled_sd([mean_sd([r['final_val'] for r in runs_at[o, n]])[1] for o in ('adamw', 'muon') if runs_at[o, n]])
        for optimizer, trace in traces.items():
            longest = settings[optimizer].get(16 * self.length)
            tuned_run = self.setting_run(optimizer, longest, 16 * self.length) if longest else None
            base = self.summary(tuned_run) if longest else None
            if base is None or len(trace) < len(KNOBS[optimizer]):
                continue
            tuned = by_seed(self.seed_summaries(tuned_run), lambda r: r['final_val'])
            for key, run in self.check_runs(optimizer, longest, trace, retuned).items():
                s = self.summary(run)
                if s:
                    delta = s['final_val'] - base['final_val']
                    verdict = 'holds' if delta > 0 else 'DOES NOT HOLD'
                    checked.append(f"- {optimizer}, {key}: {run.name}: {s['final_val']:.4f} against the tuned "
                                   f"{base['final_val']:.4f} (seed 0, {delta:+.4f}): the short length's value {verdict}"
                                   + (' (within the noise)' if abs(delta) < 2 * math.sqrt(2) * sd else ''))
                    seeds = by_seed(self.seed_summaries(run), lambda r: r['final_val'])
                    shared = sorted(set(seeds) & set(tuned))
                    if len(shared) > 1:  # a check run at more seeds: paired over them
                        mean, marked = paired_difference(seeds, tuned)
                        checked[-1] += (f"; over seeds {', '.join(map(str, shared))}, paired: {mean:+.4f}"
                                        + (' *' if marked else ', not marked'))
        return ['', f"Checks at {n} steps, each tuned knob moved one grid step to its runner-up side. The seed SD of a "
                f"final run there is {sd:.4f}; within the noise = less than 2·sqrt(2)·SD apart, two standard errors "
                "of the difference of two independent runs (these two share seed 0, so they likely differ by less "
                "by chance):", ''] + checked if checked else []

    def probes_section(self, runs_at, floor):
        """Every length's encoders probed, and their margins over the floors, paired by seed."""
        probed = {k: by_seed(runs, lambda r: r['probes'].get('default')) for k, runs in runs_at.items()}
        flat = {k: by_seed(runs, lambda r: r['probes'].get(probe_key(FLATTEN))) for k, runs in runs_at.items()}
        if not any(probed.values()):
            return []
        lines = ['', *probe_table(probed, (self.length, 4 * self.length, 16 * self.length), flat),
                 '', "Best probe top-1, mean ± sample SD (n); linear = on the mean of the tokens, all tokens = on "
                 "them concatenated. Floors, per seed: a random encoder (attentive "
                 f"{fmt_mean(top1(floor['random'], 'attentive').values(), 3)}, "
                 f"linear {fmt_mean(top1(floor['random'], 'linear').values(), 3)}, "
                 f"all tokens {fmt_mean(top1(floor['random_flat'], 'linear').values(), 3)})"
                 f" and the pixels through the linear probe (a logistic regression: "
                 f"{fmt_mean(top1(floor['pixels'], 'linear').values(), 3)}; like for like with all tokens). "
                 "Margins over the floors, paired by seed:", '']
        for (optimizer, iters), probes in probed.items():
            if top1(probes, 'linear'):
                vs = [f"random {h} {fmt_delta(top1(probes, h), top1(floor['random'], h), 3)}" for h in HEADS]
                vs += [f"{name} {fmt_delta(top1(flat[optimizer, iters], 'linear'), top1(floor[f], 'linear'), 3)}"
                       for name, f in (('random all tokens', 'random_flat'), ('pixels all tokens', 'pixels'))]
                lines.append(f"- {optimizer}, {iters} steps: {'; '.join(vs)}")
        return lines


PHASES = dict(sweep=LrStudy.sweep, lengths=LrStudy.lengths, long=LrStudy.long, tables=LrStudy.train_tables,
              report=LrStudy.report, seeds=LrStudy.train_seeds, tune=TunedStudy.tune, scale=TunedStudy.scale,
              probes=TunedStudy.probes, rows=TunedStudy.rows, report_tuned=TunedStudy.report_tuned)  # each a method of its study


def main(argv):
    argv, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog='after --: extra train_mae.py flags')
    p.add_argument('phase', choices=tuple(PHASES))
    p.add_argument('--config', default=os.path.join(ROOT, 'config', 'study.py'))
    p.add_argument('--length', type=int, default=320, help='the short run length in optimizer steps')
    p.add_argument('--lrs', default=','.join(f'{lr:g}' for lr in LRS), help='the first sweep grid')
    p.add_argument('--optimizers', default='', help=f"default: {','.join(OPTIMIZERS)}; the tuned study's: adamw,muon")
    p.add_argument('--tables', default='', help=f"default: {','.join(TABLES)}; the tuned study's: blog,probe_optimizer")
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--probe_config', default='config/probe_quickstart.py', help="probe.py's config file (the probe budget)")
    p.add_argument('--probe_args', default='', help='extra probe.py flags (after --probe_config)')
    p.add_argument('--results', default=os.path.join(ROOT, 'results', 'study'), help='summaries, tables, plots')
    p.add_argument('--out', default=os.path.join(ROOT, 'out', 'study'), help='checkpoints and logs of the runs')
    p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
    p.add_argument('--commit', action='store_true', help='git-commit each summary as it is written (--results in a repository)')
    a = p.parse_args(argv)
    phase = PHASES[a.phase]
    study = TunedStudy if phase in vars(TunedStudy).values() else LrStudy
    tuned = study is TunedStudy  # it tunes AdamW and Muon (KNOBS) and has no papers' table
    allowed = dict(optimizers=tuple(KNOBS) if tuned else OPTIMIZERS, tables=('blog', 'probe_optimizer') if tuned else TABLES)
    lrs, probe_args = [float(x) for x in a.lrs.split(',')], shlex.split(a.probe_args)
    optimizers, tables = ((getattr(a, flag) or ','.join(allowed[flag])).split(',') for flag in ('optimizers', 'tables'))
    for value, flag in ((optimizers, 'optimizers'), (tables, 'tables')):
        if set(value) - set(allowed[flag]):
            sys.exit(f"error: --{flag}={','.join(value)}: choose from {','.join(allowed[flag])}")
    if not 1 <= a.seeds <= max(T_975) + 1:  # T_975 holds every degree of freedom from 1
        sys.exit(f"error: --seeds={a.seeds}: 1 to {max(T_975) + 1} (the paired t-test's table)")
    phase(study(*map(os.path.abspath, (a.config, a.results, a.out)), a.length, lrs, optimizers, tables, range(a.seeds),
                a.probe_config, probe_args, train_args, a.dry_run, a.commit))


if __name__ == '__main__':
    main(sys.argv[1:])
