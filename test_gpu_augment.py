"""Tests of gpu_augment.py and augment_cuda.cu against data.py's Pillow path (the reference), and of the
parameter draws they share (TrainTransform.draw).

Tolerance: none. On the GPU every test compares augment's pictures with TrainTransform.apply's bit for
bit (0 levels): each op in each slot at 7 levels, both signs and interpolations, on photo-like, squeezed,
flat and two-valued pictures; pairs of ops in both slots; the crop + resize alone over random and border
boxes on pictures from 37 x 23 (an upscale) to 2000 x 300 and 300 x 2000, both filters, flips; whole
batches of mixed sizes with random draws; a side stream and two threads. Equality is not vacuous: the ops
change most pictures, and a box one pixel off, a missing flip, the opposite sign or a level 1% off fail.
GPU tests skip without CUDA, or when the kernels could not be built (available() False, with a warning).

On the CPU: a numpy replica of the resize arithmetic that augment_cuda.cu implements, with gpu_augment's
pass order, equals Pillow's (so a Pillow that changes its resampling shows here first); prepare's
intermediate covers every row or column Pillow's second pass reads and its weight rows every tap, over
many random draws; the input checks; the draws.
"""
import math
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import data
import gpu_augment
import synthetic

S = 48

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu():
    """The device the GPU tests run on; skips them if the kernels could not be built."""
    if not gpu_augment.available():
        pytest.skip("gpu_augment's kernels could not be built here (see the warning)")
    return torch.device("cuda")


