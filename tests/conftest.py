import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a tiny MAE on the built-in data: a few steps take well under a second on a 2-core CPU
TINY = ['--data_dir=synthetic', '--synthetic_size=(256,32)', '--img_size=32', '--patch_size=8',
        '--enc_dim=64', '--enc_depth=2', '--enc_heads=2', '--dec_dim=32', '--dec_depth=1', '--dec_heads=2',
        '--batch_size=16', '--micro_batch_size=8', '--compile=False', '--num_workers=0',
        '--epochs=2', '--warmup_epochs=1', '--log_interval=1', '--eval_interval=2']


def run(args, check=True, timeout=300, env=None, torchrun=0):
    """Run train_mae.py (or another script: args[0] ending in .py) in a fresh process."""
    script = args[0] if args and args[0].endswith('.py') else 'train_mae.py'
    args = args[1:] if args and args[0].endswith('.py') else args
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [sys.executable]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    p = subprocess.run(launcher + [os.path.join(ROOT, script)] + list(args), cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def start(args, torchrun=0):
    """Start train_mae.py in the background, in a session of its own (kill_run ends every process of the run)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [sys.executable]
    return subprocess.Popen(launcher + [os.path.join(ROOT, 'train_mae.py')] + args, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for_step(out_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if max((r['step'] for r in read_log(out_dir)), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass  # not there yet, or a line half written
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {out_dir}")


def worker_pids(torchrun_pid):
    """{rank: pid} of the workers torchrun started: its child processes, by parent id
    (ps truncates command lines, so a long checkout path would hide the script's name)."""
    ranks = {}
    for task in os.listdir(f'/proc/{torchrun_pid}/task'):
        with open(f'/proc/{torchrun_pid}/task/{task}/children') as f:
            children = [int(pid) for pid in f.read().split()]
        for pid in children:
            try:
                with open(f'/proc/{pid}/environ', 'rb') as f:
                    env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
            except OSError:
                continue  # gone already
            if b'RANK' in env:
                ranks[int(env[b'RANK'])] = pid
    return ranks


def kill_run(proc):
    """SIGKILL every process of a run from start(). torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone leaves them training."""
    workers = worker_pids(proc.pid).values()
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.fixture
def tiny():
    return list(TINY)
