"""scripts/prepare_data.py and the packed copy it writes: the folder's labels and images,
exact resumes of training on it, interrupted and refused preparations, bad images."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train_mae as T
from conftest import ROOT, TINY

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import prepare_data  # noqa: E402

SIDE = 48  # the tests' short_side: the 80x60 images shrink, the 40x30 one keeps its size
FLAGS = ['--workers=1', f'--short_side={SIDE}', '--shard_size=5']


def smooth_image(rng, W, H):
    """Blobs, not pixel noise: a JPEG round trip keeps them close, so images can be compared."""
    low = rng.integers(0, 255, (H // 20, W // 20, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((W, H), Image.BICUBIC)


@pytest.fixture
def source(tmp_path):
    """An ImageNet-layout folder: 3 classes x 8 train (landscape, one portrait, one small) + 2 val JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 2)):
        for c in ('cat', 'dog', 'eel'):
            os.makedirs(tmp_path / 'src' / split / c)
            for i in range(n):
                W, H = (60, 80) if i == 1 else (40, 30) if i == 2 else (80, 60)
                smooth_image(rng, W, H).save(tmp_path / 'src' / split / c / f'{i}.JPEG', quality=95)
    return tmp_path / 'src'


def prepare(src, dst, *flags):
    prepare_data.main([str(src), str(dst), *FLAGS, *flags])


def one_line_error(call):
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def test_the_packed_copy_has_the_folders_classes_labels_and_images(source, tmp_path):
    prepare(source, tmp_path / 'packed')
    classes = data.ImageFolder(source / 'train').classes
    for split in ('train', 'val'):
        folder, packed = data.ImageFolder(source / split, classes), data.PackedImages(str(tmp_path / 'packed'), split)
        assert packed.classes == folder.classes == ['cat', 'dog', 'eel']
        assert packed.rows[:, 3].tolist() == [label for _, label in folder.samples]
        for i in range(len(folder)):
            img, label = packed.open(i)
            original = folder.open(i)[0].convert('RGB')
            W, H = original.size
            scale = min(1, SIDE / min(W, H))  # shorter side to SIDE, never upsampled
            expected = np.asarray(original.resize((round(W * scale), round(H * scale)), Image.BICUBIC), float)
            assert img.format == 'JPEG' and img.mode == 'RGB' and label == folder.samples[i][1]
            assert np.asarray(img).shape == expected.shape
            assert np.abs(np.asarray(img, float) - expected).mean() < 3  # JPEG at quality 90: ~1.5 (other images: ~70)


@pytest.mark.parametrize('crop_resize', ['loader', 'device'])
def test_training_on_the_packed_copy_resumes_exactly(source, tmp_path, crop_resize):
    prepare(source, tmp_path / 'packed')
    args = TINY + [f'--data_dir={tmp_path / "packed"}', '--batch_size=8', '--micro_batch_size=4', '--max_iters=4',
                   '--eval_interval=2', f'--crop_resize={crop_resize}']
    # the straight run reads the shards in a forked DataLoader worker, the resumed one in the main process
    T.main(args + [f'--out_dir={tmp_path / "straight"}', '--keep_ckpts=5', '--num_workers=1'])
    os.makedirs(tmp_path / 'resumed')
    os.link(tmp_path / 'straight' / 'ckpt_2.pt', tmp_path / 'resumed' / 'ckpt.pt')
    T.main(args + [f'--out_dir={tmp_path / "resumed"}', '--init_from=resume', '--num_workers=0'])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    resumed = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)
    assert resumed['step'] == straight['step'] == 4 and straight['train_images'] == 24
    for k, v in straight['model'].items():
        assert torch.equal(v, resumed['model'][k]), k


def test_crops_resized_on_the_device_have_the_loaders_pixels(source, tmp_path):
    """The device path (the worker sends the part of the image a crop reads; batched
    matmuls resize it) against PIL in the worker, crop for crop: from the folder and
    the packed copy, shrinking (JPEG draft decoding at img_size 16) and enlarging, flipped
    and not. Only PIL's fixed-point weights differ: a few values, by 1."""
    prepare(source, tmp_path / 'packed')
    for root in (source, tmp_path / 'packed'):
        for size in (16, 40):
            c = T.SimpleNamespace(**{**T.CONFIG, 'data_dir': str(root), 'img_size': size})
            (pil, _), (device, _) = (T.build_datasets(c, 4, on) for on in (False, True))
            keys = [(epoch, i) for epoch in range(4) for i in range(len(pil))]
            want = data.collate([pil[k] for k in keys])
            got = data.collate([device[k] for k in keys])
            done = torch.tensor([0, 0, size, size, size, size, 0], dtype=torch.float64)  # PIL did it all
            assert (want.crop == done).all() and got.crop.shape == (len(keys), 7)  # one shape in both modes
            assert 0 < got.crop[:, 6].sum() < len(keys)  # flipped and not
            assert torch.equal(want.noise, got.noise) and torch.equal(want.labels, got.labels)
            resized = data.to_device(got.imgs, 'cpu', got.crop, size)
            diff = (resized - data.to_device(want.imgs, 'cpu')) * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
            assert diff.abs().max() < 1 + 1e-3, (root, size)
            assert (diff.abs() > 0.5).float().mean() < 1e-3, (root, size)


