"""CPU tests of data.py (folders, decoding, transforms, mixup/cutmix, sampling), of synthetic.py's
image folders and of bench.py's loader benchmark."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import step
import synthetic

MEAN, STD = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_folder(root, counts, size=(40, 30)):
    """root/<class>/<k>.JPEG with random pixels; counts: {class name: number of images}."""
    for c, n in counts.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(n):
            random_image(*size, seed=hash((c, k)) % 2**32).save(os.path.join(root, c, f"{k}.JPEG"))
    return str(root)


# ---------------------------------------------------------------------------------------------- folders

def test_image_folder_classes_samples_and_decoding(tmp_path):
    root = write_folder(tmp_path / "train", {"b_cls": 2, "a_cls": 3})
    # the odd files of real ImageNet: CMYK and greyscale JPEGs, a PNG saved under a .JPEG name
    random_image(20, 20).convert("CMYK").save(tmp_path / "train" / "a_cls" / "cmyk.JPEG")
    random_image(20, 20).convert("L").save(tmp_path / "train" / "b_cls" / "grey.JPEG")
    random_image(20, 20).save(tmp_path / "train" / "b_cls" / "png.JPEG", format="PNG")
    (tmp_path / "train" / "a_cls" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(root)
    assert ds.classes == ["a_cls", "b_cls"]
    assert len(ds) == 8 and [label for _, label in ds.samples] == [0] * 4 + [1] * 4
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape[0] == 3 and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ds.num_bad == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="no image files"):  # none of the classes asked for has a folder
        data.ImageFolder(str(tmp_path / "empty"), classes=["ant"])
    with pytest.raises(data.DataError, match="not in train/: zebra; val/ lacks classes of train/: ant"):
        data.check_same_classes(["ant", "bee"], ["bee", "zebra"])
    data.check_same_classes(["ant", "bee"], ["ant", "bee"])


def test_class_folder_without_images_is_refused_by_name(tmp_path):
    root = write_folder(tmp_path, {"ant": 2, "bee": 0})
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "bee" / ".hidden.JPEG").write_bytes((tmp_path / "ant" / "0.JPEG").read_bytes())
    with pytest.raises(data.DataError, match=r"class folder .*/bee holds no images \(files ending in \.jpeg, "):
        data.ImageFolder(root)


def test_unreadable_class_folder_is_refused_by_name(tmp_path, monkeypatch):
    root = write_folder(tmp_path, {"ant": 2, "bee": 2})
    scandir = os.scandir

    def refuse_bee(path):
        if os.path.basename(path) == "bee":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_bee)  # the tests may run as root, whom chmod does not stop
    with pytest.raises(data.DataError, match=r"cannot read folder .*/bee \(Permission denied\): fix its permissions"):
        data.ImageFolder(root)


def image_names(ds):
    """{class: paths relative to the root, in sample order}."""
    names = {}
    for path, label in ds.samples:
        names.setdefault(ds.classes[label], []).append(os.path.relpath(path, ds.root))
    return names


def test_symlink_to_the_parent_folder_adds_nothing(tmp_path):
    root = write_folder(tmp_path / "train", {"checker": 2, "dots": 3})
    os.makedirs(tmp_path / "val" / "checker")
    (tmp_path / "val" / "checker" / "v.JPEG").write_bytes((tmp_path / "train" / "dots" / "0.JPEG").read_bytes())
    os.symlink("..", tmp_path / "train" / "checker" / "up")  # -> train/: every class again, ~40 levels deep
    os.symlink("../..", tmp_path / "train" / "dots" / "top")  # -> above train/: val/ too
    assert image_names(data.ImageFolder(root)) == {"checker": ["checker/0.JPEG", "checker/1.JPEG"],
                                                   "dots": ["dots/0.JPEG", "dots/1.JPEG", "dots/2.JPEG"]}


def test_symlink_loop_to_the_folder_itself_counts_each_image_once(tmp_path):
    root = write_folder(tmp_path, {"a": 2, "b": 1})
    os.makedirs(tmp_path / "a" / "sub")
    random_image(8, 8).save(tmp_path / "a" / "sub" / "s.JPEG")
    os.symlink(".", tmp_path / "a" / "self")
    os.symlink("..", tmp_path / "a" / "sub" / "back")  # -> a/ again, from below
    assert image_names(data.ImageFolder(root)) == {"a": ["a/0.JPEG", "a/1.JPEG", "a/sub/s.JPEG"], "b": ["b/0.JPEG"]}


def test_symlinked_folders_are_followed_but_never_into_two_classes(tmp_path):
    elsewhere = write_folder(tmp_path / "elsewhere", {"more": 2})
    root = write_folder(tmp_path / "train", {"a": 1})
    os.symlink(os.path.join(elsewhere, "more"), tmp_path / "train" / "b")  # a whole class on another disk
    os.symlink(os.path.join(elsewhere, "more"), tmp_path / "train" / "a" / "extra")
    with pytest.raises(data.DataError, match=r"train/a/extra leads to .*/more, which belongs to class b: an image "
                                             r"needs one class; remove the link"):
        data.ImageFolder(root)
    os.remove(tmp_path / "train" / "a" / "extra")
    assert image_names(data.ImageFolder(root)) == {"a": ["a/0.JPEG"], "b": ["b/0.JPEG", "b/1.JPEG"]}


def test_hidden_files_and_folders_are_skipped_at_every_depth(tmp_path):
    root = write_folder(tmp_path, {"a": 1, ".cache": 1})
    for hidden in ("a/.ipynb_checkpoints", "a/sub/.thumbs"):
        os.makedirs(tmp_path / hidden)
        random_image(8, 8).save(tmp_path / hidden / "copy.JPEG")
    random_image(8, 8).save(tmp_path / "a" / "sub" / "kept.JPEG")
    random_image(8, 8).save(tmp_path / "a" / "._0.JPEG")  # macOS's resource-fork twin
    ds = data.ImageFolder(root)
    assert ds.classes == ["a"] and image_names(ds) == {"a": ["a/0.JPEG", "a/sub/kept.JPEG"]}


def test_corrupt_image_is_reported_replaced_and_counted(tmp_path, capsys):
    root = write_folder(tmp_path, {"a": 2, "b": 2})
    good = (tmp_path / "a" / "1.JPEG").read_bytes()
    (tmp_path / "a" / "1.JPEG").write_bytes(good[: len(good) // 2])  # truncated JPEG
    ds = data.ImageFolder(root, max_bad_fraction=0.5)
    x, label = ds[1]  # a/1.JPEG is bad: the next sample, b/0.JPEG, comes instead
    assert label == 1 and torch.equal(x, ds[2][0])
    assert "a/1.JPEG" in capsys.readouterr().err
    ds[1]
    assert ds.num_bad == 1  # distinct files, not reads
    (tmp_path / "b" / "0.JPEG").write_bytes(b"garbage")
    ds[2]  # the second bad file: 2 of 4 is not more than half
    (tmp_path / "b" / "1.JPEG").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=r"^3 of 4 images under .* are unreadable \(75%\), more than the 50% "
                                             r"allowed: fix or remove them \(last: .*b/1\.JPEG: UnidentifiedImageError"):
        ds[3]


@pytest.mark.parametrize("n, tolerated", [(9, 0), (10, 1), (19, 1), (20, 2)])
def test_bad_image_budget_is_a_plain_fraction(tmp_path, n, tolerated):
    """At most max_bad_fraction x n bad files, rounded down: 10% of 9 images tolerates none."""
    root = write_folder(tmp_path, {"a": n}, size=(8, 8))
    ds = data.ImageFolder(root, max_bad_fraction=0.1)
    paths = [path for path, _ in ds.samples]
    for k in range(tolerated):
        with open(paths[2 * k], "wb") as f:
            f.write(b"garbage")
    for i in range(n):
        ds[i]
    assert ds.num_bad == tolerated
    with open(paths[-1], "wb") as f:
        f.write(b"garbage")
    with pytest.raises(data.DataError, match=f"^{tolerated + 1} of {n} images .* more than the 10% allowed"):
        ds[n - 1]


def test_bad_image_budget_default_on_a_thousand_and_more(tmp_path):
    os.makedirs(tmp_path / "a")
    for k in range(1200):
        (tmp_path / "a" / f"{k:04d}.JPEG").write_bytes(b"")
    ds = data.ImageFolder(str(tmp_path))
    with pytest.raises(data.DataError, match=r"^2 of 1,200 images under .* are unreadable \(0\.167%\), more than "
                                             r"the 0\.1% allowed: fix or remove them \(last: .*/0001\.JPEG: "):
        ds[0]  # 0000 is bad (1,200 x 0.1% tolerates 1), then 0001


# ---------------------------------------------------------------------------------------------- decoding

def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    value = np.array([[0, 1, 128, 129, 257], [1000, 32767, 32768, 65280, 65535]], dtype=np.uint16)
    want = np.floor(value.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # round(value * 255 / 65535)
    assert want.tolist() == [[0, 0, 0, 1, 1], [4, 127, 128, 254, 255]]
    Image.fromarray(value).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode in data.SIXTEEN_BIT_MODES  # Pillow keeps the 16 bits
    for img in (data.load_rgb(tmp_path / "grey16.png"), data.to_rgb(Image.fromarray(value.astype(np.int32)))):
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.repeat(want[..., None], 3, axis=-1))
    with pytest.raises(ValueError, match="outside 0..65535"):
        data.to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_sliver_is_reported_unreadable_before_decoding(tmp_path, capsys):
    root = write_folder(tmp_path, {"a": 2})
    Image.new("RGB", (20000, 3)).save(tmp_path / "a" / "sliver.png")
    Image.new("RGB", (100, 1)).save(tmp_path / "a" / "wide.png")  # exactly 100:1 is still a picture
    ds = data.ImageFolder(root, data.eval_transform(32, 0.875), max_bad_fraction=0.5)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["0.JPEG", "1.JPEG", "sliver.png", "wide.png"]
    x, _ = ds[2]  # replaced by wide.png
    assert torch.equal(x, ds[3][0]) and ds.num_bad == 1
    assert "sliver.png (ValueError: 20000 x 3 px is more than 100:1, not a photo)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="more than 100:1"):
        data.load_rgb_for_crop(tmp_path / "a" / "sliver.png", lambda w, h: (0, 0, w, h), 8)


# ---------------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_eval_transform_matches_the_protocol(crop_mode):
    img = random_image(300, 200, seed=1)
    x = data.eval_transform(224, 0.875, crop_mode)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # reference: floor(224 / 0.875) = 256; 'center' keeps the aspect (300 x 200 -> 384 x 256)
    size = (384, 256) if crop_mode == "center" else (256, 256)
    ref = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float64) / 255  # (H, W, 3)
    top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
    ref = (ref[top:top + 224, left:left + 224] - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    assert np.abs(x.permute(1, 2, 0).double().numpy() - ref).max() < 1e-5


def test_eval_transform_crop_pct_below_one_and_portrait():
    img = random_image(150, 330, seed=2)  # portrait: the width is the shorter side
    x = data.eval_transform(64, 0.93)(img)  # floor(64 / 0.93) = 68 -> 68 x 149
    ref_img = img.resize((68, int(68 * 330 / 150)), Image.BICUBIC)
    top = int(round((ref_img.size[1] - 64) / 2))
    ref = data.normalize(data.to_tensor(ref_img))[:, top:top + 64, 2:66]
    assert torch.allclose(x, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------- train transforms

def test_train_transform_shape_range_and_determinism():
    img = random_image(90, 70, seed=3)
    t = data.TrainTransform(48, erase_prob=0.0)
    outs = [t(img, random.Random(s)) for s in range(20)]
    for x, box in outs:
        assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and box.tolist() == [0, 0, 0, 0]
    assert torch.equal(t(img, random.Random(7))[0], outs[7][0])  # same seed, same image
    assert len({x.sum().item() for x, _ in outs}) > 15  # different seeds, different images
    boxes = [data.TrainTransform(48, erase_prob=0.5)(img, random.Random(s))[1] for s in range(40)]
    assert 8 < sum(b[2] > 0 for b in boxes) < 32  # about half of them erase


def test_train_transform_apply_full_box_is_a_plain_resize():
    img = random_image(50, 50, seed=4)
    t = data.TrainTransform(32, randaugment=False, erase_prob=0.0)
    for interp in (0, 1):
        params = t.draw(50, 50, random.Random(0))
        params[:6] = torch.tensor([0, 0, 50, 50, interp, 0])  # the whole image, no flip
        ref = img.resize((32, 32), data.RANDOM_INTERPOLATIONS[interp])
        assert np.array_equal(np.asarray(t.apply(img, params)), np.asarray(ref))


def test_randaugment_ops_identity_at_zero_and_increasing():
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([xx * 3, yy * 3, 128 + 60 * np.sin(xx / 6) * np.cos(yy / 9)], axis=-1)
    smooth[16:48:4, 16:48] = 40  # a few edges for the sharpness op
    img = Image.fromarray(smooth.astype(np.uint8))  # mostly smooth: a larger shift moves pixels further
    base = np.asarray(img, dtype=np.float64)
    for name, op in data.RANDAUGMENT_OPS.items():
        outs = [np.asarray(op(img, v, 1.0, Image.BILINEAR), dtype=np.float64) for v in (0.0, 0.5, 1.0)]
        assert all(o.shape == base.shape for o in outs), name
        if name in ("AutoContrast", "Equalize", "Invert"):
            continue  # no magnitude
        diffs = [np.abs(o - base).mean() for o in outs]
        if name != "PosterizeIncreasing":  # posterize keeps 4 bits at magnitude 0
            assert diffs[0] < 1e-9, name  # magnitude 0 changes nothing
        assert diffs[0] < diffs[1] < diffs[2], (name, diffs)  # a larger magnitude changes more


def test_rand_augment_magnitude_and_determinism():
    img = random_image(40, 40, seed=6)
    a = data.apply_rand_augment(img, data.draw_rand_augment(random.Random(3)))
    b = data.apply_rand_augment(img, data.draw_rand_augment(random.Random(3)))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size == img.size and a.mode == "RGB"


def test_erase_box_and_normalize_and_erase():
    h, w = 40, 60
    boxes = [data.erase_box(h, w, random.Random(s), prob=1.0) for s in range(50)]
    for top, left, eh, ew in boxes:
        assert 0 < eh < h and 0 < ew < w and top + eh <= h and left + ew <= w
        assert 0.02 * 0.8 < eh * ew / (h * w) < 1 / 3 * 1.2
    assert data.erase_box(h, w, random.Random(0), prob=0.0) == (0, 0, 0, 0)
    x = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8)
    box = torch.tensor([boxes[0], (0, 0, 0, 0), boxes[1]])  # (3, 4): the middle sample keeps its pixels
    torch.manual_seed(0)
    out = data.normalize_and_erase(x, box)
    plain = ((x.double() / 255 - MEAN.double()) / STD.double()).float()  # (x / 255 - mean) / std, written out
    for i, (top, left, eh, ew) in enumerate(box.tolist()):
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top:top + eh, left:left + ew] = True
        torch.testing.assert_close(out[i][:, ~inside], plain[i][:, ~inside], rtol=1e-5, atol=1e-5)
        if eh:
            noise = out[i][:, inside]
            assert not torch.isclose(noise, plain[i][:, inside]).any()
            assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3


def coordinate_jpeg(path, w, h):
    """A JPEG whose red and green channels are the pixel's x and y (as fractions of the width and height)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * xx / (w - 1), 255 * yy / (h - 1), np.full((h, w), 128.0)], axis=-1)
    Image.fromarray(rgb.round().astype(np.uint8)).save(path, quality=95)


