"""Faults injected for real: SIGKILL, SIGTERM, a dead rank, a full disk, bad images, NaN."""
import json
import math
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train_mae as T
from conftest import TINY, kill_run, read_log, run, start, wait_for_step, worker_pids

LONG = TINY + ['--max_iters=400', '--eval_interval=3', '--synthetic_size=(1024,32)']


def params(out_dir, name='ckpt.pt'):
    return torch.load(os.path.join(out_dir, name), weights_only=True)


def losses(log):
    return [(r['step'], r.get('loss', r.get('val_loss'))) for r in log]


@pytest.mark.parametrize('nproc', [0, 2])
def test_sigkill_at_any_step_then_resume_matches_a_straight_run(tmp_path, nproc):
    args = TINY + ['--max_iters=14', '--eval_interval=3', '--optimizer=muon']
    run(args + [f'--out_dir={tmp_path / "straight"}'], torchrun=nproc)
    p = start(args + [f'--out_dir={tmp_path / "killed"}'], torchrun=nproc)
    wait_for_step(tmp_path / 'killed', 7, p)  # somewhere between checkpoints 6 and 9
    kill_run(p)  # no warning, every process of the run (torchrun's workers too)
    died_at = params(tmp_path / 'killed')['step']
    assert 6 <= died_at < 14
    run(args + [f'--out_dir={tmp_path / "killed"}', '--init_from=resume'], torchrun=nproc)
    straight, resumed = params(tmp_path / 'straight'), params(tmp_path / 'killed')
    assert resumed['step'] == 14
    for k, v in straight['model'].items():
        assert torch.equal(v, resumed['model'][k]), k  # CPU fp32: exactly
    # the log was rewound to the checkpoint and continued: the same trajectory
    assert losses(read_log(tmp_path / 'killed')) == losses(read_log(tmp_path / 'straight'))


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    p = start(LONG + [f'--out_dir={tmp_path}'])
    wait_for_step(tmp_path, 4, p)
    os.kill(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    last = max(r['step'] for r in read_log(tmp_path))
    assert params(tmp_path)['step'] == last and last < 400 and 'stopped by signal' in out


def test_sigterm_to_the_whole_process_group_with_loader_workers_saves_too(tmp_path):
    """A scheduler (SLURM, a preemptible VM) signals every process of the job, the DataLoader's
    workers too: they must leave the signal to the main process, which saves and exits."""
    p = start(LONG + [f'--out_dir={tmp_path}', '--num_workers=2'])
    wait_for_step(tmp_path, 4, p)
    os.killpg(p.pid, signal.SIGTERM)  # start() gives the run a session, so a group, of its own
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    last = max(r['step'] for r in read_log(tmp_path))
    assert params(tmp_path)['step'] == last and last < 400 and 'stopped by signal' in out


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=2'])
    before = params(tmp_path)

    def dies_halfway(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=4', '--init_from=resume', '--resume_override=max_iters'])
    monkeypatch.undo()
    after = params(tmp_path)
    assert after['step'] == before['step'] == 2 and sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'log.jsonl', 'recon.png']


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path):
    T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=2'])
    os.symlink('/dev/full', tmp_path / 'ckpt.pt.tmp')  # the next write hits "No space left on device"
    p = run(TINY + [f'--out_dir={tmp_path}', '--max_iters=4', '--init_from=resume', '--resume_override=max_iters'],
            check=False)
    assert p.returncode != 0 and 'could not write' in p.stderr and 'No space left' in p.stderr, p.stderr
    assert params(tmp_path)['step'] == 2 and not os.path.lexists(tmp_path / 'ckpt.pt.tmp')


def test_unwritable_out_dir_fails_before_work(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit, match='not writable'):
        T.main(TINY + [f'--out_dir={tmp_path / "file" / "out"}'])


