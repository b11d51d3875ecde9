"""muon.Muon against torch.optim.Muon (both in bf16) and against a float64
Muon written here (ours in fp32), and what it adds: conv weights, batching,
ranks, the Newton-Schulz dtype."""
import functools
import math

import pytest
import torch

import muon
import muon_ddp_worker
from conftest import run
from muon import Muon, zeropower_via_newtonschulz5

BF16 = dict(ns_dtype=torch.bfloat16)  # torch.optim.Muon's Newton-Schulz runs in bf16 on every device

SHAPES = [(64, 16), (16, 64), (32, 32), (48, 40), (64, 16)]  # tall, wide, square, near-square, a repeat


def run_both(shapes, steps=4, **kw):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    results = []
    for make in (functools.partial(Muon, **BF16), torch.optim.Muon):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = make(params, **kw)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        results.append([p.detach() for p in params])
    return init, results


@pytest.mark.parametrize('adjust_lr_fn', [None, 'original', 'match_rms_adamw'])
@pytest.mark.parametrize('nesterov', [True, False])
def test_same_update_as_torch_muon(adjust_lr_fn, nesterov):
    init, (ours, theirs) = run_both(SHAPES, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                                    adjust_lr_fn=adjust_lr_fn)
    for w0, a, b in zip(init, ours, theirs):
        moved = (b - w0).abs().max()
        assert moved > 1e-3  # the parameters did move
        # bf16 Newton-Schulz: the two may round differently, by well under 1% of the step
        assert (a - b).abs().max() < 0.01 * moved


def test_same_update_with_other_hyperparameters():
    init, (ours, theirs) = run_both(SHAPES[:3], steps=3, lr=0.1, weight_decay=0.0, momentum=0.8, ns_steps=3,
                                    ns_coefficients=(3.0, -3.2, 1.2))
    for w0, a, b in zip(init, ours, theirs):
        assert (a - b).abs().max() < 0.01 * (b - w0).abs().max()


@pytest.mark.parametrize('shape', [(64, 16), (16, 64), (128, 128), (8, 3, 40, 50)])
def test_newton_schulz_singular_values_lie_in_the_band(shape):
    torch.manual_seed(0)
    # G = U diag(s) V^T with singular values spread over 20x, the polar factor is U V^T
    k = min(shape[-2:])
    U = torch.linalg.qr(torch.randn(*shape[:-1], k))[0]
    V = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k))[0]
    G = U @ torch.diag_embed(torch.logspace(-1.3, 0, k).expand(*shape[:-2], k)) @ V.mT
    X = zeropower_via_newtonschulz5(G).float()
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    # and it approximates the polar factor
    cos = torch.nn.functional.cosine_similarity((U @ V.mT).flatten(-2), X.flatten(-2), dim=-1)
    assert cos.min() > 0.98


def test_conv_weights_are_orthogonalised_as_2d_matrices():
    torch.manual_seed(0)
    w0, g = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    conv = torch.nn.Parameter(w0.clone())
    flat = torch.nn.Parameter(w0.view(8, 36).clone())
    for p, grad in ((conv, g), (flat, g.view(8, 36))):
        p.grad = grad.clone()
    Muon([conv], lr=0.02, adjust_lr_fn='match_rms_adamw', **BF16).step()
    torch.optim.Muon([flat], lr=0.02, adjust_lr_fn='match_rms_adamw').step()
    assert conv.shape == (8, 4, 3, 3)
    step = (flat.detach() - w0.view(8, 36)).abs().max()
    assert (conv.detach().view(8, 36) - flat.detach()).abs().max() < 0.01 * step
    with pytest.raises(ValueError, match='shape'):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    w0 = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]

    def steps(params, opt, gs):
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    straight = [torch.nn.Parameter(w.clone()) for w in w0]
    steps(straight, Muon(straight, lr=0.02), grads)
    first = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = Muon(first, lr=0.02)
    steps(first, opt, grads[:2])
    saved = opt.state_dict()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = Muon(second, lr=0.02)
    opt2.load_state_dict(saved)
    steps(second, opt2, grads[2:])
    for a, b in zip(straight, second):
        assert torch.equal(a, b)


def test_shape_groups_that_change_between_steps():
    # a parameter without a gradient is skipped (as by torch's), so the shape groups change
    # from step to step
    torch.manual_seed(0)
    shapes = [(64, 3, 2, 2), (64, 12), (12, 64), (64, 12), (32, 32)]  # a tall conv weight, as 64 x 12
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.flatten(1).clone()) for w in init]
    optimizers = Muon(ours, lr=0.02, **BF16), torch.optim.Muon(theirs, lr=0.02)
    for step in range(4):
        for i, shape in enumerate(shapes):
            g = torch.randn(shape) if (i + step) % 3 else None
            ours[i].grad, theirs[i].grad = g, None if g is None else g.flatten(1).clone()
        for opt in optimizers:
            opt.step()
    for w0, a, b in zip(init, ours, theirs):
        moved = (b - w0.flatten(1)).abs().max()
        assert moved > 1e-3
        assert (a.detach().flatten(1) - b.detach()).abs().max() < 0.01 * moved


def test_bf16_momentum_halves_the_state():
    p = torch.nn.Parameter(torch.randn(32, 16))
    p.grad = torch.randn(32, 16)
    opt = Muon([p], momentum_dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]['momentum_buffer'].dtype == torch.bfloat16 and p.dtype == torch.float32


def test_two_ranks_split_the_work_and_end_identical_to_one_process(tmp_path):
    run(['tests/muon_ddp_worker.py', str(tmp_path)], torchrun=2, timeout=120)
    r0, r1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    single = muon_ddp_worker.train(*muon_ddp_worker.make_params())
    for a, b, c in zip(r0, r1, single):
        assert torch.equal(a, b)  # all ranks identical
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)  # and equal to the one-process result


