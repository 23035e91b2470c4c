"""The training augmentation of data.py on the GPU, for a whole batch, with our CUDA kernels (augment_cuda.cu).

`data.TrainTransform.draw(w, h, rng)` draws everything random about a sample on the host (laid out as
`data.Params`); `TrainTransform.apply` applies it with Pillow, and that Pillow path is the reference.

    if gpu_augment.available():
        x = gpu_augment.augment(images, params, 224)  # uint8 (B, 3, 224, 224) on the images' GPU

applies the same parameters to a batch of decoded pictures of any sizes:
    crop + resize   Pillow's two-pass fixed-point resampling of the box (Resample.c), bilinear or bicubic,
                    the passes in Pillow's order (`vertical_first`)
    flip            folded into the resize's second pass
    RandAugment     slot 1, then slot 2: Pillow's affine transforms (Rotate, ShearX/Y, TranslateX/YRel,
                    its matrices, pixel centres, filters and fill), its tables (AutoContrast, Equalize,
                    Invert, Posterize, Solarize, SolarizeAdd; Contrast and Brightness are blends with a
                    constant, so tables too) and blends (Color, Sharpness) in its float32 arithmetic
Exactness: equal to TrainTransform.apply bit for bit, every op, both slots and interpolations (0 levels
of tolerance; augment_cuda.cu's header gives the argument, test_gpu_augment.py checks it on the GPU).
The random erasing box stays in the parameters, for data.normalize_and_erase, as on the CPU path.

Cost per batch, whatever its size: the host packs the per-image arguments with numpy (`prepare`, ARGS:
344 bytes an image), one pinned host-to-device copy takes them over, and at most 9 kernels and a memset
follow (augment_cuda.cu's header lists them), all on the current stream: nothing waits for the GPU,
unless `params` is given on the GPU (it is copied to the host first, which waits). The kernels are
compiled on first use for the visible GPU (scan.jit_build, cached); if that fails, one warning gives the
reason and `available()` is False.
"""
import ctypes
import math
import threading
import warnings

import numpy as np
import PIL
import torch

import data

OPS = list(data.RANDAUGMENT_OPS)  # op index -> name
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OP_CODES = {  # name -> augment_cuda.cu's Op
    "AutoContrast": 2, "Equalize": 3, "Invert": 4, "PosterizeIncreasing": 5, "SolarizeIncreasing": 6,
    "SolarizeAdd": 7, "ContrastIncreasing": 8, "BrightnessIncreasing": 9, "ColorIncreasing": 10,
    "SharpnessIncreasing": 11, **{name: 1 for name in GEOMETRIC},
}
HISTOGRAM_OPS = [OP_CODES[name] for name in ("AutoContrast", "Equalize", "ContrastIncreasing")]  # tables of histograms
TABLE_OPS = HISTOGRAM_OPS + [OP_CODES[name] for name in ("Invert", "PosterizeIncreasing", "SolarizeIncreasing",
                                                         "SolarizeAdd", "BrightnessIncreasing")]
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])  # its resize's pass order changed in 13 (vertical_first)
MAX_SIZE = 8192  # output side: augment_cuda.cu counts one picture's pixels in int32
MAX_BATCH = 65535  # a CUDA grid dimension

# augment_cuda.cu's Slot and ImageArgs, field for field (8 bytes each, no padding)
SLOT = np.dtype([("op", "<i8"), ("bicubic", "<i8"), ("value", "<i8"), ("alpha", "<f8"),
                 ("matrix", "<f8", (6,)), ("fill", "<i8", (3,))])
ARGS = np.dtype([("pixels", "<u8"), ("height", "<i8"), ("width", "<i8"), ("box", "<f8", (4,)),
                 ("bicubic", "<i8"), ("flip", "<i8"), ("vertical_first", "<i8"), ("ksize", "<i8", (2,)),
                 ("coeff_offset", "<i8", (2,)), ("temp_offset", "<i8"), ("temp_first", "<i8"),
                 ("temp_count", "<i8"), ("slot", SLOT, (2,))])

_build = {"tried": False, "error": None, "lib": None}  # outcome of the one build attempt of this process
_lock = threading.Lock()  # one build when loader threads start together


# ----------------------------------------------------------------------------------------------
# Host side: the per-image arguments, from the parameters