@pytest.mark.parametrize('eval_interval', [1, 3])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, eval_interval):
    T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=3', '--eval_interval=3'])
    good = params(tmp_path)
    # resume with an infinite learning rate: the weights turn to inf/NaN at the next step
    p = run(TINY + [f'--out_dir={tmp_path}', '--max_iters=9', '--init_from=resume', '--lr=1e400',
                    '--resume_override=lr,max_iters',
                    f'--eval_interval={eval_interval}'], check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'keeps the last good state' in p.stderr
    last = json.loads((tmp_path / 'log.jsonl').read_text().splitlines()[-1])  # where it diverged, logged
    assert last['step'] > 3 and not all(math.isfinite(last[k]) for k in ('loss', 'val_loss') if k in last)
    kept = params(tmp_path)
    assert kept['step'] == 3 and all(torch.equal(v, good['model'][k]) for k, v in kept['model'].items())


def test_mismatched_architecture_on_resume(tmp_path):
    T.main(TINY + [f'--out_dir={tmp_path}', '--max_iters=1'])
    with pytest.raises(SystemExit, match="--enc_dim=128 does not match the checkpoint's 64"):
        T.main(TINY + [f'--out_dir={tmp_path}', '--init_from=resume', '--enc_dim=128'])


def test_bad_images_are_skipped_counted_and_reported(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for cls in ('a', 'b'):
            os.makedirs(tmp_path / split / cls)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / cls / f'{i}.jpg')
    bad = tmp_path / 'train' / 'a'
    good = (bad / '0.jpg').read_bytes()
    (bad / 'truncated.jpg').write_bytes(good[:len(good) // 2])
    (bad / 'empty.jpg').write_bytes(b'')
    (bad / 'text.png').write_text('this is not a png')
    Image.new('L', (5000, 3000)).save(bad / 'bomb.png')  # 15 MP: over twice the pixel limit set below
    Image.new('L', (40, 40), 7).save(bad / 'gray.jpg')
    Image.new('CMYK', (40, 40)).save(bad / 'cmyk.jpg')
    Image.new('RGBA', (40, 40)).save(bad / 'alpha.png')
    Image.fromarray(np.full((40, 40), 999, dtype=np.uint16)).save(bad / 'deep.png')
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(bad / 'huge.jpg')  # 12 MP: decoded
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 6_500_000)  # PIL's bomb guard refuses > 13 MP
    T.main(TINY + [f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', '--batch_size=8', '--micro_batch_size=8',
                   '--epochs=10', '--max_iters=0', '--eval_interval=100'])
    log = read_log(tmp_path / 'out')
    assert max(r['step'] for r in log) == 30  # 25 images // 8 per step x 10 epochs: training went on
    n_skipped = [r['skipped_images'] for r in log if 'loss' in r][-1]
    # 24 of the 25 files drawn per epoch; bomb, empty and truncated cost one skip each, text.png two
    # (the next file is truncated.jpg): 5 per epoch, less at most 2 for the one file an epoch leaves out
    assert 10 * 3 <= n_skipped <= 10 * 5
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning: skipping')]
    assert 1 <= len(warnings) <= 3 and any('truncated.jpg' in w or 'empty.jpg' in w or 'text.png' in w or 'bomb.png' in w for w in warnings)


def test_a_dead_rank_ends_the_whole_run(tmp_path):
    p = start(LONG + [f'--out_dir={tmp_path}'], torchrun=2)
    wait_for_step(tmp_path, 2, p)
    workers = worker_pids(p.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    t = time.time()
    p.communicate(timeout=90)
    assert p.returncode != 0 and time.time() - t < 90
    time.sleep(1)
    assert all(not os.path.exists(f'/proc/{w}') or open(f'/proc/{w}/stat').read().split()[2] == 'Z' for w in workers.values())


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path):
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='is not a readable nanoMAE checkpoint'):
        T.main(TINY + [f'--out_dir={tmp_path}', '--init_from=resume'])
