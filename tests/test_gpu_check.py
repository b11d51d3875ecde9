"""scripts/gpu_check.py: its CPU dry run measures every check (the same code as the GPU run, at
tiny sizes), a short budget skips checks by name, a time box ends a check, and the resume
comparison sees a changed loss or weight."""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import train_mae
from conftest import ROOT, run

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import gpu_check  # noqa: E402


def read(out):
    with open(os.path.join(out, gpu_check.RESULTS)) as f:
        return [json.loads(line) for line in f]


def numbers(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from numbers(v)


def test_the_dry_run_measures_every_check(tmp_path):
    run(['scripts/gpu_check.py', '--device=cpu', f'--out_dir={tmp_path / "out"}', f'--scratch_dir={tmp_path / "scratch"}',
         '--budget_s=400'], timeout=420)
    records = read(tmp_path / 'out')
    assert records[0]['check'] == 'plan' and list(records[0]['estimate_s']) == list(gpu_check.CHECKS)
    ends = [r for r in records if r.get('end')]
    assert [(r['check'], r['status']) for r in ends] == [(name, 'ok') for name in gpu_check.CHECKS]
    measured = [r for r in records[1:] if not r.get('end')]
    assert [r for r in measured if r['status'] != 'ok'] == []
    assert {r['check'] for r in measured} == set(gpu_check.CHECKS)
    assert all(math.isfinite(x) for r in records for x in numbers(r))

    def only(check, part=None, **fields):
        return [r for r in measured if r['check'] == check and (part is None or r.get('part') == part)
                and all(r.get(k) == v for k, v in fields.items())]

    [eager], [compiled] = only('train_eager'), only('train_compiled')
    for r, compile in ((eager, False), (compiled, True)):
        assert r['compile'] is compile and r['dtype'] == 'bfloat16' and r['micro_batch_size'] == 8
        assert r['imgs_per_sec'] > 0 and r['peak_mem_gb'] > 0 and r['mfu'] is None  # no GPU peak on a CPU

    # Muon: the whole step on the device and the host CPU, and Newton-Schulz alone on every shape
    steps = {r['part']: r for r in only('muon') if r.get('name') == 'muon_step'}
    assert set(steps) == {'device', 'host cpu bfloat16', 'host cpu float32'}
    assert steps['host cpu bfloat16']['ns_dtype'] == 'bfloat16' and steps['host cpu float32']['ns_dtype'] == 'float32'
    assert all(r['ours_ms'] > 0 and r['torch_ms'] > 0 for r in steps.values())
    c = SimpleNamespace(**{**train_mae.CONFIG, **gpu_check.TINY_MODEL})
    shapes = {tuple(p.shape) for _, p in train_mae.param_groups(train_mae.build_model(c), c)['muon']}
    for part in ('device newton-schulz', 'host cpu newton-schulz'):
        assert {tuple(r['shape']) for r in only('muon', part)} == shapes
        assert all(min(r['ours_batched_ms'], r['ours_looped_ms'], r['torch_ms']) > 0 for r in only('muon', part))

    # numerics: bf16 autocast tracks fp32 over the steps, the compiled graph (aot_eager here) is
    # eager's, and flash attention is as close to fp32 as the math path
    [bf16] = only('numerics', 'bf16 autocast vs fp32')
    assert bf16['steps'] == 4 and bf16['max_loss_rel_diff'] < 0.01 and 0 < bf16['weight_rel_diff'] < 0.5
    [comp] = only('numerics', 'compiled vs eager')
    assert comp['backend'] == 'aot_eager' and comp['grad_rel_diff'] <= comp['bf16_grad_rel_diff'] < 0.05
    [flash] = only('numerics', 'flash vs math attention')
    assert flash['flash_vs_fp32'] < 2 * flash['math_vs_fp32'] + 1e-3 < 0.05

    [data] = only('data')
    assert data['train_images'] == 64 and data['val_images'] == 16
    # the real run under torchrun, from the packed copy: stopped by SIGTERM, resumed, the same log line by line
    [straight], [resumed] = only('resume', run='straight'), only('resume', run='stopped and resumed')
    assert straight['imgs_per_sec'] > 0 and straight['world'] == resumed['world'] == 1
    assert 0 < resumed['stopped_at'] < 12 and resumed['exact'] is True and resumed['max_weight_diff'] == 0
    assert resumed['lines_compared'] == 12 + 2  # every step's loss and the two evaluations
    assert resumed['loss_diff_before_stop'] == resumed['loss_diff_after_stop'] == 0

    stages = {(r['stage'], r['path'], r.get('resize')) for r in only('loader')}
    assert {('MAEDataset train pipeline', path, resize) for path in ('folder', 'packed256')
            for resize in ('loader', 'device')} <= stages
    [probe] = only('probe')
    assert probe['configs'] == 30 and probe['sweep_s'] > 0 and probe['single_s'] > 0

    summary = (tmp_path / 'out' / gpu_check.SUMMARY).read_text()
    assert all(f"| {name} | (end) | ok |" in summary for name in gpu_check.CHECKS)
    assert 'The goal, 10,000 images/s (30% MFU) for ViT-S/16 on one H100: the best here is' in summary
    assert sorted(os.listdir(tmp_path / 'out' / 'logs')) == sorted(
        [f'{name}.log' for name in gpu_check.CHECKS] + [f'resume_{n}_1.log' for n in ('straight', 'stopped', 'resumed')])


def test_a_short_budget_skips_by_name_and_a_time_box_ends_a_check(tmp_path, monkeypatch, capsys):
    # data gets a 1 s box (2 x its estimate) that importing torch alone overruns; loader needs data;
    # probe's estimate does not fit in what is left of the 4 s budget
    monkeypatch.setitem(gpu_check.ESTIMATE_S, 'data', (1, 0.5))
    monkeypatch.setitem(gpu_check.ESTIMATE_S, 'probe', (30, 60))
    gpu_check.main(['--device=cpu', '--checks=data,loader,probe', '--budget_s=4', f'--out_dir={tmp_path}',
                    f'--scratch_dir={tmp_path / "scratch"}'])
    ends = {r['check']: r for r in read(tmp_path) if r.get('end')}
    assert ends['data']['status'] == 'timeout' and ends['data']['seconds'] < 20
    assert ends['loader']['status'] == 'skipped' and ends['loader']['reason'] == 'needs data, which ended timeout'
    assert ends['probe']['status'] == 'skipped' and ends['probe']['reason'].startswith('budget: estimated 60 s')
    out = capsys.readouterr().out
    assert 'the last are skipped: probe, loader, data' in out and '| probe | (end) | skipped |' in out
    with pytest.raises(SystemExit, match="unknown"):
        gpu_check.main(['--device=cpu', '--checks=train,nope', f'--out_dir={tmp_path}'])


def write_run(folder, losses, weight):
    os.makedirs(folder)
    with open(folder / 'log.jsonl', 'w') as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({'step': step, 'loss': loss, 'imgs_per_sec': 100.0 * step}) + '\n')
    torch.save({'model': {'w': torch.full((3,), weight)}, 'step': len(losses)}, folder / 'ckpt.pt')


