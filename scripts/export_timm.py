r"""Export the encoder of a train_mae.py checkpoint for timm's VisionTransformer.

    python scripts/export_timm.py out/ckpt.pt vit.pt

writes a plain state dict in timm's names (patch_embed.proj, pos_embed, blocks.N.*,
norm; no decoder, no mask token) and prints the timm model that loads it strictly,
and the flags of timm's train.py (checked with timm 1.0.31) that fine-tune it.
MAE's fine-tuning recipe with layer-wise lr decay, for the default ViT-S/16 on
8 GPUs (global batch 1024), run in a clone of timm:

    torchrun --nproc_per_node=8 train.py --data-dir /imagenet --model vit_small_patch16_224 \
        --pretrained --pretrained-path vit.pt --model-kwargs img_size=224 patch_size=16 \
        embed_dim=384 depth=12 num_heads=6 mlp_ratio=4.0 class_token=False no_embed_class=True \
        global_pool=avg fc_norm=False qkv_bias=True proj_bias=True norm_layer=layernorm \
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 -b 128 --opt adamw --lr 2e-3 \
        --weight-decay 0.05 --layer-decay 0.75 --epochs 100 --warmup-epochs 5 --drop-path 0.1 \
        --aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --reprob 0.25 --amp

--pretrained-path loads the file as the model's pretrained weights under a new
classifier head; --model-kwargs (printed for each checkpoint) overrides the named
model's shape; --mean/--std are the statistics we pretrained with (that model's own
are 0.5). A SwiGLU encoder needs mlp_layer=timm.layers.SwiGLU, a class --model-kwargs
cannot carry: build it in Python as printed.
"""
import dataclasses
import math
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402
import train_mae  # noqa: E402

ENCODER = ('patch_embed.', 'blocks.', 'norm.')  # our encoder's names are timm's already
# the architecture keys timm_kwargs passes on, and those the encoder does not have; any
# other key (stem, a new knob) exports only at its default, which timm's model computes
EXPRESSED = ('img_size', 'patch_size', 'enc_dim', 'enc_depth', 'enc_heads', 'mlp_ratio', 'norm', 'swiglu', 'bias')
NOT_ENCODER = ('dec_dim', 'dec_depth', 'dec_heads', 'mask_ratio', 'norm_pix_loss')


def timm_kwargs(c):
    """timm VisionTransformer arguments of the encoder of config c: no [CLS], the
    position embedding added to every patch token, the final norm before pooling."""
    dim, swiglu = c['enc_dim'], c['swiglu']
    hidden = train_mae.ffn_hidden(dim, c['mlp_ratio'], swiglu)
    mlp_ratio = hidden / dim  # timm takes hidden = int(dim * mlp_ratio): round up if the division fell short
    mlp_ratio = mlp_ratio if int(dim * mlp_ratio) == hidden else math.nextafter(mlp_ratio, math.inf)
    kw = dict(img_size=c['img_size'], patch_size=c['patch_size'], embed_dim=dim, depth=c['enc_depth'],
              num_heads=c['enc_heads'], mlp_ratio=mlp_ratio, class_token=False, no_embed_class=True,
              global_pool='avg', fc_norm=False, qkv_bias=c['bias'], proj_bias=c['bias'], norm_layer=c['norm'])
    return {**kw, 'act_layer': 'silu'} if swiglu else kw  # timm's Block hands act_layer (GELU) to the MLP


def export(ckpt):
    c = ckpt['config']  # with the keys an older checkpoint lacks at their defaults (harness.load_checkpoint)
    for key in (f.name for f in dataclasses.fields(train_mae.ModelConfig)):
        if key not in EXPRESSED + NOT_ENCODER and c[key] != train_mae.CONFIG[key]:
            raise SystemExit(f"error: {key}={c[key]!r}: timm's VisionTransformer cannot express it "
                             f"(it exports only with {key}={train_mae.CONFIG[key]!r})")
    model = train_mae.build_model(SimpleNamespace(**c))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise SystemExit(f"error: the checkpoint does not match its own config: {str(e).splitlines()[-1].strip()}")
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER)}
    sd['pos_embed'] = model.pos_embed.clone()  # [1, L, D] fixed sin-cos: a buffer we do not save, a parameter in timm
    # timm's PatchEmbed always has a bias (unless pre_norm): a zero bias computes the same
    sd.setdefault('patch_embed.proj.bias', torch.zeros(c['enc_dim']))
    return sd, timm_kwargs(c)


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: python scripts/export_timm.py CKPT OUT")
    ckpt_path, out = argv
    sd, kw = export(harness.load_checkpoint(ckpt_path, train_mae.CONFIG))  # weights_only=True, one-line errors
    torch.save(sd, out)
    mlp = ', mlp_layer=timm.layers.SwiGLU' if 'act_layer' in kw else ''
    print(f"wrote {out}: the encoder of {ckpt_path}, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters")
    print("import timm, torch")
    print(f"kwargs = {kw!r}")
    print(f"model = timm.models.VisionTransformer(**kwargs, num_classes=0{mlp})")
    print(f"model.load_state_dict(torch.load({out!r}))  # strict: every tensor in place")
    if not mlp:
        print("# timm's train.py: --pretrained --pretrained-path " + out + " --model-kwargs "
              + ' '.join(f"{k}={v}" for k, v in kw.items()))


if __name__ == '__main__':
    main(sys.argv[1:])