def test_an_interrupted_prepare_resumes_and_completes(source, tmp_path):
    dst = tmp_path / 'packed'
    stall = source / 'train' / 'eel' / 'zz.JPEG'  # sorts last: the fifth and last train shard
    os.mkfifo(stall)  # opening it blocks until a writer comes: the job stalls there, the shards before it done
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'scripts', 'prepare_data.py'), str(source), str(dst),
                          *FLAGS], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (os.path.isdir(dst) and any(f.startswith('train_00004') for f in os.listdir(dst))):
            assert p.poll() is None and time.time() < deadline, p.communicate()  # 4 shards done, the fifth begun
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the script and its pool's worker, without warning
        p.wait()
    assert os.path.exists(dst / 'train_00003.npy') and os.path.exists(dst / 'train_00004.bin.tmp')
    for unfinished in ('train_00004.bin', 'train_00004.npy', 'train.npy', 'index.json'):
        assert not os.path.exists(dst / unfinished), unfinished
    msg = one_line_error(lambda: T.main(TINY + [f'--data_dir={dst}', f'--out_dir={tmp_path / "out"}']))
    assert 'unfinished' in msg and str(dst) in msg  # half-written: refused, never read as a whole copy

    finished = {f: os.stat(dst / f) for f in os.listdir(dst) if f.endswith(('.bin', '.npy'))}
    os.remove(stall)
    smooth_image(np.random.default_rng(1), 80, 60).save(stall, quality=95)
    prepare(source, dst)  # the same command: finishes the copy
    for f, st in finished.items():  # the shards done before the kill were not packed again
        assert os.stat(dst / f).st_ino == st.st_ino and os.stat(dst / f).st_mtime_ns == st.st_mtime_ns, f
    prepare(source, tmp_path / 'straight')  # the same bytes as a preparation that was never interrupted
    files = sorted(os.listdir(tmp_path / 'straight'))
    assert sorted(os.listdir(dst)) == files and 'train_00004.bin' in files and 'index.json' in files
    for f in files:
        assert (dst / f).read_bytes() == (tmp_path / 'straight' / f).read_bytes(), f
    assert len(data.PackedImages(str(dst), 'train')) == 25


def test_a_finished_copy_is_never_overwritten_and_a_resume_keeps_its_settings(source, tmp_path):
    dst = tmp_path / 'packed'
    prepare(source, dst)
    before = {f: (dst / f).read_bytes() for f in os.listdir(dst)}
    msg = one_line_error(lambda: prepare(source, dst))
    assert str(dst) in msg and 'finished packed copy' in msg
    assert {f: (dst / f).read_bytes() for f in os.listdir(dst)} == before

    os.remove(dst / 'index.json')  # as if stopped before its end: only the same settings may finish it
    msg = one_line_error(lambda: prepare(source, dst, '--short_side=32'))
    assert msg.startswith('error: --short_side=32 differs from the 48') and str(dst) in msg
    (source / 'train' / 'cat' / '0.JPEG').rename(source / 'train' / 'cat' / '9.JPEG')  # another file list
    assert 'another source' in one_line_error(lambda: prepare(source, dst))

    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    msg = one_line_error(lambda: prepare(source, tmp_path / 'other'))
    assert 'not empty' in msg and str(tmp_path / 'other') in msg


def test_unreadable_source_images_are_reported_counted_and_left_out(source, tmp_path, capsys):
    good = (source / 'train' / 'dog' / '0.JPEG').read_bytes()
    (source / 'train' / 'dog' / '3.JPEG').write_bytes(good[:len(good) // 2])  # truncated
    (source / 'train' / 'dog' / 'readme.JPEG').write_text('this is not a JPEG')
    prepare(source, tmp_path / 'packed')
    err = capsys.readouterr().err
    assert sum(line.startswith('warning: skipping unreadable image') for line in err.splitlines()) == 2
    with open(tmp_path / 'packed' / 'index.json') as f:
        index = json.load(f)
    assert index['splits']['train']['skipped'] == 2 and index['splits']['train']['images'] == 23  # 25 files
    assert index['skipped_files'] == [os.path.join('train', 'dog', '3.JPEG'), os.path.join('train', 'dog', 'readme.JPEG')]
    bad = {str(source / 'train' / 'dog' / '3.JPEG'), str(source / 'train' / 'dog' / 'readme.JPEG')}
    kept = [label for path, label in data.ImageFolder(source / 'train').samples if path not in bad]
    assert data.PackedImages(str(tmp_path / 'packed'), 'train').rows[:, 3].tolist() == kept


@pytest.mark.parametrize('script', ['train_mae', 'probe'])
def test_a_half_written_copy_is_refused_in_one_line(source, tmp_path, script):
    prepare(source, tmp_path / 'packed')
    os.remove(tmp_path / 'packed' / 'index.json')  # what a preparation stopped before its end leaves
    main = T.main if script == 'train_mae' else __import__('probe').main
    argv = [f'--data_dir={tmp_path / "packed"}', f'--out_dir={tmp_path / "out"}', '--compile=False', '--num_workers=0']
    msg = one_line_error(lambda: main((TINY if script == 'train_mae' else ['--ckpt=']) + argv))
    assert msg == (f"error: {tmp_path / 'packed'} is an unfinished packed copy (no index.json): "
                   "run scripts/prepare_data.py again to finish it")
