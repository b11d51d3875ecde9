"""Benchmarks: one JSON object per line, each with a `name`.

    python bench.py                                   # all four
    python bench.py --only=train --compile=False      # one, with train_mae.py's keys
    python bench.py --only=loader --loader_workers=(1,2,4,8)

train        one training step of train_mae's model and optimizers on synthetic tensors:
             imgs_per_sec, mfu (analytic FLOPs / the GPU's bf16 dense peak), peak_mem_gb
muon_step    muon.Muon vs torch.optim.Muon on the MAE's Linear weights, random gradients; under
             `torchrun --nproc_per_node=N bench.py --only=muon_step`, per rank with the work split N ways
loader       train crops/s of the real JPEG pipeline per DataLoader worker count, from the ImageFolder
             and from scripts/prepare_data.py's packed copies of it, with the crop resized in the
             workers (PIL) or on the device (the workers only decode), each as a ratio to the folder
             resized in the workers; the device's resize time per crop; PIL decode alone
probe_sweep  probe.py's 30-setting lr x wd sweep vs a single setting
optim_state  optimizer-state bytes per parameter, per optimizer and state_dtype (adafactor: Zhai et al.'s)

Every train_mae.py key works here too (the model, optimizer, micro_batch_size, compile,
dtype, device, ...); the defaults are its ViT-S/16 recipe. On CPU the benches shrink to
seconds (CPU_DEFAULTS), and keys given on the command line still win.
"""
import contextlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import harness
import muon
import train_mae
from muon import Muon

# -----------------------------------------------------------------------------
# config: these keys plus all of train_mae.py's
_names_before_config = set(globals())
only = ''  # run one bench: 'train', 'muon_step', 'loader', 'probe_sweep' or 'optim_state'; '' runs them all
# train
iters = 10  # timed optimizer steps of batch_size images (the median counts), as train_mae's: with accumulation
warmup_iters = 3  # untimed steps first: compilation, allocator warm-up
compile_backend = 'inductor'  # torch.compile's backend with compile=True; 'aot_eager' traces the same graphs without
#                               generating kernels (seconds instead of a minute: scripts/gpu_check.py's CPU dry run)
peak_flops = 0.0  # the device's bf16 dense FLOP/s for mfu; 0 looks the GPU up in PEAK_FLOPS (CPU: mfu is null)
# muon_step
muon_iters = 10  # timed steps of each optimizer, after one untimed (the median counts)
# loader
loader_images = 512  # generated JPEGs, 500x375 at quality 90 (~90 KB, like ImageNet's)
loader_batches = 20  # timed micro-batches per worker count, after each worker's first
loader_workers = ()  # DataLoader worker counts; () = 1, 2, 4, ... up to the CPU count
loader_rounds = 3  # timings of each source per worker count, interleaved (the median counts)
pack_short_sides = (256,)  # packed copies (prepare_data.py --short_side) compared with the ImageFolder
bench_dir = ''  # where the JPEGs and packed copies are written once and reused; '' = a temporary folder
# probe_sweep (on probe.py's built-in synthetic data, with a random encoder of the model keys)
probe_epochs = 1
probe_batch_size = 256
BENCH_CONFIG = harness.settings(globals(), _names_before_config)
DEFAULTS = {**train_mae.CONFIG, **BENCH_CONFIG}

# On CPU (2 cores is the reference machine) each bench is cut to seconds: train and
# probe_sweep take the quickstart model; muon_step keeps ViT-S/16's matrices.
SMALL_MODEL = dict(img_size=64, patch_size=8, enc_dim=128, enc_depth=6, enc_heads=4,
                   dec_dim=128, dec_depth=2, dec_heads=4)
CPU_DEFAULTS = {
    'train': dict(SMALL_MODEL, batch_size=64, micro_batch_size=64, compile=False, iters=10, warmup_iters=3),
    'muon_step': dict(muon_iters=5),
    'loader': dict(micro_batch_size=32, loader_images=256, loader_batches=8),
    'optim_state': dict(),
    'probe_sweep': dict(SMALL_MODEL, synthetic_size=(1024, 256), probe_batch_size=128, compile=False, num_workers=1),
}

