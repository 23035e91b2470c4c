"""JPEG decoding on the GPU with nvJPEG (jpeg_cuda.cu), with Pillow as the fallback for every file it refuses.

    if jpeg.available():
        images = jpeg.decode(datas, "cuda")   # [(3, H, W) uint8 CUDA tensor, or None]
        images = [im if im is not None else jpeg.decode_with_pillow(d).cuda() for im, d in zip(images, datas)]

`datas` are file contents as 1-D uint8 CPU tensors (`torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)`).
The extension is compiled on first use for the visible GPU, like scan.py's kernels; if it cannot be
built (no nvjpeg.h or libnvjpeg in the CUDA toolkit, a compiler error) or nvJPEG cannot start, one
warning gives the reason and `available()` is False. A file gets None where the GPU could not decode it
the way Pillow does (CMYK, YCCK or RGB-stored JPEGs, PNGs named .JPEG, truncated or corrupt files, 12-bit
or lossless JPEGs, images over Pillow's size limits): `decode_with_pillow` then decodes it exactly as the
CPU path (data.load_rgb) does, raising where that raises. Pixels differ from Pillow's by a few levels
(nvJPEG's IDCT and chroma upsampling are not libjpeg's; test_jpeg.py states the bounds). Glossary:
    engines     the GPU's hardware JPEG decoders (A100, H100, H200), used through NVJPEG_BACKEND_HARDWARE for
                the baseline files they accept; the others take nvJPEG's GPU-assisted default backend
    decoder     the nvJPEG handle, states and buffers of one GPU and slot (jpeg_cuda.cu's `Decoder`): made once, reused
    status      per-file result code of jpeg_cuda.cu: 0 decoded, else why not (`error_string`)
"""
import ctypes
import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data as datalib  # a module reference, not names: data.py may import this file

_build = {"tried": False, "error": None, "lib": None}  # outcome of the one build attempt of this process
_decoders = {}  # (device index, engines allowed, slot) -> decoder pointer (ctypes.c_void_p), None if it failed
_INFO_FIELDS = 6  # mv_jpeg_info's ints per file: width, height, components, subsampling, engines take it, status
_lock = threading.RLock()  # one build, one decoder per key, when loader threads start together


def _nvjpeg_paths():
    """(include dirs, linker flags) for nvJPEG: the CUDA toolkit's, or under MAMBAVISION_NVJPEG_HOME first (a
    root holding include/nvjpeg.h and lib/libnvjpeg.so*, e.g. the nvidia-nvjpeg wheel's nvidia/cu13). Linked
    with an rpath, so that libnvjpeg loads without LD_LIBRARY_PATH."""
    from torch.utils import cpp_extension

    roots = [Path(p) for p in (os.environ.get("MAMBAVISION_NVJPEG_HOME"), cpp_extension.CUDA_HOME) if p]
    if not roots:
        raise RuntimeError("no CUDA toolkit found (install nvcc or set CUDA_HOME)")
    includes = [p for r in roots for p in (r / "include", *sorted(r.glob("targets/*/include")))
                if (p / "nvjpeg.h").exists()]
    libdirs = [p for r in roots for p in (r / "lib64", r / "lib", *sorted(r.glob("targets/*/lib")))
               if any(p.glob("libnvjpeg.so*"))]
    if not includes or not libdirs:
        raise RuntimeError(f"no {'nvjpeg.h' if not includes else 'libnvjpeg.so'} under {', '.join(map(str, roots))}: "
                           "install the CUDA toolkit's nvJPEG or set MAMBAVISION_NVJPEG_HOME")
    libdir = libdirs[0]
    if (libdir / "libnvjpeg.so").exists():
        flag = "-lnvjpeg"
    else:  # no development symlink: name the versioned file (libnvjpeg.so.13) itself
        flag = "-l:" + min((p.name for p in libdir.glob("libnvjpeg.so.*")), key=len)
    return [str(includes[0])], [f"-L{libdir}", flag, f"-Wl,-rpath,{libdir}"]


def _build_extension():
    """Build jpeg_cuda.cu against nvJPEG (scan.jit_build); declare its functions."""
    import scan
    includes, ldflags = _nvjpeg_paths()
    lib = scan.jit_build("jpeg_cuda.cu", "the nvJPEG decoder", include_paths=includes, ldflags=ldflags)
    ptr, i32, ptrs = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)
    sizes, ints = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int)
    lib.mv_jpeg_error_string.restype = ctypes.c_char_p
    lib.mv_jpeg_error_string.argtypes = [i32]
    lib.mv_jpeg_create.argtypes = [i32, ptrs]
    lib.mv_jpeg_uses_hardware.argtypes = [ptr]
    lib.mv_jpeg_info.argtypes = [ptr, i32, ptrs, sizes, ints]
    lib.mv_jpeg_decode.argtypes = [ptr, i32, ptrs, sizes, ptrs, ints, ints, ptr, ints]
    if lib.mv_jpeg_info_fields() != _INFO_FIELDS:
        raise RuntimeError("jpeg.py's _INFO_FIELDS disagrees with jpeg_cuda.cu (a stale build?)")
    return lib


def _library():
    """Build the extension once per process; None (after one warning with the reason) if that failed."""
    with _lock:
        if not _build["tried"]:
            _build["tried"] = True
            try:
                _build["lib"] = _build_extension()
            except Exception as e:  # a missing toolkit or header, or a compiler error, must not end the run
                _build["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                warnings.warn(f"MambaVision: could not build the nvJPEG decoder ({_build['error']}); "
                              "decoding JPEGs with Pillow instead", RuntimeWarning, stacklevel=3)
    return _build["lib"]


