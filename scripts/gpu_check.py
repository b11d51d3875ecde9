"""The first GPU run: what only a GPU can tell, measured in one time-boxed command.

    python scripts/gpu_check.py                    # a CUDA machine: ViT-S/16, ~7 min on one H100 (the plan it prints)
    python scripts/gpu_check.py --device=cpu       # the dry run: the same code at tiny sizes (the suite runs it)
    python scripts/gpu_check.py --budget_s=300 --checks=train_eager,muon

It needs only this repository and torch, numpy, pillow, tqdm (no download, nothing to
install): it makes its own data, a folder of 500x375 JPEGs and its packed copy. Each check
runs in a process of its own, time-boxed, in the order below; a check whose estimate no
longer fits the budget is skipped, so a short budget drops checks from the end.

  env             torch, CUDA, the GPUs, the host CPU's bf16 support; features this torch lacks
  train_eager     bench.py's train bench, ViT-S/16, micro-batch 256, bf16: images/s, MFU, peak memory
  train_compiled  the same compiled: its warmup_s is mostly compile time
  muon            muon.Muon vs torch.optim.Muon on ViT-S/16's matrices, on the GPU and on the host CPU
                  (bf16, fp32), then Newton-Schulz alone per shape: batched, one matrix at a time, torch's
  numerics        bf16 autocast vs fp32 over a few dozen steps, compiled vs eager, flash vs math attention
  data            the JPEG folder (bench.make_jpegs) and its packed copy (scripts/prepare_data.py)
  resume          train_mae.py under torchrun from the packed copy (one GPU, then all of them): a straight
                  run, and one stopped by SIGTERM midway and resumed, compared log line by line
  loader          bench.py's loader bench: folder, packed, packed + device resize, at this node's worker counts
  probe           bench.py's probe_sweep: probe.py's 30-setting sweep vs one setting

Every measurement is a JSON line in OUT/gpu_check.jsonl, appended as it is made, so a kill
loses only the check under way; a failure, a timeout and a skip are lines too, with the
reason. OUT/summary.md is the readable version, OUT/logs/ each check's output.
"""
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import data  # noqa: E402
import harness  # noqa: E402
import muon  # noqa: E402
import train_mae  # noqa: E402

# -----------------------------------------------------------------------------
# config (--key=value)
_names_before_config = set(globals())
out_dir = ''  # the JSON lines, summary.md, logs/; '' = $OUT if set (what a GPU machine sends back), else out/gpu_check
scratch_dir = ''  # the made data and the runs' checkpoints (GBs, not results); '' = <tmp>/nanomae_gpu_check
budget_s = 480.0  # wall-clock seconds for all checks; a check whose estimate no longer fits is skipped, named
checks = ''  # comma-separated subset of the checks ('' = all, in their order)
device = 'auto'  # 'auto' (CUDA where there is one), 'cuda', or 'cpu': the dry run, at tiny sizes
seed = 0
check = ''  # set by the driver for its child processes: run this one check here
CONFIG = harness.settings(globals(), _names_before_config)

# Estimated seconds of each check, process start, CUDA init and compilation included: on one
# H100 (guesses until the first GPU run replaces them), and on the 2-core CPU for the dry run.
# The order is the run order, the most wanted first.
ESTIMATE_S = dict(env=(10, 4), train_eager=(40, 6), train_compiled=(100, 10), muon=(35, 6), numerics=(60, 8),
                  data=(25, 8), resume=(70, 25), loader=(60, 5), probe=(30, 4))
EXTRA_WORLD_S = 60  # resume: the run on all GPUs of a node with several, on top of the one-GPU run
NEEDS = dict(resume='data', loader='data')  # checks that read what another one made

