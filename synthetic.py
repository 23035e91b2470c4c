"""Synthetic image folders: the built-in demo set and ImageNet-sized photo-like JPEGs for timing.

Both are written as `root/{train,val}/<class>/<image>` folders that `data.ImageFolder` reads.
    python synthetic.py demo DIR                                    # the demo set (what train.py uses
                                                                    # without --data-dir)
    python synthetic.py photos DIR --images 25600 --size 500 375    # photo-like JPEGs of one size
    python synthetic.py photos DIR --images 25600 --imagenet-sizes  # ... of ImageNet's mix of sizes
"""
import argparse
import io
import os
import shutil

import numpy as np
from PIL import Image

from data import DataError

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
    f = rng.uniform(1 / 24, 1 / 12) * 72 / size  # 3 to 6 periods across: coarse enough for 64 px
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
        cell = max(size // 6, 1)
        cells = rng.integers(0, 2, (size // cell + 1, size // cell + 1))
        m = np.kron(cells, np.ones((cell, cell)))[:size, :size]
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


def make_demo_dataset(root, train_per_class=120, val_per_class=30, seed=0, image_size=72):
    """Write (once; cached) the demo set as real JPEG files in `root/{train,val}/<class>/`; returns root.

    Ten texture classes (DEMO_CLASSES), by default 72 x 72 pixels, 1,200 train and 300 val images. It is built
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
                Image.fromarray(demo_image(label, rng, image_size)).save(
                    os.path.join(folder, f"{name}_{k:04d}.JPEG"), quality=90)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("demo dataset written by synthetic.make_demo_dataset\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process put its copy in place first, or root is in the way
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isfile(os.path.join(root, "COMPLETE")):
        raise DataError(f"{root} exists but is not a complete demo dataset: remove it and re-run")
    return root


# ----------------------------------------------------------------------------------------------
# Photo-like JPEGs of ImageNet's sizes, to time decoding and augmentation

# ImageNet-1K's training images by size, in percent: median 500 x 375, a quarter small, 10% wider
# than 800 px, 3% very large. This mix has a median of 500 x 375 and a mean of about 490 x 410.
IMAGENET_SIZE_MIX = (  # (percent, width, height)
    (35, 500, 375),
    (12, 375, 500),
    (10, 500, 333),
    (8, 333, 500),
    (25, 250, 188),
    (7, 1024, 768),
    (3, 2000, 1500),
)
IMAGENET_SIZES = tuple((w, h) for percent, w, h in IMAGENET_SIZE_MIX for _ in range(percent))  # 100 sizes


def photo_like(rng, w, h, alpha=1.1):
    """A (h, w, 3) uint8 picture with a natural image's 1/f^alpha spectrum (shared luminance, weaker
    colour): it compresses like a photo, about 110 KB as a 500 x 375 JPEG at quality 90."""
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])  # (h, w // 2 + 1)
    f[0, 0] = 1.0

    def field():
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
        x = np.fft.irfft2(spectrum, s=(h, w))
        return (x - x.mean()) / x.std()

    luma = field()
    img = np.stack([luma + 0.4 * field() for _ in range(3)], axis=-1) * 55 + 118
    return np.clip(img, 0, 255).astype(np.uint8)


def make_photo_dataset(root, train_images, val_images, classes=10, sizes=((500, 375),), quality=90, seed=0):
    """Write `root/{train,val}/class<k>/` with photo-like JPEGs, to time loading in a real training run.

    `sizes`: (width, height) of the distinct pictures, in turn (e.g. IMAGENET_SIZES). max(64,
    len(sizes)) distinct pictures are encoded once and their bytes written under many names: file k
    of a split (named k, in class k % classes) holds picture k % that count. The labels mean
    nothing. Returns root.
    """
    rng = np.random.default_rng(seed)
    pictures = []
    for j in range(max(64, len(sizes))):
        buffer = io.BytesIO()
        Image.fromarray(photo_like(rng, *sizes[j % len(sizes)])).save(buffer, format="JPEG", quality=quality)
        pictures.append(buffer.getvalue())
    for split, n in (("train", train_images), ("val", val_images)):
        for k in range(n):
            folder = os.path.join(root, split, f"class{k % classes}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{k:07d}.JPEG"), "wb") as f:
                f.write(pictures[k % len(pictures)])
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description="Write synthetic image folders (train/ and val/ of class folders)")
    commands = p.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the built-in demo set: ten texture classes, 1,200 + 300 JPEGs")
    demo.add_argument("dir", help="folder to write (kept if already complete)")
    photos = commands.add_parser("photos", help="photo-like JPEGs in 10 classes, for timing a real training run")
    photos.add_argument("dir", help="folder to write")
    photos.add_argument("--images", type=int, default=512, help="train JPEGs; val gets a tenth as many")
    sizes = photos.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="JPEG width and height")
    sizes.add_argument("--imagenet-sizes", action="store_true", help="instead, ImageNet's mix of sizes (IMAGENET_SIZE_MIX)")
    photos.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = p.parse_args(argv)
    if args.command == "demo":
        return print(f"demo set in {make_demo_dataset(args.dir)}")
    make_photo_dataset(args.dir, args.images, args.images // 10,
                       sizes=IMAGENET_SIZES if args.imagenet_sizes else (tuple(args.size),), quality=args.quality)
    print(f"wrote {args.images} + {args.images // 10} JPEGs to {args.dir}")


if __name__ == "__main__":
    main()
