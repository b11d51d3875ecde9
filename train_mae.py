"""Masked-Autoencoder pretraining of a Vision Transformer, in one file.

    python train_mae.py config/quickstart.py                       # CPU, built-in data
    torchrun --nproc_per_node=8 train_mae.py --data_dir=/imagenet   # the ViT-S/16 recipe

Reads top to bottom: config, model (ViT block, MAE), data, optimizers and
schedules, the training loop. Importing it runs nothing: probe.py, bench.py
and the tests reuse its model and data code.
"""
import contextlib
import dataclasses
import math
import os
import sys
import time
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import harness
from harness import ConfigError
from muon import Muon
from optimizers import Adafactor, Lamb
from synthetic import Synthetic

# -----------------------------------------------------------------------------
# config: every knob, with the blog's ViT-S/16 ImageNet recipe as defaults.
# Override with `python train_mae.py [config/file.py] --key=value ...` (harness.py parses and checks)
_names_before_config = set(globals())
# data
data_dir = ''  # ImageFolder root with train/ and val/ (ImageNet layout), its scripts/prepare_data.py copy, or 'synthetic'
synthetic_size = (10000, 1000)  # (train, val) images of the built-in 'synthetic' data set
crop_scale = (0.2, 1.0)  # RandomResizedCrop area range (MAE's)
num_workers = 10  # DataLoader worker processes per GPU (JPEG decoding)
crop_resize = 'auto'  # where train crops are resized: 'loader' (PIL, in the workers), 'device' (the same bicubic
#                       weights as matrices, batched on the device; the workers only decode), 'auto' = device on CUDA
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
adamw_lr = 0.0  # optimizer='muon': the AdamW side's own peak lr (norms, biases, patch conv, mask token); 0 = lr (the blog's)
weight_decay = 0.05  # AdamW/LAMB side
betas = (0.9, 0.95)
muon_weight_decay = 0.1
muon_momentum = 0.95
muon_nesterov = True
muon_ns_steps = 5
muon_adjust_lr = 'match_rms_adamw'  # 'original' (Jordan) or 'match_rms_adamw' (Liu et al.): lr scale per matrix shape
muon_conv = False  # conv-stem weights on Muon (viewed as 2D) instead of AdamW
muon_ns_dtype = 'auto'  # Newton-Schulz in 'bfloat16' or 'float32'; 'auto': bf16 on GPUs and CPUs with native bf16
state_dtype = 'float32'  # 'bfloat16': Muon's momentum or LAMB's first moment in bf16 (Zhai et al.; Adafactor's always is)
# schedule
batch_size = 4096  # global images per optimizer step (all ranks x accumulation)
micro_batch_size = 256  # images per process per forward; accumulation = batch_size / (micro_batch_size * world)
epochs = 400
warmup_epochs = 40.0  # may be fractional (a warmup fraction of a max_iters run: warmup_epochs / epochs)
warmup_start = 1 / 3  # the warmup's first lr, a fraction of the peak (torch's LinearLR default, as the blog's code)
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
wandb_log = False  # also log to Weights & Biases (an optional extra: pip install wandb)
wandb_project = 'nanomae'
wandb_run_name = ''  # '' = wandb's generated name
CONFIG = harness.settings(globals(), _names_before_config)  # every constant above, by name
CHOICES = dict(crop_resize=('auto', 'loader', 'device'), norm=('layernorm', 'rmsnorm'), stem=('patch', 'conv'),
               optimizer=('adamw', 'muon', 'lamb', 'adafactor'), muon_adjust_lr=('original', 'match_rms_adamw'),
               muon_ns_dtype=('auto', 'bfloat16', 'float32'),
               state_dtype=('float32', 'bfloat16'), schedule=('cosine', 'wsd', 'rsqrt'), init_from=('scratch', 'resume'),
               dtype=('auto', 'bfloat16', 'float32'), device=('auto', 'cuda', 'cpu'))  # the string settings' values


