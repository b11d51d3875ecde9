"""scripts/study.py end to end on a tiny config: the sweep widens its grid until the
best lr is inside, an interrupted run resumes from its checkpoint, and finished runs
are never run again."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

TINY_CONFIG = """data_dir = 'synthetic'
synthetic_size = (64, 32)
img_size, patch_size = 32, 8
enc_dim, enc_depth, enc_heads = 64, 2, 2
dec_dim, dec_depth, dec_heads = 32, 1, 2
batch_size = micro_batch_size = 16
epochs, warmup_epochs = 10, 1
eval_interval, log_interval = 2, 2
compile = False
num_workers = 0
"""


def study(args, **kw):
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'study.py')] + args
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True, **kw)


def test_sweep_widens_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    results, out = tmp_path / 'results', tmp_path / 'out'
    args = ['sweep', f'--config={config}', '--optimizers=adamw', '--lrs=4e-3,8e-3', '--length=12',
            f'--results={results}', f'--out={out}']
    first = out / 'adamw_lr0.004_len12_seed0'
    p = study(args)  # killed (SIGKILL, the whole process group) once the first run has a checkpoint
    deadline = time.time() + 120
    while not (first / 'ckpt.pt').exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (results / 'runs' / f'{first.name}.json').exists()

    printed = study(args).communicate(timeout=600)[0]
    commands = [l for l in printed.splitlines() if l.startswith('$ ')]
    assert '--init_from=resume' in commands[0] and first.name in commands[0]
    summaries = {f: json.load(open(results / 'runs' / f)) for f in os.listdir(results / 'runs')}
    lrs = sorted(s['lr'] for s in summaries.values())
    best = min(summaries.values(), key=lambda s: s['final_val'])['lr']
    assert lrs[0] < best < lrs[-1], (lrs, best)  # widened by factors of 2 until the best is inside
    assert {4e-3, 8e-3} <= set(lrs) and all(b == 2 * a for a, b in zip(lrs, lrs[1:]))

    # it went on from its checkpoint: the evaluations of the killed attempt and of the resumed one, in order
    # (that a resumed run ends bit for bit where a straight one does is train_mae's, tested in test_faults)
    assert list(summaries[f'{first.name}.json']['curve']) == [str(s) for s in range(2, 13, 2)]

    again = study(args).communicate(timeout=300)[0]  # everything done: nothing runs
    assert '$ ' not in again
    assert {f: json.load(open(results / 'runs' / f)) for f in os.listdir(results / 'runs')} == summaries

    # the report lists the sweep with its best marked, and waits for the tables' other sweeps
    report = study(['report', f'--config={config}', '--length=12', f'--results={results}', f'--out={out}'])
    assert report.communicate(timeout=300)[0] and report.returncode == 0
    text = (results / 'study.md').read_text()
    assert f"**{best:g}: {summaries[next(f for f in summaries if summaries[f]['lr'] == best)]['final_val']:.4f}**" in text
    assert 'adamw, 12 steps' in text and '(best inside;' in text and 'it needs the sweeps of' in text


def children(pid):
    """The pids whose parent is pid, from /proc (stat's 4th field, after the parenthesised name)."""
    found = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone
    return found


def test_a_run_stopped_by_a_signal_is_not_taken_as_finished(tmp_path):
    """SIGTERM (preemption) makes train_mae.py save and exit cleanly before the end:
    the study must stop with an error, not record the run's last val loss as final."""
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    results, out = tmp_path / 'results', tmp_path / 'out'
    p = study(['sweep', f'--config={config}', '--optimizers=adamw', '--lrs=4e-3', '--length=400',
               f'--results={results}', f'--out={out}'])
    log = out / 'adamw_lr0.004_len400_seed0' / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count('"val_loss"') >= 1):
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.05)
    os.kill(children(p.pid)[0], signal.SIGTERM)  # the train_mae.py process only
    printed = p.communicate(timeout=120)[0]
    assert p.returncode != 0 and 'stopped at step' in printed and 'of 400' in printed, printed
    assert not (results / 'runs').exists() or not os.listdir(results / 'runs')


def test_a_run_that_diverges_is_a_result_the_worst_of_its_sweep(tmp_path):
    """A NaN loss ends a run (train_mae.py logs it, then stops): the study keeps the run as
    finished with an infinite final val loss, so a sweep's high edge brackets instead of the
    phase ending there, and the run is not tried again. Any other failure ends the phase."""
    import math
    S, a = made_up_study(tmp_path, 'LrStudy')
    run = S.Run('adamw', 1e30, 4)
    summary = a.train(run)
    assert summary['final_val'] == math.inf and summary['diverged_at'] == 2 and summary['curve'] == {}
    written = os.path.getmtime(a.summary_path(run))
    assert a.train(run) == a.summary(run) and os.path.getmtime(a.summary_path(run)) == written
    finals = {1e-3: 0.5, 2e-3: 0.4, 1e30: math.inf}
    assert S.bracket(S.LR, finals)[:2] == (2e-3, True)
    assert S.fmt_sweep({lr: dict(final_val=v) for lr, v in finals.items()} | {1e30: summary}, 2e-3).endswith(
        "1e+30: inf (diverged at step 2)")
    with pytest.raises(SystemExit, match='error: failed'):
        a.train(S.Run('adamw', 1e-3, 4, flags=('--no_such_key=1',)))


