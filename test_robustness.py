"""CPU tests of issue 14 (days-long runs lose nothing and never go on silently wrong): a non-finite
step leaves no trace; SIGTERM / Ctrl-C save the current step and resume exactly (one process and
torchrun); checkpoints know their classes; resume settings are checked or continued (longer
--epochs); one run per output folder; a full disk keeps the previous checkpoint; metrics survive
resumes; a changed image count goes on. A tiny network on the small demo set, seconds a test."""
import argparse
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import recipe
import train
from test_train import HERE, TINY_FLAGS, TRAIN_ENV, demo_dir, load, run_train  # noqa: F401 (demo_dir: a fixture)

# demo_dir: 10 classes x 4 train images x 3 a step = 13 steps an epoch; 3 epochs (1 warmup, 1 cooldown)
STEPS_PER_EPOCH = 13
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def main_exit(argv, capsys):
    """train.main in this process, expected to exit: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip().splitlines()


def steps_log(out):
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def metrics_log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def all_finite(state_dict):
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values() if t.is_floating_point())


def batchnorm_statistics(state_dict):
    return {k: v for k, v in state_dict.items() if k.endswith(("running_mean", "running_var"))}


def start(cmd, out, name):
    """A background process with its output in files (a pipe left unread would block it)."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(out.parent / f"{name}.out", "w"),
                            stderr=open(out.parent / f"{name}.err", "w"), env=TRAIN_ENV, cwd=HERE)