def test_draft_decode_scale_and_box(tmp_path):
    coordinate_jpeg(tmp_path / "big.JPEG", 1200, 900)
    img, box = data.load_rgb_for_crop(tmp_path / "big.JPEG", lambda w, h: (100, 50, 1100, 850), 64)
    assert img.size == (150, 113) and box == (12.5, 6.25, 137.5, 106.25)  # 800 px box >= 8 x 64: 1/8 scale
    img, box = data.load_rgb_for_crop(tmp_path / "big.JPEG", lambda w, h: (100, 50, 1100, 850), 300)
    assert img.size == (600, 450) and box == (50, 25, 550, 425)  # 2 x 300 <= 800 < 4 x 300: 1/2 scale
    img, box = data.load_rgb_for_crop(tmp_path / "big.JPEG", lambda w, h: (100, 50, 1100, 850), 401)
    assert img.size == (1200, 900) and box == (100, 50, 1100, 850)  # 800 < 2 x 401: full decode


def test_draft_mode_crops_the_same_region(tmp_path):
    w, h, size = 1200, 900, 64
    (tmp_path / "c").mkdir()
    coordinate_jpeg(tmp_path / "c" / "0.JPEG", w, h)
    sets = [data.ImageFolder(str(tmp_path), data.TrainTransform(size, randaugment=False, erase_prob=0.0, draft=d))
            for d in (True, False)]
    errors, drafted = [], 0
    for seed in range(30):
        xd, xf = (ds[(0, seed)][0][0].float() / 255 for ds in sets)
        assert xd.shape == xf.shape == (3, size, size)
        left, top, right, bottom = data.random_crop_box(w, h, random.Random(seed))  # the first draw, in both
        drafted += min(right - left, bottom - top) >= 2 * size
        coords = [x[:2] * torch.tensor([w - 1, h - 1]).view(2, 1, 1) for x in (xd, xf)]  # (2, S, S)
        pixel = torch.tensor([(right - left) / size, (bottom - top) / size]).view(2, 1, 1)  # source px per output px
        errors.append(((coords[0] - coords[1]).abs() / pixel)[:, 2:-2, 2:-2])  # in output pixels, off the border
    errors = torch.stack(errors)
    assert drafted >= 20  # most crops were decoded at a reduced scale
    assert errors.mean() < 0.3 and errors.max() < 2.0, (errors.mean(), errors.max())


