"""Masked-Autoencoder pretraining of a Vision Transformer, in one file.

    python train_mae.py config/quickstart.py                       # CPU, built-in data
    torchrun --nproc_per_node=8 train_mae.py --data_dir=/imagenet   # the ViT-S/16 recipe

Reads top to bottom: config, model (ViT block, MAE), data, optimizers and
schedules, the training loop. Importing it runs nothing: probe.py, bench.py
and the tests reuse its model and data code.
"""
import ast
import contextlib
import functools
import io
import json
import math
import os
import re
import signal
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from muon import Muon
from optimizers import Adafactor, Lamb

# -----------------------------------------------------------------------------
# config: every knob, with the blog's ViT-S/16 ImageNet recipe as defaults.
# Override with `python train_mae.py [config/file.py] --key=value ...`
# data
data_dir = ''  # ImageFolder root with train/ and val/ (ImageNet layout), or 'synthetic'
synthetic_size = (10000, 1000)  # (train, val) images of the built-in 'synthetic' data set
crop_scale = (0.2, 1.0)  # RandomResizedCrop area range (MAE's)
num_workers = 10  # DataLoader worker processes per GPU (JPEG decoding)
# model
img_size = 224
patch_size = 16
mask_ratio = 0.6  # fraction of patches hidden from the encoder
enc_dim = 384
enc_depth = 12
enc_heads = 6
dec_dim = 384
dec_depth = 8
dec_heads = 16
mlp_ratio = 4.0
norm = 'layernorm'  # 'layernorm' or 'rmsnorm'
swiglu = False  # SwiGLU FFN with hidden 2/3 * mlp_ratio * dim: same parameter count as GELU
bias = True  # biases of every Linear/Conv layer; LayerNorm keeps its shift either way (as the blog's code)
stem = 'patch'  # 'patch' (16x16 stride-16 conv) or 'conv' (3x3 stride-2 convs per patch, Xiao et al. 2021)
norm_pix_loss = True  # targets are per-patch normalised pixels (MAE)
# optimizer
optimizer = 'muon'  # 'adamw', 'muon' (Muon on hidden 2D weights, AdamW on the rest), 'lamb' or 'adafactor'
lr = 8e-4  # peak learning rate, both sides
weight_decay = 0.05  # AdamW/LAMB side
betas = (0.9, 0.95)
muon_weight_decay = 0.1
muon_momentum = 0.95
muon_nesterov = True
muon_ns_steps = 5
muon_adjust_lr = 'match_rms_adamw'  # 'original' (Jordan) or 'match_rms_adamw' (Liu et al.): lr scale per matrix shape
muon_conv = False  # conv-stem weights on Muon (viewed as 2D) instead of AdamW
state_dtype = 'float32'  # 'bfloat16': Muon's momentum or LAMB's first moment in bf16 (Zhai et al.; Adafactor's always is)
# schedule
batch_size = 4096  # global images per optimizer step (all ranks x accumulation)
micro_batch_size = 256  # images per process per forward; accumulation = batch_size / (micro_batch_size * world)
epochs = 400
warmup_epochs = 40
max_iters = 0  # if > 0, the run is this many optimizer steps (schedules scale to it)
schedule = 'cosine'  # 'cosine', 'wsd' (warmup, constant, linear cooldown) or 'rsqrt' (warmup, 1/sqrt, cooldown)
cooldown_frac = 0.2  # wsd/rsqrt: fraction of the run spent in the linear cooldown to 0
# I/O and system
out_dir = 'out'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
resume_override = ''  # keys a resume may change anyway, comma-separated ('lr,weight_decay'); logged
eval_interval = 1000  # optimizer steps between evaluation + checkpoint
keep_ckpts = 0  # also keep the last K checkpoints as ckpt_<step>.pt (cooldowns from intermediate points)
log_interval = 20  # optimizer steps between log lines (and NaN / preemption checks)
compile = True  # torch.compile the model
dtype = 'auto'  # 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16' or 'float32'
device = 'auto'  # 'auto', 'cuda' or 'cpu'
seed = 0
ddp_timeout = 600  # seconds a rank waits in a collective before giving up (a dead peer)
CONFIG = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple))}
ARCH_KEYS = ('img_size', 'patch_size', 'enc_dim', 'enc_depth', 'enc_heads', 'dec_dim', 'dec_depth',
             'dec_heads', 'mlp_ratio', 'norm', 'swiglu', 'bias', 'stem')  # a checkpoint's shape
CHOICES = dict(norm=('layernorm', 'rmsnorm'), stem=('patch', 'conv'), optimizer=('adamw', 'muon', 'lamb', 'adafactor'),
               muon_adjust_lr=('original', 'match_rms_adamw'), schedule=('cosine', 'wsd', 'rsqrt'),
               init_from=('scratch', 'resume'), dtype=('auto', 'bfloat16', 'float32'),
               device=('auto', 'cuda', 'cpu'), state_dtype=('float32', 'bfloat16'))