# The sizes: ViT-S/16 and the recipe's micro-batch on a GPU; conftest.TINY's model on a CPU. numerics
# takes train's micro-batch, so that its compile finds train_compiled's graphs in inductor's cache.
TINY_MODEL = dict(img_size=32, patch_size=8, enc_dim=64, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)
SIZES = dict(
    cuda=dict(model={}, micro_batch_size=256, batch_size=4096, iters=5, warmup_iters=2, compile_backend='inductor',
              muon_iters=10, numerics_steps=30, numerics_batch=256, images=2048, val_images=256, loader_batches=10,
              loader_rounds=2, run_batch_size=1024, run_steps=16, probe_images=2048, probe_workers=10),
    cpu=dict(model=TINY_MODEL, micro_batch_size=8, batch_size=16, iters=2, warmup_iters=1, compile_backend='aot_eager',
             muon_iters=2, numerics_steps=4, numerics_batch=8, images=64, val_images=16, loader_batches=2,
             loader_rounds=1, run_batch_size=16, run_steps=12, probe_images=64, probe_workers=0),
)
GOAL_IMGS_PER_SEC, GOAL_MFU = 10_000, 0.30  # ViT-S/16 MAE on one H100: 400 epochs in 15 h
RESULTS, SUMMARY = 'gpu_check.jsonl', 'summary.md'


def sizes(c):
    return SimpleNamespace(**SIZES[c.device])


def bench_config(c, s, name, **overrides):
    """bench.py's config of bench `name` at this run's sizes."""
    return bench.bench_config(name, {**s.model, 'device': c.device, 'seed': c.seed, 'compile_backend': s.compile_backend,
                                     'micro_batch_size': s.micro_batch_size, **overrides})


def model_config(c, s, **overrides):
    return SimpleNamespace(**{**train_mae.CONFIG, **s.model, 'device': c.device, 'seed': c.seed, **overrides})


def data_root(c, s):
    return os.path.join(c.scratch_dir, f'data{s.images}')


def packed_dir(c, s):  # bench_loader's name for the packed copy: it finds and reuses it
    return os.path.join(data_root(c, s), f'packed256_{s.images}')


def parts(*named):
    """Runs each (part, records function) in turn: a part that fails is a failed line, and the next one runs."""
    for part, records in named:
        try:
            for r in records():
                yield dict(part=part, **r)
        except Exception as e:
            traceback.print_exc()
            yield dict(part=part, status='failed', error=one_line(e))


def one_line(e):
    first = (str(e).strip().splitlines() or [''])[0]
    return f"{type(e).__name__}: {first}"[:300]


# -----------------------------------------------------------------------------
# the checks: each yields its records

def check_env(c, s):
    flags = harness.cpu_info('flags').split()
    yield dict(part='versions', torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               date=time.strftime('%Y-%m-%d %H:%M'), commit=git_commit())
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    yield dict(part='devices', gpus=[g.name for g in gpus], gpu_mem_gb=[round(g.total_memory / 1e9, 1) for g in gpus],
               capability=[f"{g.major}.{g.minor}" for g in gpus], cpu=harness.cpu_info('model name'), cpus=os.cpu_count(),
               torch_threads=torch.get_num_threads(), cpu_fast_bf16=muon.cpu_has_fast_bf16(),
               cpu_flags=[f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags])
    # what this torch lacks, one line each (a check that needs it fails with the same message)
    features = (('torch.optim.Muon', hasattr(torch.optim, 'Muon'), "muon's reference and tests/test_muon.py"),
                ('torch.nn.RMSNorm', hasattr(torch.nn, 'RMSNorm'), '--norm=rmsnorm'),
                ('torch.nn.attention', importlib.util.find_spec('torch.nn.attention') is not None,
                 "numerics' flash vs math"))
    missing = [f"{name} ({use}): needs a newer torch" for name, present, use in features if not present]
    yield dict(part='features', missing=missing,
               flash_attention=getattr(torch.backends.cuda, 'is_flash_attention_available', lambda: None)(),
               c_compiler=shutil.which('cc') or shutil.which('gcc'))  # inductor's triton builds its launchers with it