def _cuda_device(device):
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"nvJPEG decodes onto a CUDA device, not {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _decoder(device, hardware=True, slot=0):
    """The decoder `slot` of `device` (made on first use), or None (after one warning) if nvJPEG cannot start there."""
    lib = _library()
    if lib is None:
        return None
    key = (device.index, bool(hardware), slot)
    with _lock:
        if key not in _decoders:
            state = ctypes.c_void_p()
            with torch.cuda.device(device):
                code = lib.mv_jpeg_create(int(bool(hardware)), ctypes.byref(state))
            _decoders[key] = state if code == 0 else None
            if code != 0:
                warnings.warn(f"MambaVision: nvJPEG could not start on {device} ({error_string(code)}); "
                              "decoding JPEGs with Pillow instead", RuntimeWarning, stacklevel=3)
    return _decoders[key]


def available(device=None):
    """True if `decode` works on `device` (a CUDA device; default the current one): builds the extension
    and starts nvJPEG there on the first call. False without CUDA, and (after one warning naming the reason)
    if the build or nvJPEG failed: the caller decodes with Pillow."""
    if not torch.cuda.is_available() or _library() is None:
        return False
    return _decoder(_cuda_device(device)) is not None


def uses_engines(device=None):
    """True if `device`'s decoder uses the hardware JPEG engines (False without them, or without nvJPEG)."""
    state = _decoder(_cuda_device(device)) if available(device) else None
    return state is not None and _build["lib"].mv_jpeg_uses_hardware(state) == 1


def error_string(code):
    """What a jpeg_cuda.cu code means (needs the built extension)."""
    return _build["lib"].mv_jpeg_error_string(int(code)).decode() if _build["lib"] is not None else f"code {code}"


def _as_tensor(data):
    """A file's bytes as a contiguous 1-D uint8 CPU tensor (given as one, or as bytes)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1 and not data.is_cuda):
        raise TypeError("expected the file's bytes as a 1-D uint8 CPU tensor (or bytes)")
    return data.contiguous()


def _fits_pillow_limits(w, h):
    """Sizes Pillow decodes without a warning or error (DecompressionBomb limit, data.check_aspect): the
    others go to Pillow, which then warns or raises exactly as on the CPU path."""
    limit = Image.MAX_IMAGE_PIXELS
    return (limit is None or w * h <= limit) and max(w, h) <= datalib.MAX_ASPECT * min(w, h)


def decode_with_status(datas, device=None, hardware=True, slot=0):
    """`decode`, also returning each file's status code (0 decoded; see `error_string`)."""
    device = _cuda_device(device) if torch.cuda.is_available() else None
    state = _decoder(device, hardware, slot) if device is not None else None
    if state is None:
        raise RuntimeError("nvJPEG is not available (see the warning): check jpeg.available() and decode with Pillow")
    lib, tensors = _build["lib"], [_as_tensor(d) for d in datas]
    n = len(tensors)
    if n == 0:
        return [], []
    data = (ctypes.c_void_p * n)(*[t.data_ptr() if t.numel() else None for t in tensors])
    lengths = (ctypes.c_size_t * n)(*[t.numel() for t in tensors])
    info = (ctypes.c_int * (n * _INFO_FIELDS))()
    _check(lib.mv_jpeg_info(state, n, data, lengths, info))
    fields = [info[k * _INFO_FIELDS:(k + 1) * _INFO_FIELDS] for k in range(n)]  # width, height, .., status
    with torch.cuda.device(device):
        outs = [torch.empty((3, f[1], f[0]), dtype=torch.uint8, device=device)
                if f[5] == 0 and _fits_pillow_limits(f[0], f[1]) else None for f in fields]
        pointers = (ctypes.c_void_p * n)(*[o.data_ptr() if o is not None else None for o in outs])
        widths = (ctypes.c_int * n)(*[f[0] for f in fields])
        heights = (ctypes.c_int * n)(*[f[1] for f in fields])
        status = (ctypes.c_int * n)()
        stream = torch.cuda.current_stream(device).cuda_stream
        _check(lib.mv_jpeg_decode(state, n, data, lengths, pointers, widths, heights, stream, status))
    codes = [f[5] if f[5] != 0 else status[k] for k, f in enumerate(fields)]
    return [o if o is not None and status[k] == 0 else None for k, o in enumerate(outs)], codes


def decode(datas, device=None, hardware=True, slot=0):
    """Decode JPEG files onto a CUDA device: `datas` a list of 1-D uint8 CPU tensors (file bytes); returns a
    list of (3, H, W) uint8 RGB tensors on `device`, None where nvJPEG could not or should not decode the
    file (use `decode_with_pillow` there). Runs on the current CUDA stream and returns once it is done.
    `hardware=False` keeps off the JPEG engines (for tests and comparisons). Thread-safe, and the GIL
    is released meanwhile: threads that decode at the same time, each on its own stream, pass
    different `slot`s (0, 1, ...: a decoder each, made on first use and kept), else they take turns."""
    return decode_with_status(datas, device, hardware, slot)[0]


def decode_with_pillow(data):
    """The CPU path's decode of one file's bytes (data.load_rgb on a BytesIO): a (3, H, W) uint8 CPU tensor.
    Raises where load_rgb raises (OSError for a truncated or unreadable file, Pillow's size limits)."""
    raw = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else _as_tensor(data).numpy().tobytes()
    img = datalib.load_rgb(io.BytesIO(raw))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _check(code):
    if code != 0:
        raise RuntimeError(f"nvJPEG decoder failed: {error_string(code)}")