# ---------------------------------------------------------------------------------------------- mixup / cutmix

def test_cutmix_label_weight_equals_pasted_area():
    for seed in range(10):
        b, k = 4, 6
        x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 32, 48).clone()
        labels = torch.tensor([0, 1, 2, 3])
        mix = torch.tensor(data.draw_mix(random.Random(seed), 32, 48, mixup_alpha=0.0, cutmix_alpha=1.0))
        x, target = data.mix_batch(x, labels, mix, k, smoothing=0.0)
        assert torch.allclose(target.sum(1), torch.ones(b))
        for i in range(b):
            pasted = (x[i] == b - 1 - i).float().mean().item()  # pixels from the flipped sample
            assert abs(target[i, labels[b - 1 - i]].item() - pasted) < 1e-6
            assert abs(target[i, labels[i]].item() - (1 - pasted)) < 1e-6


def test_mixup_blend_and_smoothed_targets():
    b, k = 6, 10
    x0 = torch.randn(b, 3, 8, 8)
    labels = torch.randint(0, k, (b,))
    mix = torch.tensor(data.draw_mix(random.Random(1), 8, 8, mixup_alpha=0.8, cutmix_alpha=0.0))
    x, target = data.mix_batch(x0.clone(), labels, mix, k, smoothing=0.1)
    assert torch.allclose(target.sum(1), torch.ones(b))
    assert target.min() >= 0.1 / k - 1e-7
    y = data.smooth_one_hot(labels, k, 0.1)
    # recover lam from one element and check the images and targets are blended with it
    lam = random.Random(1).betavariate(0.8, 0.8)  # mixup only: no switch draw
    assert torch.allclose(x, lam * x0 + (1 - lam) * x0.flip(0), atol=1e-6)
    assert torch.allclose(target, lam * y + (1 - lam) * y.flip(0), atol=1e-6)
    none = torch.tensor(data.draw_mix(random.Random(1), 8, 8, mixup_alpha=0.0, cutmix_alpha=0.0))
    x, target = data.mix_batch(x0.clone(), labels, none, k, smoothing=0.1)  # neither: unchanged, exactly
    assert torch.equal(x, x0) and torch.allclose(target, y)