class ConfigError(SystemExit):
    """A bad setting: exits with a one-line message naming the key."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


def configure(argv, defaults):
    """Apply config files and --key=value overrides to a copy of `defaults`,
    checking that each key exists and each value has the default's type."""
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string: --data_dir=/imagenet
            if isinstance(cfg.get(key), str) and not isinstance(value, str):
                value = text  # --out_dir=123 is a string
            updates = {key: value}
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            scope = {}
            try:
                exec(open(arg).read(), scope)
            except Exception as e:
                raise ConfigError(f"config file {arg}: {type(e).__name__}: {e}")
            updates = {k: v for k, v in scope.items() if not k.startswith('_') and not callable(v)
                       and type(v).__name__ != 'module'}
        for key, value in updates.items():
            if key not in cfg:
                raise ConfigError(f"unknown config key '{key}'")
            cfg[key] = _coerce(key, value, cfg[key])
    return cfg


def _coerce(key, value, default):
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if want is tuple and isinstance(value, list):
        value = tuple(value)
    if type(value) is not want:
        raise ConfigError(f"--{key}={value!r}: expected {want.__name__} like {default!r}")
    if want is tuple and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"--{key}={value!r}: expected a tuple of numbers like {default!r}")
    return value


def check_config(c):
    """The settings that cannot work, caught before any work is done."""
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(c, key)!r}: must be one of {', '.join(allowed)}")
    if not c.data_dir:
        raise ConfigError("--data_dir is required: an ImageFolder root with train/ and val/, or 'synthetic'")
    if c.img_size % c.patch_size:
        raise ConfigError(f"--img_size={c.img_size} is not divisible by --patch_size={c.patch_size}")
    if c.stem == 'conv' and (c.patch_size < 2 or c.patch_size & (c.patch_size - 1)):
        raise ConfigError(f"--patch_size={c.patch_size}: stem='conv' needs a power of two")
    for dim, heads in (('enc_dim', 'enc_heads'), ('dec_dim', 'dec_heads')):
        if getattr(c, dim) % getattr(c, heads):
            raise ConfigError(f"--{heads}={getattr(c, heads)} does not divide --{dim}={getattr(c, dim)}")
        if getattr(c, dim) % 4:
            raise ConfigError(f"--{dim}={getattr(c, dim)}: the 2D sin-cos position embedding needs a multiple of 4")
    if not 0 <= c.mask_ratio < 1:
        raise ConfigError(f"--mask_ratio={c.mask_ratio}: must be in [0, 1)")
    L = (c.img_size // c.patch_size) ** 2
    if not 0 < int(L * (1 - c.mask_ratio)) < L:
        raise ConfigError(f"--mask_ratio={c.mask_ratio} leaves no visible or no masked patch of {L}")
    for key in ('batch_size', 'micro_batch_size', 'eval_interval', 'log_interval'):
        if getattr(c, key) < 1:
            raise ConfigError(f"--{key}={getattr(c, key)}: must be >= 1")
    if len(c.betas) != 2 or len(c.crop_scale) != 2 or len(c.synthetic_size) != 2:
        raise ConfigError("--betas, --crop_scale and --synthetic_size take two values each")
    if not 0 <= c.cooldown_frac <= 1:
        raise ConfigError(f"--cooldown_frac={c.cooldown_frac}: must be in [0, 1]")
    if c.state_dtype == 'bfloat16' and c.optimizer not in ('muon', 'lamb'):  # a flag that would do nothing
        raise ConfigError(f"--state_dtype=bfloat16 applies to optimizer muon (its momentum) or lamb (its first "
                          f"moment), not --optimizer={c.optimizer}")
    if c.muon_conv and (c.optimizer != 'muon' or c.stem != 'conv'):
        raise ConfigError(f"--muon_conv=True needs --optimizer=muon and --stem=conv (got {c.optimizer}, {c.stem})")


# -----------------------------------------------------------------------------
# model: one pre-norm ViT block, used by the encoder and the decoder

def make_norm(kind, dim):
    # LayerNorm keeps its shift whatever `bias` says (as the blog's code): the
    # blog's point is that this shift can do the Linear biases' job. RMSNorm has none.
    return nn.LayerNorm(dim, eps=1e-6) if kind == 'layernorm' else nn.RMSNorm(dim, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)  # fused q, k, v projection
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):  # [N, T, D]
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [N, H, T, hd]
        x = F.scaled_dot_product_attention(q, k, v)  # flash attention on GPUs that have it
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


def ffn_hidden(dim, mlp_ratio, swiglu):
    # SwiGLU has three matrices (gate, value, out) instead of two: 2/3 of the
    # hidden width keeps the parameter count (Shazeer 2020)
    return int(2 / 3 * mlp_ratio * dim) if swiglu else int(mlp_ratio * dim)


