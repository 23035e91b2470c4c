"""Tests of eval.py on the CPU: a tiny MambaVision trained a few steps on a small demo dataset.

The reference numbers are computed here independently of eval.py: one image at a time, float32,
no channels_last, loss from log-softmax and top-k from the rank of the true class's logit.
"""
import argparse
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
    root = data.make_demo_dataset(str(tmp / "demo"), train_per_class=4, val_per_class=2)
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
    ckpt = {"variant": "t", "model_args": net.model_args, "model": state, "ema": ema,
            "config": {"data_dir": root, "img_size": IMG_SIZE}, "epoch": 0, "step": 6,
            "best_top1": 0.0, "optimizer": opt.state_dict()}
    path = str(tmp / "ckpt.pt")
    torch.save(ckpt, path)
    return {"root": root, "path": path, "ckpt": ckpt, "tmp": tmp}


def reference(state, model_args, root, img_size=IMG_SIZE):
    """top-1 %, top-5 %, mean loss and count, image by image, without eval.py."""
    net = mv.MambaVision(**model_args)
    net.load_state_dict(state)
    net.eval()
    val = data.ImageFolder(os.path.join(root, "val"), data.eval_transform(img_size, 1.0))
    loss = top1 = top5 = 0.0
    with torch.no_grad():
        for i in range(len(val)):  # (ImageFolder wraps indices around, so no plain `for x, y in val`)
            x, y = val[i]
            logits = net(x[None])[0].double()                     # (num_classes,)
            loss -= (logits - logits.logsumexp(0))[y].item()
            higher = int((logits > logits[y]).sum())              # classes that beat the label
            top1 += higher == 0
            top5 += higher < 5
    n = len(val)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": n}


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
    for flags, top1, top5 in (([], "ema_top1", "ema_top5"), (["--no-ema"], "top1", "top5")):
        code, result, _, _ = run_main([path, "--workers", "0", *flags], capsys)
        assert code == 0 and result["images"] == 19
        assert (result["top1"], result["top5"]) == pytest.approx((logged[top1], logged[top5]), abs=1e-9)


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


def test_unreadable_images_are_reported(trained, capsys, tmp_path):
    root = str(tmp_path / "demo")
    shutil.copytree(trained["root"], root)
    bad = data.ImageFolder(os.path.join(root, "val")).samples[0][0]
    with open(bad, "wb") as f:
        f.write(b"not a JPEG")
    code, result, out, _ = run_main([trained["path"], "--data-dir", root, "--workers", "0"], capsys)
    assert code == 0 and result["unreadable"] == 1 and result["images"] == 19
    assert "not exact" in out


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
                                  ["ckpt.pt", "--variant", "t9"], ["ckpt.pt", "--dtype", "fp8"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2


def test_missing_file_data_dir_or_val_folder(trained, tiny_variants, capsys, tmp_path):
    code, _, _, err = run_main([str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, _, err = run_main([trained["path"], "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "holding val/" in err
    path = str(tmp_path / "official.pth.tar")
    save_official(trained["ckpt"]["model"], path)
    code, _, _, err = run_main([path, "--variant", "tiny"], capsys)
    assert code == 2 and "records no dataset: pass --data-dir" in err