def git_commit():
    p = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or None  # the GPU machine's copy may have no .git


def check_train(c, s, compile):
    yield from bench.bench_train(bench_config(c, s, 'train', dtype='bfloat16', compile=compile, batch_size=s.batch_size,
                                              iters=s.iters, warmup_iters=s.warmup_iters))


def check_muon(c, s):
    """Ours vs torch.optim.Muon, a whole step, on the device and on the host CPU; then
    Newton-Schulz alone. On a CPU that emulates bf16 (no AVX512-BF16 or AMX) torch's bf16
    step takes minutes at ViT-S/16's size: there the host part runs only in the dry run."""
    step = lambda device, ns, **iters: bench.bench_muon_step(bench_config(c, s, 'muon_step', device=device,
                                                                          muon_ns_dtype=ns, **iters))
    named = [('device', lambda: step(c.device, 'auto', muon_iters=s.muon_iters)),
             ('device newton-schulz', lambda: newton_schulz(c, s, c.device, s.muon_iters))]
    if c.device == 'cpu' or muon.cpu_has_fast_bf16():  # on the host, bench.CPU_DEFAULTS' iterations
        named += [(f'host cpu {ns}', lambda ns=ns: step('cpu', ns)) for ns in ('bfloat16', 'float32')]
        named += [('host cpu newton-schulz', lambda: newton_schulz(c, s, 'cpu', 3))]
    else:
        yield dict(part='host cpu', status='skipped', reason="this CPU emulates bf16 (no AVX512-BF16, no AMX): "
                   "torch.optim.Muon's bf16 step takes minutes at ViT-S/16's size")
    yield from parts(*named)


