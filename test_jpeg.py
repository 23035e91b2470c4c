"""Tests of the GPU JPEG decoder (jpeg.py, jpeg_cuda.cu) against the CPU path (data.load_rgb, Pillow).

CPU tests (always run): without CUDA `available()` is False and nothing breaks; a failed build warns once;
`decode_with_pillow` is data.load_rgb exactly, for the odd files ImageNet holds.
GPU tests (skipped without CUDA), each with the JPEG engines allowed and kept off: photo-like JPEGs of
several sizes, qualities and subsamplings (4:2:0, 4:2:2, 4:4:4, greyscale, progressive) against Pillow;
files nvJPEG must refuse (truncated, a PNG, CMYK, RGB-stored, random bytes, empty) give None while the
batch's other files still decode; corrupt scan data never crashes; mixed-size batches, large batches,
repeat calls, a side stream.

Tolerance against Pillow, per pixel and channel, in levels of 0..255 (mean |diff|, max |diff|). Set before
a GPU run, then checked on one (H200, nvJPEG 13.0, 2026-12-03): everything passed but 4:2:0 on the
smallest pictures (61 x 45, 72 x 64: mean 3.16, max 23, bias under 0.02), small pictures being mostly
chroma edges, so that mean bound is 4.0. A layout or colour bug (planes swapped or transposed, wrong
YCbCr range) gives a mean difference of 10 or more, far above them:
    greyscale  mean < 1.0, max <= 8    only the IDCT differs (libjpeg's ISLOW integer IDCT vs nvJPEG's)
    4:4:4      mean < 1.5, max <= 16   plus YCbCr -> RGB rounding
    4:2:0/4:2:2 mean < 4.0, max <= 64  plus chroma upsampling: libjpeg interpolates ("fancy upsampling"),
                                       nvJPEG by default repeats each chroma sample; on a sharp colour
                                       edge the two differ by up to half the edge's contrast
and the mean signed difference of each channel within +-1.5 (rounding; a range or offset bug gives more).
"""
import functools
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import jpeg
import synthetic

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ENGINES = pytest.mark.parametrize("hardware", [True, False], ids=["engines", "default-backend"])
TOLERANCE = {"grey": (1.0, 8), "444": (1.5, 16), "422": (4.0, 64), "420": (4.0, 64)}  # mean, max |diff|
SUBSAMPLING = {"444": 0, "422": 1, "420": 2}  # Pillow's save(subsampling=...)
NOT_JPEG, NO_EOI, COLOR = 101, 103, 104  # jpeg_cuda.cu's status codes


# ----------------------------------------------------------------------------------------------
# Files


@functools.lru_cache(maxsize=None)
def photo(w, h, seed=0):
    """A photo-like (h, w, 3) uint8 picture (synthetic.photo_like), cached: the FFT is the slow part."""
    return synthetic.photo_like(np.random.default_rng(seed), w, h)


def encode(img, **save):
    buffer = io.BytesIO()
    img.save(buffer, **save)
    return buffer.getvalue()


def photo_jpeg(w, h, quality=90, kind="420", progressive=False, seed=0):
    """JPEG bytes of a photo-like picture; kind is '420', '422', '444' or 'grey'."""
    img = Image.fromarray(photo(w, h, seed))
    if kind == "grey":
        return encode(img.convert("L"), format="JPEG", quality=quality, progressive=progressive)
    return encode(img, format="JPEG", quality=quality, subsampling=SUBSAMPLING[kind], progressive=progressive)


def adobe_rgb(jpeg_bytes):
    """The same file with its JFIF APP0 marker replaced by an Adobe APP14 marker of transform 0: libjpeg then
    reads its three components as RGB, not YCbCr (nvJPEG must refuse it)."""
    assert jpeg_bytes[2:4] == b"\xff\xe0", "expected Pillow's JFIF APP0 first"
    rest = jpeg_bytes[4 + int.from_bytes(jpeg_bytes[4:6], "big"):]
    app14 = b"\xff\xee" + (14).to_bytes(2, "big") + b"Adobe" + b"\x00\x64" + b"\x00\x00" + b"\x00\x00" + b"\x00"
    return b"\xff\xd8" + app14 + rest


