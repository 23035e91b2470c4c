"""The training augmentation of data.py as one batched torch function, for the GPU.

`data.TrainTransform.draw(w, h, rng)` draws everything random about a sample (laid out as
`data.Params`); `TrainTransform.apply` applies it with Pillow on the CPU, and that Pillow path is
the reference: test_gpu_augment.py checks this file against it op by op. `augment(images, params,
S)` applies the same parameters to a whole batch of decoded pictures on their device:
    crop + resize   per image: F.interpolate with antialias, bilinear or bicubic (Pillow's resize
                    filters, a = -0.5), in one float pass where Pillow makes two rounded ones, and
                    over the crop alone: not bit-exact (see crop_resize). The box is rounded to
                    whole pixels (a JPEG decoded at a reduced scale by `TrainTransform.load` leaves
                    fractions of a pixel)
    flip            one `where` over the batch
    RandAugment     slot 1, then slot 2; in a slot the images that drew one op are processed
                    together, bit-exact: the geometric ops as one affine resampling per
                    interpolation (Pillow's matrices, pixel centres, filters and fill), the colour
                    ops in Pillow's arithmetic (integer histograms and lookup tables, float32
                    blends and 3 x 3 smoothing)
The random erasing box stays in the parameters, for data.normalize_and_erase, as on the CPU path.
Kernel launches: a few per image for the resize, otherwise a bounded number per op and slot.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import data

OPS = list(data.RANDAUGMENT_OPS)  # op index -> name
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def augment(images, params, size):
    """images: B uint8 tensors (3, H_i, W_i) on one device; params: (B, 18) floats laid out as
    data.Params (the crop box in each image's pixels) -> uint8 (B, 3, size, size) on that device."""
    p = data.Params(*params.detach().to("cpu", torch.float64).unbind(1))  # (B,) each, on the host
    boxes = torch.stack([p.left, p.top, p.right, p.bottom], 1).tolist()
    x = torch.stack([crop_resize(img, box, int(bicubic), size)
                     for img, box, bicubic in zip(images, boxes, p.interpolation.tolist())])  # (B, 3, S, S) float
    x = x.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
    flip = p.flip.to(x.device).bool().view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    for slot in ((p.op1, p.level1, p.sign1, p.interp1), (p.op2, p.level2, p.sign2, p.interp2)):
        x = rand_augment_slot(x, *slot)
    return x


def crop_resize(img, box, bicubic, size):
    """Pillow's `img.resize((size, size), filter, box=box)` of one uint8 image (3, H, W) -> float
    (3, size, size), not yet rounded. Pillow's filter also reads the pixels just outside the box
    (up to the filter's support); here the crop's border is replicated instead."""
    left, top, right, bottom = (round(c) for c in box)
    crop = img[None, :, top:max(bottom, top + 1), left:max(right, left + 1)].float()  # (1, 3, h, w)
    return F.interpolate(crop, size=(size, size), mode="bicubic" if bicubic else "bilinear",
                         align_corners=False, antialias=True)[0]


def rand_augment_slot(x, op, level, sign, interpolation):
    """One RandAugment slot on the batch x (B, 3, S, S) uint8, in place: op (B,) an index into OPS
    or -1, level, sign, interpolation (B,) host tensors as drawn. Returns x."""
    geometric = torch.isin(op, torch.tensor([float(OPS.index(name)) for name in GEOMETRIC], dtype=op.dtype))
    for bicubic in (False, True):
        rows = (geometric & ((interpolation == 1) == bicubic)).nonzero()[:, 0]
        if len(rows):
            matrices = [pillow_affine(OPS[int(op[i])], float(level[i]), float(sign[i]), x.shape[-1]) for i in rows]
            index = rows.to(x.device)
            x[index] = affine(x[index], torch.tensor(matrices, dtype=torch.float64, device=x.device), bicubic)
    for name, colour_op in COLOUR_OPS.items():
        rows = (op == OPS.index(name)).nonzero()[:, 0]
        if len(rows):
            index = rows.to(x.device)
            x[index] = colour_op(x[index], level[rows], sign[rows])
    return x


# ----------------------------------------------------------------------------------------------
# Geometric ops: Pillow's Image.transform(AFFINE) with a fill colour


def pillow_affine(name, v, s, size):
    """Pillow's inverse affine coefficients (a, b, c, d, e, f) for op `name` of data.RANDAUGMENT_OPS
    on a size x size image, computed as Pillow does (Image.rotate's own matrix for Rotate): the
    output pixel centred at (x, y) samples the input at (a x + b y + c, d x + e y + f)."""
    if name == "Rotate":
        angle = -math.radians((s * 30 * v) % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
        centre = size / 2
        return a, b, a * -centre + b * -centre + 0.0 + centre, d, e, d * -centre + e * -centre + 0.0 + centre
    return {"ShearX": (1, s * 0.3 * v, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, s * 0.3 * v, 1, 0),
            "TranslateXRel": (1, 0, s * 0.45 * v * size, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, s * 0.45 * v * size)}[name]


def affine(x, matrices, bicubic):
    """x (n, 3, S, S) uint8 resampled through per-image matrices (n, 6) (pillow_affine) -> uint8,
    exactly as Pillow's generic transform (Geometry.c) computes it, for all n images at once.

    Pixel (x, y) samples the input at the matrix image of its centre (x + 0.5, y + 0.5), in float64
    and Pillow's order of operations. A sample outside [0, S) x [0, S) takes data.FILL. One inside
    is interpolated from the pixels around (u - 0.5, v - 0.5), border pixels replicated: bilinear
    as two lerps along x then one along y, bicubic as Pillow's cubic (a = -1) over 4 x 4 pixels,
    clipped to [0, 255]; then truncated to an integer."""
    n, _, S, _ = x.shape
    centres = torch.arange(S, dtype=torch.float64, device=x.device) + 0.5
    xin, yin = centres.view(1, 1, S), centres.view(1, S, 1)
    a, b, c, d, e, f = (m.view(-1, 1, 1) for m in matrices.unbind(1))  # (n, 1, 1) each
    u, v = a * xin + b * yin + c, d * xin + e * yin + f  # (n, S, S): where each output pixel samples
    inside = ((u >= 0) & (u < S) & (v >= 0) & (v < S))[:, None]  # (n, 1, S, S)
    u, v = u - 0.5, v - 0.5
    col, row = u.floor(), v.floor()
    dx, dy = (u - col)[:, None], (v - row)[:, None]  # (n, 1, S, S)
    pixels = x.flatten(2).double()  # (n, 3, S * S)

    def at(i, j):  # the pixels at rows row + i, columns col + j, clamped to the image: (n, 3, S, S)
        index = ((row + i).clamp(0, S - 1) * S + (col + j).clamp(0, S - 1)).long().view(n, 1, S * S)
        return pixels.gather(2, index.expand(-1, 3, -1)).view(n, 3, S, S)

    if bicubic:
        lines = [cubic(*(at(i, j) for j in (-1, 0, 1, 2)), dx) for i in (-1, 0, 1, 2)]
        out = cubic(*lines, dy).clamp_(0, 255)
    else:
        lines = [lerp(at(i, 0), at(i, 1), dx) for i in (0, 1)]
        out = lerp(*lines, dy)
    fill = torch.tensor(data.FILL, dtype=out.dtype, device=x.device).view(1, 3, 1, 1)
    return torch.where(inside, out.floor_(), fill).to(torch.uint8)


def lerp(v1, v2, d):
    """Geometry.c's BILINEAR: v1 + (v2 - v1) d."""
    return v1 + (v2 - v1) * d


def cubic(v1, v2, v3, v4, d):
    """Geometry.c's BICUBIC through v2 (d = 0) and v3 (d = 1), a = -1, in its order of operations."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


# ----------------------------------------------------------------------------------------------
# Colour ops: f(x (n, 3, S, S) uint8, level (n,), sign (n,) host float64) -> uint8, as Pillow computes them


def apply_lut(x, lut):
    """x (n, 3, S, S) uint8 through per-image, per-channel lookup tables lut (n, 3, 256) -> uint8."""
    return lut.to(torch.uint8).gather(2, x.flatten(2).long()).view_as(x)


def autocontrast(x, level, sign):
    """ImageOps.autocontrast: per channel lo, hi = min, max; lut[i] = int(i * 255 / (hi - lo) - lo * scale), clipped."""
    lo, hi = x.amin((2, 3)).double()[..., None], x.amax((2, 3)).double()[..., None]  # (n, 3, 1)
    scale = torch.full_like(lo, 255.0) / (hi - lo)  # not 255.0 / t: torch takes that as 255 x (1 / t)
    i = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = torch.trunc(i * scale + -lo * scale).clamp(0, 255)
    return apply_lut(x, torch.where(hi > lo, lut, i))


def equalize(x, level, sign):
    """ImageOps.equalize: per channel histogram h, step = (pixels - h[last non-empty bin]) // 255,
    lut[i] = (step // 2 + sum(h[:i])) // step; identity for a step of 0 or a single value."""
    n = x.shape[0]
    channel = torch.arange(3 * n, device=x.device).view(n, 3, 1) * 256
    h = torch.bincount((x.flatten(2).long() + channel).flatten(), minlength=3 * n * 256).view(n, 3, 256)
    last = 255 - (h > 0).flip(2).int().argmax(2, keepdim=True)  # (n, 3, 1): the last non-empty bin
    step = (h.sum(2, keepdim=True) - h.gather(2, last)) // 255
    lut = ((step // 2 + h.cumsum(2) - h) // step.clamp(min=1)).clamp(max=255)
    identity = (step == 0) | ((h > 0).sum(2, keepdim=True) <= 1)
    return apply_lut(x, torch.where(identity, torch.arange(256, device=x.device), lut))


def invert(x, level, sign):
    return 255 - x


def posterize(x, level, sign):
    """Keep the top 4 - int(4 v) bits (data._posterize: 0 bits -> black)."""
    bits = 4 - torch.floor(4 * level).long()
    mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits) & 255
    return x & mask.to(x.device, torch.uint8).view(-1, 1, 1, 1)


def solarize(x, level, sign):
    """ImageOps.solarize at threshold 256 - int(256 v): values at or above it inverted."""
    threshold = (256 - torch.floor(256 * level)).to(x.device, torch.int16).view(-1, 1, 1, 1)
    return torch.where(x < threshold, x, 255 - x)


def solarize_add(x, level, sign):
    """data._solarize_add: int(110 v) added to values under 128, clipped at 255."""
    add = torch.floor(110 * level).to(x.device, torch.int16).view(-1, 1, 1, 1)
    return torch.where(x < 128, (x + add).clamp(max=255), x).to(torch.uint8)


def blend(degenerate, x, level, sign):
    """Image.blend(degenerate, x, 1 + s 0.9 v) as ImageEnhance calls it, in Pillow's float32 arithmetic:
    int(d + alpha (x - d)) clipped to [0, 255]; degenerate: an integer tensor broadcastable to x."""
    alpha = (1 + sign * 0.9 * level).to(x.device, torch.float32).view(-1, 1, 1, 1)
    d = degenerate.int()
    return (d.float() + alpha * (x.int() - d).float()).clamp_(0, 255).to(torch.uint8)


def grey(x):
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as int32 (n, 1, S, S)."""
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16)[:, None]


def contrast(x, level, sign):
    """ImageEnhance.Contrast: blended with the grey level int(mean(L) + 0.5)."""
    L = grey(x)
    total = L.sum((1, 2, 3)).double()
    mean = total / torch.full_like(total, L[0].numel())  # a tensor: CUDA divides by a number as x (1 / number)
    return blend(torch.floor(mean + 0.5).view(-1, 1, 1, 1), x, level, sign)


def smooth(x):
    """ImageFilter.SMOOTH as Pillow's ImagingFilter3x3 computes it: inside the border, 0.5 + the
    3 x 3 kernel (1 1 1, 1 5 1, 1 1 1) / 13 in float32, row below first, then truncated; the border
    rows and columns kept."""
    k1, k5 = (float(np.float32(k) / np.float32(13)) for k in (1, 5))  # Pillow's kernel / 13, in float32
    f = x.float()

    def row(r, centre):  # r (n, 3, S - 2, S): kernel row over columns x - 1, x, x + 1 of the interior
        return r[..., :-2] * k1 + r[..., 1:-1] * centre + r[..., 2:] * k1

    total = 0.5 + row(f[:, :, 2:], k1)
    total = total + row(f[:, :, 1:-1], k5)
    total = total + row(f[:, :, :-2], k1)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = total.clamp_(0, 255).to(torch.uint8)
    return out


COLOUR_OPS = {  # name in data.RANDAUGMENT_OPS -> f(x, level, sign)
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": lambda x, level, sign: blend(grey(x), x, level, sign),
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": lambda x, level, sign: blend(torch.zeros(1, device=x.device), x, level, sign),
    "SharpnessIncreasing": lambda x, level, sign: blend(smooth(x), x, level, sign),
}