def newton_schulz(c, s, dev, iters):
    """Newton-Schulz alone, bf16, on each shape group of the Muon matrices: ours on the stack
    (one batched call, as muon.Muon), ours one matrix at a time, and torch.optim.Muon's
    (one matrix at a time). Which of batching and the kernels a step's gap comes from."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns  # the reference's own function
    mc = model_config(c, s, optimizer='muon')
    shapes = Counter(tuple(p.shape) for _, p in train_mae.param_groups(train_mae.build_model(mc), mc)['muon'])
    coefficients, steps, eps = (3.4445, -4.775, 2.0315), mc.muon_ns_steps, 1e-7
    for shape, k in shapes.items():
        torch.manual_seed(c.seed)
        U = torch.randn(k, *shape, device=dev).bfloat16()
        variants = dict(batched=lambda: muon.zeropower_via_newtonschulz5(U, steps, coefficients, eps, torch.bfloat16),
                        looped=lambda: [muon.zeropower_via_newtonschulz5(u, steps, coefficients, eps, torch.bfloat16)
                                        for u in U],
                        torch=lambda: [torch_ns(u, coefficients, steps, eps) for u in U])
        times = {key: [] for key in variants}
        for _ in range(1 + iters):  # interleaved; the first round is a warm-up
            for key, fn in variants.items():
                times[key].append(bench.seconds(fn, dev))
        ms = {key: 1000 * statistics.median(t[1:]) for key, t in times.items()}
        yield dict(device=bench.device_name(dev), shape=list(shape), matrices=k, ours_batched_ms=ms['batched'],
                   ours_looped_ms=ms['looped'], torch_ms=ms['torch'], speedup=ms['torch'] / ms['batched'])


def check_numerics(c, s):
    mc = model_config(c, s, dtype='bfloat16')
    rt = harness.setup(mc.device, mc.dtype, mc.ddp_timeout)  # TF32 and bf16 autocast as in training
    dev = rt.device
    batches = fixed_batches(mc, dev, s.numerics_batch)
    yield from parts(('bf16 autocast vs fp32', lambda: bf16_vs_fp32(mc, rt, batches, s.numerics_steps)),
                     ('compiled vs eager', lambda: compiled_vs_eager(mc, rt, batches[0], s.compile_backend)),
                     ('flash vs math attention', lambda: flash_vs_math(mc, rt, batches[0])))


def fixed_batches(mc, dev, n):
    """Two batches of n built-in images (val transform, fixed masks) on dev, as (imgs, noise)."""
    cfg = SimpleNamespace(**{**vars(mc), 'data_dir': 'synthetic', 'synthetic_size': (1, 2 * n)})
    val = train_mae.build_datasets(cfg, (mc.img_size // mc.patch_size) ** 2)[1]
    batches = []
    for k in range(2):
        batch = data.collate([val[0, i] for i in range(k * n, (k + 1) * n)])
        batches.append((data.to_device(batch.imgs, dev), batch.noise.to(dev)))
    return batches


def fresh_model(mc, dev):
    torch.manual_seed(mc.seed)
    return train_mae.build_model(mc).to(dev)


def loss_and_grads(model, imgs, noise, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = model(imgs, noise)[0]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def flat_params(model):
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])


def bf16_vs_fp32(mc, rt, batches, steps):
    """The same model, data and optimizers (Muon + AdamW, constant lr) trained `steps` steps
    with bf16 autocast and in fp32 (TF32 off): how far apart the losses and the weights drift."""
    def train(autocast):
        model = fresh_model(mc, rt.device)
        start = flat_params(model)
        optimizers = train_mae.build_optimizers(model, mc, rt.device.split(':')[0], log=lambda *a: None)
        losses = []
        for i in range(steps):
            imgs, noise = batches[i % len(batches)]
            with autocast:
                loss = model(imgs, noise)[0]
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        return torch.stack(losses).cpu(), start, flat_params(model)

    bf16, start, bf16_end = train(rt.autocast)
    with harness.exact_float32(torch.device(rt.device)):
        fp32, _, fp32_end = train(contextlib.nullcontext())
    yield dict(steps=steps, batch=len(batches[0][0]), loss_fp32_first=fp32[0].item(), loss_fp32_last=fp32[-1].item(),
               loss_bf16_last=bf16[-1].item(), max_loss_rel_diff=((bf16 - fp32).abs() / fp32).max().item(),
               weight_rel_diff=rel(bf16_end - start, fp32_end - start))  # of the distance travelled


def compiled_vs_eager(mc, rt, batch, backend):
    """One forward and backward in bf16 autocast, compiled and eager, against the fp32 one:
    compiled should differ from eager by no more than bf16 differs from fp32."""
    model = fresh_model(mc, rt.device)
    eager_loss, eager = loss_and_grads(model, *batch, rt.autocast)
    t0 = time.perf_counter()
    compiled_loss, compiled = loss_and_grads(torch.compile(model, backend=backend), *batch, rt.autocast)
    compile_s = time.perf_counter() - t0
    with harness.exact_float32(torch.device(rt.device)):
        _, fp32 = loss_and_grads(model, *batch, contextlib.nullcontext())
    yield dict(backend=backend, loss_eager=eager_loss, loss_compiled=compiled_loss,
               loss_rel_diff=abs(compiled_loss - eager_loss) / eager_loss, grad_rel_diff=rel(compiled, eager),
               bf16_grad_rel_diff=rel(eager, fp32), compile_s=compile_s)


def flash_vs_math(mc, rt, batch):
    """One forward and backward in bf16 with attention by the flash kernel and by the
    math path, each against fp32 math: flash should be no further from it than math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = fresh_model(mc, rt.device)
    with harness.exact_float32(torch.device(rt.device)), sdpa_kernel(SDPBackend.MATH):
        _, fp32 = loss_and_grads(model, *batch, contextlib.nullcontext())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_loss, flash = loss_and_grads(model, *batch, rt.autocast)
    with sdpa_kernel(SDPBackend.MATH):
        math_loss, math = loss_and_grads(model, *batch, rt.autocast)
    yield dict(loss_flash=flash_loss, loss_math=math_loss, grad_rel_diff=rel(flash, math),
               flash_vs_fp32=rel(flash, fp32), math_vs_fp32=rel(math, fp32))


