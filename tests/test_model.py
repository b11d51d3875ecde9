"""The MAE model: shapes, masking, loss, parameter counts, no leaks."""
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_mae as T

SMALL = dict(img_size=32, patch_size=8, enc_dim=64, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2,
             dec_heads=4, mask_ratio=0.6)


def model(**kw):
    torch.manual_seed(0)
    return T.build_model(SimpleNamespace(**{**T.CONFIG, **SMALL, **kw})).eval()


@pytest.mark.parametrize('swiglu,norm,bias,stem', itertools.product((False, True), ('layernorm', 'rmsnorm'),
                                                                    (True, False), ('patch', 'conv')))
def test_shapes_for_every_flag_combination(swiglu, norm, bias, stem):
    m = model(swiglu=swiglu, norm=norm, bias=bias, stem=stem)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    latent, ids_restore, ids_masked = m.forward_encoder(imgs, noise)
    keep = int(16 * (1 - 0.6))
    assert latent.shape == (3, keep, 64) and ids_restore.shape == (3, 16) and ids_masked.shape == (3, 16 - keep)
    assert m.forward_decoder(latent, ids_restore).shape == (3, 16, 32)
    loss, pred, _ = m(imgs, noise)
    assert loss.ndim == 0 and torch.isfinite(loss) and pred.shape == (3, 16 - keep, 8 * 8 * 3)
    assert m.forward_features(imgs).shape == (3, 16, 64)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize('mask_ratio', [0.0, 0.25, 0.6, 0.75, 0.9])
def test_random_masking_keeps_the_right_count_and_ids_restore_inverts(mask_ratio):
    m = model(mask_ratio=mask_ratio)
    N, L, D = 4, 16, 5
    x, noise = torch.randn(N, L, D), torch.rand(N, L)
    visible, ids_restore, ids_masked = m.random_masking(x, noise)
    keep = int(L * (1 - mask_ratio))
    assert visible.shape == (N, keep, D) and ids_masked.shape == (N, L - keep)
    for n in range(N):
        kept = noise[n].argsort()[:keep]  # the smallest noise is kept
        assert torch.equal(visible[n], x[n, kept])
        assert sorted(kept.tolist() + ids_masked[n].tolist()) == list(range(L))  # a partition of the patches
    # ids_restore puts the shuffled sequence (visible first, then masked) back in patch order
    shuffled = torch.cat([visible, torch.gather(x, 1, ids_masked[..., None].expand(-1, -1, D))], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, D)), x)


def test_swiglu_and_gelu_ffn_have_the_same_weight_count():
    for dim, ratio in ((384, 4.0), (192, 4.0), (96, 3.0)):
        ffn = lambda swiglu: T.FeedForward(SimpleNamespace(mlp_ratio=ratio, swiglu=swiglu, bias=False), dim)
        gelu, swi = ffn(False), ffn(True)
        assert sum(p.numel() for p in gelu.parameters()) == sum(p.numel() for p in swi.parameters())
    assert T.FeedForward(SimpleNamespace(mlp_ratio=4.0, swiglu=True, bias=True), 384).fc2.in_features == 1024  # 2/3 * 4 * 384


def test_swiglu_is_silu_of_the_gate_times_the_value_from_two_matrices():
    ffn = T.FeedForward(SimpleNamespace(mlp_ratio=4.0, swiglu=True, bias=True), 16)
    gate, value = ffn.fc1_g, ffn.fc1_x
    assert isinstance(gate, nn.Linear) and isinstance(value, nn.Linear) and gate.weight is not value.weight
    x = torch.randn(3, 5, 16)
    direct = ffn.fc2(F.silu(x @ gate.weight.T + gate.bias) * (x @ value.weight.T + value.bias))
    torch.testing.assert_close(ffn(x), direct)


