"""Adafactor (Zhai et al.) against a direct re-computation; the flags that would do nothing are errors."""
import math

import pytest
import torch

import train_mae as T
from conftest import TINY, read_log
from muon import zeropower_via_newtonschulz5
from optimizers import Adafactor


def test_adafactor_matches_a_direct_computation_over_changing_gradients():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)  # parameters and momentum in float64: the two agree to its rounding
    w, b = torch.randn(6, 4, **f64, requires_grad=True), torch.randn(4, **f64, requires_grad=True)
    grads = [(torch.randn(6, 4, **f64), torch.randn(4, **f64)) for _ in range(4)]
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    opt = Adafactor([dict(params=[w], weight_decay=0.1), dict(params=[b], weight_decay=0.0, factored=False)],
                    lr=0.01, beta1=0.8, momentum_dtype=torch.float64)
    # direct, in float64: Shazeer & Stern's factored estimate, Zhai et al.'s beta2 cap and first moment
    R, C, v_b = torch.zeros(6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    m_w, m_b = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, (gw, gb) in enumerate(grads, start=1):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        beta2 = min(1 - t ** -0.8, 0.999)
        gw, gb = gw.double(), gb.double()
        R = beta2 * R + (1 - beta2) * ((gw ** 2 + 1e-30).sum(1) / 4)
        C = beta2 * C + (1 - beta2) * ((gw ** 2 + 1e-30).sum(0) / 6)
        V = R[:, None] * C[None, :] / (R.sum() / 6)
        v_b = beta2 * v_b + (1 - beta2) * (gb ** 2 + 1e-30)
        m_w = 0.8 * m_w + 0.2 * gw / V.sqrt()
        m_b = 0.8 * m_b + 0.2 * gb / v_b.sqrt()
        w_ref = w_ref * (1 - 0.01 * 0.1) - 0.01 * m_w
        b_ref = b_ref - 0.01 * m_b
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.detach(), b_ref, rtol=1e-12, atol=1e-12)
    assert opt.state[w]['exp_avg_sq_row'].shape == (6,) and 'exp_avg_sq' not in opt.state[w]


def test_adafactor_caps_its_second_moment_decay_after_thousands_of_steps():
    """The decay 1 - t^-0.8 passes Zhai et al.'s cap of 0.999 at step 5,623: 12,000 steps,
    in float64, against the direct computation. The gradients' scale jumps at steps 4,000
    and 8,000, so how fast the second moment forgets shows in every later update."""
    steps, f64 = 12000, dict(dtype=torch.float64)
    torch.manual_seed(0)
    w, b = torch.randn(3, 2, **f64, requires_grad=True), torch.randn(2, **f64, requires_grad=True)
    scale = torch.tensor([1.0, 10.0, 0.1], **f64).repeat_interleave(4000)
    gws, gbs = torch.randn(steps, 3, 2, **f64) * scale[:, None, None], torch.randn(steps, 2, **f64) * scale[:, None]
    opt = Adafactor([dict(params=[w], weight_decay=0.1), dict(params=[b], weight_decay=0.0, factored=False)],
                    lr=1e-3, beta1=0.9, momentum_dtype=torch.float64)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    R, C, v_b, m_w, m_b = (torch.zeros(s, **f64) for s in (3, 2, 2, (3, 2), 2))
    for t in range(1, steps + 1):
        gw, gb = gws[t - 1], gbs[t - 1]
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        beta2 = min(1 - t ** -0.8, 0.999)
        R = beta2 * R + (1 - beta2) * (gw ** 2 + 1e-30).mean(1)
        C = beta2 * C + (1 - beta2) * (gw ** 2 + 1e-30).mean(0)
        v_b = beta2 * v_b + (1 - beta2) * (gb ** 2 + 1e-30)
        m_w = 0.9 * m_w + 0.1 * gw / (R[:, None] * C[None, :] / R.mean()).sqrt()
        m_b = 0.9 * m_b + 0.1 * gb / v_b.sqrt()
        w_ref = w_ref * (1 - 1e-3 * 0.1) - 1e-3 * m_w
        b_ref = b_ref - 1e-3 * m_b
    # float64 rounding over 12,000 steps of O(1) updates: far below 1e-9
    torch.testing.assert_close(w.detach(), w_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.detach(), b_ref, rtol=1e-9, atol=1e-9)


def test_adafactor_state_is_about_half_the_parameters_memory():
    c = T.SimpleNamespace(**{**T.CONFIG, 'optimizer': 'adafactor'})  # ViT-S/16's MAE
    model = T.build_model(c)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    (opt,) = T.build_optimizers(model, c, 'cpu', log=lambda *a: None)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert {s['exp_avg'].dtype for s in opt.state.values()} == {torch.bfloat16}
    assert 0.5 <= state / params < 0.52  # bf16 momentum (2 of 4 bytes) + the factors and the 1D tensors' moments