def odd_files():
    """The odd files of ImageNet and worse: {name: bytes}, none of which nvJPEG should decode."""
    good = photo_jpeg(160, 120)
    rgb = Image.fromarray(photo(160, 120))
    rng = np.random.default_rng(1)
    return {
        "truncated": good[: len(good) // 2],
        "png": encode(rgb, format="PNG"),
        "png16": encode(Image.fromarray((photo(160, 120)[..., 0].astype(np.uint16) * 257)), format="PNG"),
        "cmyk": encode(rgb.convert("CMYK"), format="JPEG", quality=90),
        "adobe_rgb": adobe_rgb(good),
        "random": bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
        "soi_then_random": b"\xff\xd8" + bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
        "empty": b"",
    }


def as_tensor(b):
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


def pillow(b):
    """The CPU path's decode (data.load_rgb) as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(data.load_rgb(io.BytesIO(b))).copy()).permute(2, 0, 1)


def assert_close(got, b, kind):
    ref = pillow(b)
    assert got is not None, "nvJPEG refused a file it should decode"
    assert got.dtype == torch.uint8 and got.is_cuda and got.shape == ref.shape, (got.shape, ref.shape)
    diff = got.cpu().int() - ref.int()
    mean, peak = diff.abs().float().mean().item(), diff.abs().max().item()
    bias = diff.float().mean(dim=(1, 2))
    bound_mean, bound_max = TOLERANCE[kind]
    stats = f"{kind} {tuple(ref.shape[1:])}: mean |diff| {mean:.3f}, max {peak}, bias {bias.tolist()} vs Pillow"
    print(stats)  # the measurements behind TOLERANCE: pytest -s shows them
    assert mean < bound_mean and peak <= bound_max and bias.abs().max().item() < 1.5, stats


# ----------------------------------------------------------------------------------------------
# CPU tests


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_without_cuda_unavailable_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: no CUDA is not a failure
        assert jpeg.available() is False
        assert jpeg.uses_engines() is False
    with pytest.raises(RuntimeError, match="not available"):
        jpeg.decode([as_tensor(photo_jpeg(32, 32))])


def test_build_failure_warns_once_then_unavailable(monkeypatch):
    def broken_build():
        raise RuntimeError("nvcc failed\nerror: something")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(jpeg, "_build_extension", broken_build)
    monkeypatch.setattr(jpeg, "_build", {"tried": False, "error": None, "lib": None})
    with pytest.warns(RuntimeWarning, match="could not build the nvJPEG decoder .*error: something"):
        assert jpeg.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert jpeg.available() is False


def test_decode_with_pillow_is_load_rgb(tmp_path):
    files = {"photo": photo_jpeg(120, 90), "grey": photo_jpeg(120, 90, kind="grey"),
             "progressive": photo_jpeg(120, 90, progressive=True), **odd_files()}
    for name, b in files.items():
        path = tmp_path / f"{name}.JPEG"  # the extension lies for some: decoding goes by content
        path.write_bytes(b)
        try:
            want = torch.from_numpy(np.asarray(data.load_rgb(str(path))).copy()).permute(2, 0, 1)
        except Exception as e:  # load_rgb refuses it: so must decode_with_pillow, with the same error
            with pytest.raises(type(e)):
                jpeg.decode_with_pillow(as_tensor(b))
            continue
        for given in (b, as_tensor(b)):
            got = jpeg.decode_with_pillow(given)
            assert got.dtype == torch.uint8 and got.shape == (3, *want.shape[1:]) and torch.equal(got, want), name


# ----------------------------------------------------------------------------------------------
# GPU tests


@pytest.fixture(scope="module")
def gpu():
    if not jpeg.available():
        pytest.fail(f"nvJPEG decoder unavailable on a CUDA machine: {jpeg._build['error'] or 'see the warning'}")
    return torch.device("cuda")


PHOTO_CASES = [  # (width, height, quality, kind, progressive)
    (500, 375, 90, "420", False),
    (375, 500, 75, "420", False),
    (500, 333, 50, "422", False),
    (333, 500, 95, "444", False),
    (250, 188, 90, "grey", False),
    (1024, 768, 85, "420", False),
    (61, 45, 90, "420", False),     # sides not multiples of the 16 x 16 block
    (17, 9, 90, "444", False),      # tiny
    (500, 375, 90, "420", True),    # progressive: never the engines
    (250, 188, 80, "grey", True),
]


@cuda
@ENGINES
@pytest.mark.parametrize("case", PHOTO_CASES, ids=lambda c: f"{c[0]}x{c[1]}-q{c[2]}-{c[3]}{'-prog' if c[4] else ''}")
def test_matches_pillow(gpu, hardware, case):
    w, h, quality, kind, progressive = case
    b = photo_jpeg(w, h, quality, kind, progressive)
    (got,), (code,) = jpeg.decode_with_status([as_tensor(b)], gpu, hardware)
    assert code == 0, jpeg.error_string(code)
    assert_close(got, b, kind)


@cuda
@ENGINES
def test_greyscale_gives_three_equal_planes(gpu, hardware):
    for progressive in (False, True):
        (got,) = jpeg.decode([as_tensor(photo_jpeg(250, 188, kind="grey", progressive=progressive))], gpu, hardware)
        assert got is not None and torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@cuda
@ENGINES
def test_channel_order(gpu, hardware):
    """Four flat quadrants (red, green, blue, white): each plane holds its own colour, in place."""
    a = np.zeros((128, 128, 3), np.uint8)
    a[:64, :64] = (230, 20, 20)
    a[:64, 64:] = (20, 230, 20)
    a[64:, :64] = (20, 20, 230)
    a[64:, 64:] = (240, 240, 240)
    for kind in ("444", "420"):
        b = encode(Image.fromarray(a), format="JPEG", quality=95, subsampling=SUBSAMPLING[kind])
        (got,) = jpeg.decode([as_tensor(b)], gpu, hardware)
        ref = pillow(b)
        for y, x in ((32, 32), (32, 96), (96, 32), (96, 96)):  # quadrant centres, away from the edges
            assert (got[:, y, x].cpu().int() - ref[:, y, x].int()).abs().max() <= 4, (kind, y, x)


@cuda
@ENGINES
def test_refused_files_give_none_and_the_rest_decode(gpu, hardware):
    odd = odd_files()
    good = [photo_jpeg(500, 375, 90), photo_jpeg(333, 500, 80, "444"), photo_jpeg(250, 188, 90, progressive=True)]
    names = ["good0", *odd, "good1", "good2"]
    files = [good[0], *odd.values(), good[1], good[2]]
    got, codes = jpeg.decode_with_status([as_tensor(b) for b in files], gpu, hardware)
    by_name = dict(zip(names, zip(got, codes)))
    for name in odd:
        assert by_name[name][0] is None, f"{name} decoded"
    assert by_name["truncated"][1] == NO_EOI
    assert by_name["png"][1] == by_name["png16"][1] == by_name["random"][1] == by_name["empty"][1] == NOT_JPEG
    assert by_name["cmyk"][1] == by_name["adobe_rgb"][1] == COLOR
    assert by_name["soi_then_random"][1] != 0
    for name, b, kind in (("good0", good[0], "420"), ("good1", good[1], "444"), ("good2", good[2], "420")):
        assert by_name[name][1] == 0, (name, jpeg.error_string(by_name[name][1]))
        assert_close(by_name[name][0], b, kind)


def corrupt(b, seed, with_markers):
    """`b` with 2 KB in the middle of its scan data overwritten: by random bytes other than FF (the markers
    stay well formed), or by random bytes with FF among them (stray markers). EOI stays in place."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256 if with_markers else 255, 2048, dtype=np.uint8).tobytes()
    start = len(b) // 2
    return b[:start] + noise + b[start + len(noise):]


@cuda
@ENGINES
def test_corrupt_scan_data_never_crashes(gpu, hardware):
    """nvJPEG may decode corrupt scan data to some picture or refuse it; either way the call returns and the
    good files of the batch decode right (on the engines a bad file fails the whole batch call, which is then
    retried file by file)."""
    good = [photo_jpeg(500, 375, 90, seed=s) for s in range(3)]
    bad = [corrupt(good[0], 1, False), corrupt(good[1], 2, True), corrupt(good[2], 3, True)]
    files = [good[0], bad[0], good[1], bad[1], good[2], bad[2]]
    got, codes = jpeg.decode_with_status([as_tensor(b) for b in files], gpu, hardware)
    for k in (1, 3, 5):
        assert got[k] is None or (got[k].shape == (3, 375, 500) and got[k].dtype == torch.uint8)
        assert (got[k] is None) == (codes[k] != 0)
    for k in (0, 2, 4):
        assert codes[k] == 0, jpeg.error_string(codes[k])
        assert_close(got[k], files[k], "420")


@cuda
@ENGINES
def test_mixed_sizes_batch(gpu, hardware):
    """One batch of ImageNet's sizes, qualities and subsamplings; the same batch again gives the same bits."""
    kinds, qualities = ("420", "444", "422", "grey"), (60, 90, 95)
    cases = [(w, h, qualities[k % 3], kinds[k % 4], k % 5 == 4)
             for k, (w, h) in enumerate([(w, h) for _, w, h in synthetic.IMAGENET_SIZE_MIX] * 2)]
    cases += [(61, 45, 90, "420", False), (200, 3, 90, "444", False), (3, 200, 90, "grey", False)]  # slivers
    files = [photo_jpeg(w, h, q, kind, progressive, seed=k % 3) for k, (w, h, q, kind, progressive) in enumerate(cases)]
    file_kinds = [case[3] for case in cases]
    first, codes = jpeg.decode_with_status([as_tensor(b) for b in files], gpu, hardware)
    for got, code, b, kind in zip(first, codes, files, file_kinds):
        assert code == 0, jpeg.error_string(code)
        assert_close(got, b, kind)
    again = jpeg.decode([as_tensor(b) for b in files], gpu, hardware)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@cuda
@ENGINES
def test_large_batch(gpu, hardware):
    files = [photo_jpeg(64 + 8 * (k % 5), 48 + 4 * (k % 7), 70 + k % 30, seed=k % 2) for k in range(300)]
    got = jpeg.decode([as_tensor(b) for b in files], gpu, hardware)
    for g, b in zip(got, files):
        assert_close(g, b, "420")


@cuda
def test_exif_orientation_is_not_applied(gpu):
    """load_rgb keeps the stored orientation (no exif_transpose); so must the GPU."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    b = encode(Image.fromarray(photo(200, 100)), format="JPEG", quality=90, exif=exif.tobytes())
    for hardware in (True, False):
        (got,) = jpeg.decode([as_tensor(b)], gpu, hardware)
        assert got.shape == (3, 100, 200)
        assert_close(got, b, "420")


@cuda
def test_side_stream_and_device_index(gpu):
    files = [as_tensor(photo_jpeg(500, 375, 90, seed=s)) for s in range(4)]
    want = jpeg.decode(files, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = jpeg.decode(files, torch.device("cuda", torch.cuda.current_device()))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@cuda
def test_engines_used_where_the_gpu_has_them(gpu):
    name = torch.cuda.get_device_name()
    if not any(n in name for n in ("A100", "H100", "H200", "H800", "A800", "GH200")) or "MIG" in name:
        pytest.skip(f"{name}: not known to have JPEG engines")
    assert jpeg.uses_engines(), f"{name} has JPEG engines, but nvJPEG's hardware backend could not start"


@cuda
@ENGINES
def test_decode_waits_for_work_queued_on_its_stream(gpu, hardware):
    """The outputs may be blocks just freed on the stream while queued kernels still read them (PyTorch's caching
    allocator hands a block on at once within its stream): the decode must not write them before those kernels
    ran. The JPEG engines write when called, not in stream order, so jpeg_cuda.cu waits for the stream first."""
    b = photo_jpeg(500, 375, 90)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for trial in range(10):
            held = torch.full((3, 375, 500), 7, dtype=torch.uint8, device=gpu)  # the output's size and stream
            torch.cuda._sleep(20_000_000)  # keeps the stream busy for several ms
            total = held.sum(dtype=torch.int64)  # queued behind the sleep: reads `held`
            del held  # freed while that read is queued: the decode's output may take its block
            (got,) = jpeg.decode([as_tensor(b)], gpu, hardware)
            assert total.item() == 7 * 3 * 375 * 500, f"trial {trial}: the decode wrote before queued work read"
            assert_close(got, b, "420")
