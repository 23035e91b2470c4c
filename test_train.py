"""CPU tests of train.py and step.py: LAMB, the step, the schedule, EMA, losses, several processes on
gloo, kill-and-resume, signals, resume checks, bad input; GPU tests of the fast path (skipped without CUDA)."""
import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import jpeg
import step
import synthetic
import recipe
import train
from model import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = json.dumps(dict(depths=[1, 1, 2, 2], dim=16, in_dim=8))
# a tiny network at 32 px (levels 2 and 3 are 2 x 2 and 1 x 1 maps), 3 images a step
TINY_FLAGS = ["--model-overrides", TINY, "--window-size", "8", "8", "2", "1", "--img-size", "32",
              "--batch-size", "3", "--workers", "0", "--epochs", "3", "--warmup-epochs", "1",
              "--cooldown-epochs", "1", "--ema-decay", "0.9", "--mesa-start", "0.3"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A small demo set: 10 classes x 4 train (13 steps of 3 a epoch) and x 2 val images."""
    return synthetic.make_demo_dataset(str(tmp_path_factory.mktemp("data") / "demo"), train_per_class=4,
                                       val_per_class=2)


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """train.main (and its --benchmark) turn on cuDNN autotuning and TF32 for the whole process; put
    them back after each test, else the later test files' tight float32 comparisons on a GPU run
    with TF32 matrix products (test_scan's model against the reference scan failed so)."""
    flags = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# train.py in a fresh process runs on the CPU also where there is a GPU: the tests compare runs
# across process counts, and a 2-process run on one GPU would look for a second.
TRAIN_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE, CUDA_VISIBLE_DEVICES="")


def run_train(*flags, nproc=None, timeout=120, gpu=False):
    """train.py in a fresh process (through torchrun for nproc; on the CPU unless gpu): returns the
    CompletedProcess."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]  # a free port each time
    cmd = [sys.executable] + (launcher if nproc else []) + \
          [os.path.join(HERE, "train.py")] + list(flags)
    env = dict(os.environ, PYTHONPATH=HERE) if gpu else TRAIN_ENV
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- LAMB

def lamb_reference(params, grads_per_step, lr, betas, eps, wd, decays, max_grad_norm):
    """LAMB written out per tensor in float64, straight from the formulas in train.Lamb's docstring."""
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        total = math.sqrt(sum(float((g * g).sum()) for g in grads))
        scale = max(total / max_grad_norm, 1.0)
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g / scale
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            ratio = 1.0
            if decays[i]:
                u = u + wd * p
                ratio = float(p.norm() / u.norm())
            params[i] = p - lr * ratio * u
    return params


@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1, dtype=torch.float64)])  # a float, or a tensor (the graphs')
def test_lamb_matches_its_formulas(lr):
    torch.manual_seed(0)
    weight, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    grads = [[torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)] for _ in range(4)]
    ref = lamb_reference([weight, bias], grads, lr=0.1, betas=(0.9, 0.999), eps=1e-8, wd=0.05,
                         decays=[True, False], max_grad_norm=math.inf)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    opt = step.Lamb([dict(params=[w], weight_decay=0.05), dict(params=[b], weight_decay=0.0)])
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step(lr)
    for ours, theirs in ((w, ref[0]), (b, ref[1])):
        assert (ours.detach() - theirs).norm() / theirs.norm() < 1e-12
    assert (w.detach() - weight).norm() > 1e-3  # it did move


