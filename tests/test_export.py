"""scripts/export_timm.py: the encoder in timm's VisionTransformer names, checked
against a forward pass written here from the state dict alone, and (where timm
imports) against timm's own model."""
import ast
import contextlib
import io
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_mae as T
from conftest import ROOT, TINY, run

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import export_timm  # noqa: E402

ARCH = dict(img_size=32, patch_size=8, enc_dim=64, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)
VARIANTS = [dict(swiglu=s, norm=n, bias=b) for s in (False, True) for n in ('layernorm', 'rmsnorm') for b in (True, False)]


def make_checkpoint(path, **arch):
    """A checkpoint as train_mae.py writes it, of a randomly initialised MAE."""
    c = {**T.CONFIG, **ARCH, **arch}
    torch.manual_seed(0)
    model = T.build_model(SimpleNamespace(**c))
    with torch.no_grad():  # no zero biases or unit norms: every tensor must land in its place
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(dict(model=model.state_dict(), config=c, step=0), path)
    return model


def export(tmp_path, capsys, **arch):
    """Export a fresh checkpoint in-process; returns our MAE, the state dict and the printed Python."""
    model = make_checkpoint(tmp_path / 'ckpt.pt', **arch)
    export_timm.main([str(tmp_path / 'ckpt.pt'), str(tmp_path / 'vit.pt')])
    out = capsys.readouterr().out
    return model.eval(), torch.load(tmp_path / 'vit.pt', weights_only=True), out


def expected_keys(depth, norm, swiglu, bias):
    """timm's VisionTransformer(class_token=False, global_pool='avg', fc_norm=False), num_classes=0."""
    def linear(name):
        return [f'{name}.weight'] + ([f'{name}.bias'] if bias else [])

    def norm_(name):  # LayerNorm keeps its shift whatever `bias` says
        return [f'{name}.weight'] + ([f'{name}.bias'] if norm == 'layernorm' else [])
    keys = ['patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed'] + norm_('norm')
    for i in range(depth):
        b = f'blocks.{i}.'
        mlp = ['mlp.fc1_g', 'mlp.fc1_x', 'mlp.fc2'] if swiglu else ['mlp.fc1', 'mlp.fc2']
        keys += norm_(b + 'norm1') + linear(b + 'attn.qkv') + linear(b + 'attn.proj') + norm_(b + 'norm2')
        keys += [k for m in mlp for k in linear(b + m)]
    return set(keys)