def test_adafactor_trains(tmp_path):
    T.main(TINY + [f'--out_dir={tmp_path}', '--optimizer=adafactor', '--max_iters=6', '--eval_interval=6',
                   '--lr=3e-3'])
    losses = [r['loss'] for r in read_log(tmp_path) if 'loss' in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize('args,names', [
    (['--optimizer=adamw', '--state_dtype=bfloat16'], '--state_dtype=bfloat16'),
    (['--optimizer=adafactor', '--state_dtype=bfloat16'], '--state_dtype=bfloat16'),
    (['--muon_conv=True'], '--muon_conv=True'),  # the patch stem has no conv for Muon
    (['--optimizer=adamw', '--stem=conv', '--muon_conv=True'], '--muon_conv=True'),
    (['--optimizer=adamw', '--adamw_lr=1e-3'], '--adamw_lr=0.001'),  # AdamW's lr is --lr
])
def test_a_flag_that_cannot_take_effect_is_an_error(tmp_path, args, names):
    with pytest.raises(SystemExit, match=names):
        T.main(TINY + [f'--out_dir={tmp_path}'] + args)


def test_muon_orthogonalises_swiglu_gate_and_value_as_two_matrices():
    c = T.SimpleNamespace(**{**T.CONFIG, 'swiglu': True, 'enc_depth': 1, 'dec_depth': 1, 'img_size': 32,
                             'patch_size': 8, 'enc_dim': 64, 'enc_heads': 2, 'dec_dim': 32, 'dec_heads': 2,
                             'muon_ns_dtype': 'bfloat16'})  # as torch's
    torch.manual_seed(0)
    model = T.build_model(c)
    muon_names = [n for n, _ in T.param_groups(model, c)['muon']]
    assert 'blocks.0.mlp.fc1_g.weight' in muon_names and 'blocks.0.mlp.fc1_x.weight' in muon_names
    ffn = model.blocks[0].mlp
    gate, value = ffn.fc1_g.weight, ffn.fc1_x.weight
    gate.grad, value.grad = torch.randn_like(gate), 100 * torch.randn_like(value)  # gradients of another scale
    refs = [p.detach().clone().requires_grad_() for p in (gate, value)]
    for r, p in zip(refs, (gate, value)):
        r.grad = p.grad.clone()
    muon = [o for o in T.build_optimizers(model, c, 'cpu', log=lambda *a: None) if isinstance(o, T.Muon)][0]
    muon.step()
    for r in refs:  # each alone, by torch's own Muon: the same update
        torch.optim.Muon([r], lr=c.lr, weight_decay=c.muon_weight_decay, adjust_lr_fn='match_rms_adamw').step()
    torch.testing.assert_close(gate.detach(), refs[0].detach())
    torch.testing.assert_close(value.detach(), refs[1].detach())
    # ...which a fused [2h, d] matrix would not give: its gate half is orthogonalised with the value's
    joint = zeropower_via_newtonschulz5(torch.cat([gate.grad, value.grad]))[:len(gate)]
    assert (joint.float() - zeropower_via_newtonschulz5(gate.grad).float()).abs().max() > 0.1


@pytest.mark.parametrize('adamw_lr', [0.0, 1e-4])
def test_adamw_lr_sets_the_adamw_side_of_a_muon_run_and_only_it(tmp_path, adamw_lr):
    """The lr each optimizer's groups last stepped with, read back from the checkpoint: Muon at
    --lr, the AdamW side (norms, biases, patch conv, mask token) at --adamw_lr (0: tied to --lr),
    both under the same schedule."""
    T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=5', '--lr=3e-3', f'--adamw_lr={adamw_lr}'])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    c = T.SimpleNamespace(**ckpt['config'])
    factor = T.lr_factor(4, *T.run_length(c, 256), c.schedule, c.cooldown_frac, c.warmup_start)  # the last step's
    adamw, muon = ckpt['optimizers']
    assert [g['lr'] for g in muon['param_groups']] == [pytest.approx(3e-3 * factor)]
    assert [g['lr'] for g in adamw['param_groups']] == [pytest.approx((adamw_lr or 3e-3) * factor)] * 2
    assert [g['weight_decay'] for g in adamw['param_groups']] == [c.weight_decay, 0.0]


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_one_step_decays_each_kind_of_parameter_as_its_group_says(optimizer):
    """What one step with zero gradients does (Adam's and Muon's updates of a zero gradient
    are zero, so only the decoupled weight decay moves a parameter): matrices shrink by
    lr * weight_decay (Muon's by lr * muon_weight_decay), and norms, biases and the mask
    token, which decay nowhere, stay exactly as they were."""
    c = T.SimpleNamespace(**{**T.CONFIG, 'enc_depth': 1, 'dec_depth': 1, 'img_size': 32, 'patch_size': 8,
                             'enc_dim': 64, 'enc_heads': 2, 'dec_dim': 32, 'dec_heads': 2, 'optimizer': optimizer,
                             'lr': 0.1, 'weight_decay': 0.3, 'muon_weight_decay': 0.7})
    torch.manual_seed(0)
    model = T.build_model(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # no zero parameters (biases, the mask token): a decay would show on each
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in T.build_optimizers(model, c, 'cpu', log=lambda *a: None):
        opt.step()
    groups = T.param_groups(model, c)
    shrink = {'decay': 1 - 0.1 * 0.3, 'muon': 1 - 0.1 * 0.7, 'no_decay': 1.0}
    for key, named in groups.items():
        for name, p in named:
            torch.testing.assert_close(p.detach(), before[name] * shrink[key], rtol=1e-6, atol=0, msg=name)
    assert groups['no_decay'] and groups['decay'] and (optimizer == 'adamw') == (not groups['muon'])
    assert {'mask_token', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias'} <= {n for n, _ in groups['no_decay']}
