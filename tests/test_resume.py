"""Checkpoints never run code when loaded; a resume continues the same run or is refused."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import harness
import train_mae as T
from conftest import TINY, read_log, run


class _Payload:
    """Unpickling this runs `touch path`: what a malicious ckpt.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def crafted_checkpoint(path, marker):
    torch.save({'model': {}, 'config': {}, 'step': 0, 'evil': _Payload(marker)}, path)


def test_the_crafted_pickle_would_run_code_if_loaded_unsafely(tmp_path):
    # the control: proves the payload below is live, so the refusal tests can fail
    crafted_checkpoint(tmp_path / 'ckpt.pt', tmp_path / 'ran')
    torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert (tmp_path / 'ran').exists()


@pytest.mark.parametrize('script', ['train_mae.py', 'probe.py'])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, script):
    marker = tmp_path / 'pwned'
    crafted_checkpoint(tmp_path / 'ckpt.pt', marker)
    args = TINY + [f'--out_dir={tmp_path}', '--init_from=resume'] if script == 'train_mae.py' else \
        [script, f'--ckpt={tmp_path / "ckpt.pt"}', '--compile=False', '--num_workers=0']
    p = run(args, check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith('error: ') and 'refused' in last[0], p.stderr
    assert not marker.exists()


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A 2-step TINY run on the synthetic data: the checkpoint the refusals start from."""
    out = tmp_path_factory.mktemp('run')
    T.main(TINY + [f'--out_dir={out}', '--max_iters=2'])
    return out


@pytest.mark.parametrize('flag,key,old', [
    ('--optimizer=adamw', 'optimizer', "'muon'"),
    ('--batch_size=32', 'batch_size', '16'),
    ('--seed=1', 'seed', '0'),
    ('--synthetic_size=(512,32)', 'synthetic_size', '(256, 32)'),
    ('--lr=0.01', 'lr', '0.0008'),
])
def test_a_resume_that_changes_the_run_is_a_named_one_line_error(finished, flag, key, old):
    before = torch.load(finished / 'ckpt.pt', weights_only=True)
    p = run(TINY + [f'--out_dir={finished}', '--max_iters=2', '--init_from=resume', flag], check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: --{key}=') and old in lines[0], p.stderr
    after = torch.load(finished / 'ckpt.pt', weights_only=True)
    assert after['step'] == before['step'] and all(torch.equal(v, after['model'][k]) for k, v in before['model'].items())


def write_images(root, n_per_class):
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n_per_class if split == 'train' else 4):
                img = np.random.default_rng([i, ord(c)]).integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f'{i}.png')


def test_a_data_set_of_another_size_is_refused_and_the_override_is_logged(tmp_path):
    write_images(tmp_path / 'data', 8)
    args = TINY + [f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--max_iters=1']
    T.main(args)
    write_images(tmp_path / 'data', 12)  # 8 more training images: another steps-per-epoch, another data order
    p = run(args + ['--init_from=resume', '--max_iters=1'], check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert p.stderr.strip().startswith('error: the training set has 24 images') and '16' in p.stderr, p.stderr
    # the explicit override goes on, and log.jsonl records what it changed
    T.main(args + ['--init_from=resume', '--max_iters=2', '--resume_override=data_dir,max_iters'])
    records = [r for r in read_log(tmp_path / 'out') if 'resume_override' in r]
    assert records == [{'step': 1, 'resume_override': {'max_iters': [1, 2]}}]


def test_legitimate_changes_resume_and_continue_the_same_run(tmp_path):
    base = TINY + ['--max_iters=4', '--eval_interval=2', '--keep_ckpts=5']
    T.main(base + [f'--out_dir={tmp_path / "straight"}'])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    # other eval/log intervals, workers, kept checkpoints: the same arithmetic, bit for bit;
    # another micro-batch: the same images, masks and updates, the gradient summed in another order;
    # the resize on the device: the same crops, a few pixel values rounded the other way
    for name, changes in (('same', ['--eval_interval=1', '--log_interval=2', '--num_workers=1', '--keep_ckpts=0']),
                          ('micro', ['--micro_batch_size=4']),
                          ('resize', ['--crop_resize=device'])):  # PIL's pixels but for ~2e-5 of values, by 1
        os.makedirs(tmp_path / name)
        os.link(tmp_path / 'straight' / 'ckpt_2.pt', tmp_path / name / 'ckpt.pt')
        T.main(TINY + ['--max_iters=4', f'--out_dir={tmp_path / name}', '--init_from=resume'] + changes)
        resumed = torch.load(tmp_path / name / 'ckpt.pt', weights_only=True)
        assert resumed['step'] == straight['step'] == 4
        diff = torch.cat([(resumed['model'][k] - v).abs().flatten() for k, v in straight['model'].items()])
        if name == 'same':
            assert diff.max() == 0
            continue
        # Summation order moves a gradient by fp32 rounding (~1e-7 relative). Adam can turn that into a
        # sign flip of an element whose gradient is ~0: at most 2 lr per step; Muon's update moves by
        # its Newton-Schulz rounding (bf16 at worst: 2^-8 of the step). So: a bound on every element,
        # and nearly all of them as close as float rounding
        c = SimpleNamespace(**{**T.CONFIG, **straight['config']})
        lr = [T.lr_factor(s, *T.run_length(c, straight['train_images']), c.schedule, c.cooldown_frac, c.warmup_start)
              for s in (2, 3)]
        assert diff.max() <= 2 * c.lr * sum(lr)
        assert (diff > 1e-5).double().mean() < 0.01


def ckpt_of(step, **config):
    c = {**T.CONFIG, 'data_dir': 'synthetic', 'epochs': 4, 'warmup_epochs': 1, 'batch_size': 16, **config}
    return {'config': c, 'step': step, 'train_images': 256}, SimpleNamespace(**c)


@pytest.mark.parametrize('schedule,epochs,step,allowed', [
    ('wsd', 3, 20, True),  # 64 -> 48 steps: the cooldown now starts at step 38, after the 20 done
    ('rsqrt', 3, 20, True),
    ('wsd', 3, 45, False),  # the new cooldown would have started before step 45
    ('cosine', 3, 20, False),  # cosine's every lr depends on the run's length
    ('wsd', 5, 20, True),  # a longer wsd run: its first 20 steps are the same
])
def test_a_wsd_or_rsqrt_run_may_be_shortened_for_a_cooldown(schedule, epochs, step, allowed):
    ckpt, c = ckpt_of(step, schedule=schedule)
    c.epochs = epochs
    if allowed:
        assert T.check_resume(c, ckpt, 256) == {}
    else:
        with pytest.raises(SystemExit, match=f"--epochs={epochs} .*changes the lr of the {step} steps"):
            T.check_resume(c, ckpt, 256)


def test_free_keys_are_free_and_an_override_must_name_a_key():
    ckpt, c = ckpt_of(10)
    for key, value in (('micro_batch_size', 4), ('compile', False), ('num_workers', 0), ('eval_interval', 7),
                       ('log_interval', 3), ('data_dir', '/elsewhere')):
        setattr(c, key, value)
    assert T.check_resume(c, ckpt, 256) == {}
    c.resume_override = 'no_such_key'
    with pytest.raises(SystemExit, match="unknown key 'no_such_key'"):
        T.check_resume(c, ckpt, 256)