def tiny_step_setup(ema_decay=0.9, clip_grad=5.0, opt="lamb"):
    """A tiny MambaVision, its EMA, LAMB and a TrainStep (eager, float32), and one micro-batch."""
    torch.manual_seed(0)
    model = build_model("t", num_classes=10, window_size=(8, 8, 2, 1), **{
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(TINY).items()}).train()
    ema = step.ModelEma(model, ema_decay)
    optimizer = step.Lamb(step.param_groups(model, 0.05), trust_ratio=opt == "lamb")
    settings = SimpleNamespace(amp="none", clip_grad=clip_grad, opt=opt, accum_steps=1, smoothing=0.1, mesa=0.5)
    train_step = step.TrainStep(model, ema, optimizer, settings, 10, 1, fast=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    batch = (x, torch.tensor([[2, 3, 10, 12], [0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 20, 8]]),
             torch.tensor([1, 7, 3, 3]), torch.tensor(data.draw_mix(random.Random(3), 32, 32)), 1234)
    return model, ema, optimizer, train_step, batch


@pytest.mark.parametrize("opt, clip", [("lamb", 5.0), ("adamw", 5.0), ("lamb", 0.0)])
def test_train_step_equals_its_parts_by_hand(opt, clip):
    """One TrainStep: gradients of the mixed, normalised batch's loss (+ MESA), one clip at
    min(--clip-grad, LAMB's 1), then the LAMB/AdamW formulas in float64, then the EMA."""
    model, ema, optimizer, train_step, (x, boxes, labels, mix, seed) = tiny_step_setup(clip_grad=clip, opt=opt)
    twin = copy.deepcopy(model)
    teacher = copy.deepcopy(ema.module)
    before = [p.detach().double().clone() for p in model.parameters()]
    loss, grad_norm, finite = train_step([(x, boxes, labels, mix, seed)], 0.01, use_mesa=True).tolist()
    torch.manual_seed(seed)  # the same erase noise and drop path draws as the step's
    xn, target = data.mix_batch(data.normalize_and_erase(x, boxes), labels, mix, 10, 0.1)
    logits = twin(xn)
    ref_loss = step.soft_cross_entropy(logits, target) + step.mesa_loss(logits, teacher(xn), 0.5)
    ref_loss.backward()
    grads = [p.grad.double() for p in twin.parameters()]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    limit = min(clip, 1.0) if opt == "lamb" else clip
    scale = max(norm / limit, 1.0) if clip > 0 else 1.0
    decays = [p.ndim > 1 and not n.endswith(".bias") for n, p in model.named_parameters()]
    ref = lamb_reference(before, [[g / scale for g in grads]], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                         wd=0.05, decays=[d and opt == "lamb" for d in decays], max_grad_norm=math.inf) \
        if opt == "lamb" else adamw_reference(before, [g / scale for g in grads], 0.01, 0.05, decays)
    assert finite and loss == pytest.approx(float(ref_loss.detach()), rel=1e-5) and grad_norm == pytest.approx(norm, rel=1e-4)
    for p, r in zip(model.parameters(), ref):
        assert (p.detach().double() - r).norm() <= 1e-5 * r.norm() + 1e-8
    for e, m, t in zip(ema.module.parameters(), model.parameters(), teacher.parameters()):
        torch.testing.assert_close(e, 0.9 * t + 0.1 * m.detach(), rtol=1e-5, atol=1e-7)
    for p, g in zip(model.parameters(), grads):  # .grad: this step's gradients, stored (not added), clipped
        assert (p.grad.double() - g / scale).norm() <= 1e-5 * g.norm() / scale + 1e-12


def adamw_reference(params, grads, lr, wd, decays, betas=(0.9, 0.999), eps=1e-8):
    """One AdamW step (t = 1) per tensor in float64, decay decoupled."""
    out = []
    for p, g, d in zip(params, grads, decays):
        m, v = (1 - betas[0]) * g, (1 - betas[1]) * g * g
        u = (m / (1 - betas[0])) / ((v / (1 - betas[1])).sqrt() + eps)
        out.append(p - lr * wd * p * d - lr * u)
    return out


@pytest.mark.parametrize("opt", ["lamb", "adamw"])
def test_a_non_finite_step_leaves_no_trace(opt):
    """An inf in the batch: the step is skipped, and weights, BatchNorm statistics and optimizer
    state (moments, step count) are bit-identical to before it (the forward had moved the
    statistics); the EMA takes exactly its usual step towards the unchanged network."""
    model, ema, optimizer, train_step, (x, boxes, labels, mix, seed) = tiny_step_setup(opt=opt)
    train_step([(x, boxes, labels, mix, seed)], 0.01, use_mesa=False)  # one good step: optimizer state exists
    saved = copy.deepcopy(model).state_dict()
    ema_before = copy.deepcopy(ema.module).state_dict()
    states = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    poisoned = mix.clone()
    poisoned[0] = float("inf")  # blend inf: every pixel non-finite from the first layer on
    loss, grad_norm, finite = train_step([(x, boxes, labels, poisoned, seed)], 0.01, use_mesa=True).tolist()
    assert not finite and not math.isfinite(grad_norm)
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, v in ema.module.state_dict().items():
        expected = torch.lerp(ema_before[k], saved[k], 0.1) if v.is_floating_point() else saved[k]
        assert torch.equal(v, expected), k
    assert all(torch.equal(s[k], before[k]) for s, before in zip(optimizer.state.values(), states) for k in before)
    assert any("running_var" in k for k in saved)
    loss, grad_norm, finite = train_step([(x, boxes, labels, mix, seed)], 0.01, use_mesa=True).tolist()
    assert finite and math.isfinite(loss)  # and the next step trains normally


def test_a_gradient_norm_too_large_for_float32_skips_the_step():
    """Every gradient and every tensor's norm finite, but their total norm overflows float32 (a loss
    scale grown large, as fp16's dynamic one may over a long run): the step is skipped, not taken
    with a clip of 0. The scale is set between the two: largest norm x scale < sqrt(float32 max) <
    total norm x scale."""
    model, _, _, train_step, micro_batch = tiny_step_setup(clip_grad=0.0)  # no clip: .grad stays as it was
    train_step([micro_batch], 0.01, use_mesa=False)
    norms = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).double()
    assert norms.norm() > 2 * norms.max()  # room for a scale between the two
    scale = math.sqrt(torch.finfo(torch.float32).max) / (norms.max() * norms.norm()).sqrt().item()
    model, _, _, train_step, micro_batch = tiny_step_setup()  # the same network and batch, clipped
    before = copy.deepcopy(model).state_dict()
    train_step.loss_scale.fill_(scale)
    loss, grad_norm, finite = train_step([micro_batch], 0.01, use_mesa=False).tolist()
    assert not finite and grad_norm == math.inf
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_buffer_snapshot_puts_back_exactly_what_it_saved():
    """BufferSnapshot over float32 statistics and int64 counters: restore(unless=True) keeps the
    current values, restore(unless=False) and restore() put the saved ones back, bit for bit."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    snapshot = step.BufferSnapshot(list(model.buffers()))
    model(torch.randn(2, 3, 5, 5))
    saved = {k: v.clone() for k, v in model.named_buffers()}
    snapshot.save()
    model(torch.randn(2, 3, 5, 5))
    moved = {k: v.clone() for k, v in model.named_buffers()}
    assert all(not torch.equal(moved[k], saved[k]) for k in saved)
    snapshot.restore(unless=torch.tensor(True))
    assert all(torch.equal(v, moved[k]) for k, v in model.named_buffers())
    snapshot.restore(unless=torch.tensor(False))
    assert all(torch.equal(v, saved[k]) for k, v in model.named_buffers())
    model(torch.randn(2, 3, 5, 5))
    snapshot.restore()
    assert all(torch.equal(v, saved[k]) and v.dtype == saved[k].dtype for k, v in model.named_buffers())


def test_param_groups_exclude_biases_and_1d():
    model = build_model("t", num_classes=10, **{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in json.loads(TINY).items()})
    decay, no_decay = step.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(names[id(p)].endswith("A_log") for p in decay["params"])  # 2-D (d, n): decays


# ---------------------------------------------------------------------------------------------- schedule

def test_learning_rate_schedule():
    # 5 steps an epoch; warmup 3 epochs (15 steps); cosine spans 10 - 2 = 8 epochs (40 steps) from step 0
    args = SimpleNamespace(lr=1.0, warmup_lr=0.1, min_lr=0.01, warmup_epochs=3, epochs=10, cooldown_epochs=2)
    lr = lambda step: recipe.lr_at(step / 5, args)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # warmup_lr
    assert lr(14) == pytest.approx(0.1 + 0.9 * 14 / 15)  # last warmup step
    assert lr(15) == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * 15 / 40)))  # cosine, part-way along
    assert lr(20) == pytest.approx(0.505)  # half the cosine span: the midpoint of lr and min_lr
    assert lr(39) == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * 39 / 40)))
    assert lr(40) == pytest.approx(0.01) and lr(49) == pytest.approx(0.01)  # cooldown start and end
    assert lr(14) > lr(15) > lr(20) > lr(39) > lr(40)
    # extended at epoch 5 (step 25) to 14 epochs: a cosine from lr(25) to min_lr at epoch 12, no jump
    longer = SimpleNamespace(**vars(args) | dict(epochs=14, extended_from=[5.0, lr(25)]))
    assert recipe.lr_at(5.0, longer) == pytest.approx(lr(25))
    assert recipe.lr_at(8.5, longer) == pytest.approx(0.01 + 0.5 * (lr(25) - 0.01))  # half way to epoch 12
    assert recipe.lr_at(12.0, longer) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------- EMA, losses

def test_ema_update():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = step.ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3))  # moves BatchNorm's running stats and num_batches_tracked
    ema.update()
    for k, v in ema.module.state_dict().items():
        m = model.state_dict()[k]
        expected = 0.9 * before[k] + 0.1 * m if v.is_floating_point() else m
        assert torch.allclose(v, expected, atol=1e-6), k
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_soft_cross_entropy_equals_label_smoothing_cross_entropy():
    logits, labels = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    target = data.smooth_one_hot(labels, 10, 0.1).double()
    ref = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(step.soft_cross_entropy(logits, target).double(), ref, rtol=1e-6)


def test_mesa_loss_is_scaled_kl():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p_s, p_t = torch.softmax(s / 3, -1), torch.softmax(t / 3, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.allclose(step.mesa_loss(s, t, 0.5), 0.5 * 50 * kl, rtol=1e-5)
    assert step.mesa_loss(t, t, 0.5).abs() < 1e-6


def test_capture_lock_is_shared_by_data_threads_and_exclusive_for_a_capture():
    """Data threads hold it together; a capture waits until they let go, and while it waits or
    captures no thread gets in (else a long run of batches could hold it off for ever)."""
    lock, events = step.CaptureLock(), []
    first, second = lock.shared(), lock.shared()
    first.__enter__(), second.__enter__()  # two holders at once: no deadlock

    def capture():
        with lock.exclusive():
            events.append("capture")

    def late_batch():
        with lock.shared():
            events.append("batch")

    capturer = threading.Thread(target=capture)
    capturer.start()
    time.sleep(0.2)
    latecomer = threading.Thread(target=late_batch)
    latecomer.start()
    time.sleep(0.2)
    assert events == []  # the capture waits for the holders, the latecomer for the capture
    first.__exit__(None, None, None)
    time.sleep(0.1)
    assert events == []
    second.__exit__(None, None, None)
    capturer.join(5), latecomer.join(5)
    assert events == ["capture", "batch"]


# ---------------------------------------------------------------------------------------------- whole runs

def test_two_process_gloo_run_keeps_ranks_identical(demo_dir, tmp_path):
    out = tmp_path / "ddp"
    r = run_train("--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS, "--epochs", "2",
                  "--cooldown-epochs", "0", "--batch-size", "4", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("weights and EMA identical on 2 ranks") == 2  # checked at each epoch's end
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 2 * (40 // 8) and ckpt["epoch"] == 2  # 40 images, 2 ranks x 4 a step
    assert len(ckpt["rng"]) == 2 and ckpt["config"]["world_size"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(lines[-1])
    assert len(lines) == 2 and {"top1", "ema_top1", "train_loss", "data_wait_ms_per_step"} <= set(metrics)
    assert 0 <= metrics["data_wait_fraction"] < 1 and "data wait" in r.stdout


def test_kill_and_resume_equals_the_straight_run(demo_dir, tmp_path):
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--deterministic", "--max-steps", "30"]
    straight = run_train(*flags, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    # 1) stopped mid-epoch (step 17 = epoch 1, 4 steps in), then the same command to the end
    stopped = tmp_path / "stopped"
    assert run_train(*flags[:-1], "17", "--output-dir", str(stopped)).returncode == 0
    assert load(stopped / "last.pt")["step"] == 17
    resumed = run_train(*flags, "--output-dir", str(stopped))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    # 2) SIGKILL once the first checkpoint is on disk, then the same command again
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *flags, "--output-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TRAIN_ENV, cwd=HERE)
    deadline = time.time() + 60
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_train(*flags, "--output-dir", str(killed)).returncode == 0
    ref = load(tmp_path / "straight" / "last.pt")
    assert ref["step"] == 30
    for other in (stopped, killed):
        ckpt = load(other / "last.pt")
        assert ckpt["step"] == 30
        for part in ("model", "ema"):
            for k, v in ref[part].items():
                assert torch.equal(ckpt[part][k], v), (other.name, part, k)
        for i, s in ref["optimizer"]["state"].items():
            assert torch.equal(ckpt["optimizer"]["state"][i]["exp_avg"], s["exp_avg"])


def test_accumulation_on_one_process_equals_two_processes(demo_dir, tmp_path):
    # 1 process accumulating 2 micro-batches of 4 and 2 processes of 4 each see the same micro-batches
    # with the same seeds (augmentation, mixup/cutmix, drop path: all on), and both average the two
    # micro-batch gradients, BatchNorm over each micro-batch. So the weights agree to float rounding.
    # (Running BatchNorm statistics differ: one process updates them twice a step. MESA, whose
    # EMA teacher runs on them, is off.)
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--deterministic", "--mesa", "0", "--batch-size", "4",
             "--max-steps", "7", "--step-log"]
    runs = {"ddp": run_train(*flags, "--output-dir", str(tmp_path / "ddp"), nproc=2),
            "accum": run_train(*flags, "--output-dir", str(tmp_path / "accum"), "--accum-steps", "2")}
    for r in runs.values():
        assert r.returncode == 0, r.stderr[-2000:]
    ddp, accum = load(tmp_path / "ddp" / "last.pt"), load(tmp_path / "accum" / "last.pt")
    assert ddp["step"] == accum["step"] == 7 and ddp["images"] == accum["images"] == 7 * 8
    tiny = build_model("t", num_classes=10, **recipe.model_overrides(SimpleNamespace(
        model_overrides=json.loads(TINY), window_size=None)))
    params = [name for name, _ in tiny.named_parameters()]  # not the buffers: see above

    def close(a, b):
        return all((a[n] - b[n]).norm() <= 1e-5 * b[n].norm() + 1e-7 for n in params)

    assert close(accum["model"], ddp["model"]) and close(accum["ema"], ddp["ema"])
    logs = [[json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
            for run in ("ddp", "accum")]
    assert [s["step"] for s in logs[0]] == [s["step"] for s in logs[1]] == list(range(7))
    for a, b in zip(*logs):  # the loss: the mean over ranks = the mean over micro-steps
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["data_wait_ms"] >= 0
    assert len({round(s["loss"], 4) for s in logs[0]}) > 3  # the losses do change from step to step
    assert all(a["time"] < b["time"] for a, b in zip(logs[0], logs[0][1:]))
    assert not close(ddp["model"], ddp["ema"])  # it trained: the EMA lags behind
    plain = run_train(*flags, "--output-dir", str(tmp_path / "plain"))  # 4 images a step: other weights
    assert plain.returncode == 0 and not close(load(tmp_path / "plain" / "last.pt")["model"], ddp["model"])


def test_non_finite_steps_are_skipped_then_stop_the_run(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(step, "soft_cross_entropy", lambda logits, target: logits.sum() * float("nan"))
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", demo_dir, "--output-dir", str(tmp_path), *TINY_FLAGS, "--max-bad-steps", "3"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out.count("step skipped") == 3
    assert err.strip().splitlines()[-1].startswith("error: 3 non-finite steps in a row")


def test_benchmark_mode(capsys):
    train.main(["--benchmark", *TINY_FLAGS, "--benchmark-steps", "2", "--accum-steps", "2"])
    out = capsys.readouterr().out
    assert "1 process(es) x batch 3 x 2 micro-steps" in out and "images/s" in out and "peak memory" in out
    r = run_train("--benchmark", *TINY_FLAGS, "--benchmark-steps", "2", nproc=2)  # DDP, as in training
    assert r.returncode == 0 and "2 process(es) x batch 3 x 1 micro-steps" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("case, flags, message", [
    ("missing data", ["--data-dir", "/nonexistent/imagenet"], "does not exist"),
    ("no train/", ["--data-dir", "{empty}"], "no train/ folder"),
    ("unknown variant", ["--variant", "tiny"], "unknown variant 'tiny'"),
    ("batch size 0", ["--batch-size", "0"], "--batch-size must be positive"),
    ("corrupt resume", ["--data-dir", "{demo}", "--resume", "{corrupt}"], "cannot read checkpoint"),
    ("missing resume", ["--resume", "{tmp}/nothing.pt"], "--resume {tmp}/nothing.pt: no such file"),
    ("folder as resume", ["--resume", "{tmp}"], "is a folder"),
    ("output dir is a file", ["--output-dir", "{corrupt}"], "is a file: pass a folder"),
    ("output dir under a file", ["--output-dir", "{corrupt}/run"], "cannot use --output-dir"),
    ("window size 0", ["--window-size", "0", "0", "0", "0"], "--window-size takes 4 positive sizes"),
    ("unknown model setting", ["--model-overrides", '{{"depth": 3}}'], "unknown key(s) depth"),
    ("negative lr", ["--lr", "-1"], "--lr must be positive"),
    pytest.param("GPU data path without a GPU", ["--data-path", "gpu"], "--data-path gpu needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_bad_input_gives_one_line_and_exit_2(case, flags, message, demo_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    fill = dict(empty=tmp_path / "empty", demo=demo_dir, corrupt=tmp_path / "corrupt.pt", tmp=tmp_path)
    flags, message = [f.format(**fill) for f in flags], message.format(**fill)
    argv = ["--output-dir", str(tmp_path / "out"), *TINY_FLAGS, *flags]
    if "--data-dir" not in argv:
        argv += ["--data-dir", demo_dir]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("given, expected", [(None, "32"), ("4", "4")])
def test_main_asks_for_32_gpu_work_queues_unless_told(given, expected, tmp_path, monkeypatch):
    """Before CUDA starts: CUDA_DEVICE_MAX_CONNECTIONS 32 (the GPU data path waits behind the
    training's queued steps with CUDA's 8); a value the user set is kept."""
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", given or "")  # the test's end restores the variable
    if given is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    with pytest.raises(SystemExit):
        train.main(["--variant", "no-such-variant", "--output-dir", str(tmp_path / "out")])
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == expected


def test_resume_from_a_different_run_is_refused(demo_dir, tmp_path, capsys):
    argv = ["--data-dir", demo_dir, "--output-dir", str(tmp_path), *TINY_FLAGS, "--max-steps", "1"]
    train.main(argv)
    assert load(tmp_path / "last.pt")["step"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--batch-size", "4"])  # the same folder, another batch size
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint's run has global batch 3 (now 4" in err[0], err
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--batch-size", "-3"])  # a bad value is named as such, resuming or not
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size must be positive, not -3" in err[0], err


def test_resume_on_another_world_size_at_the_same_global_batch(demo_dir, tmp_path):
    # 40 images, global batch 8: 5 steps an epoch. 2 processes x 4 stop mid-epoch 1 (step 7), 1
    # process x 8 goes on to mid-epoch 2 (step 13), then 2 processes x 4 again to the end (step 15).
    out = tmp_path / "run"
    flags = ["--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS]
    r = run_train(*flags, "--batch-size", "4", "--max-steps", "7", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(*flags, "--batch-size", "8", "--max-steps", "13")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 7, 56 images (global batch 8 as 2 x 4 x 1 processes x batch x micro-steps, now 1 x 8 x 1)" \
        in r.stdout
    ckpt = load(out / "last.pt")
    config = SimpleNamespace(**ckpt["config"])
    assert (ckpt["step"], ckpt["epoch"], ckpt["images"], config.world_size) == (13, 2, 13 * 8, 1)
    assert float(ckpt["optimizer"]["state"][0]["t"]) == 13  # LAMB took every step
    assert len(ckpt["rng"]) == 1
    r = run_train(*flags, "--batch-size", "4", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 13, 104 images (global batch 8 as 1 x 8 x 1 processes x batch x micro-steps, now 2 x 4 x 1)" \
        in r.stdout
    assert r.stdout.count("weights and EMA identical on 2 ranks") == 1  # checked at the end of epoch 2
    ckpt = load(out / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["images"], len(ckpt["rng"])) == (15, 3, 15 * 8, 2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15]  # one line per epoch, from three runs
    assert all(math.isfinite(m["train_loss"]) and m["train_loss"] < 3.0 for m in metrics)  # ln 10 = 2.30
    r = run_train(*flags, "--batch-size", "4", "--epochs", "4")  # a different global batch is still refused
    assert r.returncode == 2 and "global batch 8 (now 4" in r.stderr


def _all_reduce_mean_worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    tensors = _rank_tensors(rank)
    views = [t[:, :2] for t in tensors[:1]] + tensors[1:]  # a non-contiguous view is averaged in place too
    step.all_reduce_mean_(views)
    torch.save(tensors, f"{out}{rank}.pt")
    dist.destroy_process_group()


def _rank_tensors(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 1, 3, generator=g)]


def test_all_reduce_mean_averages_over_ranks_in_place(tmp_path):
    """The averaging of gradients and BatchNorm statistics: one flat collective, written back."""
    torch.multiprocessing.spawn(_all_reduce_mean_worker, args=(str(tmp_path / "store"), str(tmp_path / "r")),
                                nprocs=2)
    a, b = _rank_tensors(0), _rank_tensors(1)
    expected = [(x + y) / 2 for x, y in zip(a, b)]
    expected[0] = torch.cat([expected[0][:, :2], a[0][:, 2:]], dim=1)  # rank 0's columns outside the view
    got = load(str(tmp_path / "r0.pt"))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    got1 = load(str(tmp_path / "r1.pt"))
    torch.testing.assert_close(got1[1], expected[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the GPU's fast path

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path needs a CUDA GPU")


def step_logs(*runs):
    return [[json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()] for run in runs]


@gpu
def test_fast_path_follows_eager_through_the_schedule(demo_dir, tmp_path, capsys):
    """The default GPU path (compiled, CUDA graphs; the GPU data path in both runs where the GPU has
    JPEG engines) against --eager through warmup, MESA switching on (epoch 1 of 3: a second
    capture), evaluation and saves at each epoch's end, a stop mid-epoch and a resume (a new
    capture), to the end: per-step losses and the final weights agree within float32 / TF32
    rounding grown over 39 LAMB steps: losses to a bf16-sized 1e-2, all weights together to 2e-2
    (drop path off: compiled code draws other random numbers than eager)."""
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--drop-path-rate", "0", "--amp", "none", "--step-log"]
    eager, fast = tmp_path / "eager", tmp_path / "fast"
    train.main([*flags, "--output-dir", str(eager), "--eager"])
    train.main([*flags, "--output-dir", str(fast), "--max-steps", "20"])  # stops in epoch 1, MESA on
    if jpeg.uses_engines():  # then the default data path is the GPU's too
        assert "decoded and augmented on the GPU" in capsys.readouterr().out
    assert load(fast / "last.pt")["step"] == 20
    train.main([*flags, "--output-dir", str(fast)])  # resumes: compiles and captures again
    logs = step_logs(eager, fast)
    assert [s["step"] for s in logs[0]] == [s["step"] for s in logs[1]] == list(range(39))
    assert [s["lr"] for s in logs[0]] == [s["lr"] for s in logs[1]]
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(*logs))
    assert worst < 1e-2, f"per-step losses differ by up to {worst:.2e} (relative)"
    ckpts = [load(run / "last.pt") for run in (eager, fast)]
    for part in ("model", "ema"):  # all weights as one vector: a near-zero bias alone drifts far, relatively
        a, b = (torch.cat([v.flatten() for v in c[part].values() if v.is_floating_point()]) for c in ckpts)
        assert (a - b).norm() < 2e-2 * a.norm(), f"{part}: {float((a - b).norm() / a.norm()):.2e} (relative norm)"
    assert [m["epoch"] for m in ckpts[1]["metrics"]] == [0, 1, 2]


@gpu
def test_fast_path_accumulates_micro_batches_as_eager_does():
    """Two micro-batches a step: on the fast path both replay one forward + backward graph, which
    stores fresh gradients, and the first's are kept aside and added. Against the eager step over
    12 steps, MESA from step 4 (a second forward graph, then the update graph captured again where
    the new graph writes the gradients): each step's loss and summed (clipped) gradients, and the
    weights' change over the run, within the fast path's float32 / TF32 rounding. (At lr 0.02 compiled
    and eager steps part by 3-14% in gradients within 12 steps, graphs or not: rounding grown by
    training; a step that added stale gradients would be off by the size of the gradients.)"""
    runs = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = build_model("t", num_classes=10, window_size=(8, 8, 2, 1), drop_path_rate=0.0, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(TINY).items()}).cuda().train()
        model = model.to(memory_format=torch.channels_last)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        settings = SimpleNamespace(amp="none", clip_grad=5.0, opt="lamb", accum_steps=2, smoothing=0.1, mesa=0.5)
        train_step = step.TrainStep(model, step.ModelEma(model, 0.9), step.Lamb(step.param_groups(model, 0.05)),
                                    settings, 10, 1, fast=fast, log=lambda message: None)
        g, rng, losses, grads = torch.Generator().manual_seed(1), random.Random(3), [], []
        for k in range(12):
            micro = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g).cuda()
                      .contiguous(memory_format=torch.channels_last), torch.tensor([[2, 3, 10, 12], [0, 0, 0, 0],
                      [0, 0, 0, 0], [5, 5, 20, 8]]).cuda(), torch.randint(0, 10, (4,), generator=g).cuda(),
                      torch.tensor(data.draw_mix(rng, 32, 32)).cuda(), 100 * k + m) for m in range(2)]
            losses.append(train_step(micro, 1e-4, use_mesa=k >= 4)[0].item())  # small: rounding grows slowly
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert train_step.fast == fast  # the fast path did not fall back to eager
        runs.append((losses, grads, torch.cat([p.detach().flatten() for p in model.parameters()]) - start))
    (eager_losses, eager_grads, eager_change), (fast_losses, fast_grads, fast_change) = runs
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, fast_losses))
    assert worst < 1e-2, f"per-step losses differ by up to {worst:.2e} (relative)"
    worst = max(float((a - b).norm() / a.norm()) for a, b in zip(eager_grads, fast_grads))
    assert worst < 5e-2, f"per-step gradients differ by up to {worst:.2e} (relative norm)"
    assert (eager_change - fast_change).norm() < 5e-2 * eager_change.norm()


@gpu
def test_fast_path_runs_a_long_recipe_with_loader_workers(tmp_path):
    """40 epochs on real JPEGs with Pillow in loader workers (their pin-memory thread runs beside
    every capture), evaluation and checkpoints between the captures, MESA from epoch 10, bf16: it
    must finish (a capture once failed here when MESA switched on after evaluation and saves)."""
    root = synthetic.make_demo_dataset(str(tmp_path / "demo"), train_per_class=12, val_per_class=3)
    r = run_train("--data-dir", root, "--data-path", "cpu", "--output-dir", str(tmp_path / "run"), *TINY_FLAGS,
                  "--epochs", "40", "--warmup-epochs", "3", "--cooldown-epochs", "2", "--batch-size", "16",
                  "--workers", "4", "--mesa-start", "0.25", "--save-minutes", "0", gpu=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fast path:" in r.stdout and "training eagerly" not in r.stderr
    assert r.stdout.count("captured") == 4  # forward + backward without and with MESA, the update after each
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(40)) and all(math.isfinite(m["train_loss"]) for m in metrics)


@gpu
def test_gpu_data_path_resumes_after_sigkill(demo_dir, tmp_path):
    """The default fast step on the GPU data path (nvJPEG + gpu_augment) killed with SIGKILL once its first
    checkpoint is on disk (the end of epoch 0), then the same command: it captures again and ends where the
    straight run ends, through MESA switching on, with the same per-step losses and final weights
    within the fast path's rounding (as test_fast_path_follows_eager_through_the_schedule)."""
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--drop-path-rate", "0", "--amp", "none", "--step-log",
             "--data-path", "gpu"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_train(*flags, "--output-dir", str(straight), gpu=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decoded and augmented on the GPU" in r.stdout
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *flags, "--output-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=HERE),
                            cwd=HERE)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load(killed / "last.pt")["step"] < 39
    r = run_train(*flags, "--output-dir", str(killed), gpu=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    logs = [{s["step"]: s for s in log} for log in step_logs(straight, killed)]  # the killed run logs some steps twice
    assert sorted(logs[0]) == sorted(logs[1]) == list(range(39))
    worst = max(abs(logs[0][k]["loss"] - logs[1][k]["loss"]) / abs(logs[0][k]["loss"]) for k in range(39))
    assert worst < 1e-2, f"per-step losses differ by up to {worst:.2e} (relative)"
    ckpts = [load(run / "last.pt") for run in (straight, killed)]
    for part in ("model", "ema"):
        a, b = (torch.cat([v.flatten() for v in c[part].values() if v.is_floating_point()]) for c in ckpts)
        assert (a - b).norm() < 2e-2 * a.norm(), f"{part}: {float((a - b).norm() / a.norm()):.2e} (relative norm)"