def check_config(c):
    """The run's settings that cannot work, caught before any work is done, each a one-line
    error naming the key; the model's and the data's own rules are ModelConfig's and DataConfig's."""
    check_choices(c, CHOICES.keys() - {f.name for f in dataclasses.fields(ModelConfig)})  # the model checks its own
    ModelConfig.of(c)
    DataConfig.of(c)
    if not c.data_dir:
        raise ConfigError("--data_dir is required: an ImageFolder root with train/ and val/, its "
                          "scripts/prepare_data.py copy, or 'synthetic'")
    L = (c.img_size // c.patch_size) ** 2
    if not 0 <= c.mask_ratio < 1 or not 0 < num_visible(L, c.mask_ratio) < L:  # the loss needs both
        raise ConfigError(f"--mask_ratio={c.mask_ratio} leaves no visible or no masked patch of {L}")
    for key in ('batch_size', 'micro_batch_size', 'eval_interval', 'log_interval'):
        if getattr(c, key) < 1:
            raise ConfigError(f"--{key}={getattr(c, key)}: must be >= 1")
    if len(c.betas) != 2:
        raise ConfigError(f"--betas={c.betas}: two values (beta1, beta2)")
    for key in ('warmup_start', 'cooldown_frac'):  # fractions: of the peak lr, of the run
        if not 0 <= getattr(c, key) <= 1:
            raise ConfigError(f"--{key}={getattr(c, key)}: must be in [0, 1]")
    needs = dict(state_dtype=('muon', 'lamb'), muon_ns_dtype=('muon',), adamw_lr=('muon',), muon_conv=('muon',))
    for key, optimizers in needs.items():  # a flag that would do nothing is an error
        if getattr(c, key) != CONFIG[key] and c.optimizer not in optimizers:
            raise ConfigError(f"--{key}={getattr(c, key)} applies to optimizer {' or '.join(optimizers)}, "
                              f"not --optimizer={c.optimizer}")
    if c.muon_conv and c.stem != 'conv':
        raise ConfigError("--muon_conv=True needs --stem=conv (the patch stem has no conv for Muon)")


def check_choices(c, keys):
    for key in sorted(keys):
        if getattr(c, key) not in CHOICES[key]:
            raise ConfigError(f"--{key}={getattr(c, key)!r}: must be one of {', '.join(CHOICES[key])}")


# -----------------------------------------------------------------------------
# model: one pre-norm ViT block, used by the encoder and the decoder

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the MAE reads of the config (the constants above, by the same names).
    A new knob needs a default that keeps the old model: checkpoints saved before
    it existed load with that default (harness.load_checkpoint fills it in)."""
    img_size: int
    patch_size: int
    enc_dim: int
    enc_depth: int
    enc_heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    mlp_ratio: float
    norm: str
    swiglu: bool
    bias: bool
    stem: str
    mask_ratio: float  # these two shape the loss, not the weights
    norm_pix_loss: bool

    @classmethod
    def of(cls, c):  # c: any namespace with these keys
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self):  # the model's rules, each a one-line error naming the key
        check_choices(self, [f.name for f in dataclasses.fields(self) if f.name in CHOICES])
        if self.img_size % self.patch_size:
            raise ConfigError(f"--img_size={self.img_size} is not divisible by --patch_size={self.patch_size}")
        if self.stem == 'conv' and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"--patch_size={self.patch_size}: stem='conv' needs a power of two")
        for dim, heads in (('enc_dim', 'enc_heads'), ('dec_dim', 'dec_heads')):
            if getattr(self, dim) % getattr(self, heads):
                raise ConfigError(f"--{heads}={getattr(self, heads)} does not divide --{dim}={getattr(self, dim)}")
            if getattr(self, dim) % 4:
                raise ConfigError(f"--{dim}={getattr(self, dim)}: the 2D sin-cos position embedding needs a multiple of 4")


# the keys that shape the weights: a checkpoint loads only where they match
ARCH_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ('mask_ratio', 'norm_pix_loss'))


def make_norm(kind, dim):
    # LayerNorm keeps its shift whatever `bias` says (as the blog's code): the
    # blog's point is that this shift can do the Linear biases' job. RMSNorm has none.
    return nn.LayerNorm(dim, eps=1e-6) if kind == 'layernorm' else nn.RMSNorm(dim, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, cfg, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.bias)  # fused q, k, v projection
        self.proj = nn.Linear(dim, dim, bias=cfg.bias)

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
    def __init__(self, cfg, dim):
        super().__init__()
        self.swiglu, bias = cfg.swiglu, cfg.bias
        hidden = ffn_hidden(dim, cfg.mlp_ratio, cfg.swiglu)
        if cfg.swiglu:  # gate and value are two matrices, as in the blog's code: Muon orthogonalises each alone
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
    def __init__(self, cfg, dim, heads):  # dim, heads: the encoder's or the decoder's
        super().__init__()
        self.norm1 = make_norm(cfg.norm, dim)
        self.attn = Attention(cfg, dim, heads)
        self.norm2 = make_norm(cfg.norm, dim)
        self.mlp = FeedForward(cfg, dim)

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

    def __init__(self, cfg):
        super().__init__()
        widths = conv_stem_widths(cfg.patch_size, cfg.enc_dim)
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            # GroupNorm(1) normalises each patch on its own: BatchNorm would mix samples
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.Conv2d(cfg.enc_dim, cfg.enc_dim, 1, bias=cfg.bias))
        self.patch_size = cfg.patch_size

    def forward(self, imgs):  # [N, 3, H, W] -> [N, L, D]
        N, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, p, p)
        return self.convs(x).reshape(N, (H // p) * (W // p), -1)


def conv_stem_widths(patch_size, dim):
    """Channels of the conv stem: 3, then doubling per 3x3 stride-2 conv up to dim."""
    n = int(math.log2(patch_size))
    return [3] + [dim // 2 ** (n - 1 - i) for i in range(n)]


class PatchStem(nn.Module):
    """The ViT patchify: one p x p stride-p conv."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.enc_dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.bias)

    def forward(self, imgs):  # [N, 3, H, W] -> [N, L, D]
        return self.proj(imgs).flatten(2).transpose(1, 2)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sine-cosine position embedding [grid*grid, dim] (MAE's, without [CLS])."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing='ij')
    parts = [f(c.reshape(-1, 1) * omega) for c in (x, y) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class MAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_size, self.mask_ratio, self.norm_pix_loss = cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss
        grid = cfg.img_size // cfg.patch_size
        self.num_patches = grid * grid
        # encoder
        self.patch_embed = (ConvStem if cfg.stem == 'conv' else PatchStem)(cfg)
        self.register_buffer('pos_embed', sincos_pos_embed(cfg.enc_dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(cfg, cfg.enc_dim, cfg.enc_heads) for _ in range(cfg.enc_depth)])
        self.norm = make_norm(cfg.norm, cfg.enc_dim)
        # decoder
        self.decoder_embed = nn.Linear(cfg.enc_dim, cfg.dec_dim, bias=cfg.bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        self.register_buffer('decoder_pos_embed', sincos_pos_embed(cfg.dec_dim, grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(cfg, cfg.dec_dim, cfg.dec_heads) for _ in range(cfg.dec_depth)])
        self.decoder_norm = make_norm(cfg.norm, cfg.dec_dim)
        self.decoder_pred = nn.Linear(cfg.dec_dim, cfg.patch_size ** 2 * 3, bias=cfg.bias)
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
        keep = num_visible(L, self.mask_ratio)
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

    def masked_targets(self, imgs, ids_masked):
        """What the predictions for the patches ids_masked [N, M] are compared with: [N, M, p*p*3]."""
        target = self.patchify(imgs)
        target = torch.gather(target, 1, ids_masked[..., None].expand(-1, -1, target.size(-1)))
        if self.norm_pix_loss:  # each patch to zero mean, unit variance (MAE's best setting)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, ids_masked):
        """Mean squared error over the masked patches only. pred [N, M, p*p*3]
        are the predictions for the patches ids_masked [N, M]."""
        target = self.masked_targets(imgs, ids_masked)
        return ((pred.to(target.dtype) - target) ** 2).mean()  # bf16 predictions in fp32

    def forward(self, imgs, noise):
        """imgs [N, 3, H, W] normalised, noise [N, L] decides the mask. Returns the
        loss, the predictions for the masked patches and their indices."""
        latent, ids_restore, ids_masked = self.forward_encoder(imgs, noise)
        x = self.forward_decoder(latent, ids_restore)
        # the pixel head only on the masked patches: the loss never reads the others
        x = torch.gather(x, 1, ids_masked[..., None].expand(-1, -1, x.size(-1)))
        pred = self.decoder_pred(x)  # [N, M, p*p*3]
        return self.forward_loss(imgs, pred, ids_masked), pred, ids_masked


def num_visible(num_patches, mask_ratio):
    return int(num_patches * (1 - mask_ratio))


def build_model(c):
    """The MAE of config namespace `c`."""
    return MAE(ModelConfig.of(c))


# -----------------------------------------------------------------------------
# data: the augmentation (crops, flips, masks), each drawn from (seed, epoch, index), so it
# depends on no rank or worker; data.py reads, decodes and batches the images

@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the data pipeline reads of the config (the constants above, by the same names)."""
    data_dir: str
    img_size: int
    synthetic_size: tuple
    crop_scale: tuple
    seed: int

    @classmethod
    def of(cls, c):
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self):  # the data's rules, each a one-line error naming the key
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"--crop_scale={self.crop_scale}: two area fractions, 0 < low <= high <= 1")
        if len(self.synthetic_size) != 2 or min(self.synthetic_size) < 1:
            raise ConfigError(f"--synthetic_size={self.synthetic_size}: two image counts (train, val), each >= 1")


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


class Sample(NamedTuple):  # batched by the DataLoader (data.collate) into the same fields
    imgs: torch.Tensor  # uint8 [S, S, 3]; resizing on the device: [h, w, 3], the part of the image the crop reads
    labels: int
    noise: torch.Tensor  # [L] mask noise: the smallest int(L * (1 - mask_ratio)) are visible
    skipped: int  # unreadable files skipped to make this sample
    crop: torch.Tensor  # [7] what is left to do on the device: the crop's x0, y0, w, h in imgs, imgs' w and h, flip


class MAEDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, i): returns a Sample. Train: RandomResizedCrop + flip;
    val: the short side resized to S * 256/224, then the centre S x S."""

    def __init__(self, source, cfg, train, num_patches, resize_on_device=False):
        self.source, self.cfg, self.train, self.num_patches = source, cfg, train, num_patches
        self.resize_on_device = resize_on_device and train  # val keeps PIL's centre crop

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.cfg.seed, self.train, epoch, i])
        noise = rng.random(self.num_patches, dtype=np.float32)
        (img, crop, label), skipped = data.read_skipping(self.source, i, lambda j: self.load(j, rng))
        return Sample(torch.from_numpy(np.array(img)), label, torch.from_numpy(noise), skipped, crop)

    def load(self, j, rng):
        S = self.cfg.img_size
        img, label = self.source.open(j)
        W, H = img.size
        if self.train:
            x0, y0, w, h = random_resized_crop(W, H, self.cfg.crop_scale, rng)
        else:
            w = h = min(W, H) * 224 / 256
            x0, y0 = (W - w) / 2, (H - h) / 2
        flip = self.train and rng.random() < 0.5
        img, box = data.decode_crop(img, (x0, y0, w, h), S)  # only the pixels the resize reads
        return (*data.resize_crop(img, box, S, flip, self.resize_on_device), label)


def build_datasets(c, num_patches, resize_on_device=False):
    """(train, val) MAEDatasets for config c; num_patches=0 draws no mask noise."""
    d = DataConfig.of(c)
    if d.data_dir == 'synthetic':
        sources = [Synthetic(n, d.img_size, split, d.seed) for n, split in zip(d.synthetic_size, ('train', 'val'))]
    else:
        sources = data.open_sources(d.data_dir)
    return [MAEDataset(s, d, train, num_patches, resize_on_device) for s, train in zip(sources, (True, False))]


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
                key = 'no_decay'
            elif c.optimizer == 'muon' and (isinstance(module, nn.Linear) or (c.muon_conv and isinstance(module, nn.Conv2d))):
                key = 'muon'
            else:
                key = 'decay'
            groups[key].append((f"{module_name}.{name}" if module_name else name, p))  # state_dict's names
    return groups


def build_optimizers(model, c, device_type, log=print):
    """One optimizer per rule: Muon for hidden matrices and AdamW for the rest, or
    LAMB / Adafactor (optimizers.py) for the whole model."""
    groups = param_groups(model, c)
    for key, named in groups.items():
        log(f"{key}: {len(named)} tensors, {sum(p.numel() for _, p in named):,} parameters")
    # state_dtype=bfloat16 reaches Muon's momentum (AdamW's moments stay fp32) or LAMB's first moment
    state_dtype = torch.bfloat16 if c.state_dtype == 'bfloat16' else None
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
                               adjust_lr_fn=c.muon_adjust_lr, momentum_dtype=state_dtype,
                               ns_dtype=None if c.muon_ns_dtype == 'auto' else getattr(torch, c.muon_ns_dtype)))
    return optimizers