def test_delta_is_a_paired_t_test_over_the_seeds_both_rows_have():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import study as S
    ys = {0: 1.0, 1: 2.0, 2: 3.0}
    # differences 0.1, 0.08, 0.04: t = 4.16 < t(0.975, 2) = 4.303, unmarked (2 standard errors would mark it)
    assert S.fmt_delta({0: 1.1, 1: 2.08, 2: 3.04}, ys, 3) == '+0.073'
    # 0.1, 0.1, 0.05: t = 5.0, marked, though the rows' spreads (SD 1) dwarf the difference unpaired
    assert S.fmt_delta({0: 1.1, 1: 2.1, 2: 3.05}, ys, 3) == '+0.083 *'
    assert S.fmt_delta({0: 1.1, 1: 2.1, 5: 9.0}, ys, 2) == '+0.10 *'  # seed 5 has no partner: two pairs, no spread
    assert S.fmt_delta({0: 1.1}, ys, 2) == '+0.10' and S.fmt_delta({7: 1.0}, ys, 2) == '–'  # one pair: no test
    mean, marked = S.paired_difference({0: 1.1, 1: 2.1, 2: 3.05}, ys)  # the numbers behind the text
    assert abs(mean - 0.25 / 3) < 1e-12 and marked
    assert S.paired_difference({7: 1.0}, ys) == (None, False)
    assert abs(S.resolution([0.01, 0.01], 3) - 4.303 * (2 / 3) ** 0.5 * 0.01) < 1e-12


