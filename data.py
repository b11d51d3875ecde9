"""The data pipeline's machinery, out of train_mae.py's way. train_mae.py keeps the
augmentation a reader looks for (MAEDataset: the crop, the flip, the mask noise); this
file reads the images, decodes only what a crop needs, batches in a fixed order and,
on a GPU, resizes the crops there:

- sources: an ImageFolder, or its packed copy (shards of re-encoded JPEGs, written by
  scripts/prepare_data.py with write_shard and read by PackedImages);
- decode_crop: a JPEG decoded at the smallest DCT scale that keeps the crop's pixels,
  and only the box plus bicubic's reach around it; resize_crop: PIL's resize and flip
  of it, or, with the resize on the device, the numbers resized_crops needs;
- batches: TrainBatches (the order of a run, for any world size and resume point),
  collate, the val batches;
- to_device: bytes to normalised floats on the device, with the crops resized there by
  PIL's own bicubic weights (crop_resize='device').

Each fast path is tested against the slow one it replaces: a full decode and PIL's
resize of the box (tests/test_references.py), PIL's resize on the host (tests/test_prepare.py).
"""
import functools
import io
import json
import math
import os
import signal
import sys

import numpy as np
import torch
from PIL import Image

import harness
from harness import ConfigError

# -----------------------------------------------------------------------------
# sources: ImageFolder and its packed copy; open(i) -> (PIL image, not yet decoded, label)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for a bad file
PACKED_INDEX = 'index.json'  # a data_dir with it is a finished scripts/prepare_data.py copy (written last)
PACKED_PROGRESS = 'prepare.json'  # ... and with only this, one still being written (written first)
PACKED_FORMAT = 'nanomae-packed/1'


class ImageFolder:
    """root/<class>/<image> files; labels are the sorted class folder names."""

    def __init__(self, root, classes=None):
        if not os.path.isdir(root):
            raise ConfigError(f"data folder not found: {root}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not found:
            raise ConfigError(f"{root} has no class folders: expected {root}/<class>/<image> (labels are folder names)")
        self.classes = classes or found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ConfigError(f"{root} has class folders that train/ lacks: {unknown[:3]}")
        self.samples = []  # (path, label)
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue  # a val split may lack a class
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise ConfigError(f"class folder {folder} has no images ({' '.join(IMG_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), label) for f in files]

    def __len__(self):
        return len(self.samples)

    def name(self, i):  # for warnings
        return self.samples[i][0]

    def open(self, i):  # lazily: PIL decodes on first use, after draft()
        path, label = self.samples[i]
        return Image.open(path), label


class PackedImages:
    """One split of scripts/prepare_data.py's copy of an ImageFolder: every image a
    JPEG with its shorter side resized (to 256 px by default), the bytes concatenated
    in shard files <split>_00000.bin, ..., and <split>.npy: a row (shard, offset,
    length, label) per image. The same interface as ImageFolder. Each read opens its
    shard anew (tens of us, next to a ~1 ms decode): no file handle for the
    DataLoader's forked workers to share."""

    def __init__(self, root, split):
        with open(os.path.join(root, PACKED_INDEX)) as f:
            index = json.load(f)
        if index.get('format') != PACKED_FORMAT:
            raise ConfigError(f"{root}/{PACKED_INDEX}: format {index.get('format')!r}, this code reads {PACKED_FORMAT!r}")
        self.root, self.split, self.classes = root, split, index['classes']
        self.rows = np.load(os.path.join(root, f'{split}.npy'), allow_pickle=False)  # [n, 4] int64

    def __len__(self):
        return len(self.rows)

    def name(self, i):
        return f"{self.root} {self.split} image {i}"

    def open(self, i):
        shard, offset, length, label = self.rows[i].tolist()
        with open(self.shard_path(self.root, self.split, shard), 'rb') as f:
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(length))), label

    @staticmethod
    def shard_path(root, split, k):
        return os.path.join(root, f'{split}_{k:05d}.bin')

def open_sources(root):
    """(train, val) sources of a data_dir: its packed copy, or the ImageFolder (labels: train's classes)."""
    if os.path.exists(os.path.join(root, PACKED_INDEX)):
        return [PackedImages(root, split) for split in ('train', 'val')]
    if os.path.exists(os.path.join(root, PACKED_PROGRESS)):
        raise ConfigError(f"{root} is an unfinished packed copy (no {PACKED_INDEX}): "
                          f"run scripts/prepare_data.py again to finish it")
    train = ImageFolder(os.path.join(root, 'train'))
    return [train, ImageFolder(os.path.join(root, 'val'), train.classes)]


def shard_rows_path(root, split, k):
    """A shard's rows (offset, length, label) while a copy is written: the shard's done mark."""
    return os.path.join(root, f'{split}_{k:05d}.npy')