def lr_factor(step, total, warmup, schedule, cooldown_frac, warmup_start):
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`.
    The warmup rises linearly from warmup_start at step 0 to 1 at step `warmup`
    (torch's LinearLR, stepped per optimizer step, as the blog's code).
    cosine: warmup, cosine to 0. wsd (Zhai et al. 2022): warmup, constant,
    linear cooldown to 0 over the last cooldown_frac of the run. rsqrt: warmup,
    sqrt(warmup / step), the same cooldown. wsd and rsqrt do not depend on the
    run's length until the cooldown, so a long run can be cooled down from any
    checkpoint: resume it with a smaller max_iters."""
    if step < warmup:
        return warmup_start + (1 - warmup_start) * step / warmup
    if schedule == 'cosine':
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    base = 1.0 if schedule == 'wsd' else math.sqrt(max(1, warmup) / max(1, step))  # 1 at the warmup's end
    cooldown = round(cooldown_frac * total)
    if step >= total - cooldown:  # reaches 0 at the final step
        return base * (total - 1 - step) / max(1, cooldown - 1) if cooldown > 1 else 0.0
    return base


def run_length(c, train_images):
    """(total optimizer steps, warmup steps) of the run of config c."""
    steps_per_epoch = train_images // c.batch_size
    total = c.max_iters if c.max_iters > 0 else c.epochs * steps_per_epoch
    warmup = round(c.warmup_epochs / c.epochs * total) if c.max_iters > 0 else round(c.warmup_epochs * steps_per_epoch)
    return total, warmup


# The resume rule: a resume continues the run in the checkpoint, so every key must match the
# checkpoint's, except where and how the run runs and logs (RESUME_FREE: the micro-batch changes
# only the order of a sum, crop_resize where PIL's resize runs), the keys named in
# --resume_override (log.jsonl records them), and the length of a wsd or rsqrt run, to cool it
# down from a checkpoint: until its cooldown such a schedule does not depend on the run's length.
RESUME_FREE = ('out_dir', 'init_from', 'data_dir', 'num_workers', 'crop_resize', 'micro_batch_size', 'eval_interval',
               'log_interval', 'keep_ckpts', 'compile', 'device', 'ddp_timeout', 'resume_override', 'wandb_log',
               'wandb_project', 'wandb_run_name')
RUN_LENGTH = ('epochs', 'max_iters', 'cooldown_frac')


def check_resume(c, ckpt, train_images):
    """The resume rule above, as one-line refusals; returns {key: [old, new]} of the overridden keys that changed."""
    overrides = [k for k in c.resume_override.split(',') if k]
    overridden = harness.check_resume(vars(c), ckpt['config'], RESUME_FREE + RUN_LENGTH, overrides)
    if ckpt.get('train_images', train_images) != train_images and 'data_dir' not in overrides:
        raise ConfigError(f"the training set has {train_images} images, the checkpoint's run had "
                          f"{ckpt['train_images']}: another data set (--resume_override=data_dir to go on anyway)")
    old = SimpleNamespace(**ckpt['config'])
    changed = [k for k in RUN_LENGTH if getattr(c, k) != getattr(old, k) and k not in overrides]
    if changed:
        (old_total, old_warmup), (total, warmup) = run_length(old, train_images), run_length(c, train_images)
        cooldowns = (old_total - round(old.cooldown_frac * old_total), total - round(c.cooldown_frac * total))
        if c.schedule not in ('wsd', 'rsqrt') or warmup != old_warmup or min(cooldowns) < ckpt['step']:
            raise ConfigError(f"--{changed[0]}={getattr(c, changed[0])!r} (checkpoint: {getattr(old, changed[0])!r}) "
                              f"changes the lr of the {ckpt['step']} steps already done: only a wsd/rsqrt run may be "
                              f"shortened, to cool down from a checkpoint")
    return overridden


# -----------------------------------------------------------------------------
# evaluation, pictures

@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Mean masked-patch loss over the val split (all ranks), with fixed masks."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in loader:
        with autocast:
            loss, _, _ = model(data.to_device(batch.imgs, device), batch.noise.to(device))
        total[0] += loss.double() * len(batch.imgs)
        total[1] += len(batch.imgs)
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def save_reconstructions(model, dataset, path, device, n=8):
    """recon.png: rows of original | masked | reconstruction (visible patches pasted in)."""
    batch = data.collate([dataset[(0, i)] for i in range(min(n, len(dataset)))])
    x = data.to_device(batch.imgs, device)
    _, pred, ids_masked = model(x, batch.noise.to(device))
    target = model.patchify(x)
    idx = ids_masked[..., None].expand(-1, -1, target.size(-1))
    if model.norm_pix_loss:  # predictions are per-patch normalised: show them with each patch's own mean and std
        patches = torch.gather(target, 1, idx)
        pred = pred.float() * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    masked = target.scatter(1, idx, torch.full_like(pred, -2.0, dtype=target.dtype))  # near black
    recon = target.scatter(1, idx, pred.to(target.dtype))
    mean, std = data.imagenet_stats(device)
    rows = [torch.cat([x, model.unpatchify(masked), model.unpatchify(recon)], dim=3) * std + mean]
    grid = torch.cat(rows[0].unbind(0), dim=1)  # [3, n*H, 3*W]
    img = Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
    scale = max(1, 128 // x.size(-1))  # small images: blow up to >= 128 px each, pixels kept sharp
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


# -----------------------------------------------------------------------------
# training

def main(argv):
    c = SimpleNamespace(**harness.configure(argv, CONFIG))
    check_config(c)  # before any work
    rt = harness.setup(c.device, c.dtype, c.ddp_timeout)
    dev, log = rt.device, print if rt.master else (lambda *a, **k: None)
    accum = harness.accumulation(c.batch_size, c.micro_batch_size, rt.world)
    ckpt_path = os.path.join(c.out_dir, 'ckpt.pt')
    ckpt = harness.load_checkpoint(ckpt_path, CONFIG) if c.init_from == 'resume' else None
    if ckpt is None and os.path.exists(ckpt_path):
        log(f"warning: --init_from=scratch: {ckpt_path} will be overwritten at the first evaluation")
    if rt.master:
        harness.make_out_dir(c.out_dir)

    torch.manual_seed(c.seed)  # the same initial weights on every rank
    model = build_model(c).to(dev)
    resize_on_device = c.crop_resize == 'device' or c.crop_resize == 'auto' and dev.startswith('cuda')
    train_set, val_set = build_datasets(c, model.num_patches, resize_on_device)
    if len(train_set) < c.batch_size:
        raise ConfigError(f"--batch_size={c.batch_size} is larger than the training set ({len(train_set)} images)")
    total, warmup = run_length(c, len(train_set))

    def lr_at(step):  # the schedule's factor of the peak lr
        return lr_factor(step, total, warmup, c.schedule, c.cooldown_frac, c.warmup_start)

    log(f"{len(train_set):,} train / {len(val_set):,} val images, {len(train_set) // c.batch_size} steps per epoch, "
        f"{total} steps ({warmup} warmup), {rt.world} process(es) x {accum} accumulation x {c.micro_batch_size} "
        f"= {c.batch_size}")
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizers = build_optimizers(model, c, dev.split(':')[0], log)
    peak_lrs = [c.lr if isinstance(opt, Muon) or not c.adamw_lr else c.adamw_lr for opt in optimizers]
    step, best_val, overridden = 0, float('inf'), {}
    if ckpt is not None:
        harness.check_architecture(c, ckpt, ARCH_KEYS)
        overridden = check_resume(c, ckpt, len(train_set))
        harness.load_states(ckpt_path, ckpt, model, optimizers)
        step, best_val = ckpt['step'], ckpt['best_val_loss']
        log(f"resumed from {ckpt_path} at step {step}" + (f", overriding {overridden}" if overridden else ""))
    tracker = dict(project=c.wandb_project, name=c.wandb_run_name or None, config=vars(c)) if c.wandb_log else None
    runlog = harness.RunLog(c.out_dir, rt.master, step, tracker, ckpt and ckpt.get('wandb_id'))
    if overridden:  # the record of what the resumed run changed: {key: [checkpoint's, new]}
        runlog.write(step=step, resume_override=overridden)
    del ckpt

    compiled = torch.compile(model) if c.compile else model
    train_model = nn.parallel.DistributedDataParallel(
        compiled, device_ids=[rt.local_rank] if dev.startswith('cuda') else None) if rt.ddp else compiled
    pin = dev.startswith('cuda')
    order = data.TrainBatches(len(train_set), c.batch_size, c.micro_batch_size, rt.rank, rt.world, c.seed, step, total)
    batches = iter(data.make_loader(train_set, order, c.num_workers, pin))
    val_loader = data.make_loader(val_set, data.val_batches(len(val_set), c.micro_batch_size, rt.rank, rt.world),
                                  c.num_workers, pin)

    def checkpoint():
        if rt.master:
            harness.write_checkpoint(c.out_dir, dict(
                model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers], config=vars(c), step=step,
                best_val_loss=best_val, train_images=len(train_set), wandb_id=runlog.wandb_id), c.keep_ckpts)

    from tqdm import tqdm
    loss_sum = torch.zeros((), device=dev)  # summed on the device between log lines: no host sync per step
    skipped = torch.zeros((), dtype=torch.long)  # unreadable images this rank skipped
    steps_since_log, t0 = 0, time.time()
    with tqdm(total=total, initial=step, disable=not rt.master, dynamic_ncols=True) as bar, \
            harness.stop_on_signals() as stop:
        while step < total:
            lr = c.lr * lr_at(step)
            for opt, peak in zip(optimizers, peak_lrs):
                for group in opt.param_groups:
                    group['lr'] = peak * lr_at(step)
            for micro in range(accum):
                batch = next(batches)
                sync = not rt.ddp or micro == accum - 1  # all-reduce gradients on the last micro-step only
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with rt.autocast:
                        imgs = data.to_device(batch.imgs, dev, batch.crop if resize_on_device else None, c.img_size)
                        loss, _, _ = train_model(imgs, batch.noise.to(dev, non_blocking=True))
                    (loss / accum).backward()
                loss_sum += loss.detach() / accum
                skipped += batch.skipped.sum()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            steps_since_log += 1
            bar.update(1)

            evaluating = step % c.eval_interval == 0 or step == total
            if step % c.log_interval == 0 or evaluating:  # the only host syncs of the loop: one all-reduce
                loss_avg, skipped_all, stopping = harness.all_ranks(loss_sum / steps_since_log, skipped, bool(stop))
                imgs_per_sec = steps_since_log * c.batch_size / (time.time() - t0)
                runlog.write(step=step, loss=loss_avg, lr=lr, imgs_per_sec=imgs_per_sec, skipped_images=skipped_all)
                harness.check_finite('loss', loss_avg, step, ckpt_path)  # logged first: where the run diverged
                bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{imgs_per_sec:.0f}")
                loss_sum.zero_()
                steps_since_log = 0
                if stopping:  # SIGTERM/SIGINT on any rank
                    checkpoint()
                    log(f"\nstopped by signal at step {step}: {ckpt_path} saved, continue with --init_from=resume")
                    break
            if evaluating:
                model.eval()
                val_loss = evaluate(compiled, val_loader, dev, rt.autocast)
                model.train()
                runlog.write(step=step, val_loss=val_loss)
                harness.check_finite('val loss', val_loss, step, ckpt_path)  # the weights as saved next
                best_val = min(best_val, val_loss)
                log(f"\nstep {step}: val loss {val_loss:.4f} (best {best_val:.4f})")
                checkpoint()
                if rt.master:
                    with rt.autocast:
                        save_reconstructions(model, val_set, os.path.join(c.out_dir, 'recon.png'), dev)
                    runlog.image(step, os.path.join(c.out_dir, 'recon.png'))
            if steps_since_log == 0:  # the throughput leaves out logging, evaluation and saving
                t0 = time.time()
    if rt.ddp:
        harness.shutdown_distributed()


if __name__ == '__main__':
    main(sys.argv[1:])