@pytest.mark.parametrize('losses,weight,exact,before,after', [
    ([1.0, 0.9, 0.8, 0.7], 0.5, True, 0.0, 0.0),  # imgs_per_sec differs: timings are not compared
    ([1.0, 0.9, 0.8, 0.75], 0.5, False, 0.0, 0.05),
    ([1.0, 0.95, 0.8, 0.7], 0.5, False, 0.05, 0.0),
    ([1.0, 0.9, 0.8, 0.7], 0.5 + 2 ** -10, False, 0.0, 0.0),
])
def test_the_resume_comparison_sees_a_changed_loss_or_weight(tmp_path, losses, weight, exact, before, after):
    write_run(tmp_path / 'straight', [1.0, 0.9, 0.8, 0.7], 0.5)
    write_run(tmp_path / 'resumed', losses, weight)
    r = gpu_check.compare_runs(tmp_path / 'straight', tmp_path / 'resumed', stopped_at=2)
    assert r['exact'] is exact and r['lines_compared'] == 4 and r['max_weight_diff'] == abs(weight - 0.5)
    assert r['loss_diff_before_stop'] == pytest.approx(before) and r['loss_diff_after_stop'] == pytest.approx(after)
    write_run(tmp_path / 'short', [1.0, 0.9, 0.8], 0.5)
    with pytest.raises(RuntimeError, match='other lines'):
        gpu_check.compare_runs(tmp_path / 'straight', tmp_path / 'short', stopped_at=2)
