"""Tests of eval.py on the CPU: a tiny MambaVision trained a few steps on a small demo dataset.

The reference numbers are computed here independently of eval.py: one image at a time, float32,
no channels_last, loss from log-softmax and top-k from the rank of the true class's logit.
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import model as mv
import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(depths=(1, 1, 2, 2), dim=16, in_dim=8, window_size=(4, 4, 4, 2))
NUM_CLASSES, IMG_SIZE = 10, 32
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and it avoids OpenMP spinning on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 6 SGD steps and saved as train.py does; 'ema' is the step-3 snapshot.

    The val folder has 19 images (one removed), so two processes get an uneven split.
    """
    tmp = tmp_path_factory.mktemp("eval")
    root = synthetic.make_demo_dataset(str(tmp / "demo"), train_per_class=4, val_per_class=2)
    os.remove(data.ImageFolder(os.path.join(root, "val")).samples[-1][0])
    torch.manual_seed(0)
    net = mv.build_model("t", num_classes=NUM_CLASSES, **TINY)
    train = data.ImageFolder(os.path.join(root, "train"), data.eval_transform(IMG_SIZE, 1.0))
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for step, (x, y) in zip(range(6), loader):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 2:
            ema = {k: v.clone() for k, v in net.state_dict().items()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ckpt = {"variant": "t", "model_args": net.model_args, "classes": train.classes, "model": state, "ema": ema,
            "config": {"data_dir": root, "img_size": IMG_SIZE}, "epoch": 0, "step": 6,
            "best_top1": 0.0, "optimizer": opt.state_dict()}
    path = str(tmp / "ckpt.pt")
    torch.save(ckpt, path)
    return {"root": root, "path": path, "ckpt": ckpt, "tmp": tmp}


def per_image_logits(state, model_args, val_dir, img_size=IMG_SIZE):
    """Logits (images, classes) in float64 of every image of val_dir, one image at a time, float32,
    without eval.py; and each image's class folder name."""
    net = mv.MambaVision(**model_args)
    net.load_state_dict(state)
    net.eval()
    val = data.ImageFolder(val_dir, data.eval_transform(img_size, 1.0))
    with torch.no_grad():  # (ImageFolder wraps indices around, so no plain `for x, y in val`)
        logits = torch.stack([net(val[i][0][None])[0].double() for i in range(len(val))])
    return logits, [val.classes[label] for _, label in val.samples]


def score(logits, labels):
    """top-1 %, top-5 %, mean loss and count from logits (images, classes) and label indices: the
    loss from log-softmax, top-k from the rank of the true class's logit."""
    labels = torch.tensor(labels)
    true = logits.gather(1, labels[:, None])                         # (images, 1)
    higher = (logits > true).sum(1)                                  # classes that beat the label
    n = len(labels)
    return {"top1": 100 * int((higher == 0).sum()) / n, "top5": 100 * int((higher < 5).sum()) / n,
            "loss": -(logits.log_softmax(1).gather(1, labels[:, None])).mean().item(), "images": n}


def reference(state, model_args, root, img_size=IMG_SIZE):
    """top-1 %, top-5 %, mean loss and count on root/val, image by image, without eval.py."""
    logits, names = per_image_logits(state, model_args, os.path.join(root, "val"), img_size)
    classes = sorted(set(names))
    return score(logits, [classes.index(name) for name in names])


def run_main(argv, capsys):
    """eval.main in this process, on the CPU unless argv names a device (the results are compared
    with reference(), which runs on the CPU; a GPU would differ in the last bits); returns (exit
    code, JSON result or None, stdout, stderr)."""
    code = ev.main(argv if "--device" in argv else [*argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), out, err


def assert_same(result, ref):
    assert result["images"] == ref["images"]
    assert result["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(ref["top5"], abs=1e-9)
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-4)


def save_official(state, path, **extra):
    """Our weights as an official release stores them: under 'state_dict', 'module.' on every key."""
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, **extra}, path)


