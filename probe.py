"""Attentive probe of a frozen MAE encoder: a whole lr x weight-decay sweep in one pass.

    python probe.py --ckpt=out/quickstart/ckpt.pt   # architecture and data from the checkpoint
    # the baseline: the same architecture and data, a randomly initialised encoder
    python probe.py --ckpt=out/quickstart/ckpt.pt --random_encoder=True   # -> out/quickstart/random_encoder/
    torchrun --standalone --nproc_per_node=8 probe.py --ckpt=out/muon/ckpt.pt

The blog sweeps 10 learning rates x 3 weight decays, one probe run per setting.
Here every setting is still its own probe, with its own parameters, lr schedule,
weight decay and optimizer state, but the probes are stacked into tensors
[P, ...] and trained together on the same batches: the encoder, which costs far
more than any probe, runs once per batch for all of them. Writes
out_dir/probe_results.json (top-1 on the val split, a fraction, as the blog reports
it) and prints a table.
"""
import dataclasses
import json
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import train_mae
from muon import adjusted_lr, zeropower_via_newtonschulz5
import harness
from harness import ConfigError

# -----------------------------------------------------------------------------
# config. Override with `python probe.py [config/file.py] --key=value ...`.
# train_mae.py's model and data keys (img_size, enc_dim, norm, synthetic_size,
# crop_scale, ...) are keys here too: with a checkpoint they default to its
# config, and an architecture key that disagrees with it is an error.
_names_before_config = set(globals())
ckpt = ''  # a train_mae.py ckpt.pt; '' probes a randomly initialised encoder of train_mae.py's model keys
random_encoder = False  # True: the checkpoint's architecture and data, its weights replaced by a random init (the baseline)
pixels = False  # True: no encoder, the normalised pixels as one token [3*H*W] (the bar an encoder's features must clear;
# its linear probe is a logistic regression on the pixels); linear head only
data_dir = ''  # '' = the checkpoint's; an ImageFolder root with train/ and val/, its scripts/prepare_data.py copy, or 'synthetic'
out_dir = ''  # where probe_results.json goes; '' = the checkpoint's folder (its random_encoder/ subfolder
# with random_encoder=True; out/probe without a checkpoint)
epochs = 10
warmup_epochs = 1  # linear lr warmup, then cosine to 0, per step
warmup_start = 1 / 3  # the warmup's first lr, a fraction of the peak (torch's LinearLR default, as the blog's code)
batch_size = 1024  # global images per step (all ranks)
lrs = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)  # the sweep is every lr x every wd
wds = (5e-4, 1e-3, 5e-2)
probe_optimizer = 'adamw'  # 'adamw', or 'muon' (Muon on the probe's matrices, AdamW on the query and biases)
head = 'attentive'  # 'attentive', 'linear' (MAE's: mean-pooled tokens, BatchNorm without affine, a Linear) or 'both'
linear_pool = 'mean'  # the linear head's features: 'mean' of the patch tokens (MAE's) or 'flatten' (all L x D of
# them: a logistic regression on the tokens, as --pixels=True is on the pixels: like for like in what it may read)
head_weight_decay = -1.0  # weight decay of the final Linear; < 0 = the setting's (Zhai et al. 2022 decouple them)
augment = True  # False: the probes train on centre crops without flips (the val transform), so the encoder
# runs once over the train set and its tokens stay in memory (N x L x D values): epochs then cost little (small data)
# system
device = 'auto'  # 'auto', 'cuda' or 'cpu'
dtype = 'auto'  # 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16' or 'float32'
compile = True  # torch.compile the encoder
num_workers = 10  # DataLoader worker processes per GPU
seed = 0  # the random encoder, the probes' initial weights, data order, augmentations, synthetic images
ddp_timeout = 600  # seconds a rank waits in a collective before giving up
CONFIG = harness.settings(globals(), _names_before_config)
# all that train_mae.build_model and build_datasets read, besides data_dir and seed
MODEL_KEYS = tuple(dict.fromkeys(f.name for cls in (train_mae.ModelConfig, train_mae.DataConfig)
                                  for f in dataclasses.fields(cls) if f.name not in ('data_dir', 'seed')))