def test_a_dead_attempt_counts_from_its_start_to_its_log_s_last_write(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import study as S
    assert S.spent_before(tmp_path) == 0.0  # no attempt yet
    (tmp_path / 'spent_s.json').write_text(json.dumps(dict(spent=100.0, started=1000.0)))
    assert S.spent_before(tmp_path) == 100.0  # the attempt died before its first log line
    (tmp_path / 'log.jsonl').write_text('{}\n')
    os.utime(tmp_path / 'log.jsonl', (1250.0, 1250.0))
    assert S.spent_before(tmp_path) == 350.0  # 100 before it, 250 of its own
    (tmp_path / 'spent_s.json').write_text('42.0')  # an older runner's file: a bare number, written at the start
    os.utime(tmp_path / 'spent_s.json', (1200.0, 1200.0))
    assert S.spent_before(tmp_path) == 92.0  # 42 before it, 50 of its own


def test_steps_to_reach_interpolates_in_log_steps():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import study as S
    points = [(320, 0.33), (640, 0.31), (1280, 0.29)]
    assert abs(S.steps_to_reach(points, 0.30) - 640 * 2 ** 0.5) < 1e-9  # halfway in log(steps)
    assert abs(S.steps_to_reach(points, 0.31) - 640) < 1e-9
    assert S.steps_to_reach(points, 0.28) is None  # beyond the longest run: only a lower bound
    assert S.steps_to_reach(points, 0.34) == 0.0  # the shortest already reaches it


def test_seeds_phase_probes_each_seed_against_a_random_encoder_and_the_first_under_every_probe_seed(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    results, out = tmp_path / 'results', tmp_path / 'out'
    args = ['seeds', f'--config={config}', '--optimizers=adamw', '--lrs=4e-3', '--length=4', '--seeds=2',
            '--probe_args=--epochs=1 --lrs=(1e-2,) --wds=(0.0,)', f'--results={results}', f'--out={out}']
    p = study(args)
    printed = p.communicate(timeout=600)[0]
    assert p.returncode == 0, printed
    probes = [c for c in printed.splitlines() if c.startswith('$ ') and 'probe.py' in c]
    assert len(probes) == 5  # each seed and its random encoder, then seed 0's encoder under probe seed 1
    assert '--seed=0' in probes[-1] and probes[-1].endswith("--seed=1 --epochs=1 '--lrs=(1e-2,)' '--wds=(0.0,)'")
    first, second = (json.load(open(results / 'runs' / f'adamw_lr0.004_len4_seed{s}.json')) for s in (0, 1))
    assert set(first['probes']) == {'default', 'random', 'seed=1'} and set(second['probes']) == {'default', 'random'}
    text = (results / 'seeds.md').read_text()
    for s in (first, second):  # each seed's row, its margin the direct difference
        margin = s['probes']['default']['linear'] - s['probes']['random']['linear']
        assert f"| {s['seed']} | {s['final_val']:.4f} |" in text and f"{margin:+.3f} |" in text
    assert "Seed 0's encoder under 2 probe seeds" in text
    assert study(args).communicate(timeout=300)[0].count('$ ') == 0  # all done: nothing runs again


def test_report_speedup_and_row_pairs_are_what_the_formulas_give(tmp_path):
    """Summaries made up for the purpose: the report's speedup (the log-step interpolation
    of the seed means), its range, and the blog table's comparisons must be what the
    formulas give by hand."""
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    runs = tmp_path / 'results' / 'runs'
    runs.mkdir(parents=True)

    def summary(optimizer, lr, iters, final_val, seed=0, flags=(), probes=None):
        name = f"{optimizer}_lr{lr:g}_len{iters}{''.join('_' + f[2:].replace('=', '-') for f in flags)}_seed{seed}"
        s = dict(optimizer=optimizer, lr=lr, iters=iters, seed=seed, flags=flags, name=name, config='tiny.py',
                 curve={str(iters): final_val}, final_val=final_val, train_s=1.0, probes=probes or {})
        (runs / f'{name}.json').write_text(json.dumps(s))
    for iters, best in ((12, 0.330), (24, 0.310), (48, 0.290)):  # AdamW: every length bracketed at lr 2e-3
        for lr, v in ((1e-3, best + 0.01), (2e-3, best), (4e-3, best + 0.02)):
            summary('adamw', lr, iters, v)
    for lr, v in ((1e-3, 0.31), (2e-3, 0.298), (4e-3, 0.32)):
        summary('muon', lr, 12, v)
    summary('adamw', 2e-3, 12, 0.334, seed=1)  # second seeds at the short length: means 0.332 and 0.300
    summary('muon', 2e-3, 12, 0.302, seed=1)

    def probes(attentive, linear, random=None):
        p = dict(default=dict(attentive=attentive, linear=linear, warning='', probe_s=1.0))
        return p if random is None else dict(p, random=dict(attentive=random, linear=random, warning='', probe_s=1.0))
    summary('adamw', 2e-3, 48, 0.29, probes=probes(0.2, 0.3))  # the probes of the longest length's seed 0
    summary('muon', 2e-3, 12, 0.298, probes=probes(0.4, 0.5, random=0.1))  # and of Muon's short seeds, a floor
    summary('muon', 2e-3, 12, 0.302, seed=1, probes=probes(0.6, 0.7, random=0.3))
    for seed, v in enumerate((0.320, 0.324)):  # the blog table's no-bias row, far from the Muon row
        summary('muon', 2e-3, 12, v, seed, flags=['--bias=False'])
    long = dict(optimizer='adamw', lr=2e-3, iters=192, seed=0, flags=[], name='adamw_lr0.002_len192_seed0',
                config='tiny.py', curve={'48': 0.31, '96': 0.295, '144': 0.29, '192': 0.28}, final_val=0.28,
                train_s=1.0, probes={})  # the long phase's run: AdamW at 16x, at the 4x best lr
    (runs / 'adamw_lr0.002_len192_seed0.json').write_text(json.dumps(long))
    p = study(['report', f'--config={config}', '--length=12', '--tables=blog', f'--results={tmp_path / "results"}',
               f'--out={tmp_path / "out"}'])
    assert p.communicate(timeout=300)[0] and p.returncode == 0
    text = (tmp_path / 'results' / 'study.md').read_text()
    sd = 0.004 / 2 ** 0.5  # each pair's sample SD
    noise = 2 * sd * (1 / 2 + 1 / 1) ** 0.5

    def expected(target):  # AdamW's seed means 0.332, 0.310, 0.290 at 12, 24, 48 steps
        if target >= 0.310:
            return 2 ** ((0.332 - target) / 0.022)
        return 2 * 2 ** ((0.310 - target) / 0.020)
    assert "| 12 | 0.002, 0.3320 ± 0.0028 (2) | 0.002, 0.3000 ± 0.0028 (2) | -0.0320 * |" in text
    assert (f"(1 in 20 when nothing differs; comparisons made: 1). With 2 seeds and the seed SD pooled over the cells "
            f"(0.0028), it marks differences above about {12.706 * 2 ** 0.5 / 2 ** 0.5 * sd:.4f}.") in text
    assert (f"- Muon at 12 steps (0.3000, n = 2): log-linear {expected(0.300):.2f}x ({expected(0.300 + noise):.2f}x "
            f"to {expected(0.300 - noise):.2f}x); linear") in text
    # the blog table: the two Muon rows with runs are compared with each other, beside the Δ to AdamW
    assert "| Muon, no bias, GELU, LN (`--bias=False`) | muon 0.002 | 0.32200 ± 0.00283 (2) | -0.01000 * |" in text
    assert ("of 3 comparisons (1 each in val loss, attentive and linear top-1; about 0.1 marked by chance when "
            "nothing differs): Muon, bias, GELU, LN - Muon, no bias, GELU, LN: val -0.02200 *.") in text
    assert "| 12 | – | 0.500 ± 0.141 (2) | – | 0.600 ± 0.141 (2) |\n| 48 | 0.200 (1) | – | 0.300 (1) | – |" in text
    assert "a random encoder: attentive 0.200 ± 0.141 (2), linear 0.200 ± 0.141 (2)." in text
    assert "Machine time of all 17 runs so far: 0.0 core-hours training" in text  # 9 + 3 + 2 + 2 + 1 summaries of 1 s
    assert ("**AdamW at 192 steps** (lr 0.002, the 48-step best; seed 0; 0.0 core-hours): final val loss 0.2800; along "
            "its val curve (every 48 steps) it reaches Muon's 12-step mean (0.3000) first at step 96.") in text


def test_patch_loss_splits_the_val_loss_that_training_logged(tmp_path):
    """scripts/patch_loss.py recomputes the masked-patch val loss itself: over all
    patches it must equal train_mae's own evaluation, and both parts must be there."""
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    out = tmp_path / 'run'
    subprocess.run([sys.executable, 'train_mae.py', str(config), '--max_iters=4', f'--out_dir={out}'], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    logged = [r['val_loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'val_loss' in r][-1]
    printed = subprocess.run([sys.executable, 'scripts/patch_loss.py', str(out / 'ckpt.pt')], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    assert f"all {logged:.4f}; shape patches " in printed and 'background only' in printed, (logged, printed)
    shape, background = (float(printed.split(key)[1].split()[0]) for key in ('shape patches ', 'background only '))
    share = float(printed.split('(')[1].split('%')[0]) / 100
    assert 0 < share < 1 and abs(share * shape + (1 - share) * background - logged) < 0.01 * logged + 1e-3
    sys.path.insert(0, ROOT)
    import numpy as np
    from synthetic import Synthetic
    source = Synthetic(20, 64, 'val')
    for i in range(20):  # the mask is the shape: one colour (plus the images' 0.02 noise) inside, not outside
        img, label, inside = source.draw(i)
        assert (img, label) == source.open(i) and 0 < inside.mean() < 1
        pixels = np.asarray(img, dtype=np.float32) / 255
        assert pixels[inside].std(0).max() < 0.03 < pixels[~inside].std(0).max()


def made_up_study(tmp_path, kind='TunedStudy'):
    """(study module, a study of that kind) over made-up summaries."""
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import study as S
    config = tmp_path / 'tiny.py'
    config.write_text(TINY_CONFIG)
    return S, getattr(S, kind)(config=str(config), results=str(tmp_path / 'results'), out=str(tmp_path / 'out'),
                               length=12, lrs=list(S.LRS), optimizers=['adamw'], tables=[], seeds=range(1),
                               probe_config='config/probe_quickstart.py')


def fill(a, ask, loss):
    """Call ask() (a phase in report mode) until it returns a result, each time writing the
    summaries of the runs it found missing with loss(run) as their final val loss."""
    summary, asked = a.summary, []

    def summary_or_note(run):
        found = summary(run)
        if found is None:
            missing.append(run)
        return found
    a.summary = summary_or_note
    try:
        for _ in range(100):
            missing = []
            result = ask()
            if result is not None and not missing:
                return result, asked
            assert missing
            for run in missing:
                asked.append(run.name)
                a.save(run, dict(run._asdict(), name=run.name, final_val=loss(run), curve={}, train_s=1.0, probes={}))
    finally:
        del a.summary  # the method again
    raise AssertionError('never finished')


def adamw_setting(run):
    """The AdamW setting of a run, parsed back from its flags (off the config's values)."""
    flags = dict(f[2:].split('=') for f in run.flags)
    beta2 = float(flags['betas'].strip('()').split(',')[1]) if 'betas' in flags else 0.95
    return dict(lr=run.lr, beta2=beta2, weight_decay=float(flags.get('weight_decay', 0.05)),
                warmup_epochs=float(flags.get('warmup_epochs', 1.0)))


def test_coordinate_tuning_brackets_every_knob_and_repeats_until_nothing_moves(tmp_path):
    """Made-up summaries from a known bowl over the knobs: the tuner (in report mode, which
    trains nothing) asks for runs until every knob's best is inside its grid or on its floor,
    and returns the bowl's minimum on the grids' ladders; then each longer length re-tunes
    the lr and the weight decay in turn around the previous best until neither moves, and
    the checks move each other knob to its runner-up side."""
    import math
    S, a = made_up_study(tmp_path)
    optimum = dict(lr=3.2e-2, beta2=0.9999, weight_decay=0.2, warmup_epochs=2.0)  # lr, beta2, wd past the first grids

    def loss(run):
        s, lengths = adamw_setting(run), math.log(run.iters / 12, 4)
        lr_opt = optimum['lr'] / 2 ** lengths  # the best lr halves with each 4x in length, the best decay quarters
        wd_opt = optimum['weight_decay'] / 4 ** lengths
        return (math.log(s['lr'] / lr_opt) ** 2 + math.log((1 - s['beta2']) / (1 - optimum['beta2'])) ** 2
                + math.log((s['weight_decay'] + 1e-3) / wd_opt) ** 2
                + 0.1 * (s['warmup_epochs'] - optimum['warmup_epochs']) ** 2 + 1 / run.iters)
    trace = []
    setting, asked = fill(a, lambda: a.coordinate_tune('adamw', 12, wait=False, trace=trace.clear() or trace), loss)
    assert setting == optimum, setting
    assert len(asked) == len(set(asked))  # nothing asked twice
    assert {n for n, *_ in trace} == {1, 2}  # the first pass moves every knob; the second confirms
    for n, key, done, best in trace:
        knob = next(k for k in S.KNOBS['adamw'] if k.key == key)
        assert min(done) < best < max(done) or best == knob.floor, (n, key, sorted(done), best)

    sweeps = []
    settings, asked = fill(a, lambda: (lambda s: s if len(s) == 3 else None)(
        a.length_settings('adamw', wait=False, sweeps=sweeps.clear() or sweeps)), loss)
    assert len(asked) == len(set(asked))
    assert {n: (s['lr'], s['weight_decay']) for n, s in settings.items()} == {
        12: (3.2e-2, 0.2), 48: (1.6e-2, 0.05), 192: (8e-3, 0.0125)}
    assert all({**s, 'lr': 0, 'weight_decay': 0} == {**optimum, 'lr': 0, 'weight_decay': 0}
               for s in settings.values())  # the other knobs held
    # at each longer length: the lr moves, the decay moves, the lr again confirms; each bracketed
    assert [(n, key) for n, key, *_ in sweeps] == [(n, key) for n in (48, 192)
                                                  for key in ('lr', 'weight_decay', 'lr')]
    assert all(min(done) < best < max(done) for *_, done, best in sweeps)
    checks = a.check_runs('adamw', settings[192], trace)
    assert {k: adamw_setting(r)[k] for k, r in checks.items()} == dict(beta2=0.999, warmup_epochs=1.0)  # nearer than 4
    assert all(r.iters == 192 and r.lr == 8e-3 and adamw_setting(r)['weight_decay'] == 0.0125
               for r in checks.values())


def test_the_adamw_side_check_moves_its_ratio_to_the_lr_not_its_short_length_value(tmp_path):
    """Muon's best lr halves with each 4x in length and its AdamW side is best at twice it, once
    it coming second: the check at 16x puts the AdamW side at once the lr there, where the
    short length's value would be 4x too high."""
    import math
    S, a = made_up_study(tmp_path)

    def loss(run):
        flags = dict(f[2:].split('=') for f in run.flags)
        side = float(flags.get('adamw_lr', run.lr)) / run.lr
        return (math.log(run.lr * 2 ** math.log(run.iters / 12, 4) / 1.6e-2) ** 2 + math.log(side / 2) ** 2
                + 0.1 * (side > 2) + float(flags.get('muon_weight_decay', 0.1))
                + 0.1 * (float(flags.get('warmup_epochs', 1.0)) - 1) ** 2)
    settings, _ = fill(a, lambda: (lambda s: s if len(s) == 3 else None)(a.length_settings('muon', wait=False)), loss)
    assert {n: (s['lr'], s['adamw_lr']) for n, s in settings.items()} == {12: (1.6e-2, 3.2e-2), 48: (8e-3, 1.6e-2),
                                                                          192: (4e-3, 8e-3)}
    trace = []
    a.coordinate_tune('muon', 12, wait=False, trace=trace)
    check = a.check_runs('muon', settings[192], trace)['adamw_lr']
    assert check.lr == 4e-3 and check.flags == ('--muon_weight_decay=0.0',), check  # once the lr: tied, no flag


def test_scale_runs_the_seeds_of_the_lengths_tuned_so_far_before_a_longer_sweep(tmp_path, capsys):
    """A 48-step lr sweep still to run must hold back none of the seeds of the tuned 12-step
    setting: scale asks for those first (each once), then for the sweep."""
    import math
    S, a = made_up_study(tmp_path)
    setting, _ = fill(a, lambda: a.coordinate_tune('adamw', 12, wait=False),
                      lambda run: math.log(run.lr / 4e-3) ** 2 + 0.001 * len(run.flags))
    a.seeds, a.dry_run, a.probe_config, a.probe_args = range(3), True, 'config/probe_fmnist.py', []
    capsys.readouterr()
    a.scale()
    asked = [line for line in capsys.readouterr().out.splitlines() if line.startswith('$ ')]
    trained = [line for line in asked if 'train_mae.py' in line]
    assert len(asked) == len(set(asked))
    # seed 0's made-up summary has no checkpoint: it is trained again for its probes (restore), first
    assert ['--max_iters=12' in line for line in trained] == [True, True, True, False, False, False], trained
    assert all('--seed=0' in line for line in trained[3:]) and all(f'--seed={s}' in trained[s] for s in (0, 1, 2))


def test_with_lr_keeps_an_untied_adamw_side_in_ratio():
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    import study as S
    assert S.with_lr(dict(lr=1e-2, adamw_lr=2.5e-3), 4e-2) == dict(lr=4e-2, adamw_lr=1e-2)
    assert S.with_lr(dict(lr=1e-2, adamw_lr=0.0), 4e-2) == dict(lr=4e-2, adamw_lr=0.0)  # tied stays tied


def test_tuned_report_pairs_by_seed_interpolates_by_every_rule_and_judges_the_checks(tmp_path, capsys):
    """A whole tuned study made up: both optimizers tuned (report mode, summaries written as
    asked), every length's setting at 3 seeds with probes and the floors; the report's lines
    must be what the formulas give. The probes phase then asks for the all-token probe of
    every final encoder, and for its random-encoder floor beside AdamW's short runs alone."""
    import math
    S, a = made_up_study(tmp_path)
    a.seeds, a.probe_config, a.probe_args, a.tables = range(3), 'config/probe_fmnist.py', [], ['blog']

    def loss(run):  # a bowl in lr around 8e-3 (AdamW) or 3.2e-2 (Muon), falling with length; seeds shift it
        best = 3.2e-2 if run.optimizer == 'muon' else 8e-3
        level = {12: 0.40, 48: 0.30, 192: 0.25}[run.iters] - (0.05 if run.optimizer == 'muon' else 0.0)
        return level + 0.01 * math.log(run.lr / best) ** 2 + 0.001 * len(run.flags) + 0.002 * run.seed
    for optimizer in ('adamw', 'muon'):
        settings, _ = fill(a, lambda: (lambda s: s if len(s) == 3 else None)(
            a.length_settings(optimizer, wait=False)), loss)
        for iters, setting in settings.items():
            for seed in (1, 2):
                run = a.setting_run(optimizer, setting, iters, seed)
                a.save(run, dict(run._asdict(), name=run.name, final_val=loss(run), curve={}, train_s=1.0, probes={}))
            for seed in (0, 1, 2):  # probes: Muon reads 0.1 above AdamW; the floors per seed
                run = a.setting_run(optimizer, setting, iters, seed)
                s = a.summary(run)
                s['probes']['default'] = dict(attentive=0.5 + 0.1 * (optimizer == 'muon') + 0.01 * seed,
                                              linear=0.6 + 0.1 * (optimizer == 'muon') + 0.02 * seed, warning='',
                                              probe_s=1.0)
                if optimizer == 'adamw' and iters == 12:
                    s['probes']['random'] = dict(attentive=0.3, linear=0.2 + 0.01 * seed, warning='', probe_s=1.0)
                    s['probes']['pixels=True_head=linear'] = dict(linear=0.8, warning='', probe_s=1.0)
                a.save(run, s)
        trace = []
        a.coordinate_tune(optimizer, 12, wait=False, trace=trace)
        for run in a.check_runs(optimizer, settings[192], trace).values():
            a.save(run, dict(run._asdict(), name=run.name, final_val=loss(run) - 0.01 * (run.optimizer == 'muon'),
                             curve={}, train_s=1.0, probes={}))
    at = a.tuned_at(48)
    for seed in (0, 1, 2):  # the blog's rows at 48 steps: the no-bias rows 0.002 + 0.0001 * seed above the others
        for row in S.TABLES['blog']:
            run = a.row_run(row, at, seed)
            if a.summary(run) is None:
                a.save(run, dict(run._asdict(), name=run.name, curve={}, train_s=1.0, probes={}, final_val=loss(
                    run._replace(flags=())) + (0.002 + 0.0001 * seed) * ('--bias=False' in run.flags)))
    a.dry_run, a.optimizers = True, ['adamw', 'muon']
    capsys.readouterr()
    a.probes()
    asked = [line for line in capsys.readouterr().out.splitlines() if line.startswith('$ ')]
    restored = [line for line in asked if 'train_mae.py' in line]  # made-up runs: no checkpoints
    asked = [line for line in asked if 'probe.py' in line]
    assert len(restored) == 2 * 3 * 3 and len(set(restored)) == len(restored)
    assert len(asked) == 2 * 3 * 3 + 3 and all('--linear_pool=flatten --head=linear' in line for line in asked)
    floors = [line for line in asked if '--random_encoder=True' in line]
    assert len(floors) == 3 and all('adamw_lr0.008_len12_' in line for line in floors)
    a.dry_run = False
    for optimizer in ('adamw', 'muon'):  # all tokens: Muon 0.05 above AdamW; the floors per seed
        for iters, setting in a.length_settings(optimizer, wait=False).items():
            for seed in (0, 1, 2):
                run = a.setting_run(optimizer, setting, iters, seed)
                s = a.summary(run)
                s['probes'][S.probe_key(S.FLATTEN)] = dict(linear=0.85 + 0.05 * (optimizer == 'muon') + 0.02 * seed,
                                                           warning='', probe_s=1.0)
                if optimizer == 'adamw' and iters == 12:
                    s['probes'][S.probe_key(S.FLATTEN, random_encoder=True)] = dict(
                        linear=0.82 + 0.01 * seed, warning='', probe_s=1.0)
                a.save(run, s)
    a.tables = ['blog', 'probe_optimizer']  # the second table's rows are not probed: no resolution in top-1 there
    trace = []
    a.coordinate_tune('muon', 12, wait=False, trace=trace)
    check = a.check_runs('muon', a.length_settings('muon', wait=False)[192], trace)['warmup_epochs']
    a.save(check, dict(a.summary(check), train_s=2.5 * 3600 - 3))
    for seed in (1, 2):  # this check at two more seeds, each shifted as the tuned runs are: the paired line
        a.save(check._replace(seed=seed), dict(a.summary(check), seed=seed, final_val=a.summary(check)['final_val']
                                               + 0.002 * seed, name=check._replace(seed=seed).name, train_s=0.0))
    a.report_tuned()
    text = (tmp_path / 'results' / 'study.md').read_text()
    # the probe table's rows share their encoders: their val loss is not compared, and their top-1 is not there
    assert 'nan' not in text and '+0.00000' not in text
    assert text.count('no difference is tested until every row has 2 seeds') == 1
    # every summary in exactly one phase: 2 x 3 lengths x 3 seeds final; 4 checks, one at 3 seeds; the 6 x 3 blog
    # rows less the 2 x 3 that are final runs (AdamW's and Muon's plain rows); the rest are the sweeps' other settings
    phases = re.search(r'By phase, in core-hours \(.*?\): (.*)\.\n', text).group(1).split('; ')
    counts = [int(re.search(r': (\d+) runs, ', p).group(1)) for p in phases]
    assert counts[0] == 18 and counts[3:] == [6, 12, 0] and sum(counts) == len(a.summaries()), phases
    assert phases[3] == 'the checks at 192 steps: 6 runs, 2.5 training, 0.0 probing', phases  # one ran 2.5 h
    line = next(x for x in text.splitlines() if x.startswith('- muon, warmup_epochs: '))
    delta = re.search(r'\(seed 0, ([-+]\d\.\d{4})\)', line).group(1)
    assert line.endswith(f"; over seeds 0, 1, 2, paired: {delta} *"), line
    assert '; over seeds ' not in text.replace(line, '')  # the other checks have seed 0 alone
    assert "| Muon, no bias, GELU, LN (`--bias=False`) | muon 0.032 | 0.25410 ± 0.00210 (3) | -0.04790 * |" in text
    assert "Muon, bias, GELU, LN - Muon, no bias, GELU, LN: val -0.00210 *" in text  # paired: t = 36
    # seed means: AdamW 0.402, 0.302, 0.252 (seeds add 0, 0.002, 0.004); Muon 0.05 lower, exactly paired
    assert "| 12 | 0.008, 0.4020 ± 0.0020 (3) | 0.032, 0.3520 ± 0.0020 (3) | -0.0500 * |" in text
    assert "| 192 | 0.008, 0.2520 ± 0.0020 (3) | 0.032, 0.2020 ± 0.0020 (3) | -0.0500 * |" in text
    # Muon's 0.352 at 12 steps lies between AdamW's 0.402 (12) and 0.302 (48): halfway
    log_linear, linear = 12 * 2 ** 1, 12 + 0.5 * 36
    power = math.exp(math.log(12) + (math.log(0.402) - math.log(0.352)) / (math.log(0.402) - math.log(0.302))
                     * math.log(4))
    noise = 2 * 0.002 * math.sqrt(1 / 3 + 1 / 3)  # the log-linear answer with the target moved by the seed noise
    low, high = (4 ** ((0.402 - t) / 0.1) for t in (0.352 + noise, 0.352 - noise))
    assert (f"- Muon at 12 steps (0.3520, n = 3): log-linear {log_linear / 12:.2f}x ({low:.2f}x to {high:.2f}x); "
            f"linear {linear / 12:.2f}x; power law {power / 12:.2f}x\n" in text), text
    # at 48 steps Muon's 0.252 is AdamW's at 192: 4x by every rule
    assert "- Muon at 48 steps (0.2520, n = 3): log-linear 4.00x (" in text
    assert "; linear 4.00x; power law 4.00x\n" in text
    # each longer length's sweeps: the lr, then the decay (the default's flagless run wins), by name
    assert "- adamw, 48 steps, lr: 0.004: " in text and "- muon, 192 steps, muon_weight_decay: " in text
    assert text.count(' steps, lr: ') == 4 and text.count(' steps, weight_decay: ') == 2  # each once: neither moved
    assert text.count(' steps, muon_weight_decay: ') == 2
    # the checks, of the knobs not re-tuned per length: AdamW's moved knobs cost 0.001 (hold); Muon's gain 0.01 - 0.001
    assert text.count('the short length\'s value holds') == 2 and text.count('DOES NOT HOLD') == 2
    # the seed SD at 192 steps is 0.002 (seeds 0.002 apart): AdamW's +0.001 is within 2·sqrt(2)·0.002, Muon's -0.009 not
    assert "The seed SD of a final run there is 0.0020;" in text
    assert text.count("value holds (within the noise)") == 2 and "HOLD (within" not in text
    assert 'Before the weight decay was re-tuned' not in text  # it never moved: one protocol
    # probe margins paired by seed: AdamW attentive 0.5 + 0.01 s against 0.3; linear 0.6 + 0.02 s against 0.2 + 0.01 s;
    # all tokens 0.85 + 0.02 s against a random encoder's 0.82 + 0.01 s and the pixels' 0.8
    assert ("- adamw, 12 steps: random attentive +0.210 *; random linear +0.410 *; random all tokens +0.040 *; "
            "pixels all tokens +0.070 *") in text
    assert ("- muon, 192 steps: random attentive +0.310 *; random linear +0.510 *; random all tokens +0.090 *; "
            "pixels all tokens +0.120 *") in text
    assert "| 192 | 0.510 ± 0.010 (3) | 0.610 ± 0.010 (3) | 0.620 ± 0.020 (3) | 0.720 ± 0.020 (3) | 0.870 ± 0.020 (3) " \
        "| 0.920 ± 0.020 (3) |" in text


def test_once_the_decay_moves_the_report_keeps_the_lr_only_protocol_in_its_own_part(tmp_path):
    """Each optimizer's best weight decay quarters with each 4x in length, its best lr stays: the
    per-length re-tune moves the decay, and the report gives both protocols from their own runs,
    the earlier one (the lr alone re-tuned) with its weight-decay check at the longest length,
    the current one without (its decay is tuned there)."""
    import math
    S, a = made_up_study(tmp_path)
    key = {o: S.RETUNED[o][1].key for o in ('adamw', 'muon')}

    def loss(run):
        flags = dict(f[2:].split('=') for f in run.flags)
        wd = float(flags.get(key[run.optimizer], a.defaults(run.optimizer)[key[run.optimizer]]))
        return (math.log(run.lr / 4e-3) ** 2 + math.log((wd + 1e-3) / (0.1 / 4 ** math.log(run.iters / 12, 4))) ** 2
                + 0.001 * len(flags) + 1 / run.iters)

    def both():
        got = {(o, r): a.length_settings(o, wait=False, retuned=r) for o in ('adamw', 'muon') for r in (None, (S.LR,))}
        return got if all(len(g) == 3 for g in got.values()) else None
    settings, _ = fill(a, both, loss)
    for o in ('adamw', 'muon'):
        assert [settings[o, None][n][key[o]] for n in (12, 48, 192)] == [0.1, 0.025, 0.00625]
        assert [settings[o, (S.LR,)][n][key[o]] for n in (12, 48, 192)] == [0.1, 0.1, 0.1]
        trace = []
        a.coordinate_tune(o, 12, wait=False, trace=trace)
        for r in (None, (S.LR,)):
            for run in a.check_runs(o, settings[o, r][192], trace, r).values():
                a.save(run, dict(run._asdict(), name=run.name, final_val=loss(run), curve={}, train_s=1.0, probes={}))
    a.tables = ['blog']
    a.report_tuned()
    now, _, earlier = (tmp_path / 'results' / 'study.md').read_text().partition(
        '# Before the weight decay was re-tuned per length')
    assert earlier, now
    assert '- adamw, 48 steps, weight_decay: 0.0125: ' in now and '**0.025: ' in now
    assert '- muon, 192 steps, muon_weight_decay: ' in now and '48 steps, lr: ' in earlier
    assert ' steps, weight_decay: ' not in earlier
    checks = [line for line in earlier.splitlines() if line.startswith(('- adamw, weight_decay: ', '- muon, muon_weight'))]
    assert len(checks) == 2 and all('DOES NOT HOLD' in line for line in checks), checks
    assert '- adamw, weight_decay: ' not in now and '- muon, muon_weight_decay: ' not in now
    assert 'adamw 2500 (208.33) at 12 steps, 10000 (208.33) at 48 steps, 40000 (208.33) at 192 steps;' in now  # 1/(lr·wd)
    assert 'muon 2500 (208.33) at 12 steps, 2500 (52.08) at 48 steps, 2500 (13.02) at 192 steps.' in earlier
    note = 'A row with no runs (–) was not run at these settings'
    assert '## blog, at 48 steps' in now and note in now and note not in earlier  # the part the note points to has none


def test_a_best_lr_on_the_sweeps_edge_is_never_taken_as_tuned(tmp_path, monkeypatch):
    """The bracketing rule wherever the built-in study reads a sweep: a best on the edge is
    not tuned (tuned_lr None, the tables wait for it, the report says so), and the sweep phase
    widens it, by a factor of 2, until it is inside."""
    S, a = made_up_study(tmp_path, 'LrStudy')
    a.tables, a.dry_run, a.seeds = ['blog'], False, range(1)
    losses = {1e-3: 0.5, 2e-3: 0.4, 4e-3: 0.3, 8e-3: 0.35}  # the best, 4e-3, inside only once 8e-3 has run

    def fake_train(run):  # "trains" by writing a summary
        if a.summary(run) is None:
            a.save(run, dict(run._asdict(), name=run.name, final_val=losses[run.lr], curve={}, train_s=1.0, probes={}))
        return a.summary(run)
    for lr in (1e-3, 2e-3, 4e-3):
        fake_train(S.Run('adamw', lr, 12))
    runs = a.sweep_summaries('adamw', 12)
    assert a.tuned_lr('adamw', 12) is None and S.sweep_best(runs)[2] is False
    assert a.unready_tables() == {'blog': ['adamw', 'muon']}
    with pytest.raises(SystemExit, match='unfinished'):
        a.best_lr('adamw', 12)
    fake_train(S.Run('muon', 4e-3, 12))  # a Muon run, so the report has a speedup to leave out
    a.report()
    text = (tmp_path / 'results' / 'study.md').read_text()
    assert "(best ON THE EDGE;" in text and "| 12 | 0.004 (best on the edge), 0.3000 (1) |" in text
    assert "Muon's speedup" not in text  # no AdamW length with its best inside to interpolate
    os.remove(a.summary_path(S.Run('muon', 4e-3, 12)))
    monkeypatch.setattr(a, 'train', fake_train)
    a.optimizers, a.lrs = ['adamw'], (1e-3, 2e-3, 4e-3)
    a.sweep()  # the phase: widens once, to 8e-3, and stops: 4e-3 is inside
    assert sorted(a.sweep_summaries('adamw', 12)) == [1e-3, 2e-3, 4e-3, 8e-3]
    assert a.tuned_lr('adamw', 12) == 4e-3 and S.sweep_best(a.sweep_summaries('adamw', 12)) == (4e-3, 0.3, True)
    assert a.unready_tables() == {'blog': ['muon']}


def test_a_probe_keeps_what_another_process_saved_before_it_took_the_lock(tmp_path, monkeypatch):
    """Two study processes probe the same run (scale and probes): the summary is read again under
    the lock, so a probe saved by the other process in between is neither lost nor run twice."""
    S, a = made_up_study(tmp_path)
    run = S.Run('adamw', 1e-3, 12)
    a.save(run, dict(run._asdict(), name=run.name, final_val=0.5, curve={}, train_s=1.0, probes={}))
    lock, saved_by_the_other = a.lock, []
    other = dict(linear=0.7, warning='', probe_s=1.0)

    @contextlib.contextmanager
    def lock_after_the_other(run):  # the other process saves its probe, then releases the lock we take
        s = a.summary(run)
        s['probes'][saved_by_the_other.pop()] = other
        a.save(run, s)
        with lock(run) as mine:
            yield mine
    ran = []

    def fake_probe(script, args):  # writes what probe.py would
        out_dir = next(x.split('=', 1)[1] for x in args if x.startswith('--out_dir='))
        os.makedirs(out_dir, exist_ok=True)
        ran.append(out_dir)
        with open(os.path.join(out_dir, 'probe_results.json'), 'w') as f:
            json.dump(dict(results=[dict(head='linear', top1=0.8)]), f)
        return 2.0
    monkeypatch.setattr(a, 'lock', lock_after_the_other)
    monkeypatch.setattr(a, 'execute', fake_probe)
    monkeypatch.setattr(a, 'restore', lambda run: None)  # a made-up run: no encoder to train again
    saved_by_the_other.append('random')
    a.probe(run)
    assert a.summary(run)['probes'] == dict(random=other, default=dict(linear=0.8, warning='', probe_s=2.0))
    saved_by_the_other.append(S.probe_key(S.FLATTEN))
    a.probe(run, S.FLATTEN)  # the other process probed this one meanwhile: not run again
    assert len(ran) == 1 and a.summary(run)['probes'][S.probe_key(S.FLATTEN)] == other


def test_a_finished_run_whose_checkpoint_is_gone_is_trained_again_before_its_probes(tmp_path, capsys):
    """A run's out dir stays on the machine that trained it; its summary is what lands. Probed on
    another machine, the run is trained again first: the same seed and code end at the same val
    loss, bit for bit, and the summary keeps its figures beside the re-run's. Nothing runs twice."""
    import shutil
    S, a = made_up_study(tmp_path)
    a.probe_args = ['--epochs=1', '--lrs=(1e-2,)', '--wds=(0.0,)']
    run = S.Run('adamw', 4e-3, 4)
    first = a.train(run)
    shutil.rmtree(tmp_path / 'out' / run.name)
    capsys.readouterr()
    a.probe_final(run)
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith('$ ')]
    assert ['train_mae.py' in c for c in commands] == [True, False, False] and '--init_from' not in commands[0]
    s = a.summary(run)
    assert s['final_val'] == first['final_val'] and s['retrained_val'] == first['final_val']
    assert s['train_s'] == first['train_s'] and s['retrain_s'] > 0
    assert s['retrain_machine'] == s['machine'] and s['machine']['kernels'] and s['machine']['torch']
    assert set(s['probes']) == {'default', S.probe_key(S.FLATTEN)}
    a.probe_final(run)  # probed: nothing runs
    a.restore(run)  # its checkpoint is there and finished: nothing runs
    assert '$ ' not in capsys.readouterr().out and a.summary(run) == s
    shutil.rmtree(tmp_path / 'out' / run.name)
    a.probe(run, random_encoder=True)  # any probe (a table row's, a floor) trains it again first
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith('$ ')]
    assert ['train_mae.py' in c for c in commands] == [True, False] and a.summary(run)['retrained_val'] == first['final_val']
    assert '1.5 core-hours training' in S.fmt_machine_time([dict(train_s=3600.0, retrain_s=1800.0, probes={})])