def check_data(c, s):
    root, workers = data_root(c, s), os.cpu_count()
    t0 = time.perf_counter()
    bench.make_jpegs(os.path.join(root, 'jpegs', 'train'), s.images, c.seed, workers)
    bench.make_jpegs(os.path.join(root, 'jpegs', 'val'), s.val_images, c.seed + 1, workers)
    made_s = time.perf_counter() - t0
    packed = packed_dir(c, s)
    if not os.path.exists(os.path.join(packed, data.PACKED_INDEX)):
        shutil.rmtree(packed, ignore_errors=True)  # an unfinished copy of another attempt
        subprocess.run([sys.executable, bench.PREPARE_DATA, os.path.join(root, 'jpegs'), packed,
                        f'--workers={workers}'], check=True, stdout=sys.stderr)
    with open(os.path.join(packed, data.PACKED_INDEX)) as f:
        splits = json.load(f)['splits']
    train, val = splits['train'], splits['val']
    yield dict(part='made', train_images=train['images'], val_images=val['images'],
               packed_kb=train['bytes'] / train['images'] / 1e3, jpegs_s=made_s, packed_s=time.perf_counter() - t0 - made_s)


def check_resume(c, s):
    worlds = [1] + ([torch.cuda.device_count()] if c.device == 'cuda' and torch.cuda.device_count() > 1 else [])
    yield from parts(*[(f'{world} process(es)', lambda world=world: resume_run(c, s, world)) for world in worlds])