def vertical_first(width, height, size):
    """Whether Pillow resizes a width x height picture to size x size with its vertical pass first
    (arrays in, bool array out). Pillow 13 does when that pass removes more rows than twice the
    columns the horizontal pass removes (ImagingResampleInner); Pillow 12 only for pictures more than
    100 times taller than wide (Image.resize; data.check_aspect refuses those anyway)."""
    if PILLOW_MAJOR >= 13:
        return (height - size > 0) & (height - size > 2 * (width - size))
    return (height > 100 * width) & (size < height)


def rotate_matrix(angle, size):
    """Image.rotate's inverse matrix (a, b, c, d, e, f) for `angle` degrees about the centre of a
    size x size picture, computed as Pillow computes it (its cosines rounded to 15 digits)."""
    angle = -math.radians(angle % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    centre = size / 2
    return a, b, a * -centre + b * -centre + 0.0 + centre, d, e, d * -centre + e * -centre + 0.0 + centre


def slot_args(op, level, sign, interpolation, size):
    """One RandAugment slot's SLOT fields for a batch: op (B,) indices into OPS or -1, level, sign,
    interpolation (B,) float64, as drawn. The parameters follow data.RANDAUGMENT_OPS's formulas."""
    op = op.astype(np.int64)
    index = {name: op == k for k, name in enumerate(OPS)}  # name -> (B,) bool
    slot = np.zeros(len(op), SLOT)
    slot["op"] = np.array([OP_CODES[name] for name in OPS])[op.clip(0)] * (op >= 0)
    slot["bicubic"] = interpolation
    slot["fill"] = data.FILL
    bits = 4 - np.trunc(4 * level).astype(np.int64)  # data._posterize: 8 or more keep all, 0 or less none
    mask = np.select([bits >= 8, bits > 0], [255, (255 << (8 - bits.clip(1, 7))) & 255], 0)
    slot["value"] = np.select(
        [index["PosterizeIncreasing"], index["SolarizeIncreasing"], index["SolarizeAdd"]],
        [mask, 256 - np.trunc(256 * level), np.trunc(110 * level)])
    slot["alpha"] = (1 + sign * 0.9 * level).astype(np.float32)  # ImageEnhance's factor, a C float in Blend.c
    matrix = np.zeros((len(op), 6))
    matrix[:, [0, 4]] = 1.0
    matrix[:, 1] = np.where(index["ShearX"], sign * 0.3 * level, 0.0)
    matrix[:, 3] = np.where(index["ShearY"], sign * 0.3 * level, 0.0)
    matrix[:, 2] = np.where(index["TranslateXRel"], sign * 0.45 * level * size, 0.0)
    matrix[:, 5] = np.where(index["TranslateYRel"], sign * 0.45 * level * size, 0.0)
    rotated = np.flatnonzero(index["Rotate"])
    if len(rotated):
        matrix[rotated] = [rotate_matrix(angle, size) for angle in (sign * 30 * level)[rotated].tolist()]
    slot["matrix"] = matrix
    return slot


def check_params(heights, widths, p):
    """A one-line ValueError for parameters Pillow or data.TrainTransform.apply would refuse, or that
    TrainTransform.draw never gives: p (B, 18) float64, the pictures' heights and widths (B,)."""
    box = p[:, :4].astype(np.float32)
    problems = [
        ((box[:, 0] < 0) | (box[:, 1] < 0), "a crop box offset is negative"),
        ((box[:, 2] > widths) | (box[:, 3] > heights), "a crop box exceeds its picture"),
        ((box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1]), "a crop box is inverted"),
        (~np.isin(p[:, [4, 9, 13]], (0, 1)).all(1), "an interpolation is not 0 or 1"),
        (~np.isin(p[:, [6, 10]], np.arange(-1, len(OPS))).all(1), f"an op is not an integer in -1 .. {len(OPS) - 1}"),
        (~((p[:, [7, 11]] >= 0) & (p[:, [7, 11]] <= 1)).all(1), "a level is outside [0, 1]"),
        (~np.isin(p[:, [8, 12]], (-1, 1)).all(1), "a sign is not -1 or 1"),
    ]
    for bad, what in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"gpu_augment: {what} (image {i}: params {p[i, :14].tolist()})")