def reference_forward(sd, imgs, heads):
    """timm's ViT forward (no prefix tokens), from the exported tensors alone."""
    def norm(x, name):
        if f'{name}.bias' in sd:
            return F.layer_norm(x, x.shape[-1:], sd[f'{name}.weight'], sd[f'{name}.bias'], eps=1e-6)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f'{name}.weight']

    def linear(x, name):
        return F.linear(x, sd[f'{name}.weight'], sd.get(f'{name}.bias'))

    p = sd['patch_embed.proj.weight'].shape[-1]
    x = F.conv2d(imgs, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd['pos_embed']  # [N, L, D]
    N, L, D = x.shape
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    for i in range(depth):
        b = f'blocks.{i}.'
        q, k, v = linear(norm(x, b + 'norm1'), b + 'attn.qkv').view(N, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / (D // heads) ** 0.5).softmax(-1) @ v  # [N, H, L, hd]
        x = x + linear(attn.transpose(1, 2).reshape(N, L, D), b + 'attn.proj')
        h = norm(x, b + 'norm2')
        if b + 'mlp.fc1.weight' in sd:
            h = F.gelu(linear(h, b + 'mlp.fc1'))
        else:
            h = F.silu(linear(h, b + 'mlp.fc1_g')) * linear(h, b + 'mlp.fc1_x')
        x = x + linear(h, b + 'mlp.fc2')
    return norm(x, 'norm')


def printed_kwargs(out):
    return ast.literal_eval(next(l for l in out.splitlines() if l.startswith('kwargs = '))[len('kwargs = '):])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real train_mae.py checkpoint (two steps of TINY) and its export."""
    d = tmp_path_factory.mktemp('trained')
    run(TINY + [f'--out_dir={d}', '--max_iters=2', '--eval_interval=2'])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        export_timm.main([str(d / 'ckpt.pt'), str(d / 'vit.pt')])
    return d, out.getvalue()


def test_trained_checkpoint_exports_the_encoder_only(trained):
    d, out = trained
    sd = torch.load(d / 'vit.pt', weights_only=True)
    ckpt = torch.load(d / 'ckpt.pt', weights_only=True)
    assert sd.keys() == expected_keys(2, 'layernorm', swiglu=False, bias=True)
    assert not any('decoder' in k or 'mask_token' in k for k in sd)
    for k, v in sd.items():
        if k != 'pos_embed':
            assert torch.equal(v, ckpt['model'][k]), k
    assert torch.equal(sd['pos_embed'], T.sincos_pos_embed(64, 4)[None])  # [1, L, D], the fixed table
    model = T.build_model(SimpleNamespace(**ckpt['config']))
    model.load_state_dict(ckpt['model'])
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # in float64: the two forwards agree to its rounding, whatever the CPU
        torch.testing.assert_close(reference_forward({k: v.double() for k, v in sd.items()}, imgs, heads=2),
                                   model.double().forward_features(imgs), atol=1e-10, rtol=0)
    kw = printed_kwargs(out)
    assert kw['class_token'] is False and kw['global_pool'] == 'avg' and kw['no_embed_class'] is True
    assert "--pretrained-path" in out and 'class_token=False' in out


@pytest.mark.parametrize('v', VARIANTS, ids=lambda v: f"{'swiglu' if v['swiglu'] else 'gelu'}-{v['norm']}-bias{v['bias']}")
def test_variants_map_to_timm_names_and_compute_the_same(tmp_path, capsys, v):
    model, sd, out = export(tmp_path, capsys, **v)
    assert sd.keys() == expected_keys(2, **v)
    own = {**model.state_dict(), 'pos_embed': torch.zeros(1, 16, 64), 'patch_embed.proj.bias': torch.zeros(64)}
    for k, t in sd.items():
        assert t.dtype == torch.float32 and t.shape == own[k].shape, k
    if not v['bias']:
        assert torch.equal(sd['patch_embed.proj.bias'], torch.zeros(64))  # timm's PatchEmbed always has one
    kw = printed_kwargs(out)
    hidden = sd['blocks.0.mlp.fc2.weight'].shape[1]
    assert int(kw['embed_dim'] * kw['mlp_ratio']) == hidden == T.ffn_hidden(64, 4.0, v['swiglu'])  # timm's rounding
    assert (kw['norm_layer'], kw['qkv_bias'], kw['proj_bias']) == (v['norm'], v['bias'], v['bias'])
    assert ('mlp_layer=timm.layers.SwiGLU' in out) == v['swiglu'] == (kw.get('act_layer') == 'silu')
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # float64, as above
        torch.testing.assert_close(reference_forward({k: v.double() for k, v in sd.items()}, imgs, heads=kw['num_heads']),
                                   model.double().forward_features(imgs), atol=1e-10, rtol=0)


def test_vit_s16_mlp_ratio_reproduces_our_hidden_width():
    for swiglu, hidden in ((False, 1536), (True, 1024)):
        kw = export_timm.timm_kwargs({**T.CONFIG, 'swiglu': swiglu})
        assert int(384 * kw['mlp_ratio']) == hidden and kw['embed_dim'] == 384 and kw['depth'] == 12


def test_conv_stem_is_refused_with_one_line(tmp_path):
    make_checkpoint(tmp_path / 'ckpt.pt', stem='conv')
    p = run(['scripts/export_timm.py', str(tmp_path / 'ckpt.pt'), str(tmp_path / 'vit.pt')], check=False, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith('error:') and "stem='conv'" in lines[0], p.stderr
    assert not os.path.exists(tmp_path / 'vit.pt')


def test_a_key_the_export_does_not_map_is_refused_not_dropped(tmp_path, monkeypatch):
    """An architecture key timm_kwargs does not pass on (as a knob added later would be)
    exports only at its default: any other value is a one-line error naming it."""
    monkeypatch.setattr(export_timm, 'EXPRESSED', tuple(k for k in export_timm.EXPRESSED if k != 'norm'))
    make_checkpoint(tmp_path / 'ckpt.pt', norm='rmsnorm')
    with pytest.raises(SystemExit, match="error: norm='rmsnorm': timm's VisionTransformer cannot express it"):
        export_timm.main([str(tmp_path / 'ckpt.pt'), str(tmp_path / 'vit.pt')])
    assert not os.path.exists(tmp_path / 'vit.pt')
    make_checkpoint(tmp_path / 'ckpt.pt')  # at its default it computes what timm computes: exported
    with contextlib.redirect_stdout(io.StringIO()):
        export_timm.main([str(tmp_path / 'ckpt.pt'), str(tmp_path / 'vit.pt')])
    assert os.path.exists(tmp_path / 'vit.pt')


def test_a_checkpoint_saved_before_a_knob_existed_resumes_probes_and_exports(tmp_path):
    """Config keys a checkpoint lacks take today's defaults: delete architecture
    keys (at their defaults) from a saved config, as a checkpoint older than those
    knobs would be, and resume, probe and export it."""
    import probe
    out = tmp_path / 'run'
    T.main(TINY + [f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    for key in ('swiglu', 'bias', 'stem', 'warmup_start'):
        del ckpt['config'][key]
    torch.save(ckpt, out / 'ckpt.pt')
    T.main(TINY + [f'--out_dir={out}', '--max_iters=3', '--eval_interval=3', '--init_from=resume',
                   '--resume_override=max_iters'])
    assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 3
    torch.save(ckpt, out / 'ckpt.pt')  # the old one again, for the probe and the export
    c, _ = probe.load_config([f'--ckpt={out / "ckpt.pt"}'])
    assert (c.swiglu, c.bias, c.stem) == (T.CONFIG['swiglu'], T.CONFIG['bias'], T.CONFIG['stem'])
    with contextlib.redirect_stdout(io.StringIO()):
        export_timm.main([str(out / 'ckpt.pt'), str(tmp_path / 'vit.pt')])
    assert os.path.exists(tmp_path / 'vit.pt')


def test_missing_or_unreadable_checkpoint_is_one_line(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pt')
    for name in ('nope.pt', 'junk.pt', 'other.pt'):  # missing, not a torch file, not a train_mae.py checkpoint
        with pytest.raises(SystemExit) as e:
            export_timm.main([str(tmp_path / name), str(tmp_path / 'vit.pt')])
        msg = str(e.value.code)
        assert msg.startswith('error:') and name in msg and '\n' not in msg, msg
    assert not os.path.exists(tmp_path / 'vit.pt')


# --- with timm ----------------------------------------------------------------

@pytest.mark.parametrize('v', [dict(swiglu=False, norm='layernorm', bias=True),
                               dict(swiglu=True, norm='rmsnorm', bias=False)], ids=['gelu-ln-bias', 'swiglu-rms-nobias'])
def test_timm_builds_the_printed_model_and_matches(tmp_path, capsys, v):
    timm = pytest.importorskip('timm')
    model, sd, out = export(tmp_path, capsys, **v)
    code = out[out.index('import timm'):]
    ns = {}
    exec(code, ns)  # the printed lines: build timm's model, load_state_dict strictly
    vit = ns['model'].eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (vit.forward_features(imgs) - model.forward_features(imgs)).abs().max().item()
    print(f"timm {timm.__version__} torch {torch.__version__} {v}: max abs diff {diff:.2e}")
    assert diff < 1e-4
    if not v['swiglu']:  # what train.py --pretrained --pretrained-path ... --model-kwargs ... builds
        import argparse
        parser = argparse.ArgumentParser()  # train.py's flags, and its create_model call
        parser.add_argument('--pretrained', action='store_true')
        parser.add_argument('--pretrained-path')
        parser.add_argument('--model-kwargs', nargs='*', default={}, action=timm.utils.ParseKwargs)
        args = parser.parse_args(next(l for l in out.splitlines() if "train.py: " in l).split("train.py: ")[1].split())
        ft = timm.create_model('vit_small_patch16_224', pretrained=args.pretrained, num_classes=10, **args.model_kwargs,
                               pretrained_cfg_overlay=dict(file=args.pretrained_path, num_classes=-1)).eval()
        with torch.no_grad():
            assert (ft.forward_features(imgs) - model.forward_features(imgs)).abs().max() < 1e-4
            assert ft(imgs).shape == (2, 10)
