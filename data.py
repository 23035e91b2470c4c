"""ImageNet-style data for MambaVision: folders, decoding, transforms, mixup/cutmix, loaders.

Everything here is written with Pillow and torch only (no torchvision), following the official
recipe (timm's ImageNet pipeline): RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8 / cutmix 1.0 with label smoothing 0.1, and for evaluation the
shorter side resized to floor(S / crop_pct) then the central S x S crop. The training transform
draws each sample's random parameters apart from applying them (`TrainTransform.draw`, `Params`),
so that gpu_augment.py can apply the same draws to a whole batch on the GPU; the Pillow code here
is its reference. `python bench.py loader` times decoding + augmentation; synthetic.py writes
image folders to try it on. Glossary:
    S          output image side (--img-size)
    crop_pct   eval resize factor: the shorter side goes to floor(S / crop_pct) before the S crop
    rng        a `random.Random` owned by one sample, so its augmentation does not depend on which
               worker process decoded it (see `EpochSampler`)
"""
import io
import itertools
import math
import os
import queue
import random
import signal
import sys
import threading
from collections import deque, namedtuple
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit greyscale PNGs
MAX_ASPECT = 100  # longer side / shorter side; beyond it an image is refused (see `load_rgb`)


class DataError(ValueError):
    """A problem with the data on disk, stated in one line with what to do about it."""


# ----------------------------------------------------------------------------------------------
# Folders


def list_classes(root):
    """Sorted sub-folder names of `root` (the class names), hidden ones ('.name') left out; a clear
    error if there are none."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist: pass --data-dir holding train/ and val/")
    classes = sorted(e.name for e in _entries(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {root}: expected {root}/<class>/<image files>")
    return classes


def _entries(folder):
    """os.scandir(folder) sorted by name; a DataError if the folder cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot read folder {folder} ({e.strerror or e}): fix its permissions or remove it") from e


def list_samples(root, classes):
    """[(image path, class index)] under `root/<class>/` at any depth, sorted by folder, then name.

    Names starting with '.' are skipped at every depth (.ipynb_checkpoints, macOS's ._ files).
    Symbolic links are followed, each real directory once: a link back into the class's own
    folders (a loop to '.') adds nothing, and a link to `root` or above it is skipped (it holds
    the other classes). A folder reached from two classes is refused (its images would get two
    labels), and so is a class folder with no images. A class of `classes` with no folder under
    `root` is left out (a val/ folder checked against train/'s classes).
    """
    root_real = os.path.realpath(root)
    owner = {os.path.realpath(os.path.join(root, name)): name for name in classes}  # real folder -> class
    visited, samples = set(), []
    for label, name in enumerate(classes):
        class_folder = os.path.join(root, name)
        if not os.path.isdir(class_folder):
            continue
        images, pending = [], deque([class_folder])  # breadth first: a real path is kept under its shortest name
        while pending:
            folder = pending.popleft()
            real = os.path.realpath(folder)
            if real in visited or os.path.commonpath([real, root_real]) == real:  # seen, or root and above
                continue
            if owner.setdefault(real, name) != name:
                raise DataError(f"{folder} leads to {real}, which belongs to class {owner[real]}: an image "
                                f"needs one class; remove the link")
            visited.add(real)
            for entry in _entries(folder):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    images.append((folder, entry.name))
        if not images:
            raise DataError(f"class folder {class_folder} holds no images (files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}): add its images or remove the folder")
        samples += [(os.path.join(folder, file), label) for folder, file in sorted(images)]
    return samples


# ----------------------------------------------------------------------------------------------
# Decoding


def load_rgb(path):
    """Decode an image by its content (not its extension) and convert it to RGB (`to_rgb`).

    ImageNet holds CMYK and greyscale JPEGs and at least one PNG named .JPEG; all come out RGB.
    A truncated file raises OSError here (Pillow's LOAD_TRUNCATED_IMAGES stays off). Memory is
    bounded before decoding, from the header: an image over about 179 million pixels raises
    Pillow's DecompressionBombError, and one with a side more than MAX_ASPECT times the other a
    ValueError (eval's resize of a 3 x 20,000 sliver's shorter side to 256 px would take 2 GB).
    """
    with Image.open(path) as img:
        check_aspect(*img.size)
        img.load()
        return to_rgb(img)


