"""Evaluate MambaVision: accuracy on a validation folder, or throughput, parameters and FLOPs.

    python eval.py runs/t/best.pt                        # ours: data dir from its config
    python eval.py mambavision_tiny_1k.pth.tar --data-dir /data/imagenet      # an official release
    python eval.py best.pt --data-dir /data/imagenet-r   # a val/ with some of the classes
    torchrun --nproc_per_node 8 eval.py ckpt.pt          # several GPUs; every image is counted once
    python eval.py --throughput --variant t --batch-size 128 --dtype fp16
    python eval.py --throughput --all                    # the table for t t2 s b l l2

Accuracy uses the official preprocessing of the checkpoint's variant (data.eval_transform: shorter
side to floor(size / crop_pct), bicubic, centre crop; 'squash' for the 512-pixel models), bf16
autocast on a GPU and float32 on the CPU, channels_last. It prints top-1, top-5 and the mean loss,
then the same as one JSON line. Throughput follows the paper: eval mode, no grad, channels_last,
warm-up, then many timed batches (CUDA events, read after a device sync); images/s is the batch
size over the median batch time.

Classes: val/'s folders are matched to the model's classes by name: the names our checkpoints
record ('classes'), or for a 1000-class official release the ImageNet-1K order (the sorted WordNet
ids in imagenet_classes.txt). A val/ with only some of the model's classes is scored among those
classes alone (arg-max, top-5 and loss over their logits), and the output says so; folders the
model does not know are refused. A checkpoint that names no classes pairs val/'s sorted folders
with its outputs by number, and only when the counts agree.

Weights: of our checkpoint's raw and EMA weights, by default those that scored the higher top-1 at
the last epoch-end evaluation before the save (the EMA on a tie or when none is recorded), so
best.pt gives the best top-1 logged; --ema or --no-ema chooses. Weights with NaN or inf are refused.

Checkpoints are read with torch.load(weights_only=True), which refuses arbitrary pickled objects;
only argparse.Namespace (the training arguments the official .pth.tar files carry) is allowed besides
tensors and plain containers. Weights that do not fit the model are refused with the list of
missing, unexpected and mis-shaped keys: nothing is ever loaded partially. Every other problem with
what was given is one line on stderr, starting 'error:', and exit code 2.
"""
import argparse
import contextlib
import functools
import json
import os
import pickle
import re
import statistics
import sys
import textwrap
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import scan
from data import DataError, ImageFolder, eval_transform
from model import VARIANTS, MambaVision, build_model, count_flops

