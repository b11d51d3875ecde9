"""probe.py: the stacked probes and optimizers against plain per-setting runs,
accuracy, checkpoints, errors and torchrun."""
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import muon
import probe
import train_mae
from conftest import TINY, run
from muon import Muon

# a tiny random encoder on the built-in data, and the system keys for a quick CPU run
PROBE_TINY = ['--ckpt=', '--data_dir=synthetic', '--img_size=32', '--patch_size=8', '--enc_dim=64', '--enc_depth=2',
              '--enc_heads=2', '--dec_dim=32', '--dec_depth=1', '--dec_heads=2', '--synthetic_size=(256,128)',
              '--batch_size=32', '--epochs=2', '--compile=False', '--num_workers=0', '--device=cpu']


@pytest.fixture(autouse=True)
def one_thread():
    # these ops are tiny: a second thread costs more than it saves, and far more on a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_logits(params, x):
    """One probe the textbook way: project every token to keys and values,
    multi-head attention of the query, then the Linear. params: 2D, one probe."""
    N, L, _ = x.shape
    H = params['query'].size(0)
    wk, wv = params['wkv'].chunk(2)  # the blog's kv_proj: keys, then values
    k = (x @ wk.T).view(N, L, H, 64).transpose(1, 2)  # [N, H, L, 64]
    v = (x @ wv.T + params['bv']).view(N, L, H, 64).transpose(1, 2)
    q = params['query'][None, :, None].expand(N, H, 1, 64)
    out = F.scaled_dot_product_attention(q, k, v).reshape(N, H * 64)
    return out @ params['head_w'].T + params['head_b']