def write_shard(root, split, k, items):
    """Shard k of a packed split: the (JPEG bytes, label) items (an iterable: read as the
    .bin is written) concatenated into its .bin, then their rows into its .npy (b'': an
    unreadable image, length 0, left out of the index). Both written atomically."""
    rows = []

    def write(f):
        for blob, label in items:
            rows.append((f.tell(), len(blob), label))
            f.write(blob)
    harness.write_atomic(PackedImages.shard_path(root, split, k), write)
    harness.write_atomic(shard_rows_path(root, split, k), lambda f: np.save(f, np.array(rows, np.int64).reshape(-1, 3)))


def to_rgb(img):
    """Any PIL image (grayscale, 16-bit, CMYK, palette, alpha) as 8-bit RGB."""
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L'):  # 16-bit: keep the top 8 bits (convert() would clip)
        img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
    elif img.mode == 'P':
        img = img.convert('RGBA')
    return img.convert('RGB')

# -----------------------------------------------------------------------------
# decoding only what a crop reads

def decode_crop(img, crop, size):
    """Decode of img (PIL, not yet decoded) what a bicubic resize of the box
    crop = (x0, y0, w, h) to size x size reads: a JPEG at 1/2, 1/4 or 1/8 scale while
    the crop keeps >= size pixels, then only the box and bicubic's reach around it (2 px,
    widened when shrinking). Returns (that part as RGB, the box (x0, y0, x1, y1) in it,
    float32 as PIL computes it). PIL's resize of the box in the part equals its resize
    of the box in the whole image (tested)."""
    x0, y0, w, h = crop
    W, H = img.size
    if img.format == 'JPEG':
        img.draft('RGB', (math.ceil(W * size / w), math.ceil(H * size / h)))
    sx, sy = img.size[0] / W, img.size[1] / H
    box = np.float32([x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy])  # PIL takes a box as C floats
    reach = 2 * np.maximum(1, (box[2:] - box[:2]) / size) + 1
    part = [*np.maximum(0, np.floor(box[:2] - reach)), *np.minimum(img.size, np.ceil(box[2:] + reach))]
    img = img.crop([int(v) for v in part])  # decodes
    img = img if img.mode == 'RGB' else to_rgb(img)
    return img, box - np.float32(part[:2] * 2)  # exact: a float32 less a whole number of pixels


def resize_box(img, box, size):
    """PIL's bicubic resize of box (x0, y0, x1, y1) of img to size x size, as two explicit
    passes, horizontal first, as Pillow <= 12 always did (13 picks an order per image, and
    the order matters where a first pass clips) and as resized_crops does on the device."""
    x0, y0, x1, y1 = box.tolist()
    img = img.resize((size, img.height), Image.BICUBIC, box=(x0, 0, x1, img.height))
    return img.resize((size, size), Image.BICUBIC, box=(0, y0, size, y1))


def resize_crop(img, box, size, flip, on_device):
    """(the crop, what is left to do on the device [7]): here, PIL's resize of the box and the
    flip, leaving nothing ([0, 0, S, S, S, S, 0]: the whole image, unflipped); on_device, the
    part as decoded with the box's x0, y0, w, h in it, its w and h and the flip, for resized_crops."""
    if on_device:
        crop = [*box[:2], *(box[2:] - box[:2]), *img.size, flip]  # spans in float32, as PIL computes them
        return img, torch.tensor(crop, dtype=torch.float64)
    img = resize_box(img, box, size)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img, torch.tensor([0, 0, size, size, size, size, 0], dtype=torch.float64)


def read_skipping(source, i, read):
    """(read(j), skipped) for the first j from i on whose file reads: an unreadable image costs
    one sample, not the run, and is counted. A few warnings per process, not a flood."""
    for skipped in range(min(len(source), 100)):
        j = (i + skipped) % len(source)
        try:
            return read(j), skipped
        except UNREADABLE as e:
            if _warned[0] < 3:
                print(f"warning: skipping unreadable image {source.name(j)}: {e}", file=sys.stderr)
            _warned[0] += 1
    raise RuntimeError(f"100 unreadable images in a row from index {i}: is the data set corrupt?")


_warned = [0]  # in this process (each loader worker is one)


# -----------------------------------------------------------------------------
# batches

class TrainBatches:
    """Yields this rank's micro-batches as lists of (epoch, index), starting at
    optimizer step `start_step`. Each epoch is a permutation drawn from (seed,
    epoch); global batch b of it is split rank-major, then micro-batch-major,
    so step s sees the same images for any world size and any resume point.
    The last partial global batch of an epoch is dropped."""

    def __init__(self, n, batch_size, micro_batch_size, rank, world, seed, start_step, total_steps):
        self.n, self.B, self.mb, self.rank, self.world = n, batch_size, micro_batch_size, rank, world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        per_rank = self.B // self.world
        for step in range(self.start_step, self.total_steps):
            epoch, b = divmod(step, self.steps_per_epoch)
            if b == 0 or step == self.start_step:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = perm[b * self.B + self.rank * per_rank:b * self.B + (self.rank + 1) * per_rank]
            for m in range(0, per_rank, self.mb):
                yield [(epoch, int(i)) for i in mine[m:m + self.mb]]


