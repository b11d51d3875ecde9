"""The harness around the algorithm, shared by train_mae.py, probe.py and bench.py:
config parsing (`--key=value` and config files, each value of its key's type),
processes and devices, checkpoints, the resume check, the run log, signals. None
of it is MAE, and it knows no setting by name: the rules of the settings live
beside them in train_mae.py, which passes in what is needed (nanoGPT keeps its
configurator in a file of its own for the same reason). It imports nothing of
nanoMAE's.
"""
import ast
import contextlib
import json
import math
import os
import platform
import re
import signal
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# config: module constants as defaults, overridden by config files and --key=value

class ConfigError(SystemExit):
    """A bad setting: exits with a one-line message naming the key."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


SETTING_TYPES = (bool, int, float, str, tuple)


def settings(namespace, names_before):
    """The constants a script defined since `names_before` (its config block), as a
    dict. A type the command line cannot set (a list, None, ...) is refused."""
    out = {}
    for key, value in namespace.items():
        if key in names_before or key.startswith('_'):
            continue
        if type(value) not in SETTING_TYPES:
            raise TypeError(f"config constant {key} = {value!r}: use one of {[t.__name__ for t in SETTING_TYPES]}")
        out[key] = value
    return out


def parse(argv, defaults):
    """The overrides in argv (config files and --key=value, in order) as a dict,
    each key checked to exist in `defaults` and each value to have its type."""
    overrides = {}
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string: --data_dir=/imagenet
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # --out_dir=123 is a string
            updates = {key: value}
        else:  # a config file: Python assignments, the user's own code (as nanoGPT's)
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
            if key not in defaults:
                raise ConfigError(f"unknown config key '{key}'")
            overrides[key] = coerce(key, value, defaults[key])
    return overrides


def configure(argv, defaults):
    """defaults with the overrides of argv applied."""
    return {**defaults, **parse(argv, defaults)}


def coerce(key, value, default):
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


def accumulation(batch_size, micro_batch_size, world):
    """Micro-batches per optimizer step, per process."""
    if batch_size % (micro_batch_size * world):
        raise ConfigError(f"--batch_size={batch_size} is not divisible by --micro_batch_size={micro_batch_size}"
                          f" x {world} processes")
    return batch_size // (micro_batch_size * world)


# -----------------------------------------------------------------------------
# processes and devices

class Runtime(NamedTuple):
    ddp: bool  # launched by torchrun
    rank: int
    local_rank: int
    world: int
    device: str  # 'cpu' or 'cuda:<local_rank>'
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a no-op

    @property
    def master(self):
        return self.rank == 0


def setup(device, dtype, ddp_timeout):
    """Device ('auto', 'cuda' or 'cpu'), torch.distributed (when launched by torchrun:
    nccl on CUDA, gloo on CPU; a collective waits ddp_timeout seconds for a peer) and
    autocast (dtype 'auto', 'bfloat16' or 'float32')."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = device if device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    rank, local_rank, world = 0, 0, 1
    if ddp:
        dist.init_process_group('nccl' if dev == 'cuda' else 'gloo', timeout=timedelta(seconds=ddp_timeout))
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if dev == 'cuda':
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(dev.split(':')[0], dtype=torch.bfloat16, enabled=resolve_dtype(dtype, dev) == 'bfloat16')
    return Runtime(ddp, rank, local_rank, world, dev, autocast)


@contextlib.contextmanager
def exact_float32(device):
    """float32 matmuls as float32: autocast off and, on CUDA, TF32 off (setup turns it on)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def resolve_dtype(dtype, device):
    """'auto' is bfloat16 autocast on CUDA, float32 elsewhere."""
    return dtype if dtype != 'auto' else 'bfloat16' if device.startswith('cuda') else 'float32'


def shutdown_distributed():
    """A barrier, then the teardown: with gloo, a rank that tears down while a peer
    still finishes its last collective can abort that peer at exit."""
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM/SIGINT (preemption) append to the yielded list instead of killing:
    the loop saves at its next log step and exits cleanly."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# checkpoints

def cpu_info(key):
    """The first /proc/cpuinfo line starting with key ('model name', 'flags'), its value; the
    processor's name off Linux."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith(key)), '')
    except OSError:
        return platform.processor()