@pytest.mark.parametrize('dim', [128, 100])  # 2 heads; 1 head of 64 on a width that is no multiple of 64
def test_stacked_forward_is_multihead_cross_attention(dim):
    torch.manual_seed(0)
    probes = probe.AttentiveProbes(3, dim, 10).double()  # float64: the two orders of summation agree to ~1e-15
    with torch.no_grad():  # probes that differ, and a query that does not attend uniformly
        for p in probes.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(5, 7, dim, dtype=torch.float64)
    logits = probes(x)
    assert logits.shape == (3, 5, 10)
    for i in range(3):
        ref = reference_logits({name: p[i] for name, p in probes.named_parameters()}, x)
        torch.testing.assert_close(logits[i], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('update,shape', [(probe.adamw_update, (3, 6, 5)), (probe.adamw_update, (3, 5)),
                                          (probe.muon_update, (3, 6, 5)), (probe.muon_update, (3, 5, 7))])
def test_stacked_updates_are_adamw_and_muon_per_setting(update, shape, monkeypatch):
    """Each probe's slice of a stacked update == torch.optim.AdamW (muon.Muon) with that probe's lr and wd."""
    # float64, so the stacked and the per-setting arithmetic agree to ~1e-15, whatever the CPU. Muon's
    # Newton-Schulz runs in fp32 on both sides (in bf16 the two memory layouts round apart by ~1e-2)
    monkeypatch.setattr(muon, 'ns_dtype', lambda device: torch.float32)
    lr, wd = torch.tensor([1e-3, 1e-2, 3e-2], dtype=torch.float64), torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    stacked = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    refs = [stacked[i].detach().clone().requires_grad_() for i in range(3)]
    if update is probe.adamw_update:
        opts = [torch.optim.AdamW([r], lr=lr[i].item(), weight_decay=wd[i].item()) for i, r in enumerate(refs)]
    else:
        opts = [Muon([r], lr=lr[i].item(), weight_decay=wd[i].item(), adjust_lr_fn='match_rms_adamw')
                for i, r in enumerate(refs)]
    state = {}
    for step in range(4):
        grad, f = torch.randn(shape, dtype=torch.float64), 1 / (step + 1)  # a decaying schedule
        stacked.grad = grad
        with torch.no_grad():
            update(stacked, state, lr * f, wd)
        for i, (r, opt) in enumerate(zip(refs, opts)):
            r.grad = grad[i].clone()
            opt.param_groups[0]['lr'] = lr[i].item() * f
            opt.step()
    # AdamW: float64 rounding. Muon: fp32 Newton-Schulz of matrices laid out differently, its
    # relative error well under 1e-6, times the sum of the steps' lr x Muon's shape scale
    scale = muon.adjusted_lr(1.0, 'match_rms_adamw', shape[1:]) if len(shape) == 3 else 1.0
    tol = 1e-12 if update is probe.adamw_update else 1e-6 * lr.max().item() * scale * sum(1 / (s + 1) for s in range(4))
    for i, r in enumerate(refs):
        torch.testing.assert_close(stacked[i], r, rtol=0, atol=tol)
    assert (stacked[0] - stacked[2]).abs().max() > 0.01  # the settings differ


@pytest.mark.parametrize('head_wd', [None, 3.0])
def test_sweep_trains_each_setting_exactly_as_alone(head_wd):
    """The whole grid trained at once == each setting alone: a textbook 2D probe
    with torch.optim.AdamW, its lr schedule and weight decays, on the same batches.
    (With Muon, a probe's key and value gradients have low rank and Newton-Schulz
    amplifies rounding in the missing directions: it is checked update by update above.)
    In float64: Adam divides by sqrt(v), so an element whose gradients are near 0
    amplifies the two sides' different summation orders (in fp32 by ~2e-4 relative
    here, which no tolerance of fp32 rounding covers on every CPU); float64's 1e-16,
    amplified as much, stays far below 1e-10."""
    lrs, wds, dim, steps, warmup, tol = (1e-3, 1e-2), (0.0, 1.0), 128, 8, 2, 1e-10
    grid = [(lr, wd) for lr in lrs for wd in wds]
    torch.manual_seed(0)
    batches = [(torch.randn(16, 9, dim, dtype=torch.float64), torch.randint(0, 10, (16,))) for _ in range(steps)]
    schedule = [train_mae.lr_factor(s, steps, warmup, 'cosine', 0.0, 1 / 3) for s in range(steps)]

    probes = probe.AttentiveProbes(len(grid), dim, 10, seed=1).double()
    decay = torch.tensor([wd for _, wd in grid], dtype=torch.float64)
    head_decay = decay if head_wd is None else torch.full_like(decay, head_wd)
    opt = probe.ProbeOptimizer(probes, decay, head_decay, 'adamw')
    for (x, y), f in zip(batches, schedule):
        losses = F.cross_entropy(probes(x).flatten(0, 1), y.repeat(len(grid)), reduction='none').view(len(grid), -1)
        losses.mean(1).sum().backward()
        opt.step(torch.tensor([lr for lr, _ in grid], dtype=torch.float64) * f)
        probes.zero_grad()

    init = probe.AttentiveProbes(1, dim, 10, seed=1).double()
    for i, (lr, wd) in enumerate(grid):
        ref = {name: p[0].detach().clone().requires_grad_() for name, p in init.named_parameters()}
        ref_opt = torch.optim.AdamW([dict(params=[ref['bv'], ref['head_b']], weight_decay=0.0),
                                     dict(params=[ref['query'], ref['wkv']], weight_decay=wd),
                                     dict(params=[ref['head_w']], weight_decay=wd if head_wd is None else head_wd)],
                                    lr=lr, betas=(0.9, 0.999))
        for (x, y), f in zip(batches, schedule):
            F.cross_entropy(reference_logits(ref, x), y).backward()
            for group in ref_opt.param_groups:
                group['lr'] = lr * f
            ref_opt.step()
            ref_opt.zero_grad()
        for name, p in probes.named_parameters():
            torch.testing.assert_close(p[i], ref[name].detach(), rtol=tol, atol=tol,
                                       msg=lambda m: f"lr={lr} wd={wd} {name}: {m}")
    for i in range(1, len(grid)):  # and the settings really moved the probes apart
        assert (probes.wkv[0] - probes.wkv[i]).abs().max() > 1e-4


def test_linear_probe_normalisation_is_mae_s_batchnorm_without_affine():
    """MAE's linear probe (He et al. 2022, appendix A.2; its code: BatchNorm1d(affine=False,
    eps=1e-6) before the Linear), on the mean of the patch tokens, written here from
    the definitions: in training each feature is standardised with the batch's mean
    and biased variance plus 1e-6; in evaluation with running statistics that move
    0.1 of the way to each batch's mean and unbiased variance; nothing is learned but
    the Linear. Float64, on features whose variance (~1e-6) makes eps matter."""
    P, D, C, f64 = 2, 8, 5, dict(dtype=torch.float64)
    torch.manual_seed(0)
    probes = probe.LinearProbes(P, D, C).double()
    assert {name for name, _ in probes.named_parameters()} == {'head_w', 'head_b'}
    with torch.no_grad():
        probes.head_w.copy_(torch.randn(P, C, D, **f64))
        probes.head_b.copy_(torch.randn(P, C, **f64))
    logits_of = lambda f: torch.einsum('nd,pcd->pnc', f, probes.head_w) + probes.head_b[:, None]
    running_mean, running_var = torch.zeros(D, **f64), torch.ones(D, **f64)
    for step in range(3):
        x = torch.randn(16, 9, D, **f64) * 3e-3 * (step + 1) + 5  # [N, L, D] tokens
        f = x.mean(1)
        mean, var = f.mean(0), f.var(0, unbiased=False)
        with torch.no_grad():
            torch.testing.assert_close(probes(x), logits_of((f - mean) / (var + 1e-6).sqrt()), rtol=1e-10, atol=1e-10)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * f.var(0, unbiased=True)
    probes.eval()
    x = torch.randn(4, 9, D, **f64) * 3e-3 + 5
    with torch.no_grad():
        want = logits_of((x.mean(1) - running_mean) / (running_var + 1e-6).sqrt())
        torch.testing.assert_close(probes(x), want, rtol=1e-10, atol=1e-10)


def test_linear_probes_are_mae_s_protocol_and_train_each_setting_as_alone():
    """Mean-pooled tokens, BatchNorm without affine (batch statistics in training,
    running ones in eval), one Linear: each stacked probe == nn.Sequential of
    those, trained alone by torch.optim.AdamW on the same batches."""
    lrs, wds, dim, steps = (1e-3, 1e-2), (0.0, 1.0), 32, 6
    grid = [(lr, wd) for lr in lrs for wd in wds]
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)  # as above: Adam amplifies rounding, so float64 and a tolerance of 1e-10
    batches = [(torch.randn(16, 9, dim, **f64) * 3 + 1, torch.randint(0, 10, (16,))) for _ in range(steps)]
    probes = probe.LinearProbes(len(grid), dim, 10, seed=1).double()
    decay = torch.tensor([wd for _, wd in grid], **f64)
    opt = probe.ProbeOptimizer(probes, decay, decay, 'adamw')
    for x, y in batches:
        F.cross_entropy(probes(x).flatten(0, 1), y.repeat(len(grid)), reduction='none').view(len(grid), -1).mean(1).sum().backward()
        opt.step(torch.tensor([lr for lr, _ in grid], **f64))
        probes.zero_grad()
    init = probe.LinearProbes(1, dim, 10, seed=1).double()
    x_val = torch.randn(5, 9, dim, **f64)
    for i, (lr, wd) in enumerate(grid):
        ref = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6), torch.nn.Linear(dim, 10)).double()
        with torch.no_grad():
            ref[1].weight.copy_(init.head_w[0])
            ref[1].bias.zero_()
        ref_opt = torch.optim.AdamW([dict(params=[ref[1].weight], weight_decay=wd),
                                     dict(params=[ref[1].bias], weight_decay=0.0)], lr=lr)
        for x, y in batches:
            F.cross_entropy(ref(x.mean(1)), y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        torch.testing.assert_close(probes.head_w[i], ref[1].weight.detach(), rtol=1e-10, atol=1e-10)
        probes.eval(), ref.eval()
        torch.testing.assert_close(probes(x_val)[i], ref(x_val.mean(1)), rtol=1e-10, atol=1e-10)
        probes.train()


def test_both_heads_in_one_pass_and_the_edge_warning(tmp_path):
    out = probe.main(PROBE_TINY + [f'--out_dir={tmp_path}', '--head=both', '--lrs=(1e-3,1e-2)', '--wds=(0.0,)'])
    assert [(r['head'], r['lr']) for r in out['results']] == [('attentive', 1e-3), ('attentive', 1e-2),
                                                                ('linear', 1e-3), ('linear', 1e-2)]
    assert json.load(open(tmp_path / 'probe_results.json')) == out
    # two lrs: any best is on an edge, and the warning names the head and the key
    assert 'attentive probe' in out['warning'] and 'linear probe' in out['warning'] and '--lrs' in out['warning']
    c = SimpleNamespace(lrs=(1e-4, 1e-3, 1e-2), wds=(0.0, 0.05, 0.1))
    grid = lambda best, top1=0.5: [dict(head='linear', lr=lr, weight_decay=wd, top1=top1 if (lr, wd) == best else 0.1)
                                   for lr in c.lrs for wd in c.wds]
    assert probe.edge_warning(c, grid((1e-3, 0.05))) == ''
    assert 'lr=0.01 is the largest of --lrs' in probe.edge_warning(c, grid((1e-2, 0.05)))
    assert 'weight_decay=0 is the smallest of --wds' not in probe.edge_warning(c, grid((1e-3, 0.0)))  # none below 0
    c0 = SimpleNamespace(lrs=c.lrs, wds=(1e-4, 0.05, 0.1))
    grid0 = [dict(r, weight_decay=w) for r, w in zip(grid((1e-3, 0.0)), [1e-4, 0.05, 0.1] * 3)]
    assert 'weight_decay=0.0001 is the smallest of --wds' in probe.edge_warning(c0, grid0)
    tie = [dict(r, top1=0.5) if r['lr'] == 1e-3 else r for r in grid((1e-3, 0.0))]  # every wd ties: no edge
    assert probe.edge_warning(c, tie) == ''
    assert probe.edge_warning(SimpleNamespace(lrs=(1e-3,), wds=(0.0,)), [dict(head='linear', lr=1e-3, weight_decay=0.0, top1=0.5)]) == ''


def test_one_pass_sweep_matches_single_runs_end_to_end(tmp_path):
    grid = probe.main(PROBE_TINY + [f'--out_dir={tmp_path / "grid"}', '--lrs=(1e-3,1e-2)', '--wds=(0.0,1.0)',
                                    '--head_weight_decay=0.5'])
    settings = [(r['lr'], r['weight_decay']) for r in grid['results']]
    assert settings == [(1e-3, 0.0), (1e-3, 1.0), (1e-2, 0.0), (1e-2, 1.0)]  # lr-major
    assert json.load(open(tmp_path / 'grid' / 'probe_results.json')) == grid
    assert grid['best'] == max(grid['results'], key=lambda r: r['top1'])
    for lr, wd in [(1e-3, 1.0), (1e-2, 0.0)]:
        alone = probe.main(PROBE_TINY + [f'--out_dir={tmp_path / "alone"}', f'--lrs=({lr},)', f'--wds=({wd},)',
                                         '--head_weight_decay=0.5'])
        [r] = [r for r in grid['results'] if (r['lr'], r['weight_decay']) == (lr, wd)]
        assert abs(alone['results'][0]['top1'] - r['top1']) <= 1 / 128 + 1e-9  # at most one val image apart


def test_augment_false_encodes_once_and_trains_as_a_plain_loop(tmp_path, monkeypatch):
    """augment=False keeps every train image's tokens from one encoder pass; the
    probes then train exactly as a plain loop that encodes each batch's centre
    crops afresh, in the same batch order."""
    calls, forward_features = [], train_mae.MAE.forward_features
    monkeypatch.setattr(train_mae.MAE, 'forward_features', lambda self, x: calls.append(len(x)) or forward_features(self, x))
    argv = PROBE_TINY + ['--synthetic_size=(96,40)', '--epochs=3', '--lrs=(1e-2,)', '--wds=(0.05,)', '--augment=False']
    out = probe.main(argv + [f'--out_dir={tmp_path}'])
    assert sum(calls) == 96 + 40, calls  # each train and val image once, not once per epoch
    monkeypatch.undo()
    c, _ = probe.load_config(argv)
    torch.manual_seed(c.seed)
    model = train_mae.build_model(c).eval()
    train_set, val_set = train_mae.build_datasets(c, num_patches=0)
    train_set.train = False
    probes = probe.AttentiveProbes(1, c.enc_dim, 10, c.seed)
    opt = probe.ProbeOptimizer(probes, torch.tensor([0.05]), torch.tensor([0.05]), 'adamw')
    encode = lambda ds, idx: (model.forward_features(data.to_device(torch.stack([ds[k].imgs for k in idx]), 'cpu')),
                              torch.tensor([ds[k].labels for k in idx]))
    total = 3 * (96 // 32)
    for step, batch in enumerate(data.TrainBatches(96, 32, 32, 0, 1, c.seed, 0, total)):
        with torch.no_grad():
            x, y = encode(train_set, [(0, i) for _, i in batch])
        F.cross_entropy(probes(x)[0], y).backward()
        opt.step(torch.tensor([1e-2]) * train_mae.lr_factor(step, total, 96 // 32, 'cosine', 0.0, 1 / 3))
        probes.zero_grad()
    with torch.no_grad():
        x, y = encode(val_set, [(0, i) for i in range(40)])
        top1 = (probes(x)[0].argmax(-1) == y).double().mean().item()
    assert out['results'][0]['top1'] == top1 and 0 < top1 < 1


def plain_linear_probe(c, features, width):
    """One linear probe (BatchNorm without affine, one Linear: LinearProbes over a single token)
    trained the textbook way on features(imgs) [n, width] of c's centre crops: lr 1e-3, weight
    decay 0.05, 2 epochs of 96 images in batches of 32. Returns (its val top-1 on 40 images,
    the trained probe)."""
    train_set, val_set = train_mae.build_datasets(c, num_patches=0)
    train_set.train = False
    probes = probe.LinearProbes(1, width, 10, c.seed)
    opt = probe.ProbeOptimizer(probes, torch.tensor([0.05]), torch.tensor([0.05]), 'adamw')

    def batch(ds, idx):
        with torch.no_grad():
            x = features(data.to_device(torch.stack([ds[k].imgs for k in idx]), 'cpu'))
        return x.reshape(len(idx), 1, -1), torch.tensor([ds[k].labels for k in idx])
    total = 2 * (96 // 32)
    for step, order in enumerate(data.TrainBatches(96, 32, 32, 0, 1, c.seed, 0, total)):
        x, y = batch(train_set, [(0, i) for _, i in order])
        F.cross_entropy(probes(x)[0], y).backward()
        opt.step(torch.tensor([1e-3]) * train_mae.lr_factor(step, total, 96 // 32, 'cosine', 0.0, 1 / 3))
        probes.zero_grad()
    probes.eval()
    with torch.no_grad():
        x, y = batch(val_set, [(0, i) for i in range(40)])
        return (probes(x)[0].argmax(-1) == y).double().mean().item(), probes


def recorded_linear_probes(monkeypatch):
    """The LinearProbes probe.main makes, kept to compare their trained weights."""
    made = []

    class Recorded(probe.LinearProbes):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(probe, 'LinearProbes', Recorded)
    return made


def assert_same_probe(probes, plain):
    """The same weights to float rounding (the features are flattened in another order of ops)."""
    torch.testing.assert_close(probes.head_w.detach(), plain.head_w.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probes.head_b.detach(), plain.head_b.detach(), rtol=1e-5, atol=1e-7)


LINEAR_TINY = PROBE_TINY + ['--synthetic_size=(96,40)', '--epochs=2', '--lrs=(1e-3,)', '--wds=(0.05,)',
                            '--augment=False', '--head=linear']  # what plain_linear_probe trains


def test_pixels_probe_is_a_logistic_regression_on_the_normalised_pixels(tmp_path, monkeypatch):
    """--pixels=True: no encoder; the linear probe trains exactly as a plain loop of BatchNorm
    (no affine) + one Linear on each image's flattened normalised pixels: the same weights."""
    made = recorded_linear_probes(monkeypatch)
    argv = LINEAR_TINY + ['--pixels=True']
    out = probe.main(argv + [f'--out_dir={tmp_path}'])
    assert out['encoder'] == 'pixels' and [r['head'] for r in out['results']] == ['linear']
    c, _ = probe.load_config(argv)
    top1, plain = plain_linear_probe(c, lambda imgs: imgs, 3 * 32 * 32)
    assert out['results'][0]['top1'] == top1
    assert_same_probe(made[0], plain)
    with pytest.raises(SystemExit, match='--pixels=True probes the pixels with the linear head alone'):
        probe.load_config(PROBE_TINY + ['--pixels=True', '--head=both'])


def test_flatten_linear_probe_is_a_logistic_regression_on_all_tokens(tmp_path, monkeypatch):
    """--linear_pool=flatten: the linear probe trains exactly as a plain loop of BatchNorm (no
    affine) + one Linear on each image's L x D encoder tokens concatenated (the same weights),
    and differs from the mean."""
    made = recorded_linear_probes(monkeypatch)
    flat = probe.main(LINEAR_TINY + ['--linear_pool=flatten', f'--out_dir={tmp_path}'])
    mean = probe.main(LINEAR_TINY + [f'--out_dir={tmp_path}'])
    c, _ = probe.load_config(LINEAR_TINY)
    torch.manual_seed(c.seed)
    model = train_mae.build_model(c).eval()
    top1, plain = plain_linear_probe(c, model.forward_features, 16 * 64)
    assert flat['results'][0]['top1'] == top1 != mean['results'][0]['top1']
    assert_same_probe(made[0], plain)
    assert made[1].head_w.shape[-1] == 64  # the mean-pooled probe reads D features, not L x D
    with pytest.raises(SystemExit, match="--linear_pool='max': must be one of mean, flatten"):
        probe.load_config(PROBE_TINY + ['--linear_pool=max'])


def test_quickstart_probe_config_runs(tmp_path):
    """config/probe_quickstart.py is a valid probe config (on a tiny encoder, for one epoch)."""
    argv = ['config/probe_quickstart.py'] + PROBE_TINY + [f'--out_dir={tmp_path}', '--epochs=1', '--batch_size=32']
    out, (c, _) = probe.main(argv), probe.load_config(argv)
    assert not c.augment and c.head == 'both' and len(out['results']) == 2 * len(c.lrs) * len(c.wds) > 2


def test_random_encoder_probe_beats_chance(tmp_path):
    # Random features of these shapes are weak (top-1 0.25-0.3 at this budget): a wide
    # encoder, its tokens of the centre crops computed once, and 640 steps keep the best probe far from chance.
    argv = PROBE_TINY + [f'--out_dir={tmp_path}', '--enc_dim=256', '--enc_heads=4', '--synthetic_size=(2048,512)',
                         '--augment=False', '--batch_size=32', '--epochs=10', '--lrs=(5e-3,1e-2,2e-2)',
                         '--wds=(0.05,)']
    results = probe.main(argv)
    assert results['best']['top1'] > 0.2, results  # chance: 0.1


@pytest.mark.parametrize('arch,optimizer', [
    (['--swiglu=True'], 'adamw'),
    (['--norm=rmsnorm', '--bias=False'], 'muon'),
    (['--stem=conv', '--swiglu=True', '--norm=rmsnorm', '--bias=False'], 'muon'),
])
def test_checkpoint_round_trip_without_repeating_flags(tmp_path, monkeypatch, arch, optimizer):
    run(TINY + arch + ['--max_iters=2', f'--out_dir={tmp_path}'])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    built, build_model = [], train_mae.build_model
    monkeypatch.setattr(train_mae, 'build_model', lambda c: built.append(build_model(c)) or built[-1])
    # no architecture or data flag: they come from the checkpoint (data_dir too)
    results = probe.main([f'--ckpt={tmp_path / "ckpt.pt"}', '--synthetic_size=(64,32)', '--batch_size=32',
                          '--epochs=1', '--lrs=(1e-3,)', '--wds=(0.05,)', '--compile=False', '--num_workers=0',
                          f'--probe_optimizer={optimizer}'])
    assert len(results['results']) == 1 and os.path.isfile(tmp_path / 'probe_results.json')  # next to the checkpoint
    [model] = built
    for k, v in ckpt['model'].items():  # the trained weights, not a fresh initialisation
        assert torch.equal(model.state_dict()[k].cpu(), v), k
    monkeypatch.undo()
    # repeating a flag with the checkpoint's value is fine; a different one is not
    probe.load_config([f'--ckpt={tmp_path / "ckpt.pt"}', '--enc_dim=64'])
    with pytest.raises(SystemExit, match="--enc_dim=128 does not match the checkpoint's 64"):
        probe.load_config([f'--ckpt={tmp_path / "ckpt.pt"}', '--enc_dim=128'])


def test_random_encoder_takes_the_checkpoints_architecture_not_its_weights(tmp_path, monkeypatch):
    run(TINY + ['--swiglu=True', '--max_iters=2', f'--out_dir={tmp_path}'])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    built, build_model = [], train_mae.build_model
    monkeypatch.setattr(train_mae, 'build_model', lambda c: built.append(build_model(c)) or built[-1])
    results = probe.main([f'--ckpt={tmp_path / "ckpt.pt"}', '--random_encoder=True', '--synthetic_size=(64,32)',
                          '--batch_size=32', '--epochs=1', '--lrs=(1e-3,)', '--wds=(0.05,)', '--compile=False',
                          '--num_workers=0', '--seed=3'])
    monkeypatch.undo()
    assert results['encoder'] == 'random' and os.path.isfile(tmp_path / 'random_encoder' / 'probe_results.json')
    assert not os.path.exists(tmp_path / 'probe_results.json')  # the pretrained encoder's results stay its own
    [model] = built
    torch.manual_seed(3)  # the probe's seed draws the random encoder
    fresh = build_model(SimpleNamespace(**{**train_mae.CONFIG, **ckpt['config']}))
    assert model.state_dict().keys() == ckpt['model'].keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    moved = [k for k, v in ckpt['model'].items() if not torch.equal(model.state_dict()[k].cpu(), v)]
    assert any('fc1_g' in k for k in moved), moved  # trained weights were not loaded


@pytest.mark.parametrize('argv,message', [
    (['--lrs=1e-3'], "--lrs=0.001: expected tuple"),
    (['--probe_optimizer=sgd'], "--probe_optimizer='sgd': must be one of adamw, muon"),
    (['--epochs=2', '--warmup_epochs=3'], 'warmup_epochs'),
    (['--wds=()'], 'need one or more of each'),
    (['--lr=1e-3'], "unknown config key 'lr'"),
    (['--data_dir='], '--data_dir is required'),
])
def test_bad_settings_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        probe.load_config(PROBE_TINY + argv)


def test_bad_checkpoint_and_unlabelled_data_fail_with_one_line(tmp_path):
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='cannot read checkpoint'):
        probe.load_config([f'--ckpt={garbage}'])
    torch.save({'state': 1}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='is not a train_mae.py checkpoint'):
        probe.load_config([f'--ckpt={tmp_path / "other.pt"}'])

    p = run(['probe.py', f'--ckpt={tmp_path / "missing.pt"}'], check=False)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.pt'}"]
    for split in ('train', 'val'):  # images straight under train/ and val/: no class folders, no labels
        os.makedirs(tmp_path / 'flat' / split)
        Image.new('RGB', (8, 8)).save(tmp_path / 'flat' / split / 'x.png')
    p = run(['probe.py'] + PROBE_TINY + [f'--data_dir={tmp_path / "flat"}', f'--out_dir={tmp_path}'], check=False)
    [line] = p.stderr.strip().splitlines()
    assert p.returncode != 0 and line.startswith('error: ') and 'has no class folders' in line


def test_two_process_torchrun_matches_one_process(tmp_path):
    argv = PROBE_TINY + ['--lrs=(1e-3,1e-2)', '--wds=(0.05,)']
    one = probe.main(argv + [f'--out_dir={tmp_path / "one"}'])
    run(['probe.py'] + argv + [f'--out_dir={tmp_path / "two"}'], torchrun=2)
    two = json.load(open(tmp_path / 'two' / 'probe_results.json'))
    for a, b in zip(one['results'], two['results']):
        assert math.isclose(a['top1'], b['top1'], abs_tol=1 / 128 + 1e-9), (one, two)  # one val image at most