@pytest.fixture
def tiny_variants(monkeypatch):
    """Two made-up variants with the tiny layout (32 px and 64 px) so that shape inference sees them."""
    for name, size in (("tiny", 32), ("tiny_64", 64)):
        monkeypatch.setitem(mv.VARIANTS, name, dict(mv.VARIANTS["t"], **TINY, resolution=size,
                                                    crop_pct=1.0, crop_mode="center"))
    ev.variant_shapes.cache_clear()
    yield
    ev.variant_shapes.cache_clear()


def test_our_checkpoint_uses_ema_and_matches_reference(trained, capsys):
    ckpt, root = trained["ckpt"], trained["root"]
    ref_ema = reference(ckpt["ema"], ckpt["model_args"], root)
    ref_raw = reference(ckpt["model"], ckpt["model_args"], root)
    assert ref_ema["loss"] != pytest.approx(ref_raw["loss"], rel=1e-3)  # the two are told apart

    code, result, out, _ = run_main([trained["path"], "--workers", "0", "--batch-size", "4"], capsys)
    assert code == 0 and result["weights"] == "ema" and result["unreadable"] == 0
    assert (result["variant"], result["img_size"], result["crop_pct"], result["dtype"]) == \
        ("t", IMG_SIZE, 1.0, "fp32")
    assert "top-1" in out
    assert_same(result, ref_ema)

    code, result, _, _ = run_main([trained["path"], "--no-ema", "--workers", "1", "--batch-size", "5"],
                                  capsys)
    assert code == 0 and result["weights"] == "model"
    assert_same(result, ref_raw)


def test_train_py_checkpoint_gives_the_numbers_train_py_logged(trained, capsys):
    out_dir = str(trained["tmp"] / "run")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--variant", "t", "--data-dir",
                           trained["root"], "--output-dir", out_dir, "--model-overrides",
                           json.dumps({k: TINY[k] for k in ("depths", "dim", "in_dim")}), "--window-size",
                           *map(str, TINY["window_size"]), "--img-size", str(IMG_SIZE), "--batch-size", "8",
                           "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0",
                           "--ema-decay", "0.5"], capture_output=True, text=True, env=ONE_THREAD, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged = json.loads(f.readlines()[-1])
    path = os.path.join(out_dir, "last.pt")
    for flags, top1, top5 in ((["--ema"], "ema_top1", "ema_top5"), (["--no-ema"], "top1", "top5")):
        code, result, _, _ = run_main([path, "--workers", "0", *flags], capsys)
        assert code == 0 and result["images"] == 19
        assert (result["top1"], result["top5"]) == pytest.approx((logged[top1], logged[top5]), abs=1e-9)
    # by default the weights that scored higher, so the top-1 is the best one logged
    code, result, _, _ = run_main([path, "--workers", "0"], capsys)
    assert code == 0 and result["weights"] == ("model" if logged["top1"] > logged["ema_top1"] else "ema")
    assert result["top1"] == pytest.approx(logged["best_top1"], abs=1e-9)


def test_official_format_gives_the_same_accuracy(trained, tiny_variants, capsys):
    ckpt, root = trained["ckpt"], trained["root"]
    path = str(trained["tmp"] / "official.pth.tar")
    # official files carry the training arguments as an argparse.Namespace: a safe load allows it
    save_official(ckpt["model"], path, args=argparse.Namespace(lr=0.005, model=None), epoch=309)
    code, result, out, _ = run_main([path, "--data-dir", root, "--workers", "0"], capsys)
    assert code == 0, out
    assert result["variant"] == "tiny" and result["weights"] == "official"
    assert "tiny, tiny_64" in out  # the note about layouts that are the same
    assert_same(result, reference(ckpt["model"], ckpt["model_args"], root))

    # the name the file gives itself decides between same-shaped variants (and so the image size)
    save_official(ckpt["model"], path, args=argparse.Namespace(model="mamba_vision_tiny_64"))
    code, result, _, _ = run_main([path, "--data-dir", root, "--workers", "0"], capsys)
    assert code == 0 and (result["variant"], result["img_size"]) == ("tiny_64", 64)
    assert_same(result, reference(ckpt["model"], ckpt["model_args"], root, img_size=64))