def resume_run(c, s, world):
    """train_mae.py under torchrun from the packed copy, eager (train_compiled measures
    compile): a straight run; then the same run stopped by SIGTERM to its ranks after a
    quarter of its steps (they save at the next step) and resumed. Every log line must
    match: on CPU exactly; on a GPU, atomics in some backward kernels make two straight
    runs differ already, which the stopped run's lines before its stop measure."""
    run_dir = os.path.join(c.scratch_dir, f'run_world{world}')
    shutil.rmtree(run_dir, ignore_errors=True)
    workers = 1 if c.device == 'cpu' else max(1, min(10, os.cpu_count() // world - 1))
    args = [f'--{k}={v}' for k, v in s.model.items()] + [
        f'--data_dir={packed_dir(c, s)}', f'--device={c.device}', f'--batch_size={s.run_batch_size}',
        f'--micro_batch_size={s.micro_batch_size}', f'--max_iters={s.run_steps}', f'--eval_interval={s.run_steps // 2}',
        '--log_interval=1', '--compile=False', f'--num_workers={workers}', f'--seed={c.seed}']
    straight, stopped = os.path.join(run_dir, 'straight'), os.path.join(run_dir, 'stopped')
    t0 = time.perf_counter()
    Torchrun(c, world, args + [f'--out_dir={straight}'], 'straight').wait()
    rates = [r['imgs_per_sec'] for r in read_log(straight) if 'imgs_per_sec' in r and r['step'] > 2]
    yield dict(world=world, run='straight', steps=s.run_steps, seconds=time.perf_counter() - t0,
               imgs_per_sec=statistics.median(rates), batch_size=s.run_batch_size, num_workers=workers,
               data='packed, crops resized on the ' + ('device' if c.device == 'cuda' else 'loader'))

    p = Torchrun(c, world, args + [f'--out_dir={stopped}'], 'stopped')
    wait_for_step(stopped, s.run_steps // 4, p.proc)
    # as a scheduler does: torchrun passes it to each rank's process group, DataLoader workers included
    # (they leave it to their rank: data.leave_signals_to_the_main_process), then exits 1 itself
    p.proc.send_signal(signal.SIGTERM)
    p.proc.wait()
    stopped_at = torch.load(os.path.join(stopped, 'ckpt.pt'), weights_only=True)['step']
    if not 0 < stopped_at < s.run_steps or 'stopped by signal' not in p.output():
        raise RuntimeError(f"the SIGTERM did not stop the run midway (checkpoint at step {stopped_at}): {p.log}")
    Torchrun(c, world, args + [f'--out_dir={stopped}', '--init_from=resume'], 'resumed').wait()
    yield dict(world=world, run='stopped and resumed', **compare_runs(straight, stopped, stopped_at))


def compare_runs(straight, resumed, stopped_at):
    """A resumed run's log and final weights against the straight run's: the same lines,
    the largest loss difference before the stop (the two runs' own noise) and after it."""
    a, b = read_log(straight), read_log(resumed)
    if [(r['step'], sorted(r)) for r in a] != [(r['step'], sorted(r)) for r in b]:
        raise RuntimeError(f"the resumed log has other lines than the straight one: {len(b)} vs {len(a)}")
    strip = lambda log: [{k: v for k, v in r.items() if k != 'imgs_per_sec'} for r in log]  # all but timings
    loss = lambda r: r.get('loss', r.get('val_loss'))
    diffs = [(r['step'], abs(loss(r) - loss(q))) for r, q in zip(a, b) if loss(r) is not None]
    weights = [torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True)['model'] for d in (straight, resumed)]
    weight_diff = max((weights[0][k].float() - v.float()).abs().max().item() for k, v in weights[1].items())
    return dict(stopped_at=stopped_at, exact=strip(a) == strip(b) and weight_diff == 0, lines_compared=len(diffs),
                loss_diff_before_stop=max((d for step, d in diffs if step <= stopped_at), default=0.0),
                loss_diff_after_stop=max((d for step, d in diffs if step > stopped_at), default=0.0),
                max_weight_diff=weight_diff)


class Torchrun:
    """train_mae.py under torchrun, its output in OUT/logs/resume_<name>_<world>.log."""

    def __init__(self, c, world, args, name):
        self.log = os.path.join(c.out_dir, 'logs', f'resume_{name}_{world}.log')
        with open(self.log, 'w') as f:
            self.proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                          f'--nproc_per_node={world}', os.path.join(ROOT, 'train_mae.py'), *args],
                                         cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)

    def wait(self):
        if self.proc.wait() != 0:
            raise RuntimeError(f"torchrun exited {self.proc.returncode}: {self.output()[-300:]!r} ({self.log})")

    def output(self):
        with open(self.log) as f:
            return f.read()


def children(pid):
    """The pids of pid's child processes (Linux's /proc); [] once it is gone."""
    try:
        tasks = os.listdir(f'/proc/{pid}/task')
        return [int(k) for task in tasks for k in open(f'/proc/{pid}/task/{task}/children').read().split()]
    except OSError:
        return []


