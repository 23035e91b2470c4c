"""The run's folder for train.py: checkpoints written atomically and read safely, the RNG states
they carry, the lock that keeps a second run out, and the small files beside them.

Checkpoints, config.json and metrics.jsonl go to a temporary file in the same folder that is then
renamed over the old one, so a kill at any moment leaves either the old file or the new one, never
half of one. A checkpoint holds only plain types and tensors, so `torch.load(weights_only=True)`
reads it.
"""
import fcntl
import glob
import json
import os
import random
import shutil
import socket

import torch


class UsageError(Exception):
    """A bad flag, folder or file: train.py prints it as one line and exits with code 2."""


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss keeps diverging): train.py prints it as one line and exits
    with code 1."""


def lock_output_dir(path):
    """Make the folder and hold an exclusive lock on it while this process lives (the OS drops the
    lock when it dies, so a crash leaves no stale lock). A second run into the folder is refused."""
    try:
        os.makedirs(path, exist_ok=True)
        lock = open(os.path.join(path, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"cannot use --output-dir {path}: {e.strerror or e}: pass a writable folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UsageError(f"another run ({lock.read().strip() or 'unknown'}) is writing to {path}: wait for it "
                         f"to end, or pass another --output-dir") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    for stale in glob.glob(os.path.join(path, "*.tmp-*")):  # left by a save that was killed
        os.remove(stale)
    return lock



def rng_state():
    """This process's RNG states, as plain types (for torch.load(weights_only=True))."""
    version, state, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                python=[version, list(state), gauss])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def plain(x):
    """Tuples -> lists, recursively (checkpoints hold only weights_only-safe plain types)."""
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then rename: a kill leaves the old file intact.
    A failed write (a full disk) removes its temporary file and says how much space it needed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        need = sum(t.numel() * t.element_size() for t in tensors_in(obj))
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        raise TrainingError(f"cannot write {path} ({str(e).splitlines()[0][:80]}): it needs about {need / 2**30:.2f} "
                            f"GiB and {os.path.dirname(path) or '.'} has {free / 2**30:.2f} GiB free; the previous "
                            f"checkpoint is intact: free space, then run the same command to resume") from None


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for v in obj for t in tensors_in(v)] if isinstance(obj, (list, tuple)) else []


def link_atomic(src, dst):
    """dst becomes another name of src's file (src is later replaced, never rewritten in place)."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path):
    """torch.load(weights_only=True) with a clear error for a missing, corrupt or foreign file."""
    if os.path.isdir(path) or not os.path.exists(path):
        raise UsageError(f"--resume {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}; "
                         f"pass a last.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): the file is damaged or not a "
                         f"train.py checkpoint; pass another --resume, or move it away to start afresh") from None
    needed = {"model", "model_args", "optimizer", "epoch", "step", "config", "classes"}
    missing = needed - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UsageError(f"{path} is not a train.py checkpoint of this version (no {', '.join(sorted(missing))}): "
                         f"pass another --resume or --output-dir")
    return ckpt


def check_finite(modules):
    """Refuse to save non-finite weights or buffers (a checkpoint must stay a good place to resume)."""
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingError(f"the {name}'s {key} is not finite: not saved; the last checkpoint is "
                                    f"intact: resume from it with a lower --lr")


def write_metrics(output_dir, metrics):
    """metrics.jsonl anew from the checkpoint's list: each epoch's line exactly once, whatever was killed."""
    write_text_atomic(os.path.join(output_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))


def write_text_atomic(path, text):
    """A temporary file, then a rename: a kill leaves the old file. A failed write (a full disk) is
    one line, exit 1, like a checkpoint's: the checkpoints were saved before, and the file is
    written anew from them when the run resumes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); the checkpoints are intact: free space, "
                            f"then run the same command to resume") from None
