"""
The built-in data: coloured shapes drawn with PIL, with captions such as "a small red circle on the left" or "two
blue squares on a striped background". Nothing to download, and learnable by a tiny model on a CPU in minutes; its
held-out zero-shot tasks (shape, colour, size, count) show whether a model learned.

Each image and caption is a function of (seed, split, index): the same in every process and run.
"""

import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 235),
           "yellow": (245, 225, 30), "purple": (150, 50, 200), "orange": (250, 135, 20)}
SIZES = {"small": 0.15, "large": 0.25}  # object radius as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
POSITION_WORDS = {"center": ["in the center", "in the middle"], "left": ["on the left"], "right": ["on the right"],
                  "top": ["at the top"], "bottom": ["at the bottom"]}
COUNTS = ["one", "two", "three"]
BACKGROUNDS = {"black": 20, "gray": 128, "white": 235, "striped": None, "checkered": None, "dotted": None}
TASKS = {  # zero-shot tasks on held-out images: (classnames, templates)
    "shape": (SHAPES, ["a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}."]),
    "colour": (list(COLOURS), ["a {} shape.", "a {} object.", "a picture of something {}."]),
    "size": (list(SIZES), ["a {} shape.", "a picture of a {} object."]),
    "count": (COUNTS, ["{} shapes.", "a picture of {} objects."]),
}


def sample_scene(rng, **fixed):
    """Random attributes; `fixed` pins some (the zero-shot tasks pin the label's attribute)."""
    s = dict(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), background=rng.choice(list(BACKGROUNDS)),
             count=rng.choices(COUNTS, weights=(2, 1, 1))[0]) | fixed  # half are single objects: most informative
    # several objects are drawn small and in a row, so size and position describe single objects only
    single = s["count"] == "one"
    s.setdefault("size", rng.choice(list(SIZES)) if single else "small")
    s.setdefault("position", rng.choice(list(POSITIONS)) if single else None)
    return s


@lru_cache(maxsize=8)
def _grid(n):
    return np.mgrid[:n, :n]  # (2, n, n) pixel coordinates for the background textures


def _outline(shape, cx, cy, r):
    """Polygon vertices (or the bounding box for a circle) of a shape of radius r centred at (cx, cy)."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        h = 0.85 * r  # a bit smaller so its area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        a, w = r, 0.33 * r
        return [(cx + x, cy + y) for x, y in [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                                              (-w, w), (-a, w), (-a, -w), (-w, -w)]]
    n, radii = {"triangle": (3, [r]), "hexagon": (6, [r]), "star": (10, [r, 0.42 * r])}[shape]  # star: in and out
    polar = [(2 * np.pi * k / n, radii[k % len(radii)]) for k in range(n)]  # (angle, radius), clockwise from the top
    return [(cx + rk * np.sin(a), cy - rk * np.cos(a)) for a, rk in polar]


def render_scene(s, rng, image_size=64):
    n = image_size
    grey = BACKGROUNDS[s["background"]]
    if grey is not None:
        img = Image.new("RGB", (n, n), (grey + rng.randint(-15, 15),) * 3)
    else:  # two-grey textures, so texture is not confused with an object's colour
        y, x = _grid(n)
        p = rng.randint(n // 10, n // 5)  # texture period in pixels
        if s["background"] == "striped":
            mask = ((x if rng.random() < 0.5 else y) // p) % 2 == 0
        elif s["background"] == "checkered":
            mask = (x // p + y // p) % 2 == 0
        else:  # dotted
            mask = (x % p - p // 2) ** 2 + (y % p - p // 2) ** 2 <= (p / 4) ** 2
        grey = np.where(mask, rng.randint(40, 90), rng.randint(150, 210)).astype(np.uint8)
        img = Image.fromarray(grey).convert("RGB")
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[s["colour"]])
    r = SIZES[s["size"]] * n * rng.uniform(0.9, 1.1)
    k = COUNTS.index(s["count"]) + 1
    if k == 1:
        cx, cy = POSITIONS[s["position"]]
        centres = [(cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04))]
    else:  # a row or a column of evenly spaced objects
        along = [0.28, 0.72] if k == 2 else [0.18, 0.5, 0.82]
        across = rng.uniform(0.3, 0.7)
        centres = [(t, across) for t in along] if rng.random() < 0.5 else [(across, t) for t in along]
    draw = ImageDraw.Draw(img)
    for cx, cy in centres:
        outline = _outline(s["shape"], cx * n, cy * n, r)
        (draw.ellipse if s["shape"] == "circle" else draw.polygon)(outline, fill=colour)
    return img


def caption_scene(s, rng):
    """A caption with varied phrasing; size, colour, position and background are sometimes left out."""
    k = COUNTS.index(s["count"]) + 1
    words = [word for word, p in ((s["size"], 0.5), (s["colour"], 0.8)) if rng.random() < p]
    if k == 1:
        noun = " ".join(words + [s["shape"]])
        noun = ("one " if rng.random() < 0.2 else "an " if noun[0] in "aeiou" else "a ") + noun
    else:
        noun = " ".join([s["count"]] + words + [s["shape"] + ("es" if s["shape"] == "cross" else "s")])
    there = "there is " if k == 1 else "there are "
    text = rng.choice(["", "", "a picture of ", "an image of ", "a drawing of ", there]) + noun
    if s["position"] and rng.random() < 0.6:
        text += " " + rng.choice(POSITION_WORDS[s["position"]])
    if rng.random() < 0.3:
        text += f" on a {s['background']} background"
    return text + ("." if rng.random() < 0.5 else "")


class SyntheticCaptions(Dataset):
    """Coloured shapes drawn with PIL: (image, caption), the same for the same (seed, split, index)."""

    def __init__(self, split="train", size=None, image_size=64, seed=0):
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = size or (100_000 if split == "train" else 1_000)

    def __len__(self):
        return self.size

    def scene(self, index):  # string seeds are hashed with sha512: the same in every process and run
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        return sample_scene(rng), rng

    def __getitem__(self, index):
        s, rng = self.scene(index)
        return render_scene(s, rng, self.image_size), caption_scene(s, rng)


class SyntheticTask(Dataset):
    """(image, label) for a zero-shot task of TASKS on held-out images, classes balanced."""

    def __init__(self, task, size=600, image_size=64, seed=0, split="val"):
        self.classnames, self.templates = TASKS[task]
        self.task, self.size, self.image_size, self.seed, self.split = task, size, image_size, seed, split

    def __len__(self):
        return self.size

    def scene(self, index):
        rng = random.Random(f"{self.seed}/{self.split}/{self.task}/{index}")
        fixed = {"count": "one"} if self.task != "count" else {}  # one object, so counts cannot confuse the rest
        return sample_scene(rng, **fixed, **{self.task: self.classnames[index % len(self.classnames)]}), rng

    def __getitem__(self, index):
        s, rng = self.scene(index)
        return render_scene(s, rng, self.image_size), index % len(self.classnames)