def make_out_dir(out_dir):
    """Create out_dir and check it is writable: fail now, not after hours of work."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, '.write_test'), 'w').close()
        os.remove(os.path.join(out_dir, '.write_test'))
    except OSError as e:
        raise ConfigError(f"--out_dir={out_dir!r} is not writable: {e}")


def write_atomic(path, write):
    """write(file) into path.tmp, fsync, rename: path is whole or as it was, whenever
    the job dies or the disk fills (an error removes the temporary file)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, obj):
    """Atomic (write_atomic): a crash or a full disk while saving leaves the previous checkpoint as it was."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_checkpoint(out_dir, state, keep):
    """out_dir/ckpt.pt, atomically; with keep > 0 also the last `keep` as
    ckpt_<step>.pt, hard links (no copy; replacing ckpt.pt leaves them alone)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    try:
        save_checkpoint(path, state)
    except OSError as e:
        raise SystemExit(f"error: could not write {path} ({e}); the previous checkpoint is intact")
    if keep > 0:
        kept = os.path.join(out_dir, f"ckpt_{state['step']}.pt")
        if not os.path.exists(kept):
            os.link(path, kept)
        steps = sorted(int(m[1]) for m in map(re.compile(r'ckpt_(\d+)\.pt$').match, os.listdir(out_dir)) if m)
        for s in steps[:-keep]:
            os.remove(os.path.join(out_dir, f'ckpt_{s}.pt'))


def load_checkpoint(path, defaults):
    """A nanoMAE checkpoint, loaded with weights_only=True: tensors and plain Python
    values only, so a shared or downloaded file cannot run code when it is read.
    Config keys it lacks (settings added since it was saved) take their value in
    `defaults` (train_mae.CONFIG): a knob whose default keeps the old behaviour loads old checkpoints."""
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
    ckpt['config'] = {**defaults, **ckpt['config']}
    return ckpt


def load_states(path, ckpt, model, optimizers):
    """The checkpoint's weights into model and its optimizer states into optimizers, or one line saying why not."""
    try:
        model.load_state_dict(ckpt['model'])
        for opt, state in zip(optimizers, ckpt['optimizers'], strict=True):
            opt.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} does not fit this run's model or optimizers: {str(e).splitlines()[0]}")


def check_architecture(c, ckpt, keys):
    """A checkpoint loads only into the same architecture (config keys `keys`)."""
    for key in keys:
        if ckpt['config'][key] != getattr(c, key):
            raise ConfigError(f"--{key}={getattr(c, key)!r} does not match the checkpoint's {ckpt['config'][key]!r}")


def check_resume(config, old, free, overrides):
    """A resume continues the run whose config was `old`: every key of `config` must match
    it, but those in `free` and those in `overrides` (the caller records them). A one-line
    refusal otherwise; returns {key: [old, new]} of the overridden keys that changed."""
    for key in overrides:
        if key not in old:
            raise ConfigError(f"--resume_override: unknown key '{key}'")
    for key, value in old.items():
        new = config.get(key, value)  # a key since removed from the code: nothing to compare
        if new != value and key not in free and key not in overrides:
            raise ConfigError(f"--{key}={new!r} differs from the checkpoint's {value!r}: a resume continues the same "
                              f"run (start another out_dir, or --resume_override={key})")
    return {k: [old[k], config[k]] for k in overrides if old[k] != config[k]}


# -----------------------------------------------------------------------------
# the run log

class RunLog:
    """out_dir/log.jsonl (one JSON object per line), and Weights & Biases with `wandb`
    (wandb.init's project, name and config). On resume (step > 0), lines past the
    checkpoint's step are dropped: the resumed run writes them again; a new run starts
    the file afresh. Only the master process writes."""

    def __init__(self, out_dir, master, step, wandb=None, wandb_id=None):
        self.master, self.path, self.wandb = master, os.path.join(out_dir, 'log.jsonl'), None
        if not master:
            return
        if os.path.exists(self.path):
            keep = [l for l in open(self.path) if l.strip() and step and json.loads(l)['step'] <= step]
            with open(self.path, 'w') as f:
                f.writelines(keep)
        if wandb:
            try:
                import wandb as tracker  # an optional extra: imported only when asked for
            except ImportError:
                raise ConfigError("--wandb_log=True but the wandb package is not installed (pip install wandb)")
            self.wandb = tracker
            tracker.init(**wandb, id=wandb_id, resume='must' if wandb_id else None)

    @property
    def wandb_id(self):
        return self.wandb.run.id if self.wandb else None

    def write(self, **record):
        if self.master:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.wandb:
                self.wandb.log({k: v for k, v in record.items() if k != 'step'}, step=record['step'])

    def image(self, step, path):
        if self.wandb:
            self.wandb.log({'reconstructions': self.wandb.Image(path)}, step=step)


def all_ranks(mean_loss, skipped, stop):
    """(mean loss, images skipped, stop requested on any rank) over all ranks, in
    one all-reduce: the training loop's one host sync, at its log steps."""
    stats = torch.stack([mean_loss.float(), skipped.to(mean_loss.device).float(),
                         torch.tensor(float(stop), device=mean_loss.device)])
    world = 1
    if dist.is_initialized():
        dist.all_reduce(stats)
        world = dist.get_world_size()
    return stats[0].item() / world, int(stats[1].item()), stats[2].item() > 0


def check_finite(name, value, step, ckpt_path):
    """Stop before a poisoned model is saved: a NaN/Inf loss ends the run, the checkpoint stays the last good one."""
    if not math.isfinite(value):
        raise SystemExit(f"error: {name} is {value} at step {step}; {ckpt_path} keeps the last good state")