def prepare(heights, widths, params, size):
    """The batch's packed arguments (ARGS (B,), the pixel pointers left 0) and its work buffers' sizes,
    from the pictures' heights and widths (B,) and params (B, 18) float64 as data.Params (numpy).

    The first pass's output is kept for the source rows (horizontal first) or columns (vertical
    first) [temp_first, temp_first + temp_count): Pillow's filter support on both sides of the box,
    plus one, so that it holds every row (column) Pillow's second pass reads (test_gpu_augment.py
    checks this against Pillow's bounds)."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    check_params(heights, widths, params)
    p, n = params, len(params)
    args = np.zeros(n, ARGS)
    box = p[:, :4].astype(np.float32)  # Pillow takes the box as C floats
    args["height"], args["width"], args["box"] = heights, widths, box
    args["bicubic"], args["flip"] = p[:, 4], p[:, 5] != 0
    vfirst = vertical_first(widths, heights, size)
    args["vertical_first"] = vfirst

    span = np.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], 1).astype(np.float64)  # (B, 2): x, y
    support = np.where(p[:, 4:5] == 1, 2.0, 1.0) * np.maximum(span / size, 1.0)  # as precompute_coeffs
    ksize = np.ceil(support).astype(np.int64) * 2 + 1
    weights = size * ksize  # (B, 2)
    starts = np.concatenate([[0], np.cumsum(weights.sum(1))[:-1]])
    args["ksize"] = ksize
    args["coeff_offset"] = np.stack([starts, starts + weights[:, 0]], 1)

    axis = np.where(vfirst, 0, 1)  # the axis along which the first pass keeps source indices
    rows = np.arange(n)
    low, high = box[rows, axis].astype(np.float64), box[rows, axis + 2].astype(np.float64)
    reach = support[rows, axis]
    length = np.where(vfirst, widths, heights)
    temp_first = np.maximum(np.floor(low - reach) - 1, 0).astype(np.int64)
    temp_count = np.minimum(np.ceil(high + reach) + 1, length).astype(np.int64) - temp_first
    temp_bytes = 3 * size * temp_count
    args["temp_first"], args["temp_count"] = temp_first, temp_count
    args["temp_offset"] = np.concatenate([[0], np.cumsum(temp_bytes)[:-1]])

    codes = []
    for k, start in enumerate((6, 10)):
        args["slot"][:, k] = slot_args(p[:, start], p[:, start + 1], p[:, start + 2], p[:, start + 3], size)
        codes.append(args["slot"][:, k]["op"])
    sizes = {"coeffs": int(weights.sum()), "temp": int(temp_bytes.sum()),
             "first_pass_items": int(temp_count.max()) * size if n else 0,
             "slots_used": sum(1 << k for k in (0, 1) if (codes[k] != 0).any()),
             "slots_with_histograms": sum(1 << k for k in (0, 1) if np.isin(codes[k], HISTOGRAM_OPS).any()),
             "slots_with_tables": sum(1 << k for k in (0, 1) if np.isin(codes[k], TABLE_OPS).any())}
    return args, sizes


# ----------------------------------------------------------------------------------------------
# The kernels


def _library():
    """Build augment_cuda.cu once per process; None (after one warning with the reason) if that failed."""
    with _lock:
        if not _build["tried"]:
            _build["tried"] = True
            try:
                import scan
                lib = scan.jit_build("augment_cuda.cu", "the augmentation kernels", cflags=["-fmad=false"])
                ptr, i32 = ctypes.c_void_p, ctypes.c_int
                lib.mv_augment.argtypes = [ptr, i32, i32, ctypes.c_longlong, ptr, ptr, ptr, i32, i32, i32,
                                           ptr, ptr, ptr, ptr, ptr]
                lib.mv_augment_error_string.restype = ctypes.c_char_p
                lib.mv_augment_error_string.argtypes = [i32]
                if lib.mv_augment_args_size() != ARGS.itemsize:
                    raise RuntimeError("gpu_augment.py's ARGS disagrees with augment_cuda.cu (a stale build?)")
                _build["lib"] = lib
            except Exception as e:  # a missing toolkit or a compiler error must not end the run
                _build["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(f"MambaVision: could not build the GPU augmentation kernels ({_build['error']}); "
                              "augment with Pillow instead", RuntimeWarning, stacklevel=3)
    return _build["lib"]


def available(device=None):
    """True if `augment` works on `device` (default: the current CUDA device): builds the kernels on
    the first call. False without CUDA, and (after one warning with the reason) if the build failed."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return _library() is not None