IMAGENET_1K_VARIANTS = ("t", "t2", "s", "b", "l", "l2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile
MAX_KEYS_SHOWN = 10
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTO = b"\x80"     # the first byte of a pickle of protocol 2 or later: the legacy format


class EvalError(Exception):
    """A problem with what the user gave us: printed as one message, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Reading checkpoints

def read_checkpoint(path):
    """torch.load with weights_only=True, turning every failure into one clear EvalError."""
    if os.path.isdir(path):
        raise EvalError(f"{path} is a directory, not a checkpoint file: give the .pt or .pth.tar file in it")
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        raise EvalError(f"{path} is empty (0 bytes): the save did not finish; use another checkpoint")
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        raise EvalError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle): "
                        "give the file that torch.save wrote")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not refused:
            raise unreadable(path, e) from None
        raise EvalError(f"{path} holds a pickled object that a safe load refuses ({refused.group(1)}); "
                        "only tensors, plain containers and argparse.Namespace are accepted. "
                        "Re-save the weights alone, e.g. torch.save({'state_dict': model.state_dict()}, ...)"
                        ) from None
    except Exception as e:  # a truncated zip, a zip of something else, a pickle cut short, ...
        raise unreadable(path, e) from None
    if not isinstance(ckpt, dict):
        raise EvalError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def unreadable(path, error):
    """EvalError for a file that looks like a checkpoint but does not load; torch's own message is
    long, so only its key line is kept, shortened at a word boundary."""
    text = str(error).strip()
    key = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the line that says what the unpickler met
    detail = key.group(1) if key else (text.splitlines() or [""])[0]
    detail = textwrap.shorten(f"{type(error).__name__}: {detail}" if detail.strip() else type(error).__name__,
                              width=150, placeholder=" ...")
    return EvalError(f"cannot read {path} ({detail}): it is truncated, damaged or not a torch.save file; "
                     "copy it again or use another checkpoint")


def strip_prefixes(state_dict):
    """Drop the 'module.' / '_orig_mod.' prefixes that wrapped models put on every key."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def official_weights(ckpt, path):
    """The state dict of an official release: under 'state_dict', else 'model', else the dict itself."""
    for name in ("state_dict", "model"):
        if isinstance(ckpt.get(name), dict):
            return strip_prefixes(ckpt[name])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise EvalError(f"{path} has no weights: expected a 'state_dict' or 'model' entry, "
                    f"found keys {sorted(ckpt)[:MAX_KEYS_SHOWN]}")


# ----------------------------------------------------------------------------------------------
# Matching weights to a model, all or nothing

def key_diff(weights, shapes):
    """Compare a state dict with the {key: shape} a model expects.

    Returns (missing, unexpected, mismatched): keys the weights lack, keys the model lacks, and
    (key, weights' shape, model's shape) for keys present in both with different shapes.
    """
    missing = [k for k in shapes if k not in weights]
    unexpected = [k for k in weights if k not in shapes]
    mismatched = [(k, tuple(weights[k].shape), shapes[k]) for k in shapes
                  if k in weights and tuple(weights[k].shape) != shapes[k]]
    return missing, unexpected, mismatched


def mismatch_message(path, target, missing, unexpected, mismatched):
    """A readable refusal: one summary line, then the keys of each kind (the first few)."""
    def listed(title, items):
        shown = [f"    {item}" for item in items[:MAX_KEYS_SHOWN]]
        if len(items) > MAX_KEYS_SHOWN:
            shown.append(f"    ... and {len(items) - MAX_KEYS_SHOWN} more")
        return [f"  {title} ({len(items)}):"] + shown if items else []

    shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
    lines = [f"{path} does not fit {target}: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} mis-shaped keys; nothing was loaded"]
    lines += listed("missing keys", missing)
    lines += listed("unexpected keys", unexpected)
    lines += listed("keys with other shapes", shapes)
    return "\n".join(lines)


def load_strict(model, weights, path, target):
    """Load every tensor or none: refuse with the full key report if anything does not fit."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = key_diff(weights, shapes)
    if missing or unexpected or mismatched:
        raise EvalError(mismatch_message(path, target, missing, unexpected, mismatched))
    model.load_state_dict(weights, strict=True)


@functools.lru_cache(maxsize=None)
def variant_shapes(variant, num_classes):
    """{key: shape} of a variant's state dict, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(variant, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def release_name(ckpt):
    """The alias an official file names itself by ('arch' or the training args' 'model'), if any."""
    name = ckpt.get("arch") or getattr(ckpt.get("args"), "model", None)
    if isinstance(name, str) and name.lower().startswith("mamba_vision_"):
        return name.lower()[len("mamba_vision_"):]
    return None


def head_classes(weights):
    """Number of classes the weights' classifier predicts (1000 if they have none)."""
    return weights["head.weight"].shape[0] if "head.weight" in weights else 1000


def infer_variant(weights, path, hint=None):
    """The variant whose state-dict layout the weights match exactly; returns (variant, note).

    Several variants share every shape (B and B-21K, L and L-21K, L2 and L2-512-21K, the two L3):
    then the one the file names itself by (`hint`) wins, else the first in VARIANTS (the
    ImageNet-1K or lower-resolution one), and the note says so. No match: the refusal lists the
    keys that differ from the closest variant.
    """
    num_classes = head_classes(weights)
    diffs = {v: key_diff(weights, variant_shapes(v, num_classes)) for v in VARIANTS}
    fits = [v for v, d in diffs.items() if not any(d)]
    if not fits:
        closest = min(diffs, key=lambda v: sum(len(part) for part in diffs[v]))
        raise EvalError(mismatch_message(path, f"any variant (closest: {closest!r})", *diffs[closest]))
    if len(fits) == 1:
        return fits[0], None
    chosen = hint if hint in fits else fits[0]
    how = "named in the file" if hint in fits else "the first"
    return chosen, (f"the weights fit {', '.join(fits)} (same shapes); using {chosen!r} ({how}); "
                    "pass --variant to choose another")


def preprocessing(variant, img_size=None, crop_pct=None):
    """(img_size, crop_pct, crop_mode) of a variant, with optional overrides; None: plain 224/1.0."""
    cfg = VARIANTS[variant] if variant else {"resolution": 224, "crop_pct": 1.0, "crop_mode": "center"}
    return (cfg["resolution"] if img_size is None else img_size,
            cfg["crop_pct"] if crop_pct is None else crop_pct, cfg["crop_mode"])


def check_variant(ckpt, variant, path):
    """Refuse a --variant that contradicts the variant our checkpoint records (train.py writes it
    next to 'model_args', which build the model whatever --variant says)."""
    if variant is not None and variant != ckpt.get("variant"):
        raise EvalError(f"{path} is a checkpoint of variant {ckpt.get('variant')!r} but --variant {variant} "
                        "was given: leave --variant out (the checkpoint describes itself)")


def choose_weights(ckpt, path, wanted=None):
    """Which of our checkpoint's two state dicts to evaluate: (name, why).

    `wanted` is 'ema' or 'model' to force one. By default the one that scored the higher top-1 in
    the epoch-end evaluation last done before the save (ckpt['val_top1']); ties, or no score
    recorded: the EMA, where there is one.
    """
    has_ema = ckpt.get("ema") is not None
    if wanted == "ema" and not has_ema:
        raise EvalError(f"{path} has no EMA weights (trained without an EMA): leave out --ema")
    if wanted:
        return wanted, f"--{'ema' if wanted == 'ema' else 'no-ema'}"
    if not has_ema:
        return "model", "the checkpoint has no EMA weights"
    scores = ckpt.get("val_top1") or {}
    raw, ema = scores.get("model"), scores.get("ema")
    if raw is None or ema is None:
        return "ema", "no top-1 of both recorded before this save, so the EMA; --no-ema for the raw ones"
    when = "at the last evaluation before this save"
    if raw > ema:
        return "model", f"top-1 {raw:.3f}% raw vs {ema:.3f}% EMA {when}; --ema for the EMA"
    tie = " (a tie goes to the EMA)" if raw == ema else ""
    return "ema", f"top-1 {ema:.3f}% EMA vs {raw:.3f}% raw {when}{tie}; --no-ema for the raw"


def check_finite(weights, path, which):
    """Refuse weights with NaN or inf anywhere (parameters or buffers): they give no real accuracy."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise EvalError(f"{path}: the {which} weights hold NaN or inf, first in {bad[0]} ({len(bad)} "
                        "tensor(s) in all): training diverged before this save; evaluate an earlier "
                        "checkpoint or the other weights (--ema / --no-ema)")


def checkpoint_classes(names, num_classes, path):
    """The class names our checkpoint records, checked against its classifier's size."""
    if names is not None and len(names) != num_classes:
        raise EvalError(f"{path} names {len(names)} classes but its classifier predicts {num_classes}: "
                        "the checkpoint is inconsistent; save it again")
    return names


@functools.lru_cache(maxsize=None)
def imagenet_classes():
    """The ImageNet-1K class order of the official releases: the 1000 sorted WordNet ids."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")) as f:
        return f.read().split()


def model_from_checkpoint(path, variant=None, weights_wanted=None):
    """Build the model a checkpoint describes and load its weights.

    Our training checkpoints carry 'variant', 'model_args' (the constructor arguments), 'model' /
    'ema' state dicts and 'classes' (the class folder names in label order; absent in older ones);
    official releases carry weights alone, so the variant comes from --variant or from the
    weights' shapes, and a 1000-class head predicts the ImageNet-1K classes. Returns (model,
    info): info holds the variant, which weights were used and why, the class names (None where
    unknown), the image size and dataset root recorded at training time, and a note where the
    variant was a choice between layouts that are the same.
    """
    ckpt = read_checkpoint(path)
    if "model_args" in ckpt and "model" in ckpt:  # ours (train.py)
        return our_model(ckpt, path, variant, weights_wanted)
    if weights_wanted:
        raise EvalError(f"{path} is an official release with one set of weights: leave out --ema / --no-ema")
    weights = official_weights(ckpt, path)
    note = None
    if variant is None:
        variant, note = infer_variant(weights, path, hint=release_name(ckpt))
    try:
        model = build_model(variant, num_classes=head_classes(weights))
    except ValueError as e:
        raise EvalError(str(e)) from None
    load_strict(model, weights, path, f"variant {variant!r}")
    check_finite(weights, path, "official")
    classes = imagenet_classes() if head_classes(weights) == len(imagenet_classes()) else None
    return model, {"variant": variant, "weights": "official", "why": "the release's weights", "note": note,
                   "classes": classes, "img_size": None, "data_dir": None}


def our_model(ckpt, path, variant, weights_wanted):
    """model_from_checkpoint for a checkpoint train.py wrote."""
    try:
        model = MambaVision(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise EvalError(f"{path}: its 'model_args' do not build a MambaVision ({e})") from None
    check_variant(ckpt, variant, path)
    name, why = choose_weights(ckpt, path, weights_wanted)
    weights = strip_prefixes(ckpt[name])
    load_strict(model, weights, path, "the model its 'model_args' describe")
    check_finite(weights, path, "EMA" if name == "ema" else "raw")
    config = ckpt.get("config") or {}
    return model, {"variant": variant or ckpt.get("variant"), "weights": name, "why": why, "note": None,
                   "classes": checkpoint_classes(ckpt.get("classes"), model.head.out_features, path),
                   "img_size": config.get("img_size"), "data_dir": config.get("data_dir")}


# ----------------------------------------------------------------------------------------------
# Accuracy

def shard(n, rank, world_size):
    """This rank's sample indices: rank, rank + world, ... No padding, so no image counts twice."""
    return list(range(rank, n, world_size))


