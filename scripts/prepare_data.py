"""Pack an ImageFolder (ImageNet layout) into the copy the loader reads fastest: each
image decoded once, its shorter side resized to short_side, re-encoded as a JPEG.

    python scripts/prepare_data.py /data/imagenet /data/imagenet_256 --workers=32
    torchrun ... train_mae.py --data_dir=/data/imagenet_256      # probe.py reads it too

SRC/train/<class>/* and SRC/val/<class>/* become, in DST, shard files train_00000.bin,
... (shard_size JPEGs each, concatenated), train.npy and val.npy (a row per image: shard,
offset, length, label; no pickles) and index.json (classes, counts, settings). Every
image is re-encoded, even one already small (never upsampled): one code path, and every
packed image is a plain RGB JPEG. What this changes about the images the model sees is
in docs/data.md.

Interrupt it at any time: a shard is written under a temporary name and renamed when
whole, and running the same command again packs only the shards not yet there.
DST/prepare.json, written first, records the settings and the source's file list; a
rerun with others is refused. index.json is written last, after checking that every
source image was packed or skipped under its class, so train_mae.py never reads a
half-written copy. Unreadable images (truncated, not an image) are reported, counted and
left out: packed + skipped == source images, and index.json names the skipped ones.
"""
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import harness  # noqa: E402
from data import PACKED_FORMAT, PACKED_INDEX, PACKED_PROGRESS, shard_rows_path, write_shard  # noqa: E402

# -----------------------------------------------------------------------------
# config (--key=value after SRC and DST)
_names_before_config = set(globals())
workers = os.cpu_count() or 1  # processes, each packing whole shards
short_side = 256  # px: every image's shorter side is resized to this (smaller ones keep their size)
quality = 90  # JPEG quality of the re-encoded images
shard_size = 1000  # images per shard file: the unit of work, of resumption and of what an interruption loses
CONFIG = harness.settings(globals(), _names_before_config)
SETTINGS = ('short_side', 'quality', 'shard_size')  # what the packed bytes depend on: a resume must keep them
USAGE = "usage: python scripts/prepare_data.py SRC DST [--workers=N] [--short_side=256] [--quality=90] [--shard_size=1000]"


def shrink(img, side):
    """img as RGB with its shorter side resized to `side` (bicubic, as the crops are); never upsampled."""
    W, H = img.size
    scale = side / min(W, H)
    if scale >= 1:
        return data.to_rgb(img)
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    img.draft('RGB', size)  # a large JPEG decodes at 1/2-1/8 scale, still >= size
    return data.to_rgb(img).resize(size, Image.BICUBIC)


def encode(path, side, quality):
    """The packed bytes of the image at path: a baseline RGB JPEG (4:2:0, PIL's default), no metadata."""
    buf = io.BytesIO()
    with Image.open(path) as img:
        shrink(img, side).save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