def wait_for_steps(out, n, proc, timeout=90):
    """Until steps.jsonl has n lines (the run is n steps in)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "steps.jsonl").exists() and len((out / "steps.jsonl").read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"the run ended early with {proc.returncode}"
        time.sleep(0.01)
    raise AssertionError(f"no {n} steps within {timeout} s")


def read(path):
    return path.read_text() if path.exists() else ""


# ---------------------------------------------------------------------------------------------- non-finite steps

@pytest.mark.parametrize("mesa, at", [("0", 5), ("0.5", STEPS_PER_EPOCH + 2)])  # MESA is on from epoch 1
def test_an_inf_pixel_skips_one_step_and_leaves_no_trace(mesa, at, demo_dir, tmp_path, monkeypatch, capsys):
    # One inf pixel in the normalised batch of step `at`: the forward moves the BatchNorm running
    # statistics to NaN and the loss (with MESA also the EMA teacher's logits) is NaN. The step must
    # leave no trace: after it, the network is the one of a run that stopped before it, and the EMA
    # that one's after its usual step towards that network (as timm's EMA steps on skipped steps).
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--mesa", mesa, "--step-log"]
    straight, injected = tmp_path / "straight", tmp_path / "injected"
    train.main([*flags, "--output-dir", str(straight), "--max-steps", str(at)])
    calls, normalize = [], data.normalize_and_erase

    def with_inf(x, boxes, *args, **kwargs):  # one call a step (no accumulation); eval does not call it
        x = normalize(x, boxes, *args, **kwargs)
        if len(calls) == at:
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        calls.append(1)
        return x

    monkeypatch.setattr(data, "normalize_and_erase", with_inf)
    capsys.readouterr()
    train.main([*flags, "--output-dir", str(injected), "--max-steps", str(at + 1)])
    out = capsys.readouterr().out
    assert out.count("step skipped") == 1 and f"at step {at} " in out
    logged = steps_log(injected)
    assert not math.isfinite(logged[at]["loss"]) and all(math.isfinite(s["loss"]) for s in logged[:at])
    assert [s["loss"] for s in logged[:at]] == [s["loss"] for s in steps_log(straight)]
    a, b = load(injected / "last.pt"), load(straight / "last.pt")
    assert a["step"] == at + 1 and b["step"] == at
    for k, v in b["model"].items():  # weights and BatchNorm statistics as before the skipped step
        assert torch.equal(a["model"][k], v), k
    for k, v in b["ema"].items():
        step_ = torch.lerp(v, b["model"][k], 1 - a["config"]["ema_decay"]) if v.is_floating_point() else b["model"][k]
        assert torch.equal(a["ema"][k], step_), k
    for i, s in b["optimizer"]["state"].items():  # LAMB did not count the step
        assert torch.equal(a["optimizer"]["state"][i]["exp_avg"], s["exp_avg"]) and a["optimizer"]["state"][i]["t"] == at
    # on to the end of the run, with the inf gone: every checkpoint and metric finite, training goes on
    monkeypatch.setattr(data, "normalize_and_erase", normalize)
    train.main([*flags, "--output-dir", str(injected), "--max-steps", str(2 * STEPS_PER_EPOCH)])
    for name in ("last.pt", "best.pt"):
        ckpt = load(injected / name)
        assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])
        assert batchnorm_statistics(ckpt["model"]) and all_finite(batchnorm_statistics(ckpt["model"]))
    metrics = metrics_log(injected)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("train_loss", "top1", "ema_top1", "lr"))
    losses = [s["loss"] for s in steps_log(injected)[at + 1:]]
    assert all(map(math.isfinite, losses)) and len(set(losses)) == len(losses)  # not stuck


# ---------------------------------------------------------------------------------------------- signals

def test_sigterm_mid_epoch_saves_the_step_and_resumes_exactly(demo_dir, tmp_path):
    flags = ["--data-dir", demo_dir, *TINY_FLAGS, "--deterministic", "--step-log", "--max-steps", "30"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *flags, "--output-dir", str(stopped)]
    proc = start(cmd, stopped, "stopped")
    wait_for_steps(stopped, 17, proc)  # epoch 1, 4 steps in
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, read(tmp_path / "stopped.err")[-2000:]
    done = len(steps_log(stopped))  # the step that was running when the signal came was finished
    assert 17 <= done < 2 * STEPS_PER_EPOCH and load(stopped / "last.pt")["step"] == done
    assert f"stopped by signal 15 at step {done}: saved last.pt" in read(tmp_path / "stopped.out")
    resumed = start(cmd, stopped, "resumed")  # the same command again, while the straight run runs
    r = run_train(*flags, "--output-dir", str(straight))
    assert r.returncode == 0, r.stderr[-2000:]
    assert resumed.wait(timeout=120) == 0, read(tmp_path / "resumed.err")[-2000:]
    assert f"resumed from {stopped / 'last.pt'}: epoch 1, step {done}" in read(tmp_path / "resumed.out")
    ref, ckpt = load(straight / "last.pt"), load(stopped / "last.pt")
    assert ref["step"] == ckpt["step"] == 30
    for part in ("model", "ema"):
        for k, v in ref[part].items():
            assert torch.equal(ckpt[part][k], v), (part, k)
    for i, s in ref["optimizer"]["state"].items():
        assert torch.equal(ckpt["optimizer"]["state"][i]["exp_avg"], s["exp_avg"])
    assert [s["step"] for s in steps_log(stopped)] == list(range(30))  # each step logged once
    assert [s["loss"] for s in steps_log(stopped)] == [s["loss"] for s in steps_log(straight)]
    # metrics.jsonl: epoch 1 was cut in two, yet its line has the straight run's loss
    assert [(m["epoch"], m["step"], m["train_loss"]) for m in metrics_log(stopped)] == \
        [(m["epoch"], m["step"], m["train_loss"]) for m in metrics_log(straight)] and len(metrics_log(straight)) == 2


def test_a_signal_during_the_ranks_agreement_waits_for_the_next_reading(monkeypatch):
    """Ranks agree on a signal through one all-reduce of their flags. One caught while that runs must
    not make this rank stop when the sum (the same on every rank) says go on: the others would go on
    into the next collective alone. It stops at the next reading, with the others."""
    stop = train.StopSignal()
    try:
        def sum_while_a_signal_lands(values, device):
            stop.catch(signal.SIGTERM, None)
            return [float(sum(values))]
        monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(train, "all_reduce_sum", sum_while_a_signal_lands)
        assert stop.agreed("cpu") == 0
        assert stop.agreed("cpu") == signal.SIGTERM
    finally:
        stop.restore()


def test_sigterm_to_torchrun_saves_and_resumes(demo_dir, tmp_path):
    # torchrun forwards SIGTERM to its workers; they agree on the step, rank 0 saves, both exit
    out = tmp_path / "run"
    # 2 x 3 images a step: 6 steps an epoch, 4 epochs; the ranks read (and may agree on a signal) at steps
    # 6, 10, 12, 18, 20: a loaded machine that delivers the signal late still stops before the end
    flags = [os.path.join(HERE, "train.py"), "--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS,
             "--epochs", "4", "--step-log"]
    proc = start(TORCHRUN + flags, out, "torchrun")
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)  # torchrun itself ends with 1 (its SignalException)
    stdout = read(tmp_path / "torchrun.out")
    done = len(steps_log(out))
    assert 3 <= done < 24 and f"stopped by signal 15 at step {done}: saved last.pt" in stdout, \
        f"{done} steps logged; stdout: {stdout[-1500:]}; stderr: " + read(tmp_path / "torchrun.err")[-3000:]
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == done and len(ckpt["rng"]) == 2
    r = run_train(*flags[1:], nproc=2)
    assert r.returncode == 0 and f"step {done}" in r.stdout, r.stderr[-2000:]
    assert load(out / "last.pt")["step"] == 24 and [s["step"] for s in steps_log(out)] == list(range(24))
    assert [m["step"] for m in metrics_log(out)] == [6, 12, 18, 24]


INF_ON_RANK_1 = """
import os, sys
import data, train
calls, normalize = [0], data.normalize_and_erase
def poisoned(x, boxes, mean, std):
    calls[0] += 1
    out = normalize(x, boxes, mean, std)
    if calls[0] == 4 and os.environ["RANK"] == "1":  # step 3, on one rank only
        out[0, 0, 0, 0] = float("inf")
    return out