def autocast(device, dtype):
    """Mixed precision for bf16 / fp16; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def shown(names, limit=5):
    """The first few names, and how many more."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def class_columns(val_classes, model_classes, num_classes, val_dir):
    """The model's output index of each class folder of val/ (sorted, as ImageFolder labels them),
    and a note where the pairing is by number. Folders are matched to the model's classes by name;
    where the checkpoint does not name its classes, val/'s folders are numbered, which is right
    only if they are the model's classes in its order, so at least their count must agree."""
    if model_classes is None:
        if len(val_classes) != num_classes:
            raise EvalError(f"{val_dir} has {len(val_classes)} class folders but the model predicts "
                            f"{num_classes} classes and its checkpoint does not name them, so they "
                            "cannot be paired: evaluate on a val/ holding exactly the model's classes")
        return list(range(num_classes)), (f"the checkpoint does not name its classes: val/'s "
                                          f"{num_classes} sorted folders are taken as classes 0..{num_classes - 1}")
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in val_classes if name not in index]
    if unknown:
        raise EvalError(f"{val_dir} has {len(unknown)} class folder(s) the model does not know "
                        f"({shown(unknown)}); its classes are {shown(model_classes)}: give a val/ "
                        "whose folders are among them")
    return [index[name] for name in val_classes], None