def _check_images(images):
    """The images' common CUDA device (None for no images), or a one-line ValueError."""
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise ValueError(f"gpu_augment.augment: image {i} is a {type(img).__name__}, not a tensor")
        if not img.is_cuda:
            raise ValueError(f"gpu_augment.augment needs CUDA tensors: image {i} is on {img.device}")
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 or img.numel() == 0:
            raise ValueError(f"gpu_augment.augment needs uint8 (3, H, W) pictures: image {i} is "
                             f"{img.dtype} {tuple(img.shape)}")
        if not img.is_contiguous():
            raise ValueError(f"gpu_augment.augment needs contiguous pictures: image {i} is not (call .contiguous())")
        if img.device != images[0].device:
            raise ValueError(f"gpu_augment.augment needs one device: image 0 is on {images[0].device}, "
                             f"image {i} on {img.device}")
    return images[0].device if images else None


def augment(images, params, size):
    """images: B uint8 CUDA tensors (3, H_i, W_i), planar RGB, contiguous, on one device; params: (B, 18)
    float64 as data.Params (the crop box in each image's pixels; on the host: on the GPU it is copied
    over first, which waits for the GPU) -> a new uint8 (B, 3, size, size) tensor on that device, equal
    to data.TrainTransform(size).apply's pictures.

    Queued on the current CUDA stream, returns without waiting for the GPU. As with any CUDA op, the
    images must not be freed before that stream has run it: pictures allocated on this stream are safe
    (the caching allocator reuses their memory in stream order), ones from another stream need
    `record_stream`. Thread-safe: loader threads may call it at once, each on its own stream. No images
    give an empty tensor on the current CUDA device."""
    images = list(images)
    if not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"gpu_augment.augment: size must be an int in 1 .. {MAX_SIZE}, not {size!r}")
    if not isinstance(params, torch.Tensor) or tuple(params.shape) != (len(images), len(data.Params._fields)):
        shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise ValueError(f"gpu_augment.augment: params must be a ({len(images)}, {len(data.Params._fields)}) "
                         f"tensor (data.Params per image), not {shape}")
    if len(images) > MAX_BATCH:
        raise ValueError(f"gpu_augment.augment: at most {MAX_BATCH} images a call, not {len(images)}")
    device = _check_images(images)
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    p = params.detach().to("cpu", torch.float64).numpy()
    args, sizes = prepare([img.shape[1] for img in images], [img.shape[2] for img in images], p, size)
    args["pixels"] = [img.data_ptr() for img in images]
    with torch.cuda.device(device):
        lib = _library()
        if lib is None:
            raise RuntimeError(f"gpu_augment's kernels could not be built ({_build['error']}): "
                               "check gpu_augment.available() and augment with Pillow")
        return _launch(lib, args, sizes, size, device)


def _launch(lib, args, sizes, size, device):
    """Copy the packed arguments over, allocate the work buffers, queue the kernels; -> the pictures."""
    n = len(args)

    def empty(shape, dtype=torch.uint8, needed=True):
        return torch.empty(shape, dtype=dtype, device=device) if needed else None

    packed = torch.from_numpy(args.view(np.uint8)).pin_memory().to(device, non_blocking=True)
    bounds = empty(n * 2 * size * 2, torch.int32)
    coeffs = empty(sizes["coeffs"], torch.int32)
    temp = empty(sizes["temp"])
    hist = empty(2 * n * 3 * 256, torch.int32, needed=sizes["slots_with_histograms"] != 0)
    lut = empty(n * 3 * 256, needed=sizes["slots_with_tables"] != 0)
    scratch = empty((n, 3, size, size), needed=sizes["slots_used"] != 0)
    pictures = empty((n, 3, size, size))
    def pointer(t):
        return None if t is None else t.data_ptr()

    code = lib.mv_augment(
        pointer(packed), n, size, sizes["first_pass_items"], pointer(bounds), pointer(coeffs), pointer(temp),
        sizes["slots_used"], sizes["slots_with_histograms"], sizes["slots_with_tables"],
        pointer(hist), pointer(lut), pointer(scratch), pointer(pictures),
        torch.cuda.current_stream(device).cuda_stream)
    if code != 0:
        raise RuntimeError(f"gpu_augment's kernels failed: {lib.mv_augment_error_string(code).decode()}")
    return pictures  # the buffers above may go: the caching allocator reuses them in stream order