@pytest.mark.parametrize('stem', ['patch', 'conv'])
@pytest.mark.parametrize('norm', ['layernorm', 'rmsnorm'])
def test_bias_false_removes_linear_and_conv_biases_and_keeps_the_norms_shift(stem, norm):
    m = model(bias=False, stem=stem, norm=norm, swiglu=True)
    layers = [mod for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert layers and all(mod.bias is None for mod in layers)
    norms = [mod for mod in m.modules() if isinstance(mod, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * (2 + 2) + 2  # two per block, encoder and decoder final norms
    if norm == 'layernorm':  # the shift stays: "no bias" is about the Linear layers (the blog's code)
        assert all(isinstance(mod.bias, nn.Parameter) for mod in norms)
    with_bias = model(bias=True, stem=stem, norm=norm, swiglu=True)
    assert all(mod.bias is not None for mod in with_bias.modules() if isinstance(mod, nn.Linear))
    # exactly the Linear/conv biases differ between the two models
    extra = {n for n, _ in with_bias.named_parameters()} - {n for n, _ in m.named_parameters()}
    assert extra and all(n.endswith('.bias') for n in extra)
    # every Linear, and the stem's last conv (the conv stem's 3x3 convs have none either way: a norm follows each)
    assert len(extra) == sum(isinstance(mod, nn.Linear) for mod in m.modules()) + 1


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_loss_is_the_direct_formula_on_masked_patches_only(norm_pix_loss):
    m = model(norm_pix_loss=norm_pix_loss).double()  # float64: the formula and the model agree to ~1e-15
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    loss, _, ids_masked = m(imgs, noise)
    with torch.no_grad():
        latent, ids_restore, _ = m.forward_encoder(imgs, noise)
        pred_all = m.decoder_pred(m.forward_decoder(latent, ids_restore))  # [N, L, 192], every patch
    # direct formula, written independently: per-patch pixels in (row, col, channel) order
    patches = imgs.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 192)
    if norm_pix_loss:
        patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.zeros(2, 16, dtype=torch.float64).scatter(1, ids_masked, 1.0)
    direct = (((pred_all - patches) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, direct, rtol=1e-12, atol=1e-12)
    # garbage predictions on visible patches do not move the direct formula: the loss ignores them
    pred_all[mask == 0] = 1e6
    torch.testing.assert_close((((pred_all - patches) ** 2).mean(-1) * mask).sum() / mask.sum(), direct)
    torch.testing.assert_close(m.unpatchify(m.patchify(imgs)), imgs)


@pytest.mark.parametrize('stem', ['patch', 'conv'])
def test_masked_pixels_do_not_reach_the_encoder(stem):
    m = model(stem=stem).double()  # float64: an untouched token may differ only by rounding, ~1e-15
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    out, _, ids_masked = m.forward_encoder(imgs, noise)
    changed = m.unpatchify(m.patchify(imgs).scatter(1, ids_masked[..., None].expand(-1, -1, 192), 5.0))
    out2, _, _ = m.forward_encoder(changed, noise)
    assert not torch.equal(changed, imgs)
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-12)
    # ...while a visible pixel does
    visible = torch.ones(2, 16, dtype=torch.bool).scatter(1, ids_masked, False)
    n, l = visible.nonzero()[0].tolist()
    poked = m.patchify(imgs)
    poked[n, l] += 1.0
    out3, _, _ = m.forward_encoder(m.unpatchify(poked), noise)
    assert (out3 - out).abs().max() > 1e-3


def test_conv_stem_has_total_stride_of_the_patch():
    stem = T.ConvStem(SimpleNamespace(patch_size=16, enc_dim=384, bias=True))
    strides = [c.stride[0] for c in stem.modules() if isinstance(c, nn.Conv2d)]
    assert strides == [2, 2, 2, 2, 1]
    assert [c.out_channels for c in stem.modules() if isinstance(c, nn.Conv2d)] == [48, 96, 192, 384, 384]
    assert stem(torch.randn(1, 3, 64, 64)).shape == (1, 16, 384)


def test_sincos_position_embedding_is_distinct_per_patch():
    pe = T.sincos_pos_embed(64, 4)
    assert pe.shape == (16, 64)
    assert torch.cdist(pe, pe).add(torch.eye(16)).min() > 0.1
