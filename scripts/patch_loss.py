"""Where a checkpoint's val loss sits on the built-in data: the masked-patch loss
(the same masks and per-patch normalised target as train_mae.evaluate) split into
patches that hold any pixel of the shape and patches of striped background only.

    python scripts/patch_loss.py out/study/muon_lr0.032_len1280_seed0/ckpt.pt [more ckpts]
"""
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import harness  # noqa: E402
import train_mae  # noqa: E402
from synthetic import Synthetic  # noqa: E402


def shape_patches(c, source, i):
    """[L] bool: which patches of val image i (its centre crop, as MAEDataset takes it) hold shape pixels."""
    S, p = c.img_size, c.patch_size
    w = S * 224 / 256
    o = (S - w) / 2
    inside = Image.fromarray(source.draw(i)[2].astype(np.uint8) * 255)
    inside = np.array(inside.resize((S, S), Image.BOX, box=(o, o, o + w, o + w))) > 0
    return inside.reshape(S // p, p, S // p, p).any(axis=(1, 3)).reshape(-1)


@torch.no_grad()
def split_loss(path):
    ckpt = harness.load_checkpoint(path, train_mae.CONFIG)
    c = SimpleNamespace(**ckpt['config'])
    if c.data_dir != 'synthetic':
        sys.exit(f"error: {path} was trained on {c.data_dir}, not the built-in data: no shapes to split by")
    model = train_mae.build_model(c).eval()
    model.load_state_dict(ckpt['model'])
    _, val = train_mae.build_datasets(c, num_patches=(c.img_size // c.patch_size) ** 2)
    source = Synthetic(c.synthetic_size[1], c.img_size, 'val', c.seed)
    total = {True: [0.0, 0], False: [0.0, 0]}  # holds shape -> [summed loss, patches]
    for start in range(0, len(val), 128):
        items = [val[(0, i)] for i in range(start, min(start + 128, len(val)))]
        imgs = data.to_device(torch.stack([s.imgs for s in items]), 'cpu')
        _, pred, ids = model(imgs, torch.stack([s.noise for s in items]))
        err = ((pred - model.masked_targets(imgs, ids)) ** 2).mean(-1)  # [N, masked]
        for k, patches in enumerate(ids):
            has = shape_patches(c, source, start + k)[patches.numpy()]
            for key in (True, False):
                total[key][0] += err[k][torch.from_numpy(has == key)].sum().item()
                total[key][1] += int((has == key).sum())
    n = total[True][1] + total[False][1]
    print(f"{path}: all {(total[True][0] + total[False][0]) / n:.4f}; shape patches {total[True][0] / total[True][1]:.4f} "
          f"({total[True][1] / n:.0%} of masked patches); background only {total[False][0] / total[False][1]:.4f}")


if __name__ == '__main__':
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        split_loss(path)