class FeedForward(nn.Module):
    def __init__(self, dim, mlp_ratio, swiglu, bias):
        super().__init__()
        self.swiglu = swiglu
        hidden = ffn_hidden(dim, mlp_ratio, swiglu)
        if swiglu:  # gate and value are two matrices, as in the blog's code: Muon orthogonalises each alone
            self.fc1_g = nn.Linear(dim, hidden, bias=bias)  # timm's SwiGLU names
            self.fc1_x = nn.Linear(dim, hidden, bias=bias)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, norm, swiglu, bias):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, bias)
        self.norm2 = make_norm(norm, dim)
        self.mlp = FeedForward(dim, mlp_ratio, swiglu, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvStem(nn.Module):
    """Xiao et al. 2021, "Early Convolutions Help Transformers See Better":
    3x3 stride-2 convs (norm, ReLU) halving the patch until 1x1, then a 1x1 conv
    to the model width; channels double each stage and end at dim (48-96-192-384
    for ViT-S/16). Unlike the paper it runs on each patch alone (zero padding at
    the patch border): a conv across patch borders would leak masked pixels
    into visible tokens."""

    def __init__(self, patch_size, dim, bias):
        super().__init__()
        n = int(math.log2(patch_size))
        widths = [3] + [dim // 2 ** (n - 1 - i) for i in range(n)]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            # GroupNorm(1) normalises each patch on its own: BatchNorm would mix samples
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.Conv2d(dim, dim, 1, bias=bias))
        self.patch_size = patch_size

    def forward(self, imgs):  # [N, 3, H, W] -> [N, L, D]
        N, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
        return self.convs(x).reshape(N, (H // p) * (W // p), -1)


class PatchStem(nn.Module):
    """The ViT patchify: one p x p stride-p conv."""

    def __init__(self, patch_size, dim, bias):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, imgs):  # [N, 3, H, W] -> [N, L, D]
        return self.proj(imgs).flatten(2).transpose(1, 2)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sine-cosine position embedding [grid*grid, dim] (MAE, no [CLS])."""
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing='ij')
    parts = [f(c.reshape(-1, 1) * omega) for c in (x, y) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class MAE(nn.Module):
    def __init__(self, img_size=224, patch_size=16, enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=384,
                 dec_depth=8, dec_heads=16, mlp_ratio=4.0, norm='layernorm', swiglu=False, bias=True,
                 stem='patch', mask_ratio=0.6, norm_pix_loss=True):
        super().__init__()
        self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
        grid = img_size // patch_size
        self.num_patches = grid * grid
        block = lambda dim, heads: Block(dim, heads, mlp_ratio, norm, swiglu, bias)
        # encoder
        self.patch_embed = (ConvStem if stem == 'conv' else PatchStem)(patch_size, enc_dim, bias)
        self.register_buffer('pos_embed', sincos_pos_embed(enc_dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([block(enc_dim, enc_heads) for _ in range(enc_depth)])
        self.norm = make_norm(norm, enc_dim)
        # decoder
        self.decoder_embed = nn.Linear(enc_dim, dec_dim, bias=bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer('decoder_pos_embed', sincos_pos_embed(dec_dim, grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList([block(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = make_norm(norm, dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size ** 2 * 3, bias=bias)
        self.apply(self._init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(m):  # MAE's: xavier-uniform matrices (the patchify conv seen as one), zero biases
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.size(0), -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def patchify(self, imgs):  # [N, 3, H, W] -> [N, L, p*p*3]
        N, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(N, C, H // p, p, W // p, p)
        return torch.einsum('nchpwq->nhwpqc', x).reshape(N, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):  # [N, L, p*p*3] -> [N, 3, H, W]
        N, L, _ = x.shape
        p, g = self.patch_size, int(math.isqrt(L))
        x = x.reshape(N, g, g, p, p, 3)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(N, 3, g * p, g * p)

    def random_masking(self, x, noise):
        """Keep int(L * (1 - mask_ratio)) tokens per sample: those with the smallest
        noise. x [N, L, D], noise [N, L]. Returns the visible tokens [N, keep, D],
        ids_restore [N, L] (undoes the shuffle) and ids_masked [N, L - keep]."""
        N, L, D = x.shape
        keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_visible = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        return x_visible, ids_restore, ids_shuffle[:, keep:]

    def forward_encoder(self, imgs, noise):
        x = self.patch_embed(imgs) + self.pos_embed  # [N, L, D]
        x, ids_restore, ids_masked = self.random_masking(x, noise)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), ids_restore, ids_masked  # [N, keep, D]

    def forward_features(self, imgs):
        """Encoder on all patches, no masking: what the probe reads. [N, L, D]"""
        x = self.patch_embed(imgs) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_restore):
        """Decoder features for every patch [N, L, dec_dim], before the pixel head."""
        x = self.decoder_embed(latent)  # [N, keep, Dd]
        N, keep, Dd = x.shape
        x = torch.cat([x, self.mask_token.expand(N, ids_restore.size(1) - keep, Dd)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, Dd))  # unshuffle
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def forward_loss(self, imgs, pred, ids_masked):
        """Mean squared error over the masked patches only. pred [N, M, p*p*3]
        are the predictions for the patches ids_masked [N, M]."""
        target = self.patchify(imgs)
        target = torch.gather(target, 1, ids_masked[..., None].expand(-1, -1, target.size(-1)))
        if self.norm_pix_loss:  # each patch to zero mean, unit variance (MAE's best setting)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return ((pred.float() - target) ** 2).mean()

    def forward(self, imgs, noise):
        """imgs [N, 3, H, W] normalised, noise [N, L] decides the mask. Returns the
        loss, the predictions for the masked patches and their indices."""
        latent, ids_restore, ids_masked = self.forward_encoder(imgs, noise)
        x = self.forward_decoder(latent, ids_restore)
        # the pixel head only on the masked patches: the loss never reads the others
        x = torch.gather(x, 1, ids_masked[..., None].expand(-1, -1, x.size(-1)))
        pred = self.decoder_pred(x)  # [N, M, p*p*3]
        return self.forward_loss(imgs, pred, ids_masked), pred, ids_masked


def build_model(c):
    """The MAE of config `c` (a namespace or dict of the keys above)."""
    c = vars(c) if isinstance(c, SimpleNamespace) else c
    return MAE(**{k: c[k] for k in ARCH_KEYS}, mask_ratio=c['mask_ratio'], norm_pix_loss=c['norm_pix_loss'])


# -----------------------------------------------------------------------------
# data: ImageFolder or the built-in synthetic set; crops, flips and masks are
# drawn from (seed, epoch, index), so they do not depend on ranks or workers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class ImageFolder:
    """root/<class>/<image> files; labels are the sorted class folder names."""

    def __init__(self, root, classes=None):
        if not os.path.isdir(root):
            raise ConfigError(f"data folder not found: {root}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not found:
            raise ConfigError(f"{root} has no class folders: expected {root}/<class>/<image> (labels are folder names)")
        self.classes = classes or found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ConfigError(f"{root} has class folders that train/ lacks: {unknown[:3]}")
        self.samples = []  # (path, label)
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue  # a val split may lack a class
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise ConfigError(f"class folder {folder} has no images ({' '.join(IMG_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), label) for f in files]

    def __len__(self):
        return len(self.samples)

    def open(self, i):  # lazily: PIL decodes on first use, after draft()
        path, label = self.samples[i]
        return Image.open(path), label


class Synthetic:
    """The built-in data set: 10 classes of shapes (disk, square, triangle,
    ring, cross, diamond, horizontal bar, vertical bar, X, checkered square) at
    random positions, sizes and colours over shaded, striped backgrounds.
    Image i of a split is a pure function of (seed, split, i)."""
    classes = ['disk', 'square', 'triangle', 'ring', 'cross', 'diamond', 'hbar', 'vbar', 'x', 'checker']

    def __init__(self, size, img_size, split, seed=0):
        self.size, self.img_size, self.split_id, self.seed = size, img_size, ['train', 'val'].index(split), seed

    def __len__(self):
        return self.size

    def open(self, i):
        rng = np.random.default_rng([self.seed, self.split_id, i])
        label = int(rng.integers(10))
        S = self.img_size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S  # coordinates in [0, 1)
        # background: a gradient between two colours, faint stripes
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        t = ((np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3)[..., None]
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = c0 * (1 - t) + c1 * t + 0.08 * np.sin(2 * np.pi * freq * (np.sin(angle) * xx - np.cos(angle) * yy))[..., None]
        # foreground: the class's shape in its own colour, random centre and size
        cx, cy, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.28)
        dx, dy = (xx - cx) / s, (yy - cy) / s
        r, ax, ay = np.hypot(dx, dy), np.abs(dx), np.abs(dy)
        inside = [r < 1, np.maximum(ax, ay) < 0.85, (dy < 0.7) & (dy > 2 * ax - 1.1), (r < 1) & (r > 0.6),
                  ((ax < 0.3) | (ay < 0.3)) & (np.maximum(ax, ay) < 1), ax + ay < 1.1,
                  (ax < 1.1) & (ay < 0.35), (ax < 0.35) & (ay < 1.1), (np.abs(ax - ay) < 0.25) & (r < 1.2),
                  (np.maximum(ax, ay) < 0.9) & ((np.floor(dx * 2.2) + np.floor(dy * 2.2)) % 2 == 0)][label]
        fg = 1 - c0 if rng.random() < 0.5 else rng.uniform(0, 1, 3)
        img = np.where(inside[..., None], fg, img) + rng.normal(0, 0.02, (S, S, 3))
        return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)), label


def to_rgb(img):
    """Any PIL image (grayscale, 16-bit, CMYK, palette, alpha) as 8-bit RGB."""
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L'):  # 16-bit: keep the top 8 bits (convert() would clip)
        img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
    elif img.mode == 'P':
        img = img.convert('RGBA')
    return img.convert('RGB')


def random_resized_crop(W, H, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (x0, y0, w, h): area in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries, then a centre crop."""
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(W - w + 1)), int(rng.integers(H - h + 1)), w, h
    w, h = (W, round(W / ratio[0])) if W / H < ratio[0] else (round(H * ratio[1]), H) if W / H > ratio[1] else (W, H)
    return (W - w) // 2, (H - h) // 2, w, h


class MAEDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, i): returns (uint8 image [S, S, 3], label, mask noise [L],
    number of unreadable files skipped to make it). Train: RandomResizedCrop +
    flip; val: the short side resized to S * 256/224, then the centre S x S."""

    def __init__(self, source, img_size, train, num_patches, seed, crop_scale=(0.2, 1.0)):
        self.source, self.img_size, self.train = source, img_size, train
        self.num_patches, self.seed, self.crop_scale = num_patches, seed, crop_scale
        self.warnings = 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, self.train, epoch, i])
        noise = rng.random(self.num_patches, dtype=np.float32)
        for skipped in range(min(len(self.source), 100)):  # unreadable: take the next file, count the skip
            j = (i + skipped) % len(self.source)
            try:
                img, label = self.load(j, rng)
                return torch.from_numpy(np.array(img)), label, torch.from_numpy(noise), skipped
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if self.warnings < 3:  # per worker: a few lines, not a flood; the count goes in the log
                    print(f"warning: skipping unreadable image {self.source.samples[j][0]}: {e}", file=sys.stderr)
                self.warnings += 1
        raise RuntimeError(f"100 unreadable images in a row from index {i}: is the data set corrupt?")

    def load(self, j, rng):
        S = self.img_size
        img, label = self.source.open(j)
        W, H = img.size
        if self.train:
            x0, y0, w, h = random_resized_crop(W, H, self.crop_scale, rng)
        else:
            w = h = min(W, H) * 224 / 256
            x0, y0 = (W - w) / 2, (H - h) / 2
        if img.format == 'JPEG':  # decode at 1/2, 1/4 or 1/8 scale while the crop keeps >= S pixels
            img.draft('RGB', (math.ceil(W * S / w), math.ceil(H * S / h)))
        sx, sy = img.size[0] / W, img.size[1] / H
        img = to_rgb(img).resize((S, S), Image.BICUBIC, box=(x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy))
        if self.train and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img, label


def build_datasets(c, num_patches):
    """(train, val) MAEDatasets for config c; num_patches=0 draws no mask noise."""
    if c.data_dir == 'synthetic':
        sources = [Synthetic(n, c.img_size, split, c.seed) for n, split in zip(c.synthetic_size, ('train', 'val'))]
    else:
        train = ImageFolder(os.path.join(c.data_dir, 'train'))
        sources = [train, ImageFolder(os.path.join(c.data_dir, 'val'), train.classes)]
    return [MAEDataset(s, c.img_size, train, num_patches, c.seed, c.crop_scale) for s, train in zip(sources, (True, False))]


class TrainBatches:
    """Yields this rank's micro-batches as lists of (epoch, index), starting at
    optimizer step `start_step`. Each epoch is a permutation drawn from (seed,
    epoch); global batch b of it is split rank-major, then micro-batch-major,
    so step s sees the same images for any world size and any resume point.
    The last partial global batch of an epoch is dropped."""

    def __init__(self, n, batch_size, micro_batch_size, rank, world, seed, start_step, total_steps):
        self.n, self.B, self.mb, self.rank, self.world = n, batch_size, micro_batch_size, rank, world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        per_rank = self.B // self.world
        for step in range(self.start_step, self.total_steps):
            epoch, b = divmod(step, self.steps_per_epoch)
            if b == 0 or step == self.start_step:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = perm[b * self.B + self.rank * per_rank:b * self.B + (self.rank + 1) * per_rank]
            for m in range(0, per_rank, self.mb):
                yield [(epoch, int(i)) for i in mine[m:m + self.mb]]


def make_loader(dataset, batch_sampler, num_workers, pin):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       pin_memory=pin, persistent_workers=num_workers > 0)


def val_batches(n, micro_batch_size, rank, world):
    """Every val image once, split across ranks, with the fixed mask of epoch 0."""
    mine = list(range(rank, n, world))
    return [[(0, i) for i in mine[k:k + micro_batch_size]] for k in range(0, len(mine), micro_batch_size)]


def to_device(imgs, device):
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W] on device (the host sends bytes)."""
    imgs = imgs.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean, std = imagenet_stats(device)
    return (imgs - mean) / std