def descendants(pid):
    return [d for k in children(pid) for d in (k, *descendants(k))]


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if max((r['step'] for r in read_log(out)), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass  # not there yet, or a line half written
        time.sleep(0.02)
    raise RuntimeError(f"the run to be stopped never logged step {step} (exit {proc.poll()})")


def check_loader(c, s):
    cpus = os.cpu_count()
    workers = (1,) if c.device == 'cpu' else tuple(sorted({max(1, cpus // 4), max(1, cpus // 2), cpus}))
    yield from bench.bench_loader(bench_config(c, s, 'loader', bench_dir=data_root(c, s), loader_images=s.images,
                                               loader_batches=s.loader_batches, loader_rounds=s.loader_rounds,
                                               loader_workers=workers))


def check_probe(c, s):
    yield from bench.bench_probe_sweep(bench_config(c, s, 'probe_sweep', compile=False, num_workers=s.probe_workers,
                                                    synthetic_size=(s.probe_images, s.probe_images // 4),
                                                    probe_batch_size=min(256, s.probe_images // 2), probe_epochs=1))


CHECKS = dict(env=check_env, train_eager=lambda c, s: check_train(c, s, False),
              train_compiled=lambda c, s: check_train(c, s, True), muon=check_muon, numerics=check_numerics,
              data=check_data, resume=check_resume, loader=check_loader, probe=check_probe)
assert list(CHECKS) == list(ESTIMATE_S)


# -----------------------------------------------------------------------------
# the driver: one process per check, time-boxed; every line appended to RESULTS as it comes

def write(c, **record):
    with open(os.path.join(c.out_dir, RESULTS), 'a') as f:
        f.write(json.dumps(bench.rounded(record)) + '\n')


def run_check(c):
    """In the child: the check's records, each a line; exit 1 if a part failed."""
    failed = False
    try:
        for r in CHECKS[c.check](c, sizes(c)):
            failed |= r.get('status') == 'failed'
            write(c, check=c.check, **{'status': 'ok', **r})
    except Exception as e:
        traceback.print_exc()
        write(c, check=c.check, status='failed', error=one_line(e))
        failed = True
    sys.exit(1 if failed else 0)


def estimate(c, name):
    gpu_s, cpu_s = ESTIMATE_S[name]
    if c.device == 'cpu':
        return cpu_s
    return gpu_s + (EXTRA_WORLD_S if name == 'resume' and torch.cuda.device_count() > 1 else 0)


def main(argv):
    c = SimpleNamespace(**harness.configure(argv, CONFIG))
    c.device = c.device if c.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    if c.device not in SIZES or c.device == 'cuda' and not torch.cuda.is_available():
        raise harness.ConfigError(f"--device={c.device}: must be 'auto', 'cpu' or 'cuda' (with a CUDA device visible)")
    c.out_dir = c.out_dir or os.environ.get('OUT') or os.path.join(ROOT, 'out', 'gpu_check')
    c.scratch_dir = c.scratch_dir or os.path.join(tempfile.gettempdir(), 'nanomae_gpu_check')
    if c.check:
        return run_check(c)
    names = [n for n in c.checks.split(',') if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise harness.ConfigError(f"--checks: unknown {unknown}; the checks are {', '.join(CHECKS)}")
    os.makedirs(os.path.join(c.out_dir, 'logs'), exist_ok=True)
    os.makedirs(c.scratch_dir, exist_ok=True)
    open(os.path.join(c.out_dir, RESULTS), 'w').close()
    plan = {n: estimate(c, n) for n in names}
    where = 'one H100' if c.device == 'cuda' else 'the 2-core CPU (the dry run)'
    print(f"plan, estimated seconds on {where}: " + ', '.join(f"{n} {s}" for n, s in plan.items())
          + f"; total {sum(plan.values())} of the {c.budget_s:.0f} s budget. Short of time, the last are skipped: "
          + ', '.join(reversed(names)), flush=True)
    write(c, check='plan', status='ok', device=c.device, budget_s=c.budget_s, estimate_s=plan)
    deadline, ended = time.time() + c.budget_s, {}
    for name in names:
        left, need = deadline - time.time(), NEEDS.get(name)
        if need and ended.get(need, 'ok') != 'ok':
            ended[name] = end(c, name, 'skipped', reason=f"needs {need}, which ended {ended[need]}")
        elif left < plan[name]:
            ended[name] = end(c, name, 'skipped', reason=f"budget: estimated {plan[name]} s, {left:.0f} s left")
        else:
            ended[name] = run_child(c, name, argv, box=min(left, 2 * plan[name]))
    summary = write_summary(c)
    print(summary)


def run_child(c, name, argv, box):
    """Runs check `name` in a process of its own for at most `box` seconds; returns how it ended."""
    t0 = time.time()
    with open(os.path.join(c.out_dir, 'logs', f'{name}.log'), 'w') as log:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, f'--out_dir={c.out_dir}',
                                  f'--scratch_dir={c.scratch_dir}', f'--device={c.device}', f'--check={name}'],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = child.wait(timeout=box)
        except subprocess.TimeoutExpired:
            stop(child)
            return end(c, name, 'timeout', seconds=time.time() - t0, reason=f"time box of {box:.0f} s")
    status = 'ok' if rc == 0 else 'failed'
    return end(c, name, status, seconds=time.time() - t0, **({} if rc == 0 else {'exit': rc, 'log': log.name}))


def stop(child):
    """SIGKILL to the check's process group and to every process it started (torchrun's
    workers run in sessions of their own, out of the group's reach): its lines are written."""
    for pid in descendants(child.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def end(c, name, status, **fields):
    write(c, check=name, status=status, end=True, estimate_s=estimate(c, name), **fields)
    print(f"{name}: {status} {fields.get('reason', '')}".rstrip(), flush=True)
    return status


# -----------------------------------------------------------------------------
# the readable summary

# per bench record: the fields the summary shows (other records: all of them)
SHOWN = dict(train=('imgs_per_sec', 'mfu', 'peak_mem_gb', 'warmup_s', 'compile', 'dtype'),
             muon_step=('device', 'ns_dtype', 'ours_ms', 'torch_ms', 'speedup'),
             loader=('stage', 'path', 'resize', 'workers', 'imgs_per_sec', 'ratio'),
             probe_sweep=('configs', 'sweep_s', 'single_s'))


def figures(r):
    if r.get('end'):
        reason = f": {r['reason']}" if 'reason' in r else ''
        return f"{r.get('seconds', 0):.0f} s (estimated {r['estimate_s']} s){reason}"
    if r['status'] != 'ok':
        return r.get('reason') or r.get('error', '')
    keys = SHOWN.get(r.get('name')) or [k for k in r if k not in ('check', 'part', 'status', 'name')]
    return ', '.join(f"{k} {r[k]}" for k in keys if k in r)


def write_summary(c):
    with open(os.path.join(c.out_dir, RESULTS)) as f:
        records = [json.loads(line) for line in f]
    env = {r['part']: r for r in records if r['check'] == 'env' and 'part' in r}
    versions, devices = env.get('versions', {}), env.get('devices', {})
    lines = [f"# gpu_check {versions.get('date', time.strftime('%Y-%m-%d %H:%M'))}: "
             f"{', '.join(devices.get('gpus') or [c.device])}, host {devices.get('cpu', harness.cpu_info('model name'))}, torch "
             f"{versions.get('torch', torch.__version__)}, CUDA {versions.get('cuda', torch.version.cuda)}, commit "
             f"{versions.get('commit', git_commit())}", '', '| check | part | status | figures |', '|---|---|---|---|']
    for r in records[1:]:  # after the plan
        part = '(end)' if r.get('end') else r.get('part', r.get('name', ''))
        lines.append(f"| {r['check']} | {part} | {r['status']} | {figures(r)} |")
    train = [r for r in records if r.get('name') == 'train' and r['status'] == 'ok']
    if train:  # (the dry run's model is not ViT-S/16: its line only shows that the line is made)
        best = max(train, key=lambda r: r['imgs_per_sec'])
        mfu = 'unknown (no bf16 peak for this device)' if best['mfu'] is None else f"{best['mfu']:.1%}"
        lines += ['', f"The goal, {GOAL_IMGS_PER_SEC:,} images/s ({GOAL_MFU:.0%} MFU) for ViT-S/16 on one H100: the best "
                  f"here is {best['imgs_per_sec']:,.0f} images/s ({'compiled' if best['compile'] else 'eager'}, "
                  f"{best['model']}, {best['device']}), {best['imgs_per_sec'] / GOAL_IMGS_PER_SEC:.0%} of it; MFU {mfu}"]
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(c.out_dir, SUMMARY), 'w') as f:
        f.write(text)
    return text


if __name__ == '__main__':
    main(sys.argv[1:])