HEAD_DIM = 64


# -----------------------------------------------------------------------------
# the probes

class AttentiveProbes(nn.Module):
    """P attentive probes, stacked. Each is a learned query token that
    cross-attends (heads of dim 64) to the patch tokens through key and value
    projections, then one Linear to the classes; no non-linearity. The query is
    learned directly per head (a query token times a learned W_q is no more
    general), and the tokens already leave the encoder through its final norm,
    so the probe adds none. Keys and values come from one [2 * inner, D] matrix,
    as the blog's kv_proj: with probe_optimizer='muon' it is orthogonalised as
    one. All P start from the same weights: the sweep compares settings, not
    initialisations, and a probe trains the same in the sweep as alone."""

    def __init__(self, num_probes, dim, num_classes, seed=0):
        super().__init__()
        self.heads = max(1, dim // HEAD_DIM)
        inner = self.heads * HEAD_DIM
        g = torch.Generator().manual_seed(seed)
        # a small query attends almost uniformly at first (mean pooling); a small head starts near chance
        one = dict(query=torch.randn(self.heads, HEAD_DIM, generator=g) * 0.02,
                   wkv=torch.cat([xavier_uniform(inner, dim, g), xavier_uniform(inner, dim, g)]), bv=torch.zeros(inner),
                   head_w=torch.randn(num_classes, inner, generator=g) * 0.01, head_b=torch.zeros(num_classes))
        for name, t in one.items():  # matrices are [P, out, in], like nn.Linear's weight
            setattr(self, name, nn.Parameter(t.expand(num_probes, *t.shape).clone()))

    def forward(self, x):  # x [N, L, D] patch tokens -> logits [P, N, classes]
        P, H = self.query.shape[:2]
        wk, wv = (w.reshape(P, H, HEAD_DIM, -1) for w in self.wkv.chunk(2, dim=1))
        # With a single query, q . (Wk x) = (Wk^T q) . x: fold the query into Wk once
        # instead of projecting all N*L tokens to keys for each of the P probes (64x
        # fewer FLOPs). A key bias would add one constant to all of a query's
        # logits, which softmax cancels, so the key projection has none.
        qk = torch.einsum('phe,phed->phd', self.query, wk) / math.sqrt(HEAD_DIM)  # [P, H, D]
        attn = torch.einsum('phd,nld->pnhl', qk, x).softmax(dim=-1)  # [P, N, H, L]
        # Likewise pool the tokens, then project once: the weights sum to 1, so
        # sum_l a_l (Wv x_l + bv) = Wv (sum_l a_l x_l) + bv.
        pooled = torch.einsum('pnhl,nld->pnhd', attn, x)  # [P, N, H, D]
        out = torch.einsum('pnhd,phed->pnhe', pooled, wv).flatten(2) + self.bv[:, None]  # [P, N, H*64]
        return torch.baddbmm(self.head_b[:, None], out, self.head_w.mT)


class LinearProbes(nn.Module):
    """P linear probes, stacked: MAE's protocol (He et al. 2022, appendix A.2)
    without [CLS]: the mean of the patch tokens, a BatchNorm without affine
    parameters, one Linear. The BatchNorm has no parameters and sees the same
    features for every probe, so one serves all P. pool='flatten' reads all
    tokens concatenated instead (dim is then L x D)."""

    def __init__(self, num_probes, dim, num_classes, seed=0, pool='mean'):
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        g = torch.Generator().manual_seed(seed)
        self.head_w = nn.Parameter((torch.randn(num_classes, dim, generator=g) * 0.01).expand(num_probes, -1, -1).clone())
        self.head_b = nn.Parameter(torch.zeros(num_probes, num_classes))

    def forward(self, x):  # x [N, L, D] -> logits [P, N, classes]
        feats = x.flatten(1) if self.pool == 'flatten' else x.mean(dim=1)  # [N, L*D] or [N, D]
        feats = self.bn(feats.to(self.bn.running_mean.dtype))  # in the BatchNorm's fp32 under autocast
        return torch.einsum('nd,pcd->pnc', feats, self.head_w) + self.head_b[:, None]


def xavier_uniform(fan_out, fan_in, generator):
    bound = math.sqrt(6 / (fan_in + fan_out))
    return (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound


def adamw_update(p, state, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.AdamW's step for each of the P probes stacked in p [P, ...],
    with per-probe lr and wd [P]."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state['step'] += 1
    m, v, g, t = state['exp_avg'], state['exp_avg_sq'], p.grad, state['step']
    lr, wd = lr.view(-1, *[1] * (p.ndim - 1)), wd.view(-1, *[1] * (p.ndim - 1))
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    denom = v.sqrt() / math.sqrt(1 - betas[1] ** t) + eps
    p.sub_(lr / (1 - betas[0] ** t) * m / denom)


def muon_update(p, state, lr, wd, momentum=0.95, ns_steps=5, adjust_lr_fn='match_rms_adamw'):
    """muon.Muon's step (Nesterov) for each of the P matrices stacked in p [P, A, B],
    with per-probe lr and wd [P]: one batched Newton-Schulz call for all probes.
    match_rms_adamw gives Muon AdamW's update size, so one lr grid serves both.
    Note: a probe's key and value gradients have low rank (at most heads, and at
    most classes), and Newton-Schulz in bf16 lifts the missing directions' rounding
    noise to full size, as torch.optim.Muon does. So a Muon probe in the sweep
    and the same probe alone agree in distribution, not to rounding as AdamW's do."""
    if not state:
        state['momentum_buffer'] = torch.zeros_like(p)
    buf = state['momentum_buffer']
    buf.lerp_(p.grad, 1 - momentum)
    update = zeropower_via_newtonschulz5(p.grad.lerp(buf, momentum), ns_steps)
    lr, wd = lr.view(-1, 1, 1), wd.view(-1, 1, 1)
    p.mul_(1 - lr * wd)
    p.sub_(lr * adjusted_lr(1.0, adjust_lr_fn, p.shape[1:]) * update.to(p.dtype))


class ProbeOptimizer:
    """Steps all probes at once; lr and weight decay are vectors [P], one value
    per probe. kind='muon' puts the matrices on Muon; the query and biases stay on
    AdamW. As the blog's probe: weight decay on the matrices and the query, not the
    biases; head_wd is the final Linear's (Zhai et al. decouple it)."""

    def __init__(self, probes, wd, head_wd, kind):
        matrix = muon_update if kind == 'muon' else adamw_update
        no_decay = torch.zeros_like(wd)
        self.rules = [(probes.head_w, head_wd, matrix), (probes.head_b, no_decay, adamw_update)]
        if isinstance(probes, AttentiveProbes):
            self.rules += [(probes.query, wd, adamw_update), (probes.wkv, wd, matrix), (probes.bv, no_decay, adamw_update)]
        self.states = [{} for _ in self.rules]

    @torch.no_grad()
    def step(self, lr):
        for (p, wd, update), state in zip(self.rules, self.states):
            update(p, state, lr, wd)


# -----------------------------------------------------------------------------
# config and checkpoint

def load_config(argv):
    """Returns (config namespace, checkpoint dict or None). The command line is
    parsed once; its overrides go over defaults that already hold the checkpoint's
    model and data keys, so a key the user did not set takes the checkpoint's."""
    defaults = {**CONFIG, **{k: train_mae.CONFIG[k] for k in MODEL_KEYS}}
    overrides = harness.parse(argv, defaults)
    ckpt = None
    if overrides.get('ckpt', defaults['ckpt']):
        ckpt = harness.load_checkpoint(overrides['ckpt'], train_mae.CONFIG)
        defaults.update({k: ckpt['config'][k] for k in MODEL_KEYS + ('data_dir',)})
    c = SimpleNamespace(**{**defaults, **overrides})
    c.data_dir = c.data_dir or defaults['data_dir']  # --data_dir= (empty) keeps the checkpoint's
    if ckpt is not None:
        harness.check_architecture(c, ckpt, train_mae.ARCH_KEYS)  # "--enc_dim=128 does not match the checkpoint's 384"
    c.out_dir = c.out_dir or (os.path.join(os.path.dirname(c.ckpt), 'random_encoder' if c.random_encoder else
                                           'pixels' if c.pixels else '') if c.ckpt else os.path.join('out', 'probe'))
    everything = SimpleNamespace(**{**train_mae.CONFIG, **vars(c)})
    train_mae.check_config(everything)  # the model's, the data's, the device's rules
    if c.probe_optimizer not in ('adamw', 'muon'):
        raise ConfigError(f"--probe_optimizer={c.probe_optimizer!r}: must be one of adamw, muon")
    if c.head not in ('attentive', 'linear', 'both'):
        raise ConfigError(f"--head={c.head!r}: must be one of attentive, linear, both")
    if c.linear_pool not in ('mean', 'flatten'):
        raise ConfigError(f"--linear_pool={c.linear_pool!r}: must be one of mean, flatten")
    if c.pixels and (c.head != 'linear' or c.random_encoder):
        raise ConfigError(f"--pixels=True probes the pixels with the linear head alone: got --head={c.head}, "
                          f"--random_encoder={c.random_encoder}")
    if not c.lrs or not c.wds or min(c.lrs) <= 0 or min(c.wds) < 0:
        raise ConfigError(f"--lrs={c.lrs} --wds={c.wds}: need one or more of each, lrs > 0 and wds >= 0")
    if c.epochs < 1 or not 0 <= c.warmup_epochs <= c.epochs:
        raise ConfigError(f"--epochs={c.epochs} --warmup_epochs={c.warmup_epochs}: need epochs >= 1 and "
                          f"0 <= warmup_epochs <= epochs")
    return c, ckpt


# -----------------------------------------------------------------------------
# the sweep

def main(argv):
    c, ckpt = load_config(argv)
    rt = harness.setup(c.device, c.dtype, c.ddp_timeout)
    log = print if rt.master else (lambda *a, **k: None)
    encode = frozen_encoder(c, ckpt, rt)
    del ckpt  # the encoder has its weights; the rest (optimizer states) need not stay in memory
    train_set, val_set, order, val_loader = build_data(c, rt)
    if rt.master:
        harness.make_out_dir(c.out_dir)  # before training: an unwritable out_dir fails now, not after it
    grid = [(lr, wd) for lr in c.lrs for wd in c.wds]  # one probe per setting, in each head
    classes = train_set.source.classes
    heads = build_probes(c, grid, len(classes), rt.device)
    encoder = 'pixels' if c.pixels else 'random' if c.random_encoder or not c.ckpt else c.ckpt
    log(f"{len(train_set):,} train / {len(val_set):,} val images, {len(classes)} classes, "
        f"{len(grid)} probes per head ({len(c.lrs)} lrs x {len(c.wds)} wds; {', '.join(heads)}), "
        f"{order.total_steps} steps of {c.batch_size} images, {rt.world} process(es), "
        f"encoder {encoder if encoder == 'random' else 'from ' + encoder}")
    train(c, rt, heads, grid, order, train_tokens(c, rt, encode, train_set, order))
    correct = evaluate(heads, encode(val_loader), len(grid), rt)
    if rt.ddp:
        harness.shutdown_distributed()  # evaluate's all-reduce was the last collective
    out = summarise(c, grid, correct, len(val_set), encoder)
    if rt.master:
        report(c, out, heads, len(val_set))
    return out


def frozen_encoder(c, ckpt, rt):
    """The encoder of c's architecture, with the checkpoint's weights (random ones
    without a checkpoint or with random_encoder), frozen. Returns encode(loader),
    which yields (tokens [n, L, D], labels [n]) per batch of the loader."""
    torch.manual_seed(c.seed)  # the random encoder: the same on every rank
    model = train_mae.build_model(c)
    if ckpt is not None and not c.random_encoder:
        model.load_state_dict(ckpt['model'])
    model = model.to(rt.device).eval().requires_grad_(False)
    features = torch.compile(model.forward_features) if c.compile else model.forward_features
    if c.pixels:  # [N, 3, H, W] -> [N, 1, 3*H*W]: the linear probe's mean over one token is the image itself
        features = lambda imgs: imgs.flatten(1)[:, None]  # noqa: E731

    def encode(loader):
        for batch in loader:
            with torch.no_grad(), rt.autocast:  # (not around the yield: the caller trains the probes)
                x = features(data.to_device(batch.imgs, rt.device))
            yield x, batch.labels.to(rt.device, non_blocking=True)
    return encode


def build_data(c, rt):
    """(train set, val set, this rank's training batch order, val loader). The
    order is c.epochs passes of c.batch_size images per step, each split across
    the ranks: no accumulation, one micro-batch per rank is one global batch."""
    if c.batch_size % rt.world:
        raise ConfigError(f"--batch_size={c.batch_size} is not divisible by {rt.world} processes")
    micro = c.batch_size // rt.world
    train_set, val_set = train_mae.build_datasets(c, num_patches=0)  # RandomResizedCrop + flip; centre crops
    train_set.train = c.augment  # augment=False: centre crops for training too
    steps_per_epoch = len(train_set) // c.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch_size={c.batch_size} is larger than the training set ({len(train_set)} images)")
    order = data.TrainBatches(len(train_set), c.batch_size, micro, rt.rank, rt.world, c.seed, 0,
                                   c.epochs * steps_per_epoch)
    val_loader = make_loader(c, rt, val_set, data.val_batches(len(val_set), micro, rt.rank, rt.world))
    return train_set, val_set, order, val_loader


def make_loader(c, rt, dataset, batches):
    return data.make_loader(dataset, batches, c.num_workers, pin=rt.device.startswith('cuda'))


def train_tokens(c, rt, encode, train_set, order):
    """The training batches (tokens [n, L, D], labels [n]) in `order`. With augment,
    every batch is cropped and encoded afresh (a new crop of each image each epoch);
    without, every image's tokens are encoded once (each rank holds all of them) and
    the batches are taken from memory: the encoder then costs one pass, not epochs."""
    if c.augment:
        yield from encode(make_loader(c, rt, train_set, order))
        return
    everything = data.val_batches(len(train_set), c.batch_size // rt.world, 0, 1)
    x, labels = map(torch.cat, zip(*encode(make_loader(c, rt, train_set, everything))))
    for batch in order:
        idx = torch.tensor([i for _, i in batch], device=rt.device)
        yield x[idx], labels[idx]


def build_probes(c, grid, num_classes, device):
    """{head name: (its P stacked probes, their optimizer)}, probe i for grid[i] = (lr, wd)."""
    decay = torch.tensor([wd for _, wd in grid], device=device)  # one value per probe
    head_decay = decay if c.head_weight_decay < 0 else torch.full_like(decay, c.head_weight_decay)
    dim = 3 * c.img_size ** 2 if c.pixels else c.enc_dim  # the width of a token
    probes = {}
    if c.head in ('attentive', 'both'):
        probes['attentive'] = AttentiveProbes(len(grid), dim, num_classes, c.seed).to(device)
    if c.head in ('linear', 'both'):
        tokens = 1 if c.pixels else (c.img_size // c.patch_size) ** 2
        width = tokens * dim if c.linear_pool == 'flatten' else dim
        probes['linear'] = LinearProbes(len(grid), width, num_classes, c.seed, c.linear_pool).to(device)
    return {name: (p, ProbeOptimizer(p, decay, head_decay, c.probe_optimizer)) for name, p in probes.items()}


def train(c, rt, heads, grid, order, tokens):
    """All probes of all heads on the same token batches, one optimizer step per
    batch: each probe steps on its own loss with its own lr (warmup, then cosine)."""
    from tqdm import tqdm
    P, steps_per_epoch = len(grid), order.steps_per_epoch
    peak_lr = torch.tensor([lr for lr, _ in grid], device=rt.device)  # one value per probe
    total, warmup = order.total_steps, c.warmup_epochs * steps_per_epoch
    bar = tqdm(total=total, disable=not rt.master, dynamic_ncols=True)
    for step, (x, labels) in enumerate(tokens):  # x [n, L, D], shared by all probes
        for probes, optimizer in heads.values():
            with rt.autocast:
                logits = probes(x)  # [P, n, classes]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(P), reduction='none').view(P, -1).mean(1)
            losses.sum().backward()  # a sum: each probe gets the gradient of its own loss
            if rt.ddp:  # average over ranks; the probes are too small for DDP's bucketing to matter
                for p in probes.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= rt.world
            optimizer.step(peak_lr * train_mae.lr_factor(step, total, warmup, 'cosine', 0.0, c.warmup_start))
            probes.zero_grad(set_to_none=True)
        bar.update(1)
        if (step + 1) % steps_per_epoch == 0:
            bar.set_postfix(epoch=(step + 1) // steps_per_epoch, best_loss=f"{losses.min().item():.3f}")
    bar.close()


def evaluate(heads, val_tokens, P, rt):
    """{head name: correct top-1 predictions [P] on the val split}, summed over ranks."""
    correct = {name: torch.zeros(P, device=rt.device, dtype=torch.long) for name in heads}
    for probes, _ in heads.values():
        probes.eval()  # the linear probe's BatchNorm: running statistics
    for x, labels in val_tokens:
        with torch.no_grad(), rt.autocast:
            for name, (probes, _) in heads.items():
                correct[name] += (probes(x).argmax(-1) == labels).sum(1)
    if rt.ddp:
        for n in correct.values():
            dist.all_reduce(n)
    return correct


def summarise(c, grid, correct, num_val, encoder):
    """probe_results.json's content: top-1 of every head and setting, the best,
    and a warning for each head whose best setting lies on the grid's edge."""
    results = [dict(head=name, lr=lr, weight_decay=wd, top1=acc) for name, n in correct.items()
               for (lr, wd), acc in zip(grid, (n.double() / num_val).tolist())]
    out = dict(encoder=encoder, results=results, best=max(results, key=lambda r: r['top1']))
    warnings = [edge_warning(c, [r for r in results if r['head'] == name]) for name in correct]
    if any(warnings):
        out['warning'] = ' '.join(w for w in warnings if w)
    return out


def report(c, out, heads, num_val):
    """Writes out_dir/probe_results.json and prints a top-1 table per head."""
    path = os.path.join(c.out_dir, 'probe_results.json')
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    for name in heads:
        print(f"{name} probes: top-1 on {num_val:,} val images; rows: lr, columns: weight decay")
        print(' ' * 9 + ''.join(f"{wd:>9g}" for wd in c.wds))
        top1 = [r['top1'] for r in out['results'] if r['head'] == name]
        for i, lr in enumerate(c.lrs):
            print(f"{lr:<9g}" + ''.join(f"{acc:>9.4f}" for acc in top1[i * len(c.wds):(i + 1) * len(c.wds)]))
    best = out['best']
    print(f"best: {best['head']} lr={best['lr']:g} weight_decay={best['weight_decay']:g} top-1 {best['top1']:.4f} "
          f"-> {path}")
    if 'warning' in out:
        print(f"warning: {out['warning']}")


def edge_warning(c, results):
    """The best setting of one head's results on the edge of a grid axis (of more
    than one value), unless an interior setting ties it: the optimum may lie
    outside the grid, so widen it before trusting the number."""
    best = max(results, key=lambda r: r['top1'])
    edges = []
    for key, name, values in (('lr', 'lrs', c.lrs), ('weight_decay', 'wds', c.wds)):
        other = 'weight_decay' if key == 'lr' else 'lr'
        inner = [r['top1'] for r in results if r[other] == best[other] and min(values) < r[key] < max(values)]
        ends = {v for v in (min(values), max(values)) if v > 0}  # nothing lies below a weight decay of 0
        if len(values) > 1 and best[key] in ends and max(inner, default=-1) < best['top1']:
            edges.append(f"{key}={best[key]:g} is the {'smallest' if best[key] == min(values) else 'largest'} of --{name}")
    return f"{best['head']} probe's best setting lies on the grid's edge ({', '.join(edges)})." if edges else ''


if __name__ == '__main__':
    main(sys.argv[1:])