def init_worker():
    """A pool worker: Ctrl-C is the main process's to handle (no traceback from each
    worker), and PIL keeps freed image memory for the next image instead of returning it
    to the OS and faulting it in afresh (~30% of the CPU time per image on a 2-core VM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.core.set_blocks_max(8)  # what the PILLOW_BLOCKS_MAX environment variable sets


def pack_shard(job):
    """Pack one shard (data.write_shard), each image encoded as it is written: returns
    (images, errors); an unreadable image is left out (length 0) and named in errors."""
    dst, split, k, samples, side, quality = job
    errors = []

    def encoded():
        for path, label in samples:
            try:
                yield encode(path, side, quality), label
            except data.UNREADABLE as e:
                errors.append(f"{path}: {e}")
                yield b'', label
    write_shard(dst, split, k, encoded())
    return len(samples), errors


def list_source(src):
    """{split: ImageFolder} of SRC/train and SRC/val (labels: train's sorted class folders)."""
    train = data.ImageFolder(os.path.join(src, 'train'))
    return dict(train=train, val=data.ImageFolder(os.path.join(src, 'val'), train.classes))


def begin(dst, manifest):
    """Start DST (write prepare.json), or check that it is an unfinished copy of the same
    source with the same settings, which this run then finishes."""
    path = os.path.join(dst, PACKED_PROGRESS)
    if os.path.exists(os.path.join(dst, PACKED_INDEX)):
        raise SystemExit(f"error: {dst} is a finished packed copy already ({PACKED_INDEX}): remove it to prepare "
                         f"it again, or choose another DST")
    if not os.path.exists(path):
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise SystemExit(f"error: {dst} is not empty and not an unfinished packed copy: choose a new or empty DST")
        try:
            os.makedirs(dst, exist_ok=True)
            harness.write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        except OSError as e:
            raise SystemExit(f"error: cannot write {dst}: {e}")
        return
    with open(path) as f:
        begun = json.load(f)
    for key in SETTINGS:
        if begun[key] != manifest[key]:
            raise SystemExit(f"error: --{key}={manifest[key]} differs from the {begun[key]} of the unfinished copy in "
                             f"{dst}: rerun with --{key}={begun[key]} to finish it, or remove {dst}")
    if begun['files'] != manifest['files'] or begun['format'] != manifest['format']:
        raise SystemExit(f"error: {dst} is an unfinished copy of another source ({begun['source']}, "
                         f"{sum(begun['images'].values())} images) or format: remove it, or give that source")


def finish(dst, src, sources, manifest, per_shard):
    """Check that the shards hold every source image, under its label, packed or
    skipped; write <split>.npy, then index.json, the mark of a finished copy."""
    splits, skipped_files = {}, []
    for split, source in sources.items():
        shards = math.ceil(len(source) / per_shard)
        parts = [np.load(shard_rows_path(dst, split, k), allow_pickle=False) for k in range(shards)]
        rows = np.concatenate(parts)  # [n, 3]: offset, length, label
        labels = np.array([label for _, label in source.samples], np.int64)
        if len(rows) != len(source) or not np.array_equal(rows[:, 2], labels):
            raise SystemExit(f"error: {dst}: the {split} shards hold {len(rows)} images, {src}/{split} has "
                             f"{len(source)} (or their labels differ): remove {dst} and prepare it again")
        packed = rows[:, 1] > 0
        index = np.column_stack([np.repeat(np.arange(shards), [len(p) for p in parts]), rows])[packed]
        harness.write_atomic(os.path.join(dst, f'{split}.npy'), lambda f: np.save(f, index))
        skipped_files += [os.path.relpath(source.samples[i][0], src) for i in np.flatnonzero(~packed)]
        splits[split] = dict(images=int(packed.sum()), skipped=int((~packed).sum()), shards=shards,
                             bytes=int(rows[:, 1].sum()))
    index = dict(manifest, splits=splits, skipped_files=skipped_files)
    harness.write_atomic(os.path.join(dst, PACKED_INDEX), lambda f: f.write(json.dumps(index, indent=1).encode()))
    return splits


def main(argv):
    paths = [a for a in argv if not a.startswith('--')]
    if len(paths) != 2:
        raise SystemExit(USAGE)
    src, dst = paths
    c = SimpleNamespace(**harness.configure([a for a in argv if a.startswith('--')], CONFIG))
    for key, low, high in (('workers', 1, 1024), ('short_side', 16, 8192), ('quality', 1, 100), ('shard_size', 1, 10**6)):
        if not low <= getattr(c, key) <= high:
            raise SystemExit(f"error: --{key}={getattr(c, key)}: must be in [{low}, {high}]")
    sources = list_source(src)
    listing = '\n'.join(f"{os.path.relpath(p, src)}\t{label}" for s in sources.values() for p, label in s.samples)
    manifest = dict(format=PACKED_FORMAT, source=os.path.abspath(src), classes=sources['train'].classes,
                    images={split: len(s) for split, s in sources.items()},
                    files=hashlib.sha256(listing.encode()).hexdigest(), **{k: getattr(c, k) for k in SETTINGS})
    begin(dst, manifest)

    n = c.shard_size
    jobs = [(dst, split, k, s.samples[k * n:(k + 1) * n], c.short_side, c.quality)
            for split, s in sources.items() for k in range(math.ceil(len(s) / n))
            if not os.path.exists(shard_rows_path(dst, split, k))]  # a finished shard is never redone
    total, todo = sum(map(len, sources.values())), sum(len(job[3]) for job in jobs)
    if todo < total:
        print(f"resuming {dst}: {total - todo:,} of {total:,} images packed already")
    warnings, t0 = 0, time.time()
    with multiprocessing.Pool(c.workers, init_worker) as pool, \
            tqdm(total=total, initial=total - todo, unit='img', dynamic_ncols=True) as bar:
        try:
            for images, errors in pool.imap_unordered(pack_shard, jobs):
                for e in errors[:max(0, 3 - warnings)]:  # a few lines, not a flood; index.json names them all
                    tqdm.write(f"warning: skipping unreadable image {e}", file=sys.stderr)
                warnings += len(errors)
                bar.update(images)
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted: {bar.n:,} of {total:,} images packed; the same command finishes {dst}")
        except OSError as e:  # a full disk, say: the finished shards stay
            raise SystemExit(f"error: writing {dst}: {e}; the same command resumes where it stopped")
    seconds = max(time.time() - t0, 1e-6)
    splits = finish(dst, src, sources, manifest, n)
    packed, skipped, nbytes = (sum(s[key] for s in splits.values()) for key in ('images', 'skipped', 'bytes'))
    print(f"packed {packed:,} images into {dst} ({skipped:,} unreadable, skipped), {nbytes / max(1, packed) / 1e3:.1f} "
          f"KB each; this run: {todo:,} in {seconds:.1f} s, {todo / seconds:.0f} images/s with {c.workers} workers")


if __name__ == '__main__':
    main(sys.argv[1:])