data.normalize_and_erase = poisoned
train.main(sys.argv[1:])
"""


def test_an_inf_on_one_rank_skips_the_step_on_both(demo_dir, tmp_path):
    """Under torchrun the averaged gradients carry one rank's inf to every rank: both skip the same
    step, restore their statistics, and stay identical (checked at each epoch's end)."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(INF_ON_RANK_1)
    out = tmp_path / "run"
    r = subprocess.run(TORCHRUN + [str(script), "--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS,
                                   "--epochs", "2", "--cooldown-epochs", "0", "--step-log"],
                       capture_output=True, text=True, timeout=120, env=TRAIN_ENV, cwd=HERE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("step skipped") == 1 and "at step 3" in r.stdout
    assert r.stdout.count("weights and EMA identical on 2 ranks") == 2
    ckpt = load(out / "last.pt")
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])
    assert all(math.isfinite(m["top1"]) and math.isfinite(m["train_loss"]) for m in metrics_log(out))
    grad_norms = [s["grad_norm"] for s in steps_log(out)]
    assert not math.isfinite(grad_norms[3]) and all(math.isfinite(g) for i, g in enumerate(grad_norms) if i != 3)


def test_ctrl_c_to_the_process_group_with_loader_workers(demo_dir, tmp_path):
    # Ctrl-C reaches every process of the group, the loader workers too: they ignore it, so the
    # training process can still finish its step and save
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--data-dir", demo_dir, "--output-dir", str(out),
           *TINY_FLAGS, "--workers", "1", "--step-log"]
    out.mkdir()
    proc = subprocess.Popen(cmd, stdout=open(tmp_path / "out", "w"), stderr=open(tmp_path / "err", "w"),
                            env=TRAIN_ENV, cwd=HERE, start_new_session=True)  # its own process group
    wait_for_steps(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, read(tmp_path / "err")[-2000:]
    assert load(out / "last.pt")["step"] == len(steps_log(out)) and "Traceback" not in read(tmp_path / "err")


def test_a_signal_during_set_up_is_not_lost(demo_dir, tmp_path, monkeypatch, capsys):
    # SIGTERM after the handlers are in place but before the first step (loading data, building
    # the model): the run stops at the end of its first step, saved
    build_data = train.build_data

    def build_then_signal(*args):
        loaders = build_data(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return loaders

    monkeypatch.setattr(train, "build_data", build_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = main_exit(["--data-dir", demo_dir, "--output-dir", str(tmp_path), *TINY_FLAGS], capsys)
    assert code == 128 + signal.SIGTERM and "stopped by signal 15 at step 1" in out
    assert load(tmp_path / "last.pt")["step"] == 1
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back


# ---------------------------------------------------------------------------------------------- what a resume checks

def test_resume_on_renamed_classes_is_refused(demo_dir, tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(demo_dir, root)
    argv = ["--data-dir", str(root), "--output-dir", str(out), *TINY_FLAGS, "--max-steps", "1"]
    train.main(argv)
    assert load(out / "last.pt")["classes"] == data.list_classes(str(root / "train"))
    renamed = data.list_classes(str(root / "train"))[0]
    for split in ("train", "val"):
        os.rename(root / split / renamed, root / split / f"zzz_{renamed}")
    code, _, err = main_exit(argv + ["--max-steps", "2"], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"missing now: {renamed}; new: zzz_{renamed}" in err[0] and "other classes" in err[0]
    assert load(out / "last.pt")["step"] == 1  # untouched


def test_resume_settings_refused_or_extended(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS, "--step-log"]
    train.main(argv + ["--max-steps", "20"])  # stopped mid-cosine (epoch 1, 7 steps in)
    old = load(out / "last.pt")["config"]
    code, _, err = main_exit(argv + ["--lr", "1e-2"], capsys)
    assert code == 2 and len(err) == 1 and "resuming keeps the run's settings, but --lr 0.01 (the run has" in err[0], err
    code, _, err = main_exit(argv + ["--epochs", "2"], capsys)
    assert code == 2 and len(err) == 1 and "--epochs 2 is shorter than the checkpoint's run (3" in err[0], err
    assert load(out / "last.pt")["step"] == 20 and len(steps_log(out)) == 20  # the refusals changed nothing

    # a longer run from mid-cosine: the learning rate goes on from where it was, no jump
    capsys.readouterr()
    train.main(argv + ["--epochs", "5", "--max-steps", "22"])
    stdout = capsys.readouterr().out
    assert "notice: --epochs 3 -> 5: the learning rate continues from" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 5 and config["extended_from"][0] == pytest.approx(1 + 7 / STEPS_PER_EPOCH)
    lrs = [s["lr"] for s in steps_log(out)]  # step 20 where the 3-epoch cosine had it, then a gentler one
    assert lrs[20] == pytest.approx(recipe.lr_at(1 + 7 / STEPS_PER_EPOCH, argparse.Namespace(**old)), rel=1e-12)
    assert lrs[19] > lrs[20] > lrs[21] > lrs[20] - (lrs[19] - lrs[20])
    fresh = recipe.lr_at(1 + 7 / STEPS_PER_EPOCH, argparse.Namespace(**(config | dict(extended_from=None))))
    assert fresh > 1.5 * lrs[20]  # what a plain --epochs 5 schedule would have jumped to
    assert load(out / "last.pt")["config"]["extended_from"] == config["extended_from"]

    # on to the end (--epochs 3 is refused now: the run has 5), then a finished run extended by one epoch
    train.main(argv + ["--epochs", "5"])
    assert load(out / "last.pt")["epoch"] == 5 and [m["epoch"] for m in metrics_log(out)] == [0, 1, 2, 3, 4]
    capsys.readouterr()
    train.main(argv + ["--epochs", "6"])
    assert "notice: --epochs 5 -> 6" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 6 and config["extended_from"][0] == 5
    lrs = [s["lr"] for s in steps_log(out)]
    assert len(lrs) == 6 * STEPS_PER_EPOCH and lrs[5 * STEPS_PER_EPOCH] == pytest.approx(lrs[5 * STEPS_PER_EPOCH - 1], rel=0.05)
    assert [m["epoch"] for m in metrics_log(out)] == list(range(6)) and all(m["lr"] > 0 for m in metrics_log(out))


def test_a_changed_image_count_goes_on_with_a_notice(demo_dir, tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(demo_dir, root)
    argv = ["--data-dir", str(root), "--output-dir", str(out), *TINY_FLAGS]
    train.main(argv + ["--max-steps", "17"])  # epoch 1, 4 of 13 steps
    for path in sorted(glob.glob(str(root / "train" / "*" / "*")))[::4][:6]:  # 40 -> 34 images: 11 steps
        os.remove(path)
    capsys.readouterr()
    train.main(argv)
    stdout = capsys.readouterr().out
    assert "notice: the training set now gives 11 steps an epoch (was 13): epoch 1 goes on at step 3 of 11" in stdout
    ckpt = load(out / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["step"] == 17 + 8 + 11
    assert [m["step"] for m in metrics_log(out)] == [13, 25, 36]


# ---------------------------------------------------------------------------------------------- the output folder

def test_one_run_per_output_folder(demo_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", demo_dir, "--output-dir", str(out), *TINY_FLAGS, "--max-steps", "1"]
    lock = train.lock_output_dir(str(out))  # this process holds the folder
    try:
        for nproc in (None, 2):
            r = run_train(*flags, nproc=nproc)
            err = [line for line in r.stderr.splitlines() if line.startswith("error")]
            assert r.returncode == (2 if nproc is None else 1), r.stderr[-2000:]  # torchrun: 1 when a worker fails
            assert len(err) == 1 and f"another run (pid {os.getpid()} on " in err[0], r.stderr[-2000:]
            assert not (out / "last.pt").exists()
    finally:
        lock.close()
    # a holder that dies (SIGKILL: no clean-up at all) leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train; lock = train.lock_output_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=TRAIN_ENV, cwd=HERE)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(train.UsageError, match="another run"):
        train.lock_output_dir(str(out))
    holder.kill()
    holder.wait()
    train.lock_output_dir(str(out)).close()
    train.main(flags)  # and a run goes ahead
    assert load(out / "last.pt")["step"] == 1


def test_a_full_disk_keeps_the_previous_checkpoint(demo_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "last.pt.tmp-4242").write_bytes(b"half a checkpoint")  # left by a killed run
    saves, save = [], torch.save

    def disk_full_on_the_second_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", disk_full_on_the_second_save)
    argv = ["--data-dir", demo_dir, "--output-dir", str(tmp_path), *TINY_FLAGS, "--max-steps", "20"]
    code, _, err = main_exit(argv, capsys)  # saves at the end of epoch 0 (step 13), then at step 20
    assert code == 1 and sum("error" in line for line in err) == 1 and err[-1].startswith("error: "), err
    assert err[-1].startswith(f"error: cannot write {tmp_path / 'last.pt'} ([Errno 28] No space left on device)")
    assert "needs about" in err[-1] and "GiB free" in err[-1] and "the previous checkpoint is intact" in err[-1]
    assert glob.glob(str(tmp_path / "*.tmp-*")) == []  # the stale one (at start) and the failed one
    monkeypatch.setattr(train.torch, "save", save)
    assert load(tmp_path / "last.pt")["step"] == 13 and load(tmp_path / "best.pt")["step"] == 13
    train.main(argv)  # space freed: the same command resumes from step 13
    assert load(tmp_path / "last.pt")["step"] == 20


def test_a_full_disk_at_the_metrics_is_one_line_and_they_come_back(demo_dir, tmp_path, monkeypatch, capsys):
    replace = os.replace

    def disk_full_at_the_epoch_end(src, dst):  # the first metrics.jsonl (empty, at start) is written
        if str(dst).endswith("metrics.jsonl") and (tmp_path / "metrics.jsonl").exists():
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(train.os, "replace", disk_full_at_the_epoch_end)
    argv = ["--data-dir", demo_dir, "--output-dir", str(tmp_path), *TINY_FLAGS, "--max-steps", "14"]
    code, _, err = main_exit(argv, capsys)
    assert code == 1 and sum("error" in line for line in err) == 1, err
    assert err[-1] == (f"error: cannot write {tmp_path / 'metrics.jsonl'} (No space left on device); the checkpoints "
                       f"are intact: free space, then run the same command to resume")
    assert glob.glob(str(tmp_path / "*.tmp-*")) == [] and (tmp_path / "metrics.jsonl").read_text() == ""
    monkeypatch.setattr(train.os, "replace", replace)
    assert load(tmp_path / "last.pt")["step"] == 13  # epoch 0 was saved before its metrics line
    train.main(argv)  # the line comes back from the checkpoint
    assert [(m["epoch"], m["step"]) for m in metrics_log(tmp_path)] == [(0, 13)]
    assert load(tmp_path / "last.pt")["step"] == 14


def test_an_unwritable_output_dir_is_one_line(demo_dir, tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        writable = os.access(locked, os.W_OK)  # as root, permissions do not hold
        target = (tmp_path / "a-file" / "run") if writable else (locked / "run")
        (tmp_path / "a-file").write_text("")
        code, _, err = main_exit(["--data-dir", demo_dir, "--output-dir", str(target), *TINY_FLAGS], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: cannot use --output-dir {target}: "), err
    finally:
        locked.chmod(0o700)
