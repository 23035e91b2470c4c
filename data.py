"""ImageNet-style data for MambaVision: folders, transforms, mixup/cutmix, loaders, a demo dataset.

Everything here is written with Pillow and torch only (no torchvision), following the recipe in
NOTES.md. Glossary:
    S          output image side (--img-size)
    crop_pct   eval resize factor: the shorter side goes to floor(S / crop_pct) before the S crop
    rng        a `random.Random` owned by one sample, so its augmentation does not depend on which
               worker process decoded it (see `EpochSampler`)
"""
import math
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A problem with the data on disk, stated in one line with what to do about it."""


# ----------------------------------------------------------------------------------------------
# Folders


def list_classes(root):
    """Sorted sub-folder names of `root` (the class names); a clear error if there are none."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist: pass --data-dir holding train/ and val/")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {root}: expected {root}/<class>/<image files>")
    return classes


def load_rgb(path):
    """Decode an image by its content (not its extension) and convert it to RGB.

    ImageNet holds CMYK and greyscale JPEGs and at least one PNG named .JPEG; all come out RGB.
    A truncated file raises OSError here (Pillow's LOAD_TRUNCATED_IMAGES stays off).
    """
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` files; labels are indices into the sorted class names.

    `dataset[i]` -> (image tensor, label). The key may also be `(i, seed)`, as `EpochSampler`
    yields: then the transform is called as `transform(img, random.Random(seed))`, so that the
    sample's augmentation is fixed by the seed alone.

    An unreadable image (corrupt, truncated, not an image) is reported on stderr with its path and
    replaced by the next readable sample in the list. Distinct bad files are counted across worker
    processes (a shared-memory flag per file); once more than `max_bad_fraction` of the set (at
    least one file) is bad, loading stops with a DataError: a long run survives a few bad files and
    never hides many.
    """

    def __init__(self, root, transform=None, classes=None, max_bad_fraction=0.001):
        self.root, self.transform = root, transform
        self.classes = list_classes(root) if classes is None else list(classes)
        self.samples = []  # [(path, class_index)]
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise DataError(f"no image files under {root}/<class>/: expected e.g. .JPEG files")
        self.max_bad = max(1, int(max_bad_fraction * len(self.samples)))
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.samples)

    @property
    def num_bad(self):
        """Distinct unreadable files met so far (by every worker process)."""
        return int(self.bad.sum())

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            try:
                img = load_rgb(path)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self._report_bad(i, path, e)
        if self.transform is None:
            return to_tensor(img), label
        if seed is None:
            return self.transform(img), label
        return self.transform(img, random.Random(seed)), label

    def _report_bad(self, i, path, error):
        first_time = not self.bad[i]
        self.bad[i] = 1
        if first_time:
            print(f"[data] unreadable image skipped: {path} ({type(error).__name__}: {error})",
                  file=sys.stderr)
        if self.num_bad > self.max_bad:
            raise DataError(f"{self.num_bad} unreadable images under {self.root} (the bound is "
                            f"{self.max_bad}, {100 * self.max_bad / len(self.samples):.2g}% of the "
                            f"set): check or re-extract the data")


def check_same_classes(train, val):
    """val/ must hold exactly the classes of train/ (same labels); else a DataError naming the difference."""
    extra, missing = sorted(set(val) - set(train)), sorted(set(train) - set(val))
    if extra or missing:
        def show(names):
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts = ([f"val/ has classes not in train/: {show(extra)}"] if extra else []) + \
                ([f"val/ lacks classes of train/: {show(missing)}"] if missing else [])
        raise DataError("; ".join(parts) + ": both folders need the same class sub-folders")


# ----------------------------------------------------------------------------------------------
# Image ops (PIL image in, PIL image or tensor out)


def to_tensor(img):
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3) uint8
    return x.permute(2, 0, 1).float().div_(255.0)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(3, H, W) in [0, 1] -> (x - mean) / std per channel."""
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_shorter(img, size, interpolation):
    """Shorter side -> size, longer side -> int(size * long / short) (truncated), aspect kept."""
    w, h = img.size
    if w <= h:
        return img.resize((size, int(size * h / w)), interpolation)
    return img.resize((int(size * w / h), size), interpolation)


def center_crop(img, size):
    """The central size x size window (offsets rounded half to even, as Python's round)."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_transform(img_size, crop_pct, crop_mode="center"):
    """The official evaluation protocol (NOTES.md) as a callable: PIL image -> (3, S, S) normalised.

    'center': shorter side to floor(S / crop_pct), bicubic, then the central S x S crop.
    'squash': both sides to floor(S / crop_pct) (aspect not kept), bicubic, then the central crop.
    """
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"crop_mode must be 'center' or 'squash', not {crop_mode!r}")
    scale_size = math.floor(img_size / crop_pct)

    def transform(img):
        if crop_mode == "squash":
            img = img.resize((scale_size, scale_size), Image.BICUBIC)
        else:
            img = resize_shorter(img, scale_size, Image.BICUBIC)
        return normalize(to_tensor(center_crop(img, img_size)))

    return transform


# ----------------------------------------------------------------------------------------------
# The demo dataset: ten texture classes that survive crops, flips and RandAugment

DEMO_CLASSES = ("plain", "hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "grid",
                "blocks", "gradient")


def demo_image(label, rng, size=72):
    """One demo picture of class DEMO_CLASSES[label] as a uint8 array (size, size, 3).

    Two random colours mixed by a class-specific pattern m in [0, 1] with random period and phase,
    plus pixel noise. Patterns fill the picture, so a random crop keeps the class; 'diagonal' picks
    either direction, so a horizontal flip keeps it too.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (size, size) each
    f = rng.uniform(1 / 14, 1 / 6)  # spatial frequency, cycles per pixel
    phase = rng.uniform(0, 2 * np.pi)
    wave = lambda t: np.sin(2 * np.pi * f * t + phase)  # noqa: E731
    name = DEMO_CLASSES[label]
    if name == "plain":
        m = np.zeros_like(xx)
    elif name == "hstripes":
        m = wave(yy) > 0
    elif name == "vstripes":
        m = wave(xx) > 0
    elif name == "diagonal":
        m = wave((xx + rng.choice([-1, 1]) * yy) / np.sqrt(2)) > 0
    elif name == "checker":
        m = (wave(xx) > 0) ^ (wave(yy) > 0)
    elif name == "dots":
        m = np.sin(2 * np.pi * f * xx + phase) * np.sin(2 * np.pi * f * yy) > 0.5
    elif name == "rings":
        cy, cx = rng.uniform(0, size, 2)
        m = wave(np.hypot(yy - cy, xx - cx)) > 0
    elif name == "grid":
        m = (np.abs(np.sin(np.pi * f * xx + phase)) < 0.3) | (np.abs(np.sin(np.pi * f * yy)) < 0.3)
    elif name == "blocks":
        cells = rng.integers(0, 2, (size // 6 + 1, size // 6 + 1))
        m = np.kron(cells, np.ones((6, 6)))[:size, :size]
    else:  # gradient: a linear ramp along a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        m = (t - t.min()) / (t.max() - t.min())
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 150:  # keep the two colours far apart
        c2 = rng.uniform(0, 255, 3)
    m = np.asarray(m, dtype=np.float32)[..., None]
    img = c1 * (1 - m) + c2 * m + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_demo_dataset(root, train_per_class=120, val_per_class=30, seed=0):
    """Write (once; cached) the demo set as real JPEG files in `root/{train,val}/<class>/`; returns root.

    Ten texture classes (DEMO_CLASSES), 72 x 72 pixels, 1,200 train and 300 val images. It is built
    in a temporary folder and renamed into place, so concurrent processes never see half of it.
    """
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    rng = np.random.default_rng(seed)
    tmp = f"{root}.tmp-{os.getpid()}"
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(DEMO_CLASSES):
            folder = os.path.join(tmp, split, name)
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(demo_image(label, rng)).save(
                    os.path.join(folder, f"{name}_{k:04d}.JPEG"), quality=90)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("demo dataset written by data.make_demo_dataset\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process put its copy in place first, or root is in the way
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isfile(os.path.join(root, "COMPLETE")):
        raise DataError(f"{root} exists but is not a complete demo dataset: remove it and re-run")
    return root