PREPARE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'scripts', 'prepare_data.py')

# bf16 dense tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name (first match)
PEAK_FLOPS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('B200', 2.25e15), ('A100', 312e12))


def bench_config(name, overrides):
    """The config of bench `name`: the defaults, then CPU_DEFAULTS[name] on CPU, then the overrides."""
    device = overrides.get('device', DEFAULTS['device'])
    on_cpu = device == 'cpu' or (device == 'auto' and not torch.cuda.is_available())
    return SimpleNamespace(**{**DEFAULTS, **(CPU_DEFAULTS[name] if on_cpu else {}), **overrides})


def mae_flops_per_image(c):
    """Training FLOPs per image of the MAE of config c: 3x the forward (the backward
    does two matmuls per forward matmul), counting the matmuls (a multiply-add is 2
    FLOPs) and attention's q @ k^T and attn @ v; norms, activations, softmax and the
    loss are left out. As in MAE.forward, the encoder sees the visible tokens, the
    decoder all of them, and the pixel head only the masked ones."""
    L = (c.img_size // c.patch_size) ** 2
    keep = train_mae.num_visible(L, c.mask_ratio)
    pixels = 3 * c.patch_size ** 2

    def blocks(depth, dim, T):
        hidden = train_mae.ffn_hidden(dim, c.mlp_ratio, c.swiglu)
        weights = 4 * dim * dim + (3 if c.swiglu else 2) * dim * hidden  # qkv and proj, then the FFN
        return depth * (2 * T * weights + 2 * 2 * T * T * dim)

    if c.stem == 'conv':  # ConvStem's 3x3 stride-2 convs on each patch, widths doubling to enc_dim, then a 1x1
        widths = train_mae.conv_stem_widths(c.patch_size, c.enc_dim)
        macs = sum(9 * a * b * (c.patch_size >> (i + 1)) ** 2 for i, (a, b) in enumerate(zip(widths, widths[1:])))
        stem = 2 * L * (macs + c.enc_dim ** 2)
    else:
        stem = 2 * L * pixels * c.enc_dim
    forward = (stem + blocks(c.enc_depth, c.enc_dim, keep)
               + 2 * keep * c.enc_dim * c.dec_dim  # decoder_embed
               + blocks(c.dec_depth, c.dec_dim, L)
               + 2 * (L - keep) * c.dec_dim * pixels)  # decoder_pred
    return 3 * forward


def synchronize(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize(dev)


def seconds(fn, dev):
    """Wall time of one call of fn, with the device's queue drained before and after.
    The benches report medians of these: a stall on a shared machine moves a mean a lot."""
    synchronize(dev)
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    return time.perf_counter() - t0


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.startswith('cuda') else f"cpu ({torch.get_num_threads()} threads)"


def gpu_peak_flops(dev):
    name = torch.cuda.get_device_name(dev) if dev.startswith('cuda') else ''
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def model_name(c):
    return f"enc {c.enc_dim}x{c.enc_depth}, dec {c.dec_dim}x{c.dec_depth}, {c.img_size}px/{c.patch_size}"


# -----------------------------------------------------------------------------
# the benches: each yields its JSON records

def bench_train(c):
    rt = harness.setup(c.device, c.dtype, c.ddp_timeout)
    dev, autocast = rt.device, rt.autocast
    accum = harness.accumulation(c.batch_size, c.micro_batch_size, 1)
    torch.manual_seed(c.seed)
    model = train_mae.build_model(c).to(dev)
    optimizers = train_mae.build_optimizers(model, c, dev.split(':')[0], log=lambda *a: None)
    train_model = torch.compile(model, backend=c.compile_backend) if c.compile else model
    # synthetic tensors already on the device: the model step alone (the loader has its own bench)
    imgs = torch.randn(c.micro_batch_size, 3, c.img_size, c.img_size, device=dev)
    noise = torch.rand(c.micro_batch_size, model.num_patches, device=dev)

    def train_step():  # as train_mae's loop, one process
        for _ in range(accum):
            with autocast:
                loss, _, _ = train_model(imgs, noise)
            (loss / accum).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(c.warmup_iters):
        train_step()
    synchronize(dev)
    warmup_s = time.perf_counter() - t0  # with compile: mostly compilation
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats(dev)
    imgs_per_sec = c.batch_size / statistics.median([seconds(train_step, dev) for _ in range(c.iters)])
    if dev.startswith('cuda'):
        peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
    else:  # the process's peak resident memory (Linux reports kB)
        peak_mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    flops = mae_flops_per_image(c)
    peak = c.peak_flops or gpu_peak_flops(dev)
    dtype = harness.resolve_dtype(c.dtype, dev)
    yield dict(name='train', imgs_per_sec=imgs_per_sec, mfu=flops * imgs_per_sec / peak if peak else None,
               peak_mem_gb=peak_mem_gb, device=device_name(dev), model=model_name(c), gflop_per_img=flops / 1e9,
               tflops=flops * imgs_per_sec / 1e12, warmup_s=warmup_s, batch_size=c.batch_size,
               micro_batch_size=c.micro_batch_size, compile=c.compile, dtype=dtype, optimizer=c.optimizer,
               data='synthetic tensors')


def bench_muon_step(c):
    dev = harness.setup(c.device, c.dtype, c.ddp_timeout).device
    torch.manual_seed(c.seed)  # the same gradients on every rank, as after DDP's all-reduce
    model = train_mae.build_model(c).to(dev)
    # the Muon group of build_optimizers(optimizer='muon'): every nn.Linear weight, all 2D
    params = [p for _, p in train_mae.param_groups(model, SimpleNamespace(**{**vars(c), 'optimizer': 'muon'}))['muon']]
    for p in params:
        p.grad = torch.randn_like(p)
    kwargs = dict(lr=c.lr, weight_decay=c.muon_weight_decay, momentum=c.muon_momentum, nesterov=c.muon_nesterov,
                  ns_steps=c.muon_ns_steps, adjust_lr_fn=c.muon_adjust_lr)
    ns_dtype = muon.ns_dtype(dev) if c.muon_ns_dtype == 'auto' else getattr(torch, c.muon_ns_dtype)
    optimizers = dict(ours=Muon(params, ns_dtype=ns_dtype, **kwargs), torch=torch.optim.Muon(params, **kwargs))
    for opt in optimizers.values():
        opt.step()  # untimed: creates the momentum buffers
    # torch's Newton-Schulz is always bf16: where bf16 is emulated (a CPU without
    # native bf16) one of its steps takes minutes, so it is timed once there
    torch_iters = c.muon_iters if muon.ns_dtype(dev) == torch.bfloat16 else 1
    times = {key: [] for key in optimizers}
    for i in range(c.muon_iters):  # alternate, so a busy machine slows both alike
        for key, opt in optimizers.items():
            if key == 'ours' or i < torch_iters:
                times[key].append(seconds(opt.step, dev))
    ours_ms, torch_ms = (1000 * statistics.median(times[key]) for key in ('ours', 'torch'))
    # under torchrun, ours splits the Newton-Schulz work across the `world` ranks; torch's does it all on each
    yield dict(name='muon_step', ours_ms=ours_ms, torch_ms=torch_ms, speedup=torch_ms / ours_ms,
               ns_dtype=str(ns_dtype).removeprefix('torch.'), torch_iters=torch_iters,
               device=device_name(dev), model=model_name(c), matrices=len(params),
               params=sum(p.numel() for p in params), world=dist.get_world_size() if dist.is_initialized() else 1)


def make_jpegs(folder, n, seed=0, workers=1):
    """n JPEGs of 500x375 at quality 90 in 10 class folders, written once, by `workers` processes."""
    jobs = [(os.path.join(folder, f"class{i % 10}", f"{i:06d}.jpg"), seed, i) for i in range(n)]
    jobs = [job for job in jobs if not os.path.exists(job[0])]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(workers) as pool:
            pool.starmap(make_jpeg, jobs)
    else:
        for job in jobs:
            make_jpeg(*job)


def make_jpeg(path, seed, i):
    """Noise at four scales, from blobs to grain, so the files are ~90 KB (ImageNet's
    average is ~110 KB) and take as long to decode as photos."""
    W, H = 500, 375
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng([seed, i])
    img = np.full((H, W, 3), 128, np.float32)
    for cells, amplitude in ((8, 90), (32, 40), (128, 25), (W, 12)):
        low = rng.normal(0, amplitude, (3, cells * H // W, cells)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(ch).resize((W, H), Image.BICUBIC)) for ch in low], axis=-1)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def bench_loader(c):
    with contextlib.ExitStack() as stack:
        root = c.bench_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix='nanomae_bench_'))
        folder = os.path.join(root, 'jpegs')
        make_jpegs(os.path.join(folder, 'train'), c.loader_images, c.seed, os.cpu_count())
        make_jpegs(os.path.join(folder, 'val'), 10, c.seed + 1)  # prepare_data.py packs both splits
        sources = dict(folder=data.ImageFolder(os.path.join(folder, 'train')))
        n = len(sources['folder'])
        for side in c.pack_short_sides:  # the same images, packed by the real script (once per bench_dir)
            packed = os.path.join(root, f'packed{side}_{n}')
            if not os.path.exists(os.path.join(packed, data.PACKED_INDEX)):
                subprocess.run([sys.executable, PREPARE_DATA, folder, packed, f'--short_side={side}'], check=True,
                               stdout=sys.stderr)  # stdout carries only the JSON lines
            sources[f'packed{side}'] = data.PackedImages(packed, 'train')
        for path, source in sources.items():
            # one process, PIL's decode alone (no crop, no resize): the per-core ceiling of each source
            t0 = time.perf_counter()
            for i in range(min(n, 100)):
                source.open(i)[0].convert('RGB')
            yield dict(name='loader', stage='PIL decode alone', path=path, workers=0,
                       imgs_per_sec=min(n, 100) / (time.perf_counter() - t0))
        # the training pipeline: crop, resize, flip and mask noise in DataLoader workers
        num_patches = (c.img_size // c.patch_size) ** 2
        mb = c.micro_batch_size
        if n < mb:
            raise harness.ConfigError(f"--loader_images={n} is fewer than --micro_batch_size={mb}")
        cpus = os.cpu_count()
        workers = c.loader_workers or tuple(2 ** k for k in range(int(math.log2(cpus)) + 1))

        def crops_per_sec(source, on_device, w, rnd):  # round rnd reads its own steps: other crops than the last's
            dataset = train_mae.MAEDataset(source, train_mae.DataConfig.of(c), True, num_patches, on_device)
            first = max(1, w)  # every worker's first batch arrives at about the same time: not timed
            steps = first + c.loader_batches
            sampler = data.TrainBatches(n, mb, mb, 0, 1, c.seed, rnd * steps, (rnd + 1) * steps)
            batches = iter(data.make_loader(dataset, sampler, w, pin=False))
            for _ in range(first):
                next(batches)
            t0 = time.perf_counter()
            for _ in batches:
                pass
            return c.loader_batches * mb / (time.perf_counter() - t0)  # the iterator dies here: its workers stop

        variants = [(path, resize) for path in sources for resize in ('loader', 'device')]
        for w in workers:
            rates = {v: [] for v in variants}
            for r in range(c.loader_rounds):  # interleaved: on a shared machine only ratios in one run count
                for path, resize in variants:
                    rates[path, resize].append(crops_per_sec(sources[path], resize == 'device', w, r))
            today = statistics.median(rates['folder', 'loader'])
            for (path, resize), per_round in rates.items():
                rate = statistics.median(per_round)
                yield dict(name='loader', stage='MAEDataset train pipeline', path=path, resize=resize, workers=w,
                           imgs_per_sec=rate, imgs_per_sec_per_worker=rate / max(1, w), ratio=rate / today,
                           img_size=c.img_size, micro_batch_size=mb, rounds=c.loader_rounds, cpus=cpus)
        # what the device does instead: resize one micro-batch of the last packed copy's crops
        path = list(sources)[-1]
        dev = c.device if c.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
        dataset = train_mae.MAEDataset(sources[path], train_mae.DataConfig.of(c), True, num_patches, True)
        batch = data.collate([dataset[0, i] for i in range(mb)])
        imgs, crop = batch.imgs.to(dev).permute(0, 3, 1, 2).float(), batch.crop.to(dev)
        per_batch = statistics.median(seconds(lambda: data.resized_crops(imgs, crop, c.img_size), dev)
                                      for _ in range(5))
        yield dict(name='loader', stage='resize on the device', path=path, device=device_name(dev), workers=0,
                   imgs_per_sec=mb / per_batch, micro_batch_size=mb, input_hw=list(imgs.shape[2:]))


def bench_probe_sweep(c):
    import probe  # written alongside; only this bench needs it
    with tempfile.TemporaryDirectory(prefix='nanomae_probe_') as out_dir:
        keys = probe.MODEL_KEYS + ('device', 'dtype', 'compile', 'num_workers', 'seed')
        argv = [f"--{k}={getattr(c, k)!r}" for k in keys]
        argv += ["--ckpt=", "--data_dir=synthetic", f"--out_dir={out_dir}", f"--epochs={c.probe_epochs}",
                 f"--batch_size={c.probe_batch_size}"]

        def run(extra):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
                results = probe.main(argv + extra)
            return time.perf_counter() - t0, len(results['results'])

        sweep_s, configs = run([])  # probe.py's default grid: the blog's 10 lrs x 3 wds
        single_s, _ = run(['--lrs=(1e-3,)', '--wds=(0.05,)'])
    yield dict(name='probe_sweep', configs=configs, sweep_s=sweep_s, single_s=single_s, model=model_name(c),
               images=c.synthetic_size[0], epochs=c.probe_epochs)


def bench_optim_state(c):
    """Optimizer-state bytes per model parameter after one step, for each optimizer and
    state_dtype (Zhai et al.'s bf16 first moment / Muon momentum), measured on the states."""
    model = train_mae.build_model(c)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    for optimizer, state_dtype in (('adamw', 'float32'), ('muon', 'float32'), ('muon', 'bfloat16'),
                                   ('lamb', 'float32'), ('lamb', 'bfloat16'), ('adafactor', 'float32')):
        oc = SimpleNamespace(**{**vars(c), 'optimizer': optimizer, 'state_dtype': state_dtype})
        optimizers = train_mae.build_optimizers(model, oc, 'cpu', log=lambda *a: None)
        for opt in optimizers:
            opt.step()
        nbytes = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values()
                     for t in s.values() if torch.is_tensor(t) and t.numel() > 1)
        yield dict(name='optim_state', optimizer=optimizer, state_dtype=state_dtype,
                   bytes_per_param=nbytes / n, model=model_name(c))


BENCHES = dict(train=bench_train, muon_step=bench_muon_step, loader=bench_loader, probe_sweep=bench_probe_sweep,
               optim_state=bench_optim_state)


def rounded(record):
    """The record with its floats to 4 significant digits."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in record.items()}


def emit(record):
    """One JSON line."""
    print(json.dumps(rounded(record)), flush=True)


def main(argv):
    overrides = harness.parse(argv, DEFAULTS)  # once: each bench's config is built from these
    name = overrides.get('only', only)
    if name and name not in BENCHES:
        raise harness.ConfigError(f"--only={name!r}: must be one of {', '.join(BENCHES)}")
    if 'RANK' in os.environ and name != 'muon_step':
        raise harness.ConfigError("under torchrun only --only=muon_step runs (distributed Muon)")
    for bench in [name] if name else BENCHES:
        for record in BENCHES[bench](bench_config(bench, overrides)):
            if not dist.is_initialized() or dist.get_rank() == 0:
                emit(record)
    if dist.is_initialized():
        harness.shutdown_distributed()


if __name__ == '__main__':
    main(sys.argv[1:])