def break_images(root, count):
    """Overwrite the first `count` val images under `root` with bytes that are not an image."""
    for path, _ in data.ImageFolder(os.path.join(root, "val")).samples[:count]:
        with open(path, "wb") as f:
            f.write(b"not a JPEG")


def test_unreadable_images_are_reported(trained, capsys, tmp_path, monkeypatch):
    root = str(tmp_path / "demo")
    shutil.copytree(trained["root"], root)
    break_images(root, 1)
    # ImageFolder tolerates bad files only in a large set (0.1%): tolerate 1 in these 19
    monkeypatch.setattr(ev, "ImageFolder", functools.partial(data.ImageFolder, max_bad_fraction=0.1))
    code, result, out, _ = run_main([trained["path"], "--data-dir", root, "--workers", "0"], capsys)
    assert code == 0 and result["unreadable"] == 1 and result["images"] == 19
    assert "not exact" in out


def assert_one_error_line(err):
    """stderr ends with the one line 'error: ...', and holds no traceback (ImageFolder's '[data]
    unreadable image' lines and a progress bar may come before it)."""
    lines = err.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ")
    assert sum(line.startswith("error") for line in lines) == 1, err


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_unreadable_images_is_one_line(trained, capsys, tmp_path, workers):
    root = str(tmp_path / "demo")
    shutil.copytree(trained["root"], root)
    break_images(root, 3)
    code, result, _, err = run_main([trained["path"], "--data-dir", root, "--workers", str(workers)], capsys)
    assert code == 2 and result is None
    assert_one_error_line(err)
    assert "unreadable" in err.splitlines()[-1]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_val_set_of_one_unreadable_image_is_one_line(trained, capsys, tmp_path, workers):
    folder = tmp_path / "one" / "val" / trained["ckpt"]["classes"][0]
    folder.mkdir(parents=True)
    (folder / "only.jpg").write_bytes(b"not a JPEG")
    code, _, _, err = run_main([trained["path"], "--data-dir", str(tmp_path / "one"), "--workers",
                                str(workers)], capsys)
    assert code == 2
    assert_one_error_line(err)


def test_pickled_object_is_refused_without_running_it(trained):
    marker = trained["tmp"] / "payload-ran"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
            return (open, (str(marker), "w"))

    path = str(trained["tmp"] / "pickled.pth.tar")
    torch.save({"state_dict": trained["ckpt"]["model"], "extra": Payload()}, path)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), path, "--data-dir",
                           trained["root"]], capture_output=True, text=True, env=ONE_THREAD, timeout=120)
    assert proc.returncode == 2
    assert not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickled object" in lines[0] and "Traceback" not in proc.stderr


def test_other_variant_is_refused_with_the_keys(trained, capsys):
    path = str(trained["tmp"] / "tiny-as-t.pth.tar")
    save_official(trained["ckpt"]["model"], path)
    code, result, _, err = run_main([path, "--variant", "t", "--data-dir", trained["root"]], capsys)
    assert code == 2 and result is None
    assert "does not fit variant 't'" in err and "nothing was loaded" in err
    assert "patch_embed.conv_down.0.weight: checkpoint [8, 3, 3, 3] vs model [32, 3, 3, 3]" in err
    assert "levels.1.blocks.1.conv1.weight" in err       # T has 3 blocks in level 1, tiny has 1


def test_missing_and_unexpected_keys_are_refused(trained, capsys, tmp_path):
    ckpt = dict(trained["ckpt"])
    ckpt["ema"] = {k: v for k, v in ckpt["ema"].items() if k != "head.bias"}
    ckpt["ema"]["head.extra"] = torch.zeros(3)
    path = str(tmp_path / "broken.pt")
    torch.save(ckpt, path)
    code, result, _, err = run_main([path, "--workers", "0"], capsys)
    assert code == 2 and result is None
    assert "1 missing, 1 unexpected" in err
    assert "missing keys (1):\n    head.bias" in err and "unexpected keys (1):\n    head.extra" in err