def test_smooth_one_hot():
    y = data.smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(y[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(y.sum(1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- sampling, loaders

def test_epoch_sampler_shards_and_resumes():
    n, world, batch = 23, 3, 2  # 6 images a step: 3 steps, 5 leftover images
    shards = [list(data.EpochSampler(n, world, r, shuffle=True, seed=5, batch_size=batch)) for r in range(world)]
    assert [len(s) for s in shards] == [3 * batch] * world
    used = [i for s in shards for i, _ in s]
    assert len(set(used)) == 18  # no image twice in an epoch
    assert len({seed for s in shards for _, seed in s}) == 18  # distinct sample seeds
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()  # epoch 0's permutation
    for k in range(3):  # step k takes positions 6k .. 6k + 5, rank r the r-th pair of them
        for r in range(world):
            assert [i for i, _ in shards[r][k * batch:(k + 1) * batch]] == order[6 * k + 2 * r:6 * k + 2 * r + 2]
    s = data.EpochSampler(n, world, 1, shuffle=True, seed=5, batch_size=batch)
    assert list(s) == shards[1]
    s.set_position(4)
    assert list(s) == shards[1][4:] and len(s) == len(shards[1]) - 4
    s.set_epoch(1)
    assert list(s) != shards[1]  # a new order each epoch
    evals = [list(data.EpochSampler(n, world, r, shuffle=False)) for r in range(world)]
    assert sorted(i for e in evals for i in e) == list(range(n))  # no padding: each image once


def steps_of(world, batch, accum, n=50, seed=5, skip_steps=0):
    """The keys of every optimizer step of one epoch: [step][rank][micro-step] -> list of keys."""
    shards = []
    for r in range(world):
        s = data.EpochSampler(n, world, r, shuffle=True, seed=seed, batch_size=batch, accum_steps=accum)
        s.set_epoch(2)
        s.set_position(skip_steps * batch * accum)
        shards.append(list(s))
    steps = len(shards[0]) // (batch * accum)
    return [[[shards[r][(k * accum + m) * batch:(k * accum + m + 1) * batch] for m in range(accum)]
             for r in range(world)] for k in range(steps)]


def test_epoch_sampler_steps_do_not_depend_on_the_world_size():
    # global batch 8 split five ways: each step uses the same 8 (image, seed) keys
    splits = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (1, 4, 2), (2, 2, 2), (1, 2, 4)]
    per_step = {split: [sorted(key for rank in step for micro in rank for key in micro)
                        for step in steps_of(*split)] for split in splits}
    assert len(per_step[(1, 8, 1)]) == 50 // 8
    assert all(v == per_step[(1, 8, 1)] for v in per_step.values())
    # 1 rank accumulating 2 micro-batches sees exactly the batches of 2 ranks, in rank order
    one, two = steps_of(1, 4, 2), steps_of(2, 4, 1)
    assert all(one[k][0][m] == two[k][m][0] for k in range(len(one)) for m in range(2))
    # resume after 2 steps on 2 ranks x 4, on 1 rank x 8: every image of the epoch exactly once
    first = [key for step in steps_of(2, 4, 1)[:2] for rank in step for key in rank[0]]
    rest = [key for step in steps_of(1, 8, 1, skip_steps=2) for key in step[0][0]]
    straight = [key for step in steps_of(1, 8, 1) for key in step[0][0]]
    assert len(rest) == 4 * 8 and sorted(first + rest) == sorted(straight)


def test_loader_is_independent_of_worker_count(tmp_path):
    root = write_folder(tmp_path, {"a": 5, "b": 5})
    ds = data.ImageFolder(root, data.TrainTransform(24))
    batches = []
    for workers in (0, 2):
        sampler = data.EpochSampler(len(ds), 1, 0, shuffle=True, seed=3)
        sampler.set_epoch(2)
        loader = data.make_loader(ds, 4, sampler, workers, train=True)
        batches.append([(x.clone(), b.clone(), y.clone()) for (x, b), y in loader])
    assert len(batches[0]) == 2  # 10 images, full batches of 4 only
    for (xa, ba, ya), (xb, bb, yb) in zip(*batches):
        assert torch.equal(xa, xb) and torch.equal(ba, bb) and torch.equal(ya, yb)


def test_loader_benchmark_runs(capsys):
    bench.main(["loader", "--images", "32", "--size", "96", "72", "--img-size", "32", "--workers", "1",
                "--batch-size", "8", "--repeat", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("32 JPEGs of 96 x 72 px") and out[0].endswith("one process: 32 files, 2 passes")
    assert len(out) == 5
    for line, draft, where in zip(out[1:], ("off", "on ", "off", "on "), ("one process", "one process",
                                                                         "DataLoader", "DataLoader")):
        assert line.startswith(f"draft {draft}: {where}") and "images/s" in line
    with pytest.raises(SystemExit):
        bench.main(["loader", "--images", "16", "--workers", "1", "--batch-size", "8"])  # fewer than 3 batches
    assert "--images at least (max --workers + 2) x --batch-size" in capsys.readouterr().err


def test_loader_benchmark_counts_reduced_decodes_on_imagenet_sizes(capsys, monkeypatch):
    monkeypatch.setattr(synthetic, "IMAGENET_SIZES", ((64, 48), (1024, 768)))  # small and wide, in turn
    monkeypatch.setattr(bench, "IMAGENET_SIZES", synthetic.IMAGENET_SIZES)
    bench.main(["loader", "--imagenet-sizes", "--images", "96", "--img-size", "32", "--workers", "1",
                "--batch-size", "8", "--repeat", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("96 JPEGs of ImageNet's mix of sizes")
    # with draft mode every 1024 x 768 picture (half the files) decodes at a reduced scale: its random
    # crop spans at least 2 x 32 px each way; the 64 x 48 ones never do, nor any without draft mode
    assert out[1].startswith("draft off") and "(0% at reduced scale)" in out[1]
    assert out[2].startswith("draft on ") and "(50% at reduced scale)" in out[2]


# ---------------------------------------------------------------------------------------------- the GPU data path

def odd_folder(root):
    """root/<class>/ with photo-like JPEGs of a few sizes and ImageNet's odd files: CMYK and greyscale
    JPEGs, a PNG named .JPEG, and a truncated JPEG whose header still reads (found bad only when decoded)."""
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for k, (w, h) in enumerate([(96, 80), (120, 70), (70, 100), (90, 90)]):
            Image.fromarray(synthetic.photo_like(rng, w, h)).save(root / c / f"{k}.JPEG", quality=90)
    photo = Image.fromarray(synthetic.photo_like(rng, 90, 80))
    photo.convert("CMYK").save(root / "a" / "cmyk.JPEG")
    photo.convert("L").save(root / "b" / "grey.JPEG")
    photo.save(root / "b" / "png.JPEG", format="PNG")
    whole = (root / "a" / "0.JPEG").read_bytes()
    (root / "a" / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    return str(root)


def test_file_samples_draw_what_the_cpu_path_draws(tmp_path):
    """The GPU path's workers ship a file's bytes with the very parameters the CPU path draws for the
    same key (so that a run's augmentation does not depend on the path); a file whose header does
    not read is reported and replaced as ImageFolder replaces it."""
    root = odd_folder(tmp_path)
    (tmp_path / "b" / "garbage.JPEG").write_bytes(b"not an image")
    ds = data.ImageFolder(root, data.TrainTransform(64), max_bad_fraction=0.5)
    files = data.FileSamples(ds)
    for i, (path, label) in enumerate(ds.samples):
        seed = 1000 + i
        raw, params, got_label, index, got_seed = files[(i, seed)]
        if path.endswith("garbage.JPEG"):
            assert ds.num_bad == 1 and index == (i + 1) % len(ds)
            path, label = ds.samples[index]
        assert raw.numpy().tobytes() == open(path, "rb").read()
        with Image.open(path) as img:
            assert torch.equal(params, ds.transform.draw(*img.size, random.Random(seed)))
        if not path.endswith("truncated.JPEG"):  # its header reads: the GPU path finds it bad when decoding
            _, cpu_params = ds.transform.load(path, random.Random(seed))  # no draft at these sizes: the same box
            assert torch.equal(params, cpu_params)
        assert got_label == label and got_seed == seed
    batch = data.collate_files([files[(0, 1)], files[(1, 2)]])
    data_, lengths, params, labels, indices, seeds = batch
    assert data_.numel() == int(lengths.sum()) and params.shape == (2, 18) and seeds.tolist() == [1, 2]
    assert data_[: lengths[0]].numpy().tobytes() == open(ds.samples[0][0], "rb").read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU data path needs a CUDA GPU")
def test_gpu_batches_match_the_cpu_path(tmp_path):
    """One batch of the GPU path against the CPU path's samples for the same keys: labels and erase
    boxes equal; the files nvJPEG refuses (CMYK, PNG) decoded by Pillow and so augmented to exactly
    the CPU path's pixels (gpu_augment is exact); the truncated JPEG reported, counted and replaced
    by exactly what the CPU path gives for its key; the others within nvJPEG's decoding differences
    (its IDCT and chroma upsampling are not libjpeg's, test_jpeg.py), carried through the
    augmentation: a mean absolute difference of at most 6 levels per picture."""
    import gpu_augment
    import jpeg
    if not (jpeg.available() and gpu_augment.available()):
        pytest.skip("nvJPEG or gpu_augment could not be built here")
    root = odd_folder(tmp_path)
    ds = data.ImageFolder(root, data.TrainTransform(64), max_bad_fraction=0.5)
    sampler = data.EpochSampler(len(ds), shuffle=True, seed=4, batch_size=3)
    keys = list(sampler)
    files = data.make_loader(data.FileSamples(ds), 3, sampler, 2, True, collate_fn=data.collate_files)
    batches = list(data.GpuBatches(files, ds, torch.device("cuda"), step.CaptureLock(), threads=3))
    assert len(batches) == 4  # 3 threads took them in turn; they come out in the sampler's order
    x, boxes, labels = (torch.cat(parts) for parts in zip(*((x, b, y) for (x, b), y in batches)))
    assert x.shape == (len(ds), 3, 64, 64) and x.dtype == torch.uint8 and x.is_cuda
    assert ds.num_bad == 1
    refused = {"cmyk.JPEG", "png.JPEG", "truncated.JPEG"}
    for j, key in enumerate(keys):
        (picture, box), label = ds[key]
        name = os.path.basename(ds.samples[key[0]][0])
        assert int(labels[j]) == label and torch.equal(boxes[j].cpu(), box), name
        difference = (x[j].cpu().int() - picture.int()).abs().float().mean()
        if name in refused:
            assert difference == 0, name
        else:
            assert difference <= 6, f"{name}: {difference:.2f} levels"


def test_demo_dataset_is_written_once(tmp_path):
    root = str(tmp_path / "demo")
    assert synthetic.make_demo_dataset(root, train_per_class=3, val_per_class=2) == root
    train, val = data.ImageFolder(os.path.join(root, "train")), data.ImageFolder(os.path.join(root, "val"))
    assert train.classes == val.classes == sorted(synthetic.DEMO_CLASSES)
    assert len(train) == 30 and len(val) == 20
    with Image.open(train.samples[0][0]) as img:
        assert img.format == "JPEG" and img.size == (72, 72)
    stamp = os.path.getmtime(train.samples[0][0])
    synthetic.make_demo_dataset(root, train_per_class=3, val_per_class=2)
    assert os.path.getmtime(train.samples[0][0]) == stamp  # cached


def test_photo_dataset_is_an_image_folder_of_imagenet_sized_jpegs(tmp_path):
    root = synthetic.make_photo_dataset(str(tmp_path / "photos"), 30, 10, classes=3, sizes=((50, 40),))
    train, val = data.ImageFolder(os.path.join(root, "train")), data.ImageFolder(os.path.join(root, "val"))
    assert (len(train), len(val)) == (30, 10) and train.classes == val.classes == ["class0", "class1", "class2"]
    assert [label for _, label in train.samples] == [0] * 10 + [1] * 10 + [2] * 10
    img, label = train[12]
    assert img.shape == (3, 40, 50) and label == 1 and train.num_bad == 0


def test_photo_dataset_cycles_through_the_sizes(tmp_path):
    sizes = tuple((16 + k, 12 + k) for k in range(70))  # more than 64: one picture per size
    root = synthetic.make_photo_dataset(str(tmp_path / "photos"), 140, 0, classes=1, sizes=sizes)
    folder = os.path.join(root, "train", "class0")
    for k in (0, 1, 69, 70, 139):
        with Image.open(os.path.join(folder, f"{k:07d}.JPEG")) as img:
            assert img.size == sizes[k % 70]


def test_imagenet_size_mix():
    sizes = np.array(synthetic.IMAGENET_SIZES)  # (100, 2)
    assert len(sizes) == 100 and sum(p for p, _, _ in synthetic.IMAGENET_SIZE_MIX) == 100
    assert np.median(sizes, axis=0).tolist() == [500, 375]
    assert (sizes[:, 0] > 800).mean() == 0.10 and (sizes.prod(1) >= 2000 * 1500).mean() == 0.03


def test_synthetic_command_line(tmp_path, capsys):
    synthetic.main(["photos", str(tmp_path / "p"), "--images", "20", "--size", "30", "20"])
    assert capsys.readouterr().out.strip() == f"wrote 20 + 2 JPEGs to {tmp_path / 'p'}"
    assert len(data.ImageFolder(str(tmp_path / "p" / "train"))) == 20
    assert len(data.ImageFolder(str(tmp_path / "p" / "val"))) == 2