def check_aspect(w, h):
    """A ValueError for a w x h image whose longer side is more than MAX_ASPECT times the shorter."""
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(f"{w} x {h} px is more than {MAX_ASPECT}:1, not a photo")


def to_rgb(img):
    """A decoded PIL image -> RGB. 16-bit greyscale (SIXTEEN_BIT_MODES) is scaled to 8 bits,
    round(value * 255 / 65535), where Pillow's convert would clip it to 255 (a white image)."""
    if img.mode in SIXTEEN_BIT_MODES:
        value = np.asarray(img).astype(np.int64)  # (H, W)
        if value.min() < 0 or value.max() > 65535:  # mode 'I' also holds 32-bit integers
            raise ValueError(f"{img.mode} pixels outside 0..65535: save the image with 8 or 16 bits")
        img = Image.fromarray(((value * 255 + 32767) // 65535).astype(np.uint8), "L")  # rounded: 65535 is odd
    return img.convert("RGB")


def load_rgb_for_crop(path, pick_box, size):
    """Decode an image for one crop of it that is then resized to size x size; returns (RGB image, box).

    `pick_box(w, h)` chooses the crop box (left, top, right, bottom) on the full image, from its
    header alone. A JPEG is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    draft mode) when the box still spans at least `size` pixels each way at that scale, so the
    resize stays a downscale; the box comes back in the decoded image's pixels (divided by the scale:
    decoded pixel i covers source pixels [i s, (i + 1) s)). The crop covers the same image region
    with or without the reduced decode; only the resampling filter differs. Bounds and modes as
    `load_rgb`.
    """
    with Image.open(path) as img:
        check_aspect(*img.size)
        box = pick_box(*img.size)
        scale = max([s for s in (8, 4, 2) if s * size <= min(box[2] - box[0], box[3] - box[1])], default=1)
        if scale > 1 and img.format == "JPEG":
            width = img.size[0]
            drafted = img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
            if drafted is not None:  # None: a JPEG Pillow cannot draft; decoded in full
                scale = round(width / drafted[1][2])  # the scale Pillow took: its box is (0, 0, w / s, h / s)
                box = tuple(c / scale for c in box)
        img.load()
        return to_rgb(img), box


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` files (`list_samples`); labels are indices into the sorted class names.

    `dataset[i]` -> (image tensor, label). The key may also be `(i, seed)`, as `EpochSampler`
    yields: then the transform is called as `transform(img, random.Random(seed))`, so that the
    sample's augmentation is fixed by the seed alone; a transform with `draft` set (TrainTransform)
    decodes the file itself, as `transform.finish(*transform.load(path, rng))`.

    An unreadable image (corrupt, truncated, not an image, refused by `load_rgb`) is reported on
    stderr with its path and replaced by the next readable sample in the list. Distinct bad files
    are counted across worker processes (a shared-memory flag per file). The rule: loading stops
    with a DataError as soon as more than `max_bad_fraction` of the set is bad. At the default
    0.1% a set of 1,000 to 1,999 images tolerates one bad file and ImageNet's 1,281,167 tolerate
    1,281; a set under 1,000 images tolerates none (fix or remove the file).
    """

    def __init__(self, root, transform=None, classes=None, max_bad_fraction=0.001):
        self.root, self.transform, self.max_bad_fraction = root, transform, max_bad_fraction
        self.classes = list_classes(root) if classes is None else list(classes)
        self.samples = list_samples(root, self.classes)  # [(path, class_index)]
        if not self.samples:
            raise DataError(f"no image files under {root}/<class>/: expected e.g. .JPEG files")
        self.max_bad = math.floor(Fraction(str(max_bad_fraction)) * len(self.samples))  # exact: 0.29 x 100 is 29
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.samples)

    @property
    def num_bad(self):
        """Distinct unreadable files met so far (by every worker process)."""
        return int(self.bad.sum())

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample {index} of {len(self.samples)}")  # also ends plain iteration
        drafting = seed is not None and getattr(self.transform, "draft", False)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            rng = random.Random(seed)
            try:
                if drafting:  # decode only as much of a JPEG as the random crop needs
                    img, params = self.transform.load(path, rng)
                else:
                    img = load_rgb(path)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self._report_bad(i, path, e)
        if self.transform is None:
            return to_tensor(img), label
        if drafting:
            return self.transform.finish(img, params), label
        if seed is None:
            return self.transform(img), label
        return self.transform(img, rng), label

    def _report_bad(self, i, path, error):
        first_time = not self.bad[i]
        self.bad[i] = 1
        reason = f"{type(error).__name__}: {error}"
        if first_time:
            print(f"[data] unreadable image skipped: {path} ({reason})", file=sys.stderr)
        bad, n = self.num_bad, len(self.samples)
        if bad > self.max_bad:
            raise DataError(f"{bad:,} of {n:,} images under {self.root} are unreadable ({100 * bad / n:.3g}%), "
                            f"more than the {100 * self.max_bad_fraction:g}% allowed: fix or remove them "
                            f"(last: {path}: {reason})")


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
    """The official evaluation protocol (timm's, as MambaVision's checkpoints were scored) as a
    callable: PIL image -> (3, S, S) normalised.

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
# Training transforms: RandomResizedCrop, flip, RandAugment, normalise, random erasing
#
# Drawing a sample's random parameters (`TrainTransform.draw`) is kept apart from applying them:
# the Pillow code below applies them on the CPU and is the reference; gpu_augment.augment applies
# the same parameters to a whole batch on the GPU.

RANDOM_INTERPOLATIONS = (Image.BILINEAR, Image.BICUBIC)  # parameter value 0, 1

# One sample's random parameters, in this order (TrainTransform.draw returns them as a float64 tensor):
#   left, top, right, bottom        RandomResizedCrop's box, in the pixels of the image it is applied to
#   interpolation                   of the crop's resize: index into RANDOM_INTERPOLATIONS
#   flip                            1: flip left-right after the resize, 0: not
#   op1, level1, sign1, interp1     RandAugment's first slot: op index into RANDAUGMENT_OPS, -1 = skipped;
#                                   level = magnitude / 10 in [0, 1]; sign +-1 (used by signed ops);
#                                   interpolation index (used by geometric ops)
#   op2, level2, sign2, interp2     its second slot, applied after the first
#   erase_top .. erase_width        random erasing's box on the S x S output (`erase_box`), zeros: none
Params = namedtuple("Params", "left top right bottom interpolation flip op1 level1 sign1 interp1 "
                              "op2 level2 sign2 interp2 erase_top erase_left erase_height erase_width")


def random_crop_box(w, h, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (left, top, right, bottom) on a w x h image: area fraction in `scale`,
    aspect ratio in `ratio` (log-uniform). After 10 failed draws, the central box with the ratio
    clamped to `ratio` (the usual fallback)."""
    area = w * h
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:
        aspect = w / h
        cw, ch = (w, int(round(w / ratio[0]))) if aspect < ratio[0] else \
                 (int(round(h * ratio[1])), h) if aspect > ratio[1] else (w, h)
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


# RandAugment (Cubuk et al. 2020), policy `rand-m9-mstd0.5-inc1` of the official recipe: each image
# gets 2 ops drawn uniformly with replacement from the 'increasing' set below, each applied with
# probability 0.5, at a magnitude drawn per op from N(9, 0.5) and clipped to [0, 10]. In the
# increasing set a larger magnitude is always a stronger change. Signed ops flip their sign at
# random. Geometric ops fill with the mean colour and resample bilinear or bicubic at random.
MAX_MAGNITUDE = 10.0
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def _affine(img, coeffs, interpolation):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=interpolation, fillcolor=FILL)


def _posterize(img, bits):
    """Keep the top `bits` bits of each channel; 0 bits -> black (Pillow refuses bits = 0)."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else Image.new("RGB", img.size)


def _solarize_add(img, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * 3)


RANDAUGMENT_OPS = {  # name -> f(img, level v in [0, 1], sign s = +-1, Pillow interpolation)
    "AutoContrast": lambda img, v, s, i: ImageOps.autocontrast(img),
    "Equalize": lambda img, v, s, i: ImageOps.equalize(img),
    "Invert": lambda img, v, s, i: ImageOps.invert(img),
    "Rotate": lambda img, v, s, i: img.rotate(s * 30 * v, resample=i, fillcolor=FILL),
    "PosterizeIncreasing": lambda img, v, s, i: _posterize(img, 4 - int(4 * v)),
    "SolarizeIncreasing": lambda img, v, s, i: ImageOps.solarize(img, 256 - int(256 * v)),
    "SolarizeAdd": lambda img, v, s, i: _solarize_add(img, int(110 * v)),
    "ColorIncreasing": lambda img, v, s, i: ImageEnhance.Color(img).enhance(1 + s * 0.9 * v),
    "ContrastIncreasing": lambda img, v, s, i: ImageEnhance.Contrast(img).enhance(1 + s * 0.9 * v),
    "BrightnessIncreasing": lambda img, v, s, i: ImageEnhance.Brightness(img).enhance(1 + s * 0.9 * v),
    "SharpnessIncreasing": lambda img, v, s, i: ImageEnhance.Sharpness(img).enhance(1 + s * 0.9 * v),
    "ShearX": lambda img, v, s, i: _affine(img, (1, s * 0.3 * v, 0, 0, 1, 0), i),
    "ShearY": lambda img, v, s, i: _affine(img, (1, 0, 0, s * 0.3 * v, 1, 0), i),
    "TranslateXRel": lambda img, v, s, i: _affine(img, (1, 0, s * 0.45 * v * img.size[0], 0, 1, 0), i),
    "TranslateYRel": lambda img, v, s, i: _affine(img, (1, 0, 0, 0, 1, s * 0.45 * v * img.size[1]), i),
}


def draw_rand_augment(rng, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """RandAugment's random choices (see the policy comment above): [(op, level, sign, interpolation)]
    per slot, op an index into RANDAUGMENT_OPS or -1 where the slot's probability test skips it.
    All four are drawn for every slot, used or not, so every sample takes the same draws."""
    slots = []
    for _ in range(num_ops):
        op = rng.randrange(len(RANDAUGMENT_OPS))
        skip = rng.random() > prob
        level = min(max(rng.gauss(magnitude, magnitude_std), 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
        sign = -1.0 if rng.random() < 0.5 else 1.0
        slots.append((-1 if skip else op, level, sign, rng.randrange(len(RANDOM_INTERPOLATIONS))))
    return slots


def apply_rand_augment(img, slots):
    """Apply the slots of `draw_rand_augment` in order (op -1: nothing)."""
    ops = list(RANDAUGMENT_OPS.values())
    for op, level, sign, interpolation in slots:
        if op >= 0:
            img = ops[int(op)](img, level, sign, RANDOM_INTERPOLATIONS[int(interpolation)])
    return img


def erase_box(h, w, rng, prob=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)):
    """Random erasing's box (Zhong et al. 2020) for an h x w image: with probability `prob`, a box of
    area fraction in `scale` and log-uniform aspect in `ratio`, as (top, left, height, width); up to
    10 draws to fit one. (0, 0, 0, 0) = nothing erased. normalize_and_erase fills it with noise."""
    if rng.random() < prob:
        for _ in range(10):
            target_area = h * w * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            eh, ew = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if eh < h and ew < w:
                return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return 0, 0, 0, 0


def to_uint8_tensor(img):
    """PIL RGB image -> uint8 tensor (3, H, W): a quarter of float32's bytes between processes."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_and_erase(x, boxes, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The training transform's last steps, batched, on the batch's device: uint8 (B, 3, S, S) ->
    (x / 255 - mean) / std in float32, and each sample's erase box (B, 4) = (top, left, height,
    width) filled with per-pixel N(0, 1) noise (the normalised scale), drawn from torch's generator.
    mean and std may be (3,) tensors on x's device: then nothing is copied from the host (as a
    captured CUDA graph requires)."""
    mean = torch.as_tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.as_tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    x = (x.float() - mean) / std
    rows = torch.arange(x.shape[2], device=x.device).view(1, -1, 1)   # (1, S, 1)
    cols = torch.arange(x.shape[3], device=x.device).view(1, 1, -1)   # (1, 1, S)
    top, left, height, width = (boxes[:, i].view(-1, 1, 1) for i in range(4))  # (B, 1, 1) each
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)  # (B, S, S)
    return torch.where(inside[:, None], torch.randn_like(x), x)


class TrainTransform:
    """The official training pipeline: PIL image, rng -> (uint8 tensor (3, S, S), erase box (4,)).
    The loader ships uint8 pictures and boxes; normalize_and_erase finishes the batch on the GPU.

    `draw` draws everything random about a sample (`Params`), `apply` applies it with Pillow;
    `__call__` is the two in turn. gpu_augment.augment applies the same parameters to a batch.

    With `draft` (the default), `ImageFolder` calls `load(path, rng)` and then `finish`, so that a
    JPEG is decoded at a reduced scale when its crop box is large enough (`load_rgb_for_crop`).
    The crop box is drawn on the full image size either way, so the crops' distribution is unchanged.
    It pays on ImageNet's mix of sizes, not at its typical 500 x 375 (a crop there is never 448 px
    wide): the 10% of images wider than 800 px cost several typical ones each, and decoding them at
    1/2-1/4 scale makes both the decode and the resize of the crop cheaper. Measured on a 2-core
    CPU (`python bench.py loader --imagenet-sizes --images 1000 --workers 1 --repeat 5`, twice):
    +9% and +11% images/s in one process (median passes), +16% and +11% in one DataLoader worker;
    at 500 x 375 alone +2% (noise).
    """

    def __init__(self, img_size, randaugment=True, erase_prob=0.25, draft=True):
        self.img_size, self.randaugment, self.erase_prob, self.draft = img_size, randaugment, erase_prob, draft

    def draw(self, w, h, rng):
        """One sample's random parameters for a w x h image, from rng: a float64 tensor (18,) laid out as `Params`."""
        box = random_crop_box(w, h, rng)
        interpolation, flip = rng.randrange(len(RANDOM_INTERPOLATIONS)), float(rng.random() < 0.5)
        slots = draw_rand_augment(rng) if self.randaugment else [(-1, 0.0, 1.0, 0)] * 2
        erase = erase_box(self.img_size, self.img_size, rng, self.erase_prob) if self.erase_prob > 0 else (0, 0, 0, 0)
        return torch.tensor([*box, interpolation, flip, *slots[0], *slots[1], *erase], dtype=torch.float64)

    def apply(self, img, params):
        """The parameters `draw` chose, applied with Pillow: the crop box resized to S x S, the flip,
        RandAugment's two slots. -> PIL image (erasing is left to normalize_and_erase)."""
        p = Params(*params.tolist())
        img = img.resize((self.img_size, self.img_size), RANDOM_INTERPOLATIONS[int(p.interpolation)],
                         box=(p.left, p.top, p.right, p.bottom))
        if p.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return apply_rand_augment(img, [(p.op1, p.level1, p.sign1, p.interp1), (p.op2, p.level2, p.sign2, p.interp2)])

    def __call__(self, img, rng=random):
        return self.finish(img, self.draw(*img.size, rng))

    def load(self, path, rng):
        """Decode `path` for its random parameters: (RGB image, params (18,) with the crop box in the
        decoded image's pixels). The parameters are drawn on the full size (the file's header)."""
        drawn = []

        def pick_box(w, h):
            drawn.append(self.draw(w, h, rng))
            return tuple(drawn[0][:4].tolist())

        img, box = load_rgb_for_crop(path, pick_box, self.img_size)
        params = drawn[0]
        params[:4] = torch.tensor(box, dtype=torch.float64)
        return img, params

    def finish(self, img, params):
        """`apply`, as a uint8 tensor (3, S, S), and the erase box (4,) of the parameters."""
        return to_uint8_tensor(self.apply(img, params)), params[-4:].long()


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix on the device, with label smoothing, as soft targets


def smooth_one_hot(labels, num_classes, smoothing):
    """(B,) int -> (B, num_classes): 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def draw_mix(rng, h, w, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5):
    """One batch's Mixup / CutMix choice (Zhang et al. 2018; Yun et al. 2019), drawn on the host from
    rng (a random.Random) for h x w images, as 6 numbers for mix_batch: (blend, y0, y1, x0, x1, lam).

    With probability `switch_prob` CutMix: a box of area fraction 1 - lam (lam ~ Beta(1, 1)) is
    pasted from the flipped batch, clipped at the border, and lam is recomputed from the clipped
    area (blend 1: outside the box the image stays itself). Else Mixup with lam ~ Beta(0.8, 0.8):
    no box, blend = lam. Neither: blend = lam = 1, no box."""
    if cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob):
        lam = rng.betavariate(cutmix_alpha, cutmix_alpha)
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = rng.randint(0, h - 1), rng.randint(0, w - 1)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        return [1.0, y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)]
    if mixup_alpha > 0:
        lam = rng.betavariate(mixup_alpha, mixup_alpha)
        return [lam, 0, 0, 0, 0, lam]
    return [1.0, 0, 0, 0, 0, 1.0]


def mix_batch(x, labels, mix, num_classes, smoothing=0.1):
    """Mix a whole batch with its reverse as draw_mix chose: x (B, 3, H, W) and labels (B,) on the
    device, mix a (6,) float tensor there. Inside the box the flipped batch, elsewhere
    blend * x + (1 - blend) * x_flipped; soft targets lam * y + (1 - lam) * y_flipped (each row sums
    to one), y label-smoothed. No branch on the host: the same kernels run for every choice, so a
    captured CUDA graph replays any of them."""
    blend, y0, y1, x0, x1, lam = mix.unbind()
    rows = torch.arange(x.shape[2], device=x.device).view(-1, 1)      # (H, 1)
    cols = torch.arange(x.shape[3], device=x.device).view(1, -1)      # (1, W)
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)     # (H, W)
    flipped = x.flip(0)
    x = torch.where(box, flipped, blend * x + (1 - blend) * flipped)
    y = smooth_one_hot(labels, num_classes, smoothing)                # (B, num_classes)
    return x, lam * y + (1 - lam) * y.flip(0)


# ----------------------------------------------------------------------------------------------
# Sampling and loaders


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of one epoch, as keys `(sample index, sample seed)`; resumable mid-epoch.

    Training (shuffle=True): the epoch's order is a permutation drawn from (seed, epoch), read in
    blocks of num_replicas x batch_size (one micro-batch per rank); rank r takes the r-th
    batch_size-long chunk of every block. So an optimizer step of G = num_replicas x batch_size x
    accum_steps images always takes the next G positions of the permutation, whatever the split of
    G into ranks, per-rank batches and accumulation steps: after k steps exactly k x G positions
    are used, on 1, 2 or 4 ranks alike (that is what lets a run resume on another world size), and
    1 rank accumulating 2 micro-batches sees the very micro-batches 2 ranks see. An epoch is
    n // G whole steps; the n % G leftover positions (different images each epoch) are skipped.
    Each position p gets its own augmentation seed from (seed, epoch, p), so a sample's
    augmentation depends on neither the worker count nor the world size. `set_position(k)` skips
    this rank's first k samples after a mid-epoch resume.
    Evaluation (shuffle=False): rank r takes indices r, r + num_replicas, ... with no padding, so
    every image counts exactly once when the ranks' sums are added up.
    """

    def __init__(self, n, num_replicas=1, rank=0, shuffle=True, seed=0, batch_size=1, accum_steps=1):
        self.n, self.num_replicas, self.rank, self.shuffle, self.seed = n, num_replicas, rank, shuffle, seed
        self.batch_size, self.accum_steps = batch_size, accum_steps
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self):
        """Whole optimizer steps of num_replicas x batch_size x accum_steps samples in one epoch."""
        return self.n // (self.num_replicas * self.batch_size * self.accum_steps)

    def set_epoch(self, epoch):
        self.epoch, self.start = epoch, 0

    def set_position(self, start):
        self.start = start

    def _positions(self):
        """This rank's positions in the epoch's permutation, in the order it trains on them."""
        if not self.shuffle:
            return list(range(self.rank, self.n, self.num_replicas))
        block, chunk = self.num_replicas * self.batch_size, self.rank * self.batch_size
        blocks = self.steps_per_epoch * self.accum_steps
        return [k * block + chunk + i for k in range(blocks) for i in range(self.batch_size)]

    def __len__(self):
        return len(self._positions()) - self.start

    def __iter__(self):
        positions = self._positions()[self.start:]
        if not self.shuffle:
            yield from positions
            return
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for p in positions:
            yield order[p], base + p


def _seed_worker(worker_id):
    """Seed the global RNGs of a loader worker from torch's per-worker seed (base seed + worker id),
    so any code that uses them is reproducible too."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # Ctrl-C and SIGTERM reach the whole process group: the training process saves and then ends
    # its workers, so a worker must not die first (the loader would fail mid-save)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, sampler, workers, train, device_type="cpu", collate_fn=None):
    """A DataLoader over `sampler`'s keys: worker processes, pinned memory on GPUs, persistent
    workers, full batches only in training."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device_type == "cuda", drop_last=train, persistent_workers=workers > 0,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(sampler.seed + sampler.rank),
        prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------------------------
# The GPU data path: workers read file bytes and draw the parameters; the GPU decodes and augments


class FileSamples(torch.utils.data.Dataset):
    """The GPU data path's worker side over an ImageFolder whose transform is a TrainTransform:
    `files[(i, seed)]` -> (file bytes (N,) uint8, params (18,) as TrainTransform.draw on the size in
    the file's header, label, sample index, seed). Nothing is decoded here. A file whose header
    Pillow cannot read, or whose size load_rgb refuses, is reported and replaced by the next sample,
    as ImageFolder does; one that fails only when decoded is handled by GpuBatches."""

    def __init__(self, folder):
        self.folder, self.transform = folder, folder.transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key
        samples = self.folder.samples
        for attempt in range(len(samples)):
            i = (index + attempt) % len(samples)
            path, label = samples[i]
            rng = random.Random(seed)  # a fresh draw per attempt, as ImageFolder makes
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                with Image.open(io.BytesIO(raw)) as img:  # the header only; raises DecompressionBombError
                    check_aspect(*img.size)
                    w, h = img.size
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.folder._report_bad(i, path, e)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), self.transform.draw(w, h, rng), label, i, seed


def collate_files(samples):
    """FileSamples' items -> one batch with one tensor per field (one shared-memory block each between
    processes): (all files' bytes concatenated (N,), their lengths (B,), params (B, 18), labels (B,),
    sample indices (B,), seeds (B,))."""
    datas, params, labels, indices, seeds = zip(*samples)
    return (torch.cat(datas), torch.tensor([len(d) for d in datas]), torch.stack(params), torch.tensor(labels),
            torch.tensor(indices), torch.tensor(seeds))


class GpuBatches:
    """Training batches decoded and augmented on the GPU: iterating gives ((uint8 (B, 3, S, S),
    erase boxes (B, 4)), labels) on `device`, as the CPU path's loader gives them on the host.

    `loader` yields collate_files batches of FileSamples. `threads` threads of this process take
    its batches in turn, each on its own CUDA stream (high priority, so that the data path's
    kernels are not queued behind the training step's; train.py asks CUDA for 32 hardware work
    queues, as with the default 8 these streams share queues with the training's and wait behind
    its queued steps) with its own nvJPEG decoder: decode the
    JPEGs (jpeg.py; the GPU's hardware engines where it has them), apply the drawn parameters
    (gpu_augment.augment), up to `depth` batches each ahead of the training step. The batches come
    out in the loader's order, and the main stream waits on an event before it reads one. nvJPEG's
    host work (parsing each file) is most of a batch's time, hence several threads (ctypes lets go
    of the GIL meanwhile). Per file: one nvJPEG refuses (CMYK, progressive on the engines' path,
    a PNG named .JPEG) is decoded by Pillow (as load_rgb) and augmented with the rest; one Pillow
    cannot decode either is reported and counted as ImageFolder does, and its place takes what the
    CPU path gives for the same key (the next readable sample, augmented by Pillow). The threads
    hold `lock` shared around their GPU work, so that a CUDA graph capture can keep them out
    (step.CAPTURE_LOCK)."""

    def __init__(self, loader, folder, device, lock, threads=6, depth=2):
        import gpu_augment
        import jpeg
        self.loader, self.folder, self.device, self.lock, self.depth = loader, folder, device, lock, depth
        self.jpeg, self.augment = jpeg, gpu_augment.augment
        self.streams = [torch.cuda.Stream(device, priority=-1) for _ in range(threads)]

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        n, batches, stop = len(self.streams), iter(self.loader), threading.Event()
        turn = {"next": 0, "cond": threading.Condition()}  # which thread takes the loader's next batch
        ready = [queue.Queue(self.depth) for _ in range(n)]  # thread k's batches: number k, k + n, ...
        workers = [threading.Thread(target=self._produce, args=(k, batches, turn, ready[k], stop), daemon=True,
                                    name=f"gpu-data-{k}") for k in range(n)]
        for w in workers:
            w.start()
        try:
            for number in itertools.count():
                item = ready[number % n].get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                (x, boxes), labels, done = item
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in (x, boxes, labels):  # made on a data stream, read on this one
                    t.record_stream(torch.cuda.current_stream(self.device))
                yield (x, boxes), labels
        finally:
            stop.set()
            for w in workers:
                w.join()

    def _produce(self, k, batches, turn, ready, stop):
        """Thread k: the loader's batches number k, k + n, ... onto `ready`, then None; an exception
        (a DataError for too many bad files, a worker's crash) goes there instead, for the training loop."""
        n, cond = len(self.streams), turn["cond"]

        def put(item):
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass
        try:
            while not stop.is_set():
                with cond:
                    if not cond.wait_for(lambda: turn["next"] % n == k, timeout=0.1):
                        continue
                    batch = next(batches, None)
                    turn["next"] += 1
                    cond.notify_all()
                if batch is None:
                    return put(None)
                with self.lock.shared(), torch.cuda.stream(self.streams[k]):
                    item = self._gpu_batch(*batch, slot=k)
                    done = torch.cuda.Event()
                    done.record(self.streams[k])
                put((*item, done))
        except BaseException as e:
            put(e)

    def _gpu_batch(self, data, lengths, params, labels, indices, seeds, slot):
        """One collate_files batch -> ((x, boxes), labels) on the device, queued on the current stream."""
        datas = list(torch.split(data, lengths.tolist()))
        images = self.jpeg.decode(datas, self.device, slot=slot)  # (3, H, W) uint8 on the device, or None
        replaced = {}  # batch position -> the CPU path's (uint8 (3, S, S), box, label) for the same key
        for j, image in enumerate(images):
            if image is None:
                try:
                    images[j] = self.jpeg.decode_with_pillow(datas[j]).to(self.device)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    i = int(indices[j])
                    self.folder._report_bad(i, self.folder.samples[i][0], e)
                    (picture, box), label = self.folder[((i + 1) % len(self.folder), int(seeds[j]))]
                    replaced[j] = picture, box, label
        keep = [j for j in range(len(images)) if j not in replaced]
        x = self.augment([images[j] for j in keep], params[keep], self.folder.transform.img_size)  # (B', 3, S, S)
        boxes, labels = params[:, -4:].long(), labels.clone()
        if replaced:
            full = torch.empty((len(images), *x.shape[1:]), dtype=x.dtype, device=self.device)
            full[keep] = x
            for j, (picture, box, label) in replaced.items():
                full[j], boxes[j], labels[j] = picture.to(self.device), box, label
            x = full
        return (x, boxes.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)