def tensor(img):
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def pictures(size=S):
    """size x size test pictures: photo-like, the same squeezed into 60..180 (so that AutoContrast and
    Equalize have work to do), a flat one (their identity cases) and a two-valued one."""
    rng = np.random.default_rng(0)
    photo = synthetic.photo_like(rng, size, size)
    squeezed = (60 + photo.astype(np.float64) * 120 / 255).astype(np.uint8)
    flat = np.full((size, size, 3), 77, np.uint8)
    two = np.where(np.arange(size)[:, None, None] < size // 3, 30, 200).repeat(size, 1).repeat(3, 2).astype(np.uint8)
    return [Image.fromarray(p) for p in (photo, squeezed, flat, two, synthetic.photo_like(rng, size, size))]


def op_params(t, op, level, sign, interp, slot=1):
    """Params for an S x S picture: the whole picture (an identity resize), no flip, `op` in `slot`."""
    p = t.draw(S, S, random.Random(0))
    p[:6] = torch.tensor([0, 0, S, S, 0, 0])
    p[6:14] = torch.tensor([-1, 0, 1, 0] * 2)
    start = 6 if slot == 1 else 10
    p[start:start + 4] = torch.tensor([op, level, sign, interp])
    p[14:] = 0
    return p


def run(images, params, size, device):
    """gpu_augment.augment of PIL images -> uint8 (B, 3, size, size) on the host."""
    return gpu_augment.augment([tensor(img).to(device) for img in images], torch.stack(params), size).cpu()


def references(t, images, params):
    return torch.stack([tensor(t.apply(img, p)) for img, p in zip(images, params)])


def assert_equal(out, refs, params):
    """out == refs, naming the first pictures that differ and by how much."""
    bad = (out != refs).flatten(1).any(1).nonzero()[:, 0].tolist()
    assert not bad, (f"{len(bad)} of {len(out)} pictures differ", [params[i][:14].tolist() for i in bad[:3]],
                     [(out[i].int() - refs[i].int()).abs().max().item() for i in bad[:3]])


# ---------------------------------------------------------------------------------------------- RandAugment

LEVELS = (0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 1.0)


@needs_gpu
@pytest.mark.parametrize("name", gpu_augment.OPS)
def test_each_op_matches_pillow(name, gpu):
    """Each RandAugment op alone, at 7 levels, both signs, both interpolations, on 5 pictures, in slot 1
    and slot 2: all of them in one batch, equal to the Pillow path."""
    t = data.TrainTransform(S, erase_prob=0.0)
    k = gpu_augment.OPS.index(name)
    images, params = [], []
    for i, img in enumerate(pictures()):
        for level in LEVELS:
            for sign in (-1.0, 1.0):
                for interp in (0, 1):
                    images.append(img)
                    params.append(op_params(t, k, level, sign, interp, slot=1 + (i + interp) % 2))
    out = run(images, params, S, gpu)
    assert_equal(out, references(t, images, params), params)
    changed = (out != torch.stack([tensor(img) for img in images])).flatten(1).any(1)
    assert changed.float().mean() > 0.3, name  # the equality is not vacuous: the op changes most pictures


@needs_gpu
def test_two_slots_apply_in_order(gpu):
    """Both slots used, 60 random pairs of ops and parameters on S x S pictures (an identity resize):
    exact; and the order matters (slot 1 first), so the test would see a swap."""
    t = data.TrainTransform(S, erase_prob=0.0)
    rng = random.Random(0)
    imgs = pictures()
    images, params, swapped = [], [], []
    for k in range(60):
        p = op_params(t, rng.randrange(15), rng.random(), rng.choice([-1.0, 1.0]), rng.randrange(2))
        p[10:14] = torch.tensor([rng.randrange(15), rng.random(), rng.choice([-1.0, 1.0]), rng.randrange(2)])
        images.append(imgs[k % len(imgs)])
        params.append(p)
        swapped.append(torch.cat([p[:6], p[10:14], p[6:10], p[14:]]))
    refs = references(t, images, params)
    assert_equal(run(images, params, S, gpu), refs, params)
    assert not torch.equal(run(images, swapped, S, gpu), refs)


@needs_gpu
def test_geometric_ops_are_sensitive_to_their_parameters(gpu):
    """Exact equality is a strict test of the geometry: the opposite sign or a level 1% off gives
    another picture, for each geometric op and interpolation."""
    t = data.TrainTransform(S, erase_prob=0.0)
    img = pictures()[0]
    for name in gpu_augment.GEOMETRIC:
        k = gpu_augment.OPS.index(name)
        for interp in (0, 1):
            ref = tensor(t.apply(img, op_params(t, k, 0.5, 1.0, interp)))
            for wrong in (op_params(t, k, 0.5, -1.0, interp), op_params(t, k, 0.505, 1.0, interp)):
                assert not torch.equal(run([img], [wrong], S, gpu)[0], ref), name


# ---------------------------------------------------------------------------------------------- crop + resize


def border_boxes(w, h):
    """Boxes on the picture's border and corners, the whole picture, single pixels and lines."""
    a, b = max(w // 3, 1), max(h // 3, 1)
    return [(0, 0, w, h), (0, 0, a, b), (w - a, h - b, w, h), (0, h - b, a, h), (w - a, 0, w, b),
            (0, 0, 1, 1), (w - 1, h - 1, w, h), (0, 0, w, 1), (0, 0, 1, h), (0, (h - b) // 2, w, (h + b) // 2)]


@needs_gpu
@pytest.mark.parametrize("w, h, size", [(37, 23, 48), (500, 375, 224), (1024, 700, 224), (2000, 300, 224),
                                        (300, 2000, 224), (40, 300, 32), (97, 61, 48), (224, 224, 224)])
def test_crop_resize_and_flip_match_pillow(w, h, size, gpu):
    """Random boxes (TrainTransform.draw) and border boxes, both interpolations, downscales (up to 9x)
    and upscales, odd aspect ratios (300 x 2000 resizes vertically first in Pillow 13), flips as drawn:
    exact. A box one source pixel off, or a missing flip, is not."""
    img = Image.fromarray(synthetic.photo_like(np.random.default_rng(w * h), w, h))
    t = data.TrainTransform(size, randaugment=False, erase_prob=0.0)
    params = []
    for seed in range(12):
        p = t.draw(w, h, random.Random(seed))
        p[4] = seed % 2
        params.append(p)
    for k, box in enumerate(border_boxes(w, h)):
        for interp in (0, 1):
            p = t.draw(w, h, random.Random(k))
            p[:5] = torch.tensor([*box, interp], dtype=torch.float64)
            params.append(p)
    out = run([img] * len(params), params, size, gpu)
    refs = references(t, [img] * len(params), params)
    assert_equal(out, refs, params)
    shifted = [p.clone() for p in params[:12]]
    for p in shifted:  # one pixel to the right, or to the left, or (a full-width box) one column narrower
        if p[2] < w:
            p[[0, 2]] += 1
        elif p[0] >= 1:
            p[[0, 2]] -= 1
        else:
            p[2] -= 1
    unflipped = [p.clone() for p in params[:12]]
    for p in unflipped:
        p[5] = 1 - p[5]
    for wrong in (shifted, unflipped):
        assert not (run([img] * 12, wrong, size, gpu) == refs[:12]).flatten(1).all(1).any()


@needs_gpu
@pytest.mark.parametrize("seed", range(3))
def test_whole_pipeline_on_a_batch_of_sizes(seed, gpu):
    """Random draws (crop, flip, both slots), a batch of pictures of different sizes in one call: exact;
    the erase box is left in the parameters (normalize_and_erase's job)."""
    rng = np.random.default_rng(seed)
    sizes = [(80, 70), (64, 64), (120, 50), (50, 90), (200, 150), (37, 23), (500, 375), (300, 900)] * 5
    imgs = [Image.fromarray(synthetic.photo_like(rng, w, h)) for w, h in sizes]
    t = data.TrainTransform(S)
    params = [t.draw(*img.size, random.Random(100 * seed + i)) for i, img in enumerate(imgs)]
    out = run(imgs, params, S, gpu)
    assert out.shape == (len(imgs), 3, S, S) and out.dtype == torch.uint8
    refs, boxes = zip(*(t.finish(img, p) for img, p in zip(imgs, params)))
    assert_equal(out, torch.stack(refs), params)
    assert torch.equal(torch.stack(boxes), torch.stack(params)[:, 14:].long())


@needs_gpu
def test_streams_threads_and_gpu_params(gpu):
    """Queued on the current stream (a side stream here), from two threads at once, with the params on
    the GPU (copied to the host first): the same pictures."""
    rng = np.random.default_rng(5)
    imgs = [Image.fromarray(synthetic.photo_like(rng, w, h)) for w, h in [(90, 70), (60, 100), (200, 120)] * 4]
    t = data.TrainTransform(S)
    params = torch.stack([t.draw(*img.size, random.Random(i)) for i, img in enumerate(imgs)])
    refs = references(t, imgs, params)
    images = [tensor(img).to(gpu) for img in imgs]
    gpu_params = params.to(gpu)
    torch.cuda.synchronize()  # the side streams below do not wait for the default one
    results = {}

    def work(key, p):
        stream = torch.cuda.Stream(gpu)
        with torch.cuda.stream(stream):
            out = gpu_augment.augment(images, p, S)
        stream.synchronize()
        results[key] = out.cpu()

    threads = [threading.Thread(target=work, args=(k, params if k == 0 else gpu_params)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(2):
        assert_equal(results[k], refs, params)


@needs_gpu
def test_launches_do_not_grow_with_the_batch(gpu):
    """The kernels of one call (augment_cuda.cu's header: at most 9) are as many for 4 as for 64 images."""
    from torch.profiler import ProfilerActivity, profile

    names = ("coefficients_kernel", "first_pass_kernel", "second_pass_kernel", "histogram_kernel", "lut_kernel",
             "apply_kernel")
    rng = np.random.default_rng(6)
    t = data.TrainTransform(S)
    counts = []
    for n in (4, 64):
        imgs = [tensor(Image.fromarray(synthetic.photo_like(rng, 80, 60))).to(gpu) for _ in range(n)]
        params = torch.stack([t.draw(80, 60, random.Random(i)) for i in range(n)])
        # Equalize, then Contrast: every kernel runs, in both slots
        params[:, [6, 10]] = torch.tensor([1.0, 8.0], dtype=params.dtype)
        gpu_augment.augment(imgs, params, S)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gpu_augment.augment(imgs, params, S)
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in prof.key_averages() if any(k in e.key for k in names)))
    if counts[0] == 0:
        pytest.skip("the profiler saw no kernels (no CUPTI here)")
    assert counts[0] == counts[1] == 9, counts


# ---------------------------------------------------------------------------------------------- on the CPU
# A numpy replica of the resize arithmetic augment_cuda.cu implements (Resample.c's)


def pillow_coefficients(in_size, in0, in1, out_size, bicubic):
    """precompute_coeffs + normalize_coeffs_8bpc: (first tap (out,), taps (out,), int64 weights (out, ksize))."""
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(in1 - in0) / out_size  # the box in float32, as Pillow takes it
    filterscale = max(scale, 1.0)
    support = (2.0 if bicubic else 1.0) * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = float(in0) + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    taps = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    x = np.abs(((np.arange(ksize) + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    if bicubic:  # a = -0.5
        w = np.where(x < 1.0, ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1,
                     np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))
    else:
        w = np.where(x < 1.0, 1.0 - x, 0.0)
    w = np.where(np.arange(ksize) < taps[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # summed in order, as Pillow's loop
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << 22)
    return xmin, taps, np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)


def resample(img, first, taps, weights, axis):
    """One pass along axis (0 rows, 1 columns) of img (H, W, 3): from 2^21 plus the weighted pixels, clip8."""
    src = np.moveaxis(img, axis, 0).astype(np.int64)
    total = np.full((len(first),) + src.shape[1:], 1 << 21, np.int64)
    for j in range(weights.shape[1]):
        total += src[np.minimum(first + j, len(src) - 1)] * np.where(j < taps, weights[:, j], 0)[:, None, None]
    return np.moveaxis(np.clip(total >> 22, 0, 255).astype(np.uint8), 0, axis)


def replica_resize(img, size, bicubic, box):
    """img (H, W, 3) uint8 -> (size, size, 3) as augment_cuda.cu computes it: both passes always, in
    gpu_augment.vertical_first's order."""
    h, w = img.shape[:2]
    horizontal = pillow_coefficients(w, box[0], box[2], size, bicubic)
    vertical = pillow_coefficients(h, box[1], box[3], size, bicubic)
    if gpu_augment.vertical_first(np.array([w]), np.array([h]), size)[0]:
        return resample(resample(img, *vertical, axis=0), *horizontal, axis=1)
    return resample(resample(img, *horizontal, axis=1), *vertical, axis=0)


def test_resize_arithmetic_matches_pillow():
    """The replica of the two passes equals Pillow's img.resize((S, S), filter, box) on upscales,
    downscales (up to 9x), border boxes, fractional boxes (draft mode), pictures whose size is the
    output's (Pillow skips a pass there: an identity pass is exact) and tall ones (Pillow 13 resizes
    them vertically first)."""
    rng, r = np.random.default_rng(0), random.Random(0)
    cases = 0
    for w, h, size in [(37, 23, 48), (500, 375, 64), (2000, 300, 224), (300, 2000, 32), (40, 300, 24),
                       (24, 50, 24), (60, 24, 24), (5, 7, 16)]:
        img = synthetic.photo_like(rng, w, h)
        boxes = [data.random_crop_box(w, h, r) for _ in range(3)] + border_boxes(w, h)[:6]
        boxes.append((r.uniform(0, w / 3), r.uniform(0, h / 3), r.uniform(w / 2, w), r.uniform(h / 2, h)))
        for box in boxes:
            for bicubic in (0, 1):
                filt = data.RANDOM_INTERPOLATIONS[bicubic]
                ref = np.asarray(Image.fromarray(img).resize((size, size), filt, box=box))
                assert np.array_equal(replica_resize(img, size, bicubic, box), ref), (w, h, size, box, bicubic)
                cases += 1
    assert cases == 8 * 10 * 2


def test_intermediate_covers_what_pillow_reads():
    """Over 2,000 random draws on pictures of many shapes (and border boxes): prepare keeps the first
    pass's output for every source row (column, vertical first) Pillow's second pass reads, inside the
    picture, and reserves weights for every tap."""
    r = random.Random(1)
    shapes, params = [], []
    t = data.TrainTransform(224)
    for k in range(2000):
        w, h = r.choice([(500, 375), (375, 500), (37, 23), (2000, 300), (300, 2000), (1, 100), (100, 1)]) \
            if k % 2 else (r.randint(1, 3000), r.randint(1, 3000))
        p = t.draw(w, h, r)
        if k % 7 == 0:
            p[:4] = torch.tensor(r.choice(border_boxes(w, h)), dtype=torch.float64)
        shapes.append((h, w))
        params.append(p)
    heights, widths = np.array(shapes).T
    args, sizes = gpu_augment.prepare(heights, widths, torch.stack(params).numpy(), 224)
    assert sizes["temp"] == (3 * 224 * args["temp_count"]).sum()
    for a, p in zip(args, params):
        h, w = a["height"], a["width"]
        box, bicubic = p[:4].tolist(), int(p[4])
        x = pillow_coefficients(w, box[0], box[2], 224, bicubic)
        y = pillow_coefficients(h, box[1], box[3], 224, bicubic)
        assert a["ksize"].tolist() == [x[2].shape[1], y[2].shape[1]]
        assert x[1].max() <= a["ksize"][0] and y[1].max() <= a["ksize"][1]
        first, taps = (x if a["vertical_first"] else y)[:2]
        length = w if a["vertical_first"] else h
        assert 0 <= a["temp_first"] <= first[0] and first[-1] + taps[-1] <= a["temp_first"] + a["temp_count"] <= length


def test_prepare_packs_the_slots():
    """prepare's flags say which slots have an op, a histogram op, a table op; the packing is 344 bytes an
    image (augment_cuda.cu's ImageArgs, checked against the build at load)."""
    t = data.TrainTransform(S)
    ops = {name: k for k, name in enumerate(gpu_augment.OPS)}
    cases = [((-1, -1), (0, 0, 0)), ((ops["Rotate"], -1), (1, 0, 0)), ((-1, ops["Invert"]), (2, 0, 2)),
             ((ops["Equalize"], ops["ColorIncreasing"]), (3, 1, 1)),
             ((ops["ContrastIncreasing"], ops["AutoContrast"]), (3, 3, 3))]
    for (op1, op2), flags in cases:
        p = t.draw(S, S, random.Random(0))
        p[[6, 10]] = torch.tensor([op1, op2], dtype=torch.float64)
        args, sizes = gpu_augment.prepare([S], [S], p[None].numpy(), S)
        assert (sizes["slots_used"], sizes["slots_with_histograms"], sizes["slots_with_tables"]) == flags
    assert gpu_augment.ARGS.itemsize == 344


def test_bad_input_raises_a_clear_error():
    """One-line ValueErrors: CPU tensors, a wrong dtype or shape, params of the wrong shape, a box
    outside its picture, an op that does not exist."""
    img = torch.zeros((3, 20, 30), dtype=torch.uint8)
    p = data.TrainTransform(S).draw(30, 20, random.Random(0))[None]
    for images, params, match in [([img], p, "CUDA"), ([img[0]], p, "CUDA"), ("not a list", p, "tensor"),
                                  ([img], p[0], r"\(1, 18\)")]:
        with pytest.raises(ValueError, match=match):
            gpu_augment.augment(images, params, S)
    with pytest.raises(ValueError, match="size"):
        gpu_augment.augment([img], p, 0)
    for column, value, match in [(2, 31.0, "exceeds"), (0, -1.0, "negative"), (6, 15.0, "op"), (7, 1.5, "level")]:
        q = p.clone()
        q[0, column] = value
        with pytest.raises(ValueError, match=match):
            gpu_augment.prepare([20], [30], q.numpy(), S)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="uint8"):
            gpu_augment.augment([img.float().cuda()], p, S)


# ---------------------------------------------------------------------------------------------- the draws

def test_draws_follow_the_policy():
    """Over 20,000 samples: each slot skipped with probability 0.5, the 15 ops equally often, the
    magnitude N(9, 0.5) clipped to [0, 10] (level = magnitude / 10), signs, interpolations and flips
    half and half, erasing 1 in 4; compared with the policy's own draws (the old code's formulas)."""
    n = 20000
    t = data.TrainTransform(224)
    p = data.Params(*torch.stack([t.draw(500, 375, random.Random(seed)) for seed in range(n)]).unbind(1))
    ops = torch.cat([p.op1, p.op2])
    assert abs((ops < 0).float().mean() - 0.5) < 0.015
    counts = torch.bincount(ops[ops >= 0].long(), minlength=15).float() / (ops >= 0).sum()
    assert len(counts) == 15 and (counts - 1 / 15).abs().max() < 0.01, counts
    rng = random.Random(0)
    policy = torch.tensor([min(max(rng.gauss(9.0, 0.5), 0.0), 10.0) / 10 for _ in range(2 * n)])
    levels = torch.cat([p.level1, p.level2]).float()
    assert abs(levels.mean() - policy.mean()) < 0.002 and abs(levels.std() - policy.std()) < 0.002
    assert abs(levels.mean() - 0.9) < 0.002 and 0.045 < levels.std() < 0.05
    assert levels.max() <= 1.0 and levels.min() >= 0.0
    for column in (torch.cat([p.sign1, p.sign2]) > 0, torch.cat([p.interp1, p.interp2]), p.interpolation, p.flip):
        assert abs(column.float().mean() - 0.5) < 0.015
    assert set(torch.cat([p.sign1, p.sign2]).tolist()) == {-1.0, 1.0}
    assert abs((p.erase_height > 0).float().mean() - 0.25) < 0.015
    boxes = torch.stack([p.left, p.top, p.right, p.bottom], 1)[:200]  # the box comes first, as random_crop_box draws it
    assert boxes.tolist() == [list(data.random_crop_box(500, 375, random.Random(seed))) for seed in range(200)]


def test_pillow_path_is_apply_of_draw(tmp_path):
    """TrainTransform(img, rng) = apply(img, draw(w, h, rng)) plus the drawn erase box, and the
    draft-mode load draws the same parameters on the full size, with the box divided by the scale."""
    img = Image.fromarray(synthetic.photo_like(np.random.default_rng(2), 90, 70))
    t = data.TrainTransform(S)
    for seed in range(20):
        x, box = t(img, random.Random(seed))
        params = t.draw(90, 70, random.Random(seed))
        assert params.shape == (len(data.Params._fields),) and params.dtype == torch.float64
        assert torch.equal(x, tensor(t.apply(img, params))) and torch.equal(box, params[14:].long())
    w, h = 1200, 900
    Image.fromarray(synthetic.photo_like(np.random.default_rng(3), w, h)).save(tmp_path / "big.JPEG")
    reduced = 0
    for seed in range(10):
        decoded, params = t.load(tmp_path / "big.JPEG", random.Random(seed))
        full = t.draw(w, h, random.Random(seed))
        scale = w / decoded.size[0]
        reduced += scale > 1
        assert torch.equal(params[4:], full[4:]) and torch.allclose(params[:4] * scale, full[:4])
        assert torch.equal(t.finish(decoded, params)[0], tensor(t.apply(decoded, params)))
    assert reduced >= 5