def make_loader(dataset, batch_sampler, num_workers, pin):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=pin, persistent_workers=num_workers > 0,
                                       worker_init_fn=leave_signals_to_the_main_process if num_workers else None)


def leave_signals_to_the_main_process(worker_id):
    """A scheduler's SIGTERM (or a Ctrl-C) reaches the whole process group, the workers
    too: a worker that died of it would crash the run before it saves. The workers ignore
    them; the main process saves, exits, and shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(samples):
    """Samples -> one Sample of batched fields; images of different sizes (the parts
    a device resize reads) are zero-padded at the bottom and right to the largest."""
    h, w = (max(s.imgs.shape[k] for s in samples) for k in (0, 1))
    imgs = torch.zeros(len(samples), h, w, 3, dtype=torch.uint8)
    for img, s in zip(imgs, samples):
        img[:s.imgs.shape[0], :s.imgs.shape[1]] = s.imgs
    return type(samples[0])(imgs, *torch.utils.data.default_collate([s[1:] for s in samples]))


def val_batches(n, micro_batch_size, rank, world):
    """Every val image once, split across ranks, with the fixed mask of epoch 0."""
    mine = list(range(rank, n, world))
    return [[(0, i) for i in mine[k:k + micro_batch_size]] for k in range(0, len(mine), micro_batch_size)]


# -----------------------------------------------------------------------------
# to the device

def to_device(imgs, device, crop=None, size=None):
    """uint8 [N, H, W, 3] -> normalised float [N, 3, H, W] on device (the host sends bytes);
    with crop [N, 7] (loader built with resize_on_device), resized to size x size there."""
    imgs = imgs.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if crop is not None and crop.numel():
        imgs = resized_crops(imgs, crop.to(device, non_blocking=True), size)
    mean, std = imagenet_stats(device)
    return (imgs.div_(255) - mean) / std


def bicubic(t, a=-0.5):
    """The bicubic kernel PIL resizes with (a = -0.5, support 2)."""
    t = t.abs()
    inner, outer = ((a + 2) * t - (a + 3)) * t * t + 1, (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, inner, torch.where(t < 2, outer, 0))


def resize_weights(start, length, extent, pixels, out):
    """PIL's bicubic resize of the span [start, start + length) of an axis to `out`
    pixels, as matrices [N, out, pixels]: output i is centred at start + (i + 0.5) *
    scale; shrinking widens the kernel by the scale (antialiasing); the pixels at or
    past `extent` are padding and weigh nothing; each row sums to 1."""
    scale = length / out  # start, length, extent: [N, 1, 1]
    centre = start + (torch.arange(out, device=start.device)[:, None] + 0.5) * scale
    x = torch.arange(pixels, device=start.device) + 0.5
    w = bicubic((x - centre) / scale.clamp(min=1)) * (x < extent)
    w = w / w.sum(-1, keepdim=True)
    return torch.round(w * 2 ** 22) / 2 ** 22  # PIL's 8-bit path: 22-bit fixed-point weights (rounded half away from 0)


def resized_crops(imgs, crop, size):
    """Crop, resize and flip a batch on the device as the loader's PIL path does:
    per image, PIL's weights as two matrices (the flip reverses the horizontal one),
    applied as batched matmuls, horizontal pass first, each rounded to 8 bits as
    PIL's. float [N, 3, H, W] in 0..255 -> [N, 3, size, size]. PIL's pixels up to
    float32 rounding next to a half (tested: ~2e-5 of the values differ, by 1-2)."""
    x0, y0, w, h, W, H, flip = crop.double().T[..., None, None]
    horizontal = resize_weights(x0, w, W, imgs.shape[3], size)
    horizontal = torch.where(flip > 0, horizontal.flip(1), horizontal).float()
    vertical = resize_weights(y0, h, H, imgs.shape[2], size).float()
    with harness.exact_float32(imgs.device):  # no TF32, no bf16 autocast: the rounding needs ~1e-5 accuracy
        imgs = torch.matmul(imgs, horizontal.transpose(1, 2)[:, None]).add_(0.5).floor_().clamp_(0, 255)
        return torch.matmul(vertical[:, None], imgs).add_(0.5).floor_().clamp_(0, 255)


@functools.cache
def imagenet_stats(device):
    """ImageNet mean and std [1, 3, 1, 1] on device, made once: copying a new
    tensor to a GPU waits for its queue to drain, a host sync in every step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