@functools.cache
def imagenet_stats(device):
    """ImageNet mean and std [1, 3, 1, 1] on device, made once: copying a new
    tensor to a GPU waits for its queue to drain, a host sync in every step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


# -----------------------------------------------------------------------------
# optimizers and schedules

def param_groups(model, c):
    """Split the MAE's parameters: returns {'muon': [...], 'decay': [...], 'no_decay': [...]}.
    Muon (optimizer='muon') takes the Linear weights, as in the blog, and with
    muon_conv the conv-stem weights; weight decay skips 1D tensors (norms,
    biases) and the mask token; the rest (the patch conv) is AdamW/LAMB/Adafactor
    with decay. As the blog's code: there, every 2D weight but the position
    embeddings goes to Muon, and those are all Linear weights."""
    groups = {'muon': [], 'decay': [], 'no_decay': []}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or name == 'mask_token':
                groups['no_decay'].append((f"{module_name}.{name}", p))
            elif c.optimizer == 'muon' and (isinstance(module, nn.Linear) or (c.muon_conv and isinstance(module, nn.Conv2d))):
                groups['muon'].append((f"{module_name}.{name}", p))
            else:
                groups['decay'].append((f"{module_name}.{name}", p))
    return groups


def build_optimizers(model, c, device_type, log=print):
    """One optimizer per rule: Muon for hidden matrices and AdamW for the rest, or
    LAMB / Adafactor (optimizers.py) for the whole model."""
    groups = param_groups(model, c)
    bf16 = c.state_dtype == 'bfloat16'
    holds_bf16 = dict(muon='muon', decay='lamb', no_decay='lamb')  # the state that state_dtype applies to
    for key, named in groups.items():
        note = ", bf16 momentum" if bf16 and holds_bf16[key] == c.optimizer else ""
        if c.optimizer == 'adafactor' and key != 'muon':
            note = ", bf16 momentum" + (", factored second moment" if key == 'decay' else "")
        log(f"{key}: {len(named)} tensors, {sum(p.numel() for _, p in named):,} parameters{note}")
    state_dtype = torch.bfloat16 if bf16 else None
    decay = [p for _, p in groups['decay']]
    no_decay = [p for _, p in groups['no_decay']]
    if c.optimizer == 'lamb':
        opt = Lamb([dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0, trust=False)],
                   lr=c.lr, betas=c.betas, momentum_dtype=state_dtype)
    elif c.optimizer == 'adafactor':  # betas[0] is its beta1; its second moment has its own decay (1 - t^-0.8)
        opt = Adafactor([dict(params=decay, weight_decay=c.weight_decay),
                         dict(params=no_decay, weight_decay=0.0, factored=False)], lr=c.lr, beta1=c.betas[0])
    else:
        opt = torch.optim.AdamW([dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                                lr=c.lr, betas=c.betas, fused=device_type == 'cuda')
    optimizers = [opt]
    if groups['muon']:
        optimizers.append(Muon([p for _, p in groups['muon']], lr=c.lr, weight_decay=c.muon_weight_decay,
                               momentum=c.muon_momentum, nesterov=c.muon_nesterov, ns_steps=c.muon_ns_steps,
                               adjust_lr_fn=c.muon_adjust_lr, momentum_dtype=state_dtype))
    return optimizers


def lr_factor(step, total, warmup, schedule, cooldown_frac):
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`.
    cosine: linear warmup, cosine to 0. wsd (Zhai et al. 2022): warmup, constant,
    linear cooldown to 0 over the last cooldown_frac of the run. rsqrt: warmup,
    sqrt(warmup / step), the same cooldown. wsd and rsqrt do not depend on the
    run's length until the cooldown, so a long run can be cooled down from any
    checkpoint: resume it with a smaller max_iters."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == 'cosine':
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    base = 1.0 if schedule == 'wsd' else math.sqrt(max(1, warmup) / (step + 1))
    cooldown = round(cooldown_frac * total)
    if step >= total - cooldown:  # reaches 0 at the final step
        return base * (total - 1 - step) / max(1, cooldown - 1) if cooldown > 1 else 0.0
    return base


# -----------------------------------------------------------------------------
# checkpoints, evaluation, pictures

def save_checkpoint(path, obj):
    """Atomic: write a temporary file, fsync, rename. A crash or a full disk
    while saving leaves the previous checkpoint as it was."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Mean masked-patch loss over the val split (all ranks), with fixed masks."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for imgs, _, noise, _ in loader:
        with autocast:
            loss, _, _ = model(to_device(imgs, device), noise.to(device))
        total[0] += loss.double() * len(imgs)
        total[1] += len(imgs)
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def save_reconstructions(model, dataset, path, device, n=8):
    """recon.png: rows of original | masked | reconstruction (visible patches pasted in)."""
    imgs, _, noise, _ = torch.utils.data.default_collate([dataset[(0, i)] for i in range(min(n, len(dataset)))])
    x = to_device(imgs, device)
    _, pred, ids_masked = model(x, noise.to(device))
    target = model.patchify(x)
    idx = ids_masked[..., None].expand(-1, -1, target.size(-1))
    if model.norm_pix_loss:  # predictions are per-patch normalised: show them with each patch's own mean and std
        patches = torch.gather(target, 1, idx)
        pred = pred.float() * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    masked = target.scatter(1, idx, torch.full_like(pred, -2.0, dtype=target.dtype))  # near black
    recon = target.scatter(1, idx, pred.to(target.dtype))
    mean, std = imagenet_stats(device)
    rows = [torch.cat([x, model.unpatchify(masked), model.unpatchify(recon)], dim=3) * std + mean]
    grid = torch.cat(rows[0].unbind(0), dim=1)  # [3, n*H, 3*W]
    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
    scale = max(1, 128 // x.size(-1))  # small images: blow up to >= 128 px each, pixels kept sharp
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def make_out_dir(out_dir):
    """Create out_dir and check it is writable: fail now, not after hours of work."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, '.write_test'), 'w').close()
        os.remove(os.path.join(out_dir, '.write_test'))
    except OSError as e:
        raise ConfigError(f"--out_dir={out_dir!r} is not writable: {e}")


def load_checkpoint(path):
    """A nanoMAE checkpoint, loaded with weights_only=True: tensors and plain Python
    values only, so a shared or downloaded file cannot run code when it is read."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that wants to build arbitrary objects
        wanted = re.search(r'GLOBAL ([\w.]+)', str(e))
        if wanted:  # refused, not run
            raise ConfigError(f"{path} asks to call {wanted[1]} when loaded, refused: a nanoMAE checkpoint holds "
                              f"tensors and plain values only, and loading one never runs code")
        raise ConfigError(f"cannot read checkpoint {path}: it is not a readable nanoMAE checkpoint "
                          f"({type(e).__name__}: {str(e).strip()[:120]!r})")
    if not isinstance(ckpt, dict) or not {'model', 'config'} <= ckpt.keys():
        raise ConfigError(f"{path} is not a train_mae.py checkpoint (no 'model' and 'config')")
    return ckpt


def check_architecture(c, ckpt):
    """A checkpoint loads only into the same architecture."""
    for key in ARCH_KEYS:
        if ckpt['config'][key] != getattr(c, key):
            raise ConfigError(f"--{key}={getattr(c, key)!r} does not match the checkpoint's {ckpt['config'][key]!r}")


# A resume continues the same run: these keys may change (they do not change which
# images, masks, updates and learning rates the run sees), the schedule's length may
# change only where the steps done keep their lr (a wsd/rsqrt cooldown from an
# intermediate checkpoint), and every other key is refused unless named in
# --resume_override (recorded in log.jsonl).
RESUME_FREE = ('out_dir', 'init_from', 'data_dir', 'num_workers', 'micro_batch_size', 'eval_interval', 'log_interval',
               'keep_ckpts', 'compile', 'device', 'ddp_timeout', 'resume_override', 'wandb_log', 'wandb_project',
               'wandb_run_name')
RESUME_SCHEDULE = ('epochs', 'max_iters', 'cooldown_frac')


def check_resume(c, ckpt, train_images):
    """Refuse a resume that would silently become another run. Returns the overridden keys."""
    old = ckpt['config']
    overrides = [k for k in c.resume_override.split(',') if k]
    for key in overrides:
        if key not in old:
            raise ConfigError(f"--resume_override={c.resume_override}: unknown key '{key}'")
    check_architecture(c, ckpt)
    for key, value in old.items():
        new = getattr(c, key)
        if new == value or key in RESUME_FREE or key in RESUME_SCHEDULE or key in overrides:
            continue
        raise ConfigError(f"--{key}={new!r} differs from the checkpoint's {value!r}: a resume continues the same run "
                          f"(start another out_dir, or --resume_override={key})")
    if ckpt.get('train_images', train_images) != train_images and 'data_dir' not in overrides:
        raise ConfigError(f"the training set has {train_images} images, the checkpoint's run had "
                          f"{ckpt['train_images']}: another data set (--resume_override=data_dir to go on anyway)")
    done = ckpt['step']
    before, after = (run_schedule(SimpleNamespace(**cfg), train_images) for cfg in (old, vars(c)))
    changed = [k for k in RESUME_SCHEDULE if getattr(c, k) != old[k] and k not in overrides]
    if changed and any(before(s) != after(s) for s in range(done)):
        key = changed[0]
        raise ConfigError(f"--{key}={getattr(c, key)!r} (checkpoint: {old[key]!r}) changes the lr of the {done} steps "
                          f"already done: only a wsd/rsqrt run may be shortened, to cool down from a checkpoint")
    return {k: (old[k], getattr(c, k)) for k in overrides if old[k] != getattr(c, k)}


def run_schedule(c, train_images):
    """step -> lr factor of the run of config c on a training set of train_images."""
    total, warmup = run_length(c, train_images)
    return lambda step: lr_factor(step, total, warmup, c.schedule, c.cooldown_frac)


def run_length(c, train_images):
    """(total optimizer steps, warmup steps) of the run of config c."""
    steps_per_epoch = train_images // c.batch_size
    total = c.max_iters if c.max_iters > 0 else c.epochs * steps_per_epoch
    warmup = round(c.warmup_epochs / c.epochs * total) if c.max_iters > 0 else c.warmup_epochs * steps_per_epoch
    return total, warmup


# -----------------------------------------------------------------------------
# training

def setup(c):
    """Device, torch.distributed (when launched by torchrun: nccl on CUDA, gloo
    on CPU) and autocast for config c (keys device, dtype, ddp_timeout).
    Returns (ddp, rank, local_rank, world, device, autocast context)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = c.device if c.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    rank, local_rank, world = 0, 0, 1
    if ddp:
        dist.init_process_group('nccl' if dev == 'cuda' else 'gloo', timeout=timedelta(seconds=c.ddp_timeout))
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if dev == 'cuda':
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = c.dtype if c.dtype != 'auto' else 'bfloat16' if dev.startswith('cuda') else 'float32'
    autocast = torch.autocast(dev.split(':')[0], dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    return ddp, rank, local_rank, world, dev, autocast


def shutdown_distributed():
    """A barrier, then the teardown: with gloo, a rank that tears down while a peer
    still finishes its last collective can abort that peer at exit."""
    dist.barrier()
    dist.destroy_process_group()


def main(argv):
    c = SimpleNamespace(**configure(argv, CONFIG))
    check_config(c)
    ddp, rank, local_rank, world, dev, autocast = setup(c)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if c.batch_size % (c.micro_batch_size * world):
        raise ConfigError(f"--batch_size={c.batch_size} is not divisible by --micro_batch_size={c.micro_batch_size}"
                          f" x {world} processes")
    accum = c.batch_size // (c.micro_batch_size * world)
    ckpt_path = os.path.join(c.out_dir, 'ckpt.pt')

    ckpt = None
    if c.init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path):
        log(f"warning: --init_from=scratch: {ckpt_path} will be overwritten at the first evaluation")
    if master:
        make_out_dir(c.out_dir)

    torch.manual_seed(c.seed)  # the same initial weights on every rank
    model = build_model(c).to(dev)
    train_set, val_set = build_datasets(c, model.num_patches)
    steps_per_epoch = len(train_set) // c.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch_size={c.batch_size} is larger than the training set ({len(train_set)} images)")
    total, warmup = run_length(c, len(train_set))
    overridden = check_resume(c, ckpt, len(train_set)) if ckpt is not None else {}
    log(f"{len(train_set):,} train / {len(val_set):,} val images, {steps_per_epoch} steps per epoch, {total} steps "
        f"({warmup} warmup), {world} process(es) x {accum} accumulation x {c.micro_batch_size} = {c.batch_size}")
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizers = build_optimizers(model, c, dev.split(':')[0], log)
    step, best_val = 0, float('inf')
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
            for opt, state in zip(optimizers, ckpt['optimizers'], strict=True):
                opt.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"{ckpt_path} does not fit this run's model or optimizers: {str(e).splitlines()[0]}")
        step, best_val = ckpt['step'], ckpt['best_val_loss']
        log(f"resumed from {ckpt_path} at step {step}" + (f", overriding {overridden}" if overridden else ""))
    del ckpt

    compiled = torch.compile(model) if c.compile else model
    train_model = nn.parallel.DistributedDataParallel(compiled, device_ids=[local_rank] if dev.startswith('cuda') else None) if ddp else compiled
    pin = dev.startswith('cuda')
    train_loader = make_loader(train_set, TrainBatches(len(train_set), c.batch_size, c.micro_batch_size, rank, world,
                                                       c.seed, step, total), c.num_workers, pin)
    val_loader = make_loader(val_set, val_batches(len(val_set), c.micro_batch_size, rank, world), c.num_workers, pin)

    log_path = os.path.join(c.out_dir, 'log.jsonl')
    if master and os.path.exists(log_path):  # drop lines past the checkpoint: a resumed run rewrites them
        lines = [l for l in open(log_path) if l.strip() and (c.init_from == 'resume' and json.loads(l)['step'] <= step)]
        with open(log_path, 'w') as f:
            f.writelines(lines)

    def write_log(**record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    if overridden:  # the record of what the resumed run changed: {key: [checkpoint's, new]}
        write_log(step=step, resume_override=overridden)

    def checkpoint():
        if not master:
            return
        state = dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                     config=vars(c), step=step, best_val_loss=best_val, train_images=len(train_set))
        try:
            save_checkpoint(ckpt_path, state)
        except OSError as e:
            raise SystemExit(f"error: could not write {ckpt_path} ({e}); the previous checkpoint is intact")
        if c.keep_ckpts > 0:  # hard links: no copy, and replacing ckpt.pt later leaves them alone
            kept = os.path.join(c.out_dir, f'ckpt_{step}.pt')
            if not os.path.exists(kept):
                os.link(ckpt_path, kept)
            old = sorted((int(f[5:-3]) for f in os.listdir(c.out_dir) if f.startswith('ckpt_') and f.endswith('.pt')))
            for s in old[:-c.keep_ckpts]:
                os.remove(os.path.join(c.out_dir, f'ckpt_{s}.pt'))

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    batches = iter(train_loader)
    loss_sum = torch.zeros((), device=dev)  # summed on the device: no host sync per step
    skipped = torch.zeros((), dtype=torch.long)  # unreadable images so far (all ranks, after the reduce)
    t0, steps_since_log = time.time(), 0
    stop = []  # SIGTERM/SIGINT land here: save at the next log boundary and exit cleanly
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while step < total:
            lr = c.lr * lr_factor(step, total, warmup, c.schedule, c.cooldown_frac)
            for opt in optimizers:
                for group in opt.param_groups:
                    group['lr'] = lr
            for micro in range(accum):
                imgs, _, noise, n_skipped = next(batches)
                skipped += n_skipped.sum()
                sync = not ddp or micro == accum - 1  # all-reduce gradients on the last micro-step only
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with autocast:
                        loss, _, _ = train_model(to_device(imgs, dev), noise.to(dev, non_blocking=True))
                    (loss / accum).backward()
                loss_sum += loss.detach() / accum
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            steps_since_log += 1
            bar.update(1)

            evaluating = step % c.eval_interval == 0 or step == total
            if step % c.log_interval == 0 or evaluating:  # the only host syncs of the loop
                stats = torch.stack([loss_sum / steps_since_log, skipped.to(dev).float(), torch.tensor(float(bool(stop)), device=dev)])
                if ddp:
                    dist.all_reduce(stats)
                loss_avg, n_skipped, stopping = stats[0].item() / world, int(stats[1].item()), stats[2].item() > 0
                if not math.isfinite(loss_avg):  # stop before a poisoned model is saved
                    raise SystemExit(f"error: loss is {loss_avg} at step {step}; {ckpt_path} keeps the last good state")
                imgs_per_sec = steps_since_log * c.batch_size / (time.time() - t0)
                write_log(step=step, loss=loss_avg, lr=lr, imgs_per_sec=imgs_per_sec, skipped_images=n_skipped)
                bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{imgs_per_sec:.0f}")
                loss_sum.zero_()
                steps_since_log = 0
                if stopping:
                    checkpoint()
                    log(f"\nstopped by signal at step {step}: {ckpt_path} saved, continue with --init_from=resume")
                    break
            if evaluating:
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise SystemExit(f"error: non-finite weights at step {step}; {ckpt_path} keeps the last good state")
                model.eval()
                val_loss = evaluate(compiled, val_loader, dev, autocast)
                model.train()
                best_val = min(best_val, val_loss)
                write_log(step=step, val_loss=val_loss)
                log(f"\nstep {step}: val loss {val_loss:.4f} (best {best_val:.4f})")
                checkpoint()
                if master:
                    with autocast:
                        save_reconstructions(model, val_set, os.path.join(c.out_dir, 'recon.png'), dev)
            if steps_since_log == 0:
                t0 = time.time()  # throughput excludes logging, evaluation and saving
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        bar.close()
    if ddp:
        shutdown_distributed()


if __name__ == '__main__':
    main(sys.argv[1:])