def test_refused_load_leaves_the_model_untouched(trained):
    net = mv.MambaVision(**trained["ckpt"]["model_args"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = dict(trained["ckpt"]["model"])
    del weights["norm.weight"]
    with pytest.raises(ev.EvalError, match="norm.weight"):
        ev.load_strict(net, weights, "x.pt", "the tiny model")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("variant, fits", [("s", ["s"]), ("b", ["b", "b_21k"]),
                                           ("l2", ["l2", "l2_512_21k"])])
def test_variant_inferred_from_the_real_layouts(variant, fits):
    weights = {k: torch.empty(shape, device="meta") for k, shape in ev.variant_shapes(variant, 1000).items()}
    chosen, note = ev.infer_variant(weights, "x.pth.tar")
    assert chosen == variant
    assert (note is None) == (len(fits) == 1)
    if note:
        assert ", ".join(fits) in note
        assert ev.infer_variant(weights, "x", hint=fits[1])[0] == fits[1]
    del weights["levels.2.blocks.0.mixer.A_log"]
    with pytest.raises(ev.EvalError, match="closest: '" + variant):
        ev.infer_variant(weights, "x.pth.tar")


def test_shards_cover_every_index_once():
    for n in range(12):
        for world in range(1, 5):
            shards = [ev.shard(n, rank, world) for rank in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_torchrun_two_processes_count_every_image_once(trained, capsys):
    code, single, _, _ = run_main([trained["path"], "--workers", "0", "--batch-size", "4"], capsys)
    assert code == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", os.path.join(HERE, "eval.py"), trained["path"],
                           "--workers", "0", "--batch-size", "4", "--device", "cpu"],
                          capture_output=True, text=True, env=ONE_THREAD, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # only rank 0 prints
    assert results[0]["world_size"] == 2 and single["images"] == 19
    assert_same(results[0], single)


def test_throughput_row_on_cpu(capsys):
    code, row, out, _ = run_main(["--throughput", "--variant", "t", "--batch-size", "2", "--warmup",
                                  "1", "--iters", "2", "--device", "cpu"], capsys)
    assert code == 0, out
    assert "| MambaVision-T | 31.79 |" in out
    assert row["params_m"] == 31.79                           # the released code's count
    assert row["gflops"] == pytest.approx(4.478, abs=0.01)    # ptflops' count of the release
    assert row["images_per_s"] > 0 and row["peak_mem_gib"] is None
    assert (row["img_size"], row["batch_size"], row["dtype"]) == (224, 2, "fp32")


@pytest.mark.parametrize("argv", [[], ["--throughput"], ["--throughput", "--variant", "t", "--all"],
                                  ["--throughput", "--variant", "x"], ["ckpt.pt", "--all"],
                                  ["ckpt.pt", "--variant", "t9"], ["ckpt.pt", "--dtype", "fp8"],
                                  ["ckpt.pt", "--img-size", "0"], ["ckpt.pt", "--crop-pct", "0"],
                                  ["ckpt.pt", "--crop-pct", "-0.5"], ["ckpt.pt", "--crop-pct", "1.01"],
                                  ["ckpt.pt", "--batch-size", "0"], ["ckpt.pt", "--workers", "-1"],
                                  ["ckpt.pt", "--ema", "--no-ema"], ["ckpt.pt", "--img-size", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_missing_file_data_dir_or_val_folder(trained, tiny_variants, capsys, tmp_path):
    code, _, _, err = run_main([str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, _, err = run_main([trained["path"], "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "holding val/" in err
    path = str(tmp_path / "official.pth.tar")
    save_official(trained["ckpt"]["model"], path)
    code, _, _, err = run_main([path, "--variant", "tiny"], capsys)
    assert code == 2 and "records no dataset: pass --data-dir" in err


# ----------------------------------------------------------------------------------------------
# Classes: by name, a subset of them, or by number for checkpoints that do not name them

def copy_val(root, classes, dest, rename=None):
    """dest/val/ holding root/val/'s folders of `classes`, named rename[c] if given; returns dest."""
    for name in classes:
        shutil.copytree(os.path.join(root, "val", name), os.path.join(dest, "val", (rename or {}).get(name, name)))
    return str(dest)


def restricted_score(logits, names, columns, column_names):
    """score() of the images whose class is among column_names, over those columns of logits."""
    rows = [i for i, name in enumerate(names) if name in column_names]
    labels = [column_names.index(names[i]) for i in rows]
    return score(logits[rows][:, columns], labels)


def test_a_subset_of_the_classes_is_scored_among_them(trained, capsys, tmp_path):
    ckpt, root = trained["ckpt"], trained["root"]
    logits, names = per_image_logits(ckpt["ema"], ckpt["model_args"], os.path.join(root, "val"))
    present = sorted(ckpt["classes"][1::2] + ckpt["classes"][:1])     # 6 of the 10
    expected = restricted_score(logits, names, [ckpt["classes"].index(c) for c in present], present)
    code, result, out, _ = run_main([trained["path"], "--data-dir", copy_val(root, present, tmp_path),
                                     "--workers", "0", "--batch-size", "4"], capsys)
    assert code == 0 and "scored over the 6 classes present of the model's 10" in out
    assert (result["classes_scored"], result["model_classes"], result["classes_by"]) == (6, 10, "name")
    assert result["images"] == expected["images"] < 19
    for k in ("top1", "top5"):  # the same counts of hits, exactly
        assert round(result[k] * result["images"] / 100) == round(expected[k] * expected["images"] / 100)
    assert_same(result, expected)


def test_official_1000_classes_are_the_imagenet_wordnet_ids(trained, tiny_variants, capsys, tmp_path):
    torch.manual_seed(1)
    net = mv.build_model("tiny", num_classes=1000)
    path = str(tmp_path / "official-1k.pth.tar")
    save_official(net.state_dict(), path)
    wnids = {"checker": "n01440764", "dots": "n04589890", "vstripes": "n15075141"}  # ImageNet classes 0, 904, 999
    val_root = copy_val(trained["root"], sorted(wnids), tmp_path / "wnid", rename=wnids)
    logits, names = per_image_logits(net.state_dict(), net.model_args, os.path.join(val_root, "val"))
    expected = restricted_score(logits, names, [0, 904, 999], sorted(wnids.values()))
    code, result, out, _ = run_main([path, "--variant", "tiny", "--data-dir", val_root, "--workers", "0"], capsys)
    assert code == 0 and "scored over the 3 classes present of the model's 1000" in out
    assert_same(result, expected)


def test_imagenet_class_list():
    ids = ev.imagenet_classes()
    assert len(ids) == len(set(ids)) == 1000 and ids == sorted(ids)
    assert (ids[0], ids[281], ids[999]) == ("n01440764", "n02123045", "n15075141")  # tench, tabby, toilet tissue
    assert all(len(i) == 9 and i[0] == "n" and i[1:].isdigit() for i in ids)


def test_class_folders_the_model_does_not_know_are_refused(trained, capsys, tmp_path):
    root = copy_val(trained["root"], trained["ckpt"]["classes"], tmp_path)
    shutil.copytree(os.path.join(root, "val", "dots"), os.path.join(root, "val", "zebra"))
    code, result, _, err = run_main([trained["path"], "--data-dir", root], capsys)
    assert code == 2 and result is None
    assert err.count("\n") == 1 and "1 class folder(s) the model does not know (zebra)" in err


def test_checkpoint_without_class_names_numbers_val_folders(trained, capsys, tmp_path):
    ckpt = {k: v for k, v in trained["ckpt"].items() if k != "classes"}   # as train.py saved before
    path = str(tmp_path / "old.pt")
    torch.save(ckpt, path)
    code, result, out, _ = run_main([path, "--workers", "0"], capsys)
    assert code == 0 and "does not name its classes" in out and result["classes_by"] == "number"
    assert_same(result, reference(ckpt["ema"], ckpt["model_args"], trained["root"]))
    some = copy_val(trained["root"], trained["ckpt"]["classes"][:4], tmp_path)
    code, result, _, err = run_main([path, "--data-dir", some], capsys)
    assert code == 2 and "4 class folders but the model predicts 10" in err


# ----------------------------------------------------------------------------------------------
# Which weights, which variant

def test_default_weights_follow_the_recorded_scores(trained):
    ckpt = dict(trained["ckpt"])
    for scores, chosen in (({"model": 60.0, "ema": 50.0}, "model"), ({"model": 50.0, "ema": 50.0}, "ema"),
                           ({"model": 40.0, "ema": 50.0}, "ema"), (None, "ema")):
        name, why = ev.choose_weights(dict(ckpt, val_top1=scores), "x.pt")
        assert name == chosen and why
    assert ev.choose_weights(dict(ckpt, val_top1={"model": 60.0, "ema": 50.0}), "x.pt", "ema")[0] == "ema"
    assert ev.choose_weights(dict(ckpt, ema=None), "x.pt")[0] == "model"
    with pytest.raises(ev.EvalError, match="no EMA weights"):
        ev.choose_weights(dict(ckpt, ema=None), "x.pt", "ema")


def test_raw_weights_that_scored_higher_are_evaluated(trained, capsys, tmp_path):
    path = str(tmp_path / "raw-better.pt")
    torch.save(dict(trained["ckpt"], val_top1={"model": 60.0, "ema": 50.0}), path)
    code, result, out, _ = run_main([path, "--workers", "0"], capsys)
    assert code == 0 and result["weights"] == "model" and "weights: model (top-1 60.000% raw vs 50.000% EMA" in out
    assert_same(result, reference(trained["ckpt"]["model"], trained["ckpt"]["model_args"], trained["root"]))


def test_variant_that_contradicts_the_checkpoint_is_refused(trained, capsys):
    code, _, _, err = run_main([trained["path"], "--variant", "s"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "a checkpoint of variant 't' but --variant s was given" in err


@pytest.mark.parametrize("which, key", [("ema", "norm.running_var"), ("model", "head.weight")])
def test_non_finite_weights_are_refused(trained, capsys, tmp_path, which, key):
    ckpt = dict(trained["ckpt"])
    ckpt[which] = dict(ckpt[which])
    ckpt[which][key] = ckpt[which][key].clone()
    ckpt[which][key].view(-1)[3] = float("nan") if which == "ema" else float("inf")
    path = str(tmp_path / "diverged.pt")
    torch.save(ckpt, path)
    code, result, _, err = run_main([path, "--workers", "0", "--ema" if which == "ema" else "--no-ema"], capsys)
    assert code == 2 and result is None and err.count("\n") == 1
    assert f"NaN or inf, first in {key}" in err


# ----------------------------------------------------------------------------------------------
# Where the data is; what the checkpoint file is

def test_relative_data_dir_of_older_checkpoints(trained, capsys, tmp_path, monkeypatch):
    ckpt = dict(trained["ckpt"], config={"data_dir": "demo", "img_size": IMG_SIZE})
    path = str(tmp_path / "relative.pt")
    torch.save(ckpt, path)
    monkeypatch.chdir(os.path.dirname(trained["root"]))                # where "demo" is
    code, result, _, _ = run_main([path, "--workers", "0"], capsys)
    assert code == 0 and result["images"] == 19
    monkeypatch.chdir(tmp_path)                                        # where it is not
    code, _, _, err = run_main([path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the dataset" in err and "'demo'" in err and "pass --data-dir" in err


def truncated(path, ckpt):
    torch.save(ckpt, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("kind, expected", [
    ("directory", "is a directory, not a checkpoint file"),
    ("random bytes", "is not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
    ("text", "is not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
    ("pickle-like bytes", "it is truncated, damaged or not a torch.save file; copy it again or use another checkpoint"),
    ("truncated", "it is truncated, damaged or not a torch.save file; copy it again or use another checkpoint"),
    ("empty", "is empty (0 bytes)")])
def test_files_that_are_not_checkpoints(trained, capsys, tmp_path, kind, expected):
    path = tmp_path / "ckpt.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif kind == "text":
        path.write_text("epoch 3: top-1 71.2\n")
    elif kind == "pickle-like bytes":  # the first byte of a pickle, then noise
        path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    elif kind == "truncated":
        truncated(str(path), trained["ckpt"])
    else:
        path.write_bytes(b"")
    code, result, _, err = run_main([str(path)], capsys)
    assert code == 2 and result is None
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "pickled object" not in err