def validation_folder(path, data_dir, recorded):
    """<dataset root>/val: --data-dir, else the root the checkpoint records. Older checkpoints
    record it as given to train.py, perhaps relative: that is taken from the current directory."""
    if data_dir is None:
        if not recorded:
            raise EvalError(f"{path} records no dataset: pass --data-dir (the folder holding val/)")
        data_dir = os.path.abspath(recorded)
        if not os.path.isdir(data_dir):
            relative = "" if data_dir == recorded else f", {data_dir} from here"
            raise EvalError(f"the dataset {path} records ({recorded!r}{relative}) does not exist: "
                            "pass --data-dir (the folder holding val/) to override it")
    val_dir = os.path.join(data_dir, "val")
    if not os.path.isdir(val_dir):
        raise EvalError(f"no validation folder {val_dir!r}: --data-dir must be the dataset root holding val/")
    return val_dir


@torch.no_grad()
def evaluate(model, loader, columns, device, dtype, progress=True):
    """Sums over this rank's images: tensor [loss, top-1 correct, top-5 correct, images] (float64).

    Only the logits of the classes in `columns` (the model's index of each label) are scored:
    arg-max, top-5 and the loss are taken among them.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    columns = torch.tensor(columns, device=device)
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)                                   # (B, num_classes)
        logits = logits.float()[:, columns]                          # (B, classes scored)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices                          # (B, k)
        hits = top == labels[:, None]                                # (B, k)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                             hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)]).double()
    return sums


def metrics(sums):
    """Percentages and mean loss from summed counts."""
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise EvalError("the validation set is empty")
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(n)}


def run_accuracy(args, device, rank, world_size):
    model, info = model_from_checkpoint(args.checkpoint, args.variant, args.weights)
    img_size, crop_pct, crop_mode = preprocessing(
        info["variant"], info["img_size"] if args.img_size is None else args.img_size, args.crop_pct)
    val_dir = validation_folder(args.checkpoint, args.data_dir, info["data_dir"])
    dataset = ImageFolder(val_dir, eval_transform(img_size, crop_pct, crop_mode))
    num_classes = model.head.out_features
    columns, class_note = class_columns(dataset.classes, info["classes"], num_classes, val_dir)

    subset = torch.utils.data.Subset(dataset, shard(len(dataset), rank, world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    model = model.to(device, memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    if rank == 0:
        for note in (info["note"], class_note):
            if note:
                print(f"note: {note}")
        print(f"evaluating {args.checkpoint} (variant {info['variant']}) on {len(dataset)} images of "
              f"{val_dir}: {img_size}px, crop_pct {crop_pct}, {crop_mode}, {args.dtype}, "
              f"{world_size} process(es)")
        print(f"weights: {info['weights']} ({info['why']})")
        if len(columns) < num_classes:
            print(f"scored over the {len(columns)} classes present of the model's {num_classes}: "
                  "arg-max, top-5 and loss among those classes only")
    start = time.perf_counter()
    sums = evaluate(model, loader, columns, device, DTYPES[args.dtype], progress=rank == 0)
    # ImageFolder stands the next readable image in for an unreadable one: count those too
    unreadable = torch.tensor([float(dataset.num_bad)], dtype=torch.float64, device=device)
    sums = torch.cat([sums, unreadable])
    if world_size > 1:
        dist.all_reduce(sums)  # every rank's sums: exact totals, each image counted once
    result = {"checkpoint": args.checkpoint, "variant": info["variant"], "weights": info["weights"],
              **metrics(sums[:4]), "unreadable": int(sums[4]), "classes_scored": len(columns),
              "model_classes": num_classes, "classes_by": "number" if class_note else "name",
              "img_size": img_size, "crop_pct": crop_pct, "crop_mode": crop_mode, "dtype": args.dtype,
              "world_size": world_size, "seconds": round(time.perf_counter() - start, 2)}
    if rank == 0:
        report(result, val_dir)
    return result


def report(result, val_dir):
    """The result as a line for people, then as one JSON line."""
    if result["unreadable"]:
        print(f"warning: {result['unreadable']} unreadable image(s) in {val_dir} were replaced by their "
              "neighbours, so these numbers are not exact: fix or remove those files")
    print(f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  loss {result['loss']:.4f}  "
          f"({result['images']} images, {result['classes_scored']} of {result['model_classes']} classes)")
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Throughput, parameters and FLOPs

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(model, batch_size, img_size, device, dtype, warmup, iters):
    """Images/s as the paper measures it: eval, no grad, channels_last, warm-up, synced timing.

    Each of `iters` batches is timed on its own (CUDA events on a GPU, read after one final
    device sync, so the host still queues work ahead as in a plain loop; the wall clock on the
    CPU) and the median batch time is used, so one slow batch does not move the result.
    Returns (images per second, peak device memory in GiB or None on the CPU).
    """
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)                # (B, 3, H, W)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with autocast(device, dtype):
        for _ in range(warmup):
            model(x)
        sync(device)
        if device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                model(x)
                end.record()
            sync(device)
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return batch_size / statistics.median(times), peak


def throughput_row(variant, args, device):
    try:
        model = build_model(variant)
    except ValueError as e:
        raise EvalError(str(e)) from None
    img_size = args.img_size or VARIANTS[variant]["resolution"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    flops = count_flops(model, img_size)
    model = model.to(device, memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    images_per_s, peak = measure_throughput(model, args.batch_size, img_size, device,
                                            DTYPES[args.dtype], args.warmup, args.iters)
    return {"variant": variant, "params_m": round(params, 2), "gflops": round(flops["published"], 2),
            "gflops_full": round(flops["full"], 2), "images_per_s": round(images_per_s, 1),
            "peak_mem_gib": None if peak is None else round(peak, 2), "img_size": img_size,
            "batch_size": args.batch_size, "dtype": args.dtype, "compile": args.compile,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "scan": scan.scan_path(device)}


def run_throughput(args, device):
    variants = IMAGENET_1K_VARIANTS if args.all else (args.variant,)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"throughput on {name}: batch {args.batch_size}, {args.dtype}, warm-up {args.warmup}, "
          f"{args.iters} timed batches (median), compile {args.compile}")
    print("| model | params (M) | GFLOPs | images/s | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    rows = []
    for variant in variants:
        row = throughput_row(variant, args, device)
        peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"
        print(f"| MambaVision-{variant.upper()} | {row['params_m']:.2f} | {row['gflops']:.2f} | "
              f"{row['images_per_s']:.0f} | {peak} |", flush=True)
        rows.append(row)
    print(f"selective scan: {rows[-1]['scan']}")
    for row in rows:
        print(json.dumps(row))
    return rows


# ----------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (python eval.py --help lists the options)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?",
                   help="our training checkpoint (.pt) or an official release (.pth.tar)")
    p.add_argument("--data-dir", help="dataset root holding val/ (default: the one the checkpoint records)")
    p.add_argument("--variant", help=f"model variant, one of {' '.join(VARIANTS)} (default: from the "
                                     "checkpoint, or inferred from the weights' shapes)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ema", dest="weights", action="store_const", const="ema",
                       help="evaluate the EMA weights (default: those with the higher top-1 recorded "
                            "before the save; the EMA if none is)")
    which.add_argument("--no-ema", dest="weights", action="store_const", const="model",
                       help="evaluate the raw weights, not the EMA ones")
    p.add_argument("--img-size", type=int, help="evaluation image size (default: the variant's)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction in (0, 1] (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (per process)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per evaluating process (0: load in this one)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--throughput", action="store_true",
                   help="measure params, GFLOPs, images/s and peak memory of --variant (or --all)")
    p.add_argument("--all", action="store_true", help=f"with --throughput: every ImageNet-1K variant "
                                                      f"({' '.join(IMAGENET_1K_VARIANTS)})")
    p.add_argument("--warmup", type=int, default=10, help="throughput: untimed batches first")
    p.add_argument("--iters", type=int, default=50, help="throughput: timed batches (median reported)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Refuse combinations and values that cannot give a right answer (p.error exits)."""
    if args.throughput:
        if args.checkpoint or not (args.variant or args.all) or (args.variant and args.all):
            p.error("--throughput takes either --variant NAME or --all (and no checkpoint)")
        if args.iters < 1 or args.warmup < 0:
            p.error("--iters must be at least 1 and --warmup at least 0")
    elif not args.checkpoint:
        p.error("give a checkpoint to evaluate, or --throughput --variant NAME")
    elif args.all:
        p.error("--all goes with --throughput")
    if args.variant and args.variant not in VARIANTS:
        p.error(f"unknown variant {args.variant!r}; choose from {' '.join(VARIANTS)}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be 0 (load in this process) or more, not {args.workers}")
    if args.img_size is not None and args.img_size < 1:
        p.error(f"--img-size must be a positive number of pixels, not {args.img_size}; leave it out "
                "for the variant's own")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        p.error(f"--crop-pct must be in (0, 1], not {args.crop_pct}; leave it out for the variant's own")


def setup(args):
    """(device, rank, world_size); under torchrun, joins the process group (NCCL on GPUs, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError("--device cuda but no GPU is visible; use --device cpu")
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size > 1:
        if args.throughput:
            raise EvalError("--throughput measures one device: run it with python, not torchrun")
        from torch import _dynamo  # noqa: F401  (before the group, as train.setup_distributed says why)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, rank, world_size


def main(argv=None):
    args = parse_args(argv)
    try:
        device, rank, world_size = setup(args)
        try:
            if args.throughput:
                run_throughput(args, device)
            else:
                run_accuracy(args, device, rank, world_size)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (EvalError, DataError) as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return 2
    return 0


def message(error):
    """The text of an EvalError or DataError. A DataError raised in a DataLoader worker arrives
    with the worker's traceback in its message: only the last line, the error itself, is kept."""
    text = str(error)
    if isinstance(error, DataError) and "Traceback" in text:
        text = text.strip().splitlines()[-1].split("DataError: ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
