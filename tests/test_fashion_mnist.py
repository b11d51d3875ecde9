"""scripts/prepare_fashion_mnist.py on tiny idx files made here (the Debian package is not needed):
pixels kept exactly, labels and counts checked, read back through train_mae's real folder path."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import data  # noqa: E402
import prepare_fashion_mnist as P  # noqa: E402
import train_mae as T  # noqa: E402


def write_idx(path, array):
    header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / 'pkg'
    src.mkdir()
    splits = {}
    for split, (prefix, n) in {'train': ('train', 30), 'val': ('t10k', 12)}.items():
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(src / f'{prefix}-images-idx3-ubyte.gz', images)
        write_idx(src / f'{prefix}-labels-idx1-ubyte.gz', labels)
        splits[split] = images, labels
    monkeypatch.setattr(P, 'SPLITS', {'train': ('train', 30), 'val': ('t10k', 12)})
    return src, splits


def test_pixels_labels_and_counts_survive_and_train_mae_reads_them(tmp_path, tiny_package):
    src, splits = tiny_package
    dst = tmp_path / 'fm'
    P.prepare(str(src), str(dst), workers=2)
    assert not (tmp_path / 'fm.partial').exists()
    for split, (images, labels) in splits.items():
        folder = data.ImageFolder(str(dst / split))
        assert folder.classes == [f'{k}_{name}' for k, name in enumerate(P.CLASSES)]
        assert sorted(label for _, label in folder.samples) == sorted(labels.tolist())
        for i in (0, 7, len(images) - 1):  # each file is its idx image, padded with black, exactly
            img = np.asarray(Image.open(P.image_path(str(dst), split, int(labels[i]), i)))
            assert img.shape == (32, 32) and np.array_equal(img[2:30, 2:30], images[i]) and img[:2].max() == 0
    c = T.SimpleNamespace(**{**T.CONFIG, 'data_dir': str(dst), 'img_size': 32, 'patch_size': 4})
    train, val = T.build_datasets(c, num_patches=64)
    assert (len(train), len(val)) == (30, 12)
    sample = val[(0, 0)]  # the val transform: the centre 28 px (the original image) resized to 32
    assert sample.imgs.shape == (32, 32, 3) and (sample.imgs[..., 0] == sample.imgs[..., 2]).all()


def test_refusals_are_one_line_and_name_the_problem(tmp_path, tiny_package):
    src, _ = tiny_package
    with pytest.raises(SystemExit, match='apt-get install dataset-fashion-mnist'):
        P.prepare(str(tmp_path / 'nowhere'), str(tmp_path / 'a'), workers=1)
    (tmp_path / 'b.partial').mkdir()
    with pytest.raises(SystemExit, match=r'b\.partial is a half-written copy'):
        P.prepare(str(src), str(tmp_path / 'b'), workers=1)
    P.prepare(str(src), str(tmp_path / 'c'), workers=1)
    with pytest.raises(SystemExit, match='exists already'):
        P.prepare(str(src), str(tmp_path / 'c'), workers=1)
    write_idx(src / 'train-labels-idx1-ubyte.gz', np.arange(29) % 10)  # one label short
    with pytest.raises(SystemExit, match=r'labels \(29,\)'):
        P.prepare(str(src), str(tmp_path / 'd'), workers=1)
    write_idx(src / 'train-labels-idx1-ubyte.gz', np.full(30, 10))  # a label past the 10 classes
    with pytest.raises(SystemExit, match='label 10'):
        P.prepare(str(src), str(tmp_path / 'e'), workers=1)
    (src / 'train-labels-idx1-ubyte.gz').write_bytes(gzip.compress(b'\x00\x00\x0d\x01' + bytes(8)))
    with pytest.raises(SystemExit, match='not an idx file'):
        P.prepare(str(src), str(tmp_path / 'f'), workers=1)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare_fashion_mnist.py'), str(tmp_path / 'g'),
                        f'--src={tmp_path / "nowhere"}'], capture_output=True, text=True)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and 'dataset-fashion-mnist' in p.stderr
