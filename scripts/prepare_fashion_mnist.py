"""Fashion-MNIST (Debian's dataset-fashion-mnist) as an ImageFolder of lossless PNGs.

    apt-get install dataset-fashion-mnist
    python scripts/prepare_fashion_mnist.py data/fashion_mnist
    python train_mae.py config/fmnist.py          # reads data/fashion_mnist/{train,val}

The package's idx files (60,000 train and 10,000 test 28x28 grey images, 10 classes)
become DST/train/<k>_<name>/<i>.png and DST/val/... (the test split is the val split):
each image padded with 2 black pixels a side to 32x32 (Fashion-MNIST's background is
black, so padding adds no edge) and saved as an 8-bit grey PNG, which the loader reads
as RGB with three equal channels. Pixels are kept exactly: the script reads every PNG
back and compares it with the idx bytes. Class folders are prefixed with the label so
that their sorted order is the data set's label order.

The copy is written under DST.partial and renamed to DST when whole and checked: a DST
that exists is finished; a DST.partial that exists is a half-written copy from an
interrupted run, which the script names and refuses to touch (delete it, run again).
"""
import gzip
import multiprocessing
import os
import struct
import sys

import numpy as np
from PIL import Image

SRC = '/usr/share/datasets/fashion-mnist'  # where the Debian package puts the idx files
CLASSES = ('tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
SPLITS = {'train': ('train', 60000), 'val': ('t10k', 10000)}  # our split: (idx file prefix, image count)
PAD = 2  # px a side: 28 -> 32, a size patch 4 and 8 divide
USAGE = "usage: python scripts/prepare_fashion_mnist.py DST [--src=/usr/share/datasets/fashion-mnist] [--workers=N]"


def read_idx(path, ndim):
    """An idx file (gzip or plain) as a uint8 array of `ndim` dimensions, its header checked."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an idx header")
    zero, dtype, dims = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise ValueError(f"{path}: not an idx file of {ndim}-D uint8 (header {data[:4].hex()})")
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise ValueError(f"{path}: {body.size} values, the header says {shape}")
    return body.reshape(shape)


def load_split(src, prefix, count):
    """(images [count, 28, 28], labels [count]) of one idx pair, counts and labels checked."""
    def find(name):
        for path in (os.path.join(src, name + '.gz'), os.path.join(src, name)):
            if os.path.exists(path):
                return path
        raise FileNotFoundError(name)
    images = read_idx(find(f'{prefix}-images-idx3-ubyte'), 3)
    labels = read_idx(find(f'{prefix}-labels-idx1-ubyte'), 1)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"{src}/{prefix}: images {images.shape}, labels {labels.shape}; expected {count} of 28x28")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{src}/{prefix}: label {labels.max()} is not one of the {len(CLASSES)} classes")
    return images, labels


def image_path(root, split, label, i):
    return os.path.join(root, split, f'{label}_{CLASSES[label]}', f'{i:05d}.png')


def write_chunk(job):
    """Write images[i] for i in the chunk as padded PNGs, then read each back and compare."""
    root, split, start, images, labels = job
    for k, (img, label) in enumerate(zip(images, labels)):
        path = image_path(root, split, int(label), start + k)
        padded = np.pad(img, PAD)
        Image.fromarray(padded, mode='L').save(path, optimize=False)
        with Image.open(path) as back:
            if back.mode != 'L' or not np.array_equal(np.asarray(back), padded):
                raise RuntimeError(f"{path}: read back differs from the idx pixels")
    return len(images)


def prepare(src, dst, workers):
    dst = dst.rstrip('/')
    partial = dst + '.partial'
    if os.path.exists(dst):
        sys.exit(f"error: {dst} exists already (a finished copy): delete it to write it again")
    if os.path.exists(partial):
        sys.exit(f"error: {partial} is a half-written copy from an interrupted run: delete it, then run again")
    try:
        splits = {split: load_split(src, prefix, count) for split, (prefix, count) in SPLITS.items()}
    except FileNotFoundError as e:
        sys.exit(f"error: no Fashion-MNIST file {e} in {src}: install it with `apt-get install dataset-fashion-mnist` "
                 f"or pass --src=FOLDER")
    except ValueError as e:
        sys.exit(f"error: {e}")
    jobs = []
    for split, (images, labels) in splits.items():
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(partial, split, f'{label}_{name}'))
        jobs += [(partial, split, i, images[i:i + 1000], labels[i:i + 1000]) for i in range(0, len(images), 1000)]
    with multiprocessing.Pool(workers) as pool:
        written = sum(pool.imap_unordered(write_chunk, jobs))
    for split, (images, labels) in splits.items():  # every class folder holds exactly its label's images
        for label, name in enumerate(CLASSES):
            found = len(os.listdir(os.path.join(partial, split, f'{label}_{name}')))
            if found != int((labels == label).sum()):
                sys.exit(f"error: {partial}/{split}/{label}_{name} holds {found} images, "
                         f"the labels say {int((labels == label).sum())}")
    os.rename(partial, dst)
    counts = ', '.join(f"{split} {len(labels)}" for split, (_, labels) in splits.items())
    print(f"wrote {written} images to {dst} ({counts}; 10 classes, 32x32 grey PNG)")


def main(argv):
    options = dict(src=SRC, workers=str(os.cpu_count() or 1))
    positional = []
    for arg in argv:
        key, _, value = arg[2:].partition('=') if arg.startswith('--') else ('', '', arg)
        if not key:
            positional.append(value)
        elif key in options and value:
            options[key] = value
        else:
            sys.exit(f"error: unknown option {arg}\n{USAGE}")
    if len(positional) != 1 or not options['workers'].isdigit() or int(options['workers']) < 1:
        sys.exit(USAGE)
    prepare(options['src'], positional[0], int(options['workers']))


if __name__ == '__main__':
    main(sys.argv[1:])
