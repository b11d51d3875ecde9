"""The built-in data set (data_dir='synthetic'): images generated on the fly,
deterministic, no download. For the quick start and the tests; real photographs
go through data.ImageFolder. Its geometry lives here, out of the data
pipeline's way."""
import numpy as np
from PIL import Image


class Synthetic:
    """The built-in data set: 10 classes of shapes (disk, square, triangle,
    ring, cross, diamond, horizontal bar, vertical bar, X, checkered square) at
    random positions, sizes and colours over shaded, striped backgrounds.
    Image i of a split is a pure function of (seed, split, i)."""
    classes = ['disk', 'square', 'triangle', 'ring', 'cross', 'diamond', 'hbar', 'vbar', 'x', 'checker']

    def __init__(self, size, img_size, split, seed=0):
        self.size, self.img_size, self.split_id, self.seed = size, img_size, ['train', 'val'].index(split), seed

    def __len__(self):
        return self.size

    def open(self, i):
        img, label, _ = self.draw(i)
        return img, label

    def draw(self, i):
        """Image i, its label and its shape's pixels (a boolean [S, S] mask)."""
        rng = np.random.default_rng([self.seed, self.split_id, i])
        label = int(rng.integers(10))
        S = self.img_size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S  # coordinates in [0, 1)
        # background: a gradient between two colours, faint stripes
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        t = ((np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3)[..., None]
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        img = c0 * (1 - t) + c1 * t + 0.08 * np.sin(2 * np.pi * freq * (np.sin(angle) * xx - np.cos(angle) * yy))[..., None]
        # foreground: the class's shape in its own colour, random centre and size
        cx, cy, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.28)
        dx, dy = (xx - cx) / s, (yy - cy) / s
        r, ax, ay = np.hypot(dx, dy), np.abs(dx), np.abs(dy)
        inside = [r < 1, np.maximum(ax, ay) < 0.85, (dy < 0.7) & (dy > 2 * ax - 1.1), (r < 1) & (r > 0.6),
                  ((ax < 0.3) | (ay < 0.3)) & (np.maximum(ax, ay) < 1), ax + ay < 1.1,
                  (ax < 1.1) & (ay < 0.35), (ax < 0.35) & (ay < 1.1), (np.abs(ax - ay) < 0.25) & (r < 1.2),
                  (np.maximum(ax, ay) < 0.9) & ((np.floor(dx * 2.2) + np.floor(dy * 2.2)) % 2 == 0)][label]
        fg = 1 - c0 if rng.random() < 0.5 else rng.uniform(0, 1, 3)
        img = np.where(inside[..., None], fg, img) + rng.normal(0, 0.02, (S, S, 3))
        return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)), label, inside