def test_batched_newton_schulz_matches_torchs():
    """A batch of matrices against torch.optim.Muon's own Newton-Schulz, one matrix at a time."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    torch.manual_seed(0)
    coefficients = (3.4445, -4.775, 2.0315)
    for shape in [(3, 64, 16), (3, 16, 64), (2, 32, 32)]:
        G = torch.randn(shape)
        ours = zeropower_via_newtonschulz5(G, 5, coefficients, 1e-7, dtype=torch.bfloat16).float()
        theirs = torch.stack([_zeropower_via_newtonschulz(g, coefficients, 5, 1e-7) for g in G]).float()
        assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_a_tall_stack_is_the_transpose_of_its_wide_one_and_the_input_is_left_alone(dtype, tol):
    """A tall matrix is iterated on the right (X B), a wide one on the left (B X): the same
    iteration on X^T. Both in place in two buffers, never in the caller's tensor."""
    torch.manual_seed(0)
    G = torch.randn(3, 96, 40, dtype=dtype)
    before = G.clone()
    tall = zeropower_via_newtonschulz5(G, dtype=dtype)
    wide = zeropower_via_newtonschulz5(G.mT.contiguous(), dtype=dtype)
    assert tall.is_contiguous() and torch.equal(G, before)
    assert (tall.float() - wide.mT.float()).abs().max() < tol * wide.float().abs().max()


def muon_float64(init, grads, lr, weight_decay, momentum, nesterov, adjust_lr_fn, ns_steps=5,
                 coefficients=(3.4445, -4.775, 2.0315), eps=1e-7):
    """Muon as Jordan et al. and torch.optim.Muon's docs state it, in float64:
    B = mu B + (1 - mu) G (as torch's lerp), U = G + mu (B - G) with Nesterov,
    X = U / max(||U||_F, eps), five quintic Newton-Schulz steps on the wide
    orientation, W = (1 - lr wd) W - adjusted_lr O."""
    a, b, c = coefficients
    weights = [w.double().clone() for w in init]
    bufs = [torch.zeros_like(w) for w in weights]
    for gs in grads:
        for i, g in enumerate(gs):
            g = g.double()
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = g + momentum * (bufs[i] - g) if nesterov else bufs[i]
            tall = u.size(0) > u.size(1)
            X = u.T if tall else u
            X = X / max(X.norm().item(), eps)
            for _ in range(ns_steps):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            O = X.T if tall else X
            A_, B_ = u.shape
            scale = math.sqrt(max(1.0, A_ / B_)) if adjust_lr_fn in (None, 'original') else 0.2 * math.sqrt(max(A_, B_))
            weights[i] = (1 - lr * weight_decay) * weights[i] - lr * scale * O
    return weights


def spy_on_newton_schulz_dtype(monkeypatch):
    """The dtypes Muon's Newton-Schulz calls run in, collected into the returned set."""
    dtypes, zeropower = set(), muon.zeropower_via_newtonschulz5

    def spy(*args, **kwargs):
        X = zeropower(*args, **kwargs)
        dtypes.add(X.dtype)
        return X
    monkeypatch.setattr(muon, 'zeropower_via_newtonschulz5', spy)
    return dtypes


@pytest.mark.parametrize('adjust_lr_fn', ['original', 'match_rms_adamw'])
@pytest.mark.parametrize('nesterov', [True, False])
def test_fp32_newton_schulz_matches_a_float64_muon(adjust_lr_fn, nesterov, monkeypatch):
    """In fp32 (CPUs without native bf16) the update is the float64 one to fp32 rounding:
    relative error ~1e-7 per product, amplified at most a few times by 5 iterations."""
    ns_dtypes = spy_on_newton_schulz_dtype(monkeypatch)
    torch.manual_seed(0)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = Muon(params, ns_dtype=torch.float32, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    assert ns_dtypes == {torch.float32}
    eps = torch.finfo(torch.float32).eps
    for w0, p, ref in zip(init, params, muon_float64(init, grads, **kw)):
        moved = (ref - w0.double()).abs().max()
        assert moved > 1e-3
        # Newton-Schulz in fp32: < 1e-5 of the step (bf16 is off by ~1e-2 of it, the torch
        # comparison above); storing W in fp32: two roundings (decay, update) per step
        tol = 1e-5 * moved + 2 * len(grads) * eps * ref.abs().max()
        assert (p.detach().double() - ref).abs().max() < tol


def test_newton_schulz_dtype_follows_the_device(monkeypatch):
    """bf16 where bf16 matmuls are native, fp32 on CPUs that emulate them;
    ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 counts as emulated."""
    muon.cpu_has_fast_bf16.cache_clear()
    native = muon.cpu_has_fast_bf16()
    assert muon.ns_dtype('cpu') == (torch.bfloat16 if native else torch.float32)
    assert muon.ns_dtype('cuda') == torch.bfloat16
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    muon.cpu_has_fast_bf16.cache_clear()
    assert muon.ns_dtype('cpu') == torch.float32
    p = torch.nn.Parameter(torch.randn(32, 16))
    p.grad = torch.randn(32, 16)
    opt = Muon([p])
    ns_dtypes = spy_on_newton_schulz_dtype(monkeypatch)
    opt.step()
    assert ns_dtypes == {torch.float32}
    assert zeropower_via_newtonschulz5(p.grad).dtype == torch.float32
    monkeypatch.undo()
    muon.cpu_has_fast_bf16.cache_clear()
