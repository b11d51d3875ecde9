import json
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import train_mae
from conftest import run

TINY_MODEL = dict(img_size=32, patch_size=8, enc_dim=64, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)


def test_bench_prints_every_bench_as_json(tmp_path):
    keys = dict(TINY_MODEL, batch_size=16, micro_batch_size=8, iters=2, warmup_iters=1, peak_flops=1e12, muon_iters=2,
                loader_images=24, loader_batches=2, loader_workers=(0, 1), loader_rounds=1, bench_dir=str(tmp_path),
                num_workers=0,
                synthetic_size=(64, 32), probe_batch_size=32, probe_epochs=1)
    argv = [f"--{k}={v}" for k, v in keys.items()]
    out = run(['bench.py', '--device=cpu', *argv], timeout=240)
    records = [json.loads(line) for line in out.stdout.splitlines()]  # every line is one JSON object
    by_name = {}
    for r in records:
        by_name.setdefault(r['name'], []).append(r)
    assert set(by_name) == {'train', 'muon_step', 'loader', 'probe_sweep', 'optim_state'}
    state = {(r['optimizer'], r['state_dtype']): r['bytes_per_param'] for r in by_name['optim_state']}
    assert state[('adamw', 'float32')] == pytest.approx(8.0)  # two fp32 moments
    assert 4.0 < state[('muon', 'float32')] < 8.0 and state[('muon', 'bfloat16')] < state[('muon', 'float32')]
    assert state[('lamb', 'bfloat16')] == pytest.approx(6.0)  # bf16 first moment, fp32 second
    [train] = by_name['train']
    assert train['imgs_per_sec'] > 0 and 0 < train['mfu'] < 1 and train['peak_mem_gb'] > 0
    assert train['device'].startswith('cpu')
    [muon] = by_name['muon_step']
    assert muon['ours_ms'] > 0 and muon['torch_ms'] > 0 and muon['speedup'] > 0
    # PIL alone, then 0 and 1 workers, each from the folder and from its packed copy, resized in the
    # workers and on the device; then the device's resize alone
    loader = [(r['stage'], r['path'], r.get('resize'), r.get('workers')) for r in by_name['loader']]
    assert loader == [('PIL decode alone', 'folder', None, 0), ('PIL decode alone', 'packed256', None, 0)] + [
        ('MAEDataset train pipeline', path, resize, w) for w in (0, 1) for path in ('folder', 'packed256')
        for resize in ('loader', 'device')] + [('resize on the device', 'packed256', None, 0)]
    assert all(r['imgs_per_sec'] > 0 for r in by_name['loader'])
    pipeline = [r for r in by_name['loader'] if r['stage'] == 'MAEDataset train pipeline']
    for per_workers in (pipeline[:4], pipeline[4:]):  # ratios to the folder resized in the workers, 4 digits
        today = per_workers[0]
        assert today['ratio'] == 1
        for r in per_workers[1:]:
            assert r['ratio'] == pytest.approx(r['imgs_per_sec'] / today['imgs_per_sec'], 1e-3)
    [sweep] = by_name['probe_sweep']
    assert sweep['configs'] == 30 and sweep['sweep_s'] > 0 and sweep['single_s'] > 0


def counted_flops(c):
    """An independent count: torch's FlopCounterMode over one forward and backward, with
    attention as plain matmuls (the math kernel) and the images requiring grad, so that
    every matmul has its two backward matmuls, as the formula's 3x assumes."""
    torch.manual_seed(0)
    model = train_mae.build_model(c)
    imgs = torch.randn(2, 3, c.img_size, c.img_size, requires_grad=True)
    noise = torch.rand(2, model.num_patches)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, noise)
        loss.backward()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize('variant', [dict(), dict(stem='conv', swiglu=True, mask_ratio=0.75, mlp_ratio=3.0)])
def test_mae_flops_per_image_matches_flop_counter(variant):
    c = SimpleNamespace(**{**train_mae.CONFIG, **TINY_MODEL, **variant})
    assert bench.mae_flops_per_image(c) == pytest.approx(counted_flops(c), rel=1e-3)


def test_vit_s16_is_29_gflop_per_image():
    # the blog's ViT-S/16: 224 px, mask 0.6, decoder 384 x 8 (train_mae's defaults)
    c = SimpleNamespace(**train_mae.CONFIG)
    assert bench.mae_flops_per_image(c) == pytest.approx(28.96e9, rel=0.005)


def test_bench_muon_step_under_torchrun_reports_once_with_the_world_size():
    argv = [f"--{k}={v}" for k, v in TINY_MODEL.items()] + ['--only=muon_step', '--muon_iters=2', '--device=cpu']
    out = run(['bench.py', *argv], torchrun=2, timeout=120)
    [record] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]  # rank 0 only
    assert record['name'] == 'muon_step' and record['world'] == 2 and record['ours_ms'] > 0
    # the refusal needs only torchrun's environment, not its processes
    refused = run(['bench.py', *argv[:-3], '--only=train', '--device=cpu'], env={'RANK': '0'}, check=False, timeout=120)
    assert refused.returncode != 0 and 'only --only=muon_step' in refused.stderr
