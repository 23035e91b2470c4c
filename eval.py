"""Evaluate MambaVision: accuracy on a validation folder, or throughput, parameters and FLOPs.

    python eval.py runs/t/ckpt.pt                        # ours: EMA weights, data dir from its config
    python eval.py mambavision_tiny_1k.pth.tar --data-dir /data/imagenet      # an official release
    torchrun --nproc_per_node 8 eval.py ckpt.pt          # several GPUs; every image is counted once
    python eval.py --throughput --variant t --batch-size 128 --dtype fp16
    python eval.py --throughput --all                    # the table for t t2 s b l l2

Accuracy uses the official preprocessing of the checkpoint's variant (data.eval_transform: shorter
side to floor(size / crop_pct), bicubic, centre crop; 'squash' for the 512-pixel models), bf16
autocast on a GPU and float32 on the CPU, channels_last. It prints top-1, top-5 and the mean loss,
then the same as one JSON line. Throughput follows the paper: eval mode, no grad, channels_last,
warm-up, then many timed batches (CUDA events, read after a device sync); images/s is the batch
size over the median batch time.

Checkpoints are read with torch.load(weights_only=True), which refuses arbitrary pickled objects;
only argparse.Namespace (the training arguments the official .pth.tar files carry) is allowed besides
tensors and plain containers. Weights that do not fit the model are refused with the list of
missing, unexpected and mis-shaped keys: nothing is ever loaded partially.
"""
import argparse
import contextlib
import functools
import json
import os
import pickle
import statistics
import sys
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


class EvalError(Exception):
    """A problem with what the user gave us: printed as one message, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Reading checkpoints

def read_checkpoint(path):
    """torch.load with weights_only=True, turning every failure into one clear EvalError."""
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; its key line names the refused global
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise EvalError(f"{path} holds a pickled object that a safe load refuses ({detail or e}); "
                        "only tensors, plain containers and argparse.Namespace are accepted. "
                        "Re-save the weights alone, e.g. torch.save({'state_dict': model.state_dict()}, ...)"
                        ) from None
    except Exception as e:  # a truncated file, a file that is not a checkpoint at all, ...
        raise EvalError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise EvalError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


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
    return (img_size or cfg["resolution"], crop_pct or cfg["crop_pct"], cfg["crop_mode"])


def model_from_checkpoint(path, variant=None, use_ema=True):
    """Build the model a checkpoint describes and load its weights.

    Our training checkpoints carry 'model_args' (the constructor arguments) and 'model' / 'ema'
    state dicts; official releases carry weights alone, so the variant comes from --variant or
    from the weights' shapes. Returns (model, info): info holds the variant, which weights were
    used, the image size and dataset root recorded at training time, and a note where the variant
    was a choice between layouts that are the same.
    """
    ckpt = read_checkpoint(path)
    if "model_args" in ckpt and "model" in ckpt:  # ours (train.py)
        try:
            model = MambaVision(**ckpt["model_args"])
        except (TypeError, ValueError) as e:
            raise EvalError(f"{path}: its 'model_args' do not build a MambaVision ({e})") from None
        weights_name = "ema" if use_ema and ckpt.get("ema") is not None else "model"
        variant = variant or ckpt.get("variant")
        config = ckpt.get("config") or {}
        load_strict(model, strip_prefixes(ckpt[weights_name]), path, "the model its 'model_args' describe")
        return model, {"variant": variant, "weights": weights_name, "note": None,
                       "img_size": config.get("img_size"), "data_dir": config.get("data_dir")}

    weights = official_weights(ckpt, path)
    note = None
    if variant is None:
        variant, note = infer_variant(weights, path, hint=release_name(ckpt))
    try:
        model = build_model(variant, num_classes=head_classes(weights))
    except ValueError as e:
        raise EvalError(str(e)) from None
    load_strict(model, weights, path, f"variant {variant!r}")
    return model, {"variant": variant, "weights": "official", "note": note,
                   "img_size": None, "data_dir": None}


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


@torch.no_grad()
def evaluate(model, loader, device, dtype, progress=True):
    """Sums over this rank's images: tensor [loss, top-1 correct, top-5 correct, images] (float64)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)                                   # (B, num_classes)
        logits = logits.float()
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
    model, info = model_from_checkpoint(args.checkpoint, args.variant, use_ema=not args.no_ema)
    img_size, crop_pct, crop_mode = preprocessing(info["variant"], args.img_size or info["img_size"],
                                                  args.crop_pct)
    data_dir = args.data_dir or info["data_dir"]
    if not data_dir:
        raise EvalError(f"{args.checkpoint} records no dataset: pass --data-dir (the folder holding val/)")
    val_dir = os.path.join(data_dir, "val")
    if not os.path.isdir(val_dir):
        raise EvalError(f"no validation folder {val_dir!r}: --data-dir must be the dataset root holding val/")
    dataset = ImageFolder(val_dir, eval_transform(img_size, crop_pct, crop_mode))
    num_classes = model.head.out_features
    if len(dataset.classes) > num_classes:
        raise EvalError(f"{val_dir} has {len(dataset.classes)} classes but the model predicts {num_classes}")

    subset = torch.utils.data.Subset(dataset, shard(len(dataset), rank, world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    model = model.to(device, memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    dtype = DTYPES[args.dtype]
    if rank == 0 and info["note"]:
        print(f"note: {info['note']}")
    if rank == 0:
        print(f"evaluating {args.checkpoint} ({info['weights']} weights, variant {info['variant']}) on "
              f"{len(dataset)} images of {val_dir}: {img_size}px, crop_pct {crop_pct}, {crop_mode}, "
              f"{args.dtype}, {world_size} process(es)")
    start = time.perf_counter()
    sums = evaluate(model, loader, device, dtype, progress=rank == 0)
    # ImageFolder stands the next readable image in for an unreadable one: count those too
    unreadable = torch.tensor([float(dataset.num_bad)], dtype=torch.float64, device=device)
    sums = torch.cat([sums, unreadable])
    if world_size > 1:
        dist.all_reduce(sums)  # every rank's sums: exact totals, each image counted once
    result = {"checkpoint": args.checkpoint, "variant": info["variant"], "weights": info["weights"],
              **metrics(sums[:4]), "unreadable": int(sums[4]), "img_size": img_size,
              "crop_pct": crop_pct, "crop_mode": crop_mode, "dtype": args.dtype,
              "world_size": world_size, "seconds": round(time.perf_counter() - start, 2)}
    if rank == 0 and result["unreadable"]:
        print(f"warning: {result['unreadable']} unreadable image(s) in {val_dir} were replaced by their "
              "neighbours, so these numbers are not exact: fix or remove those files")
    if rank == 0:
        print(f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  loss {result['loss']:.4f}  "
              f"({result['images']} images)")
        print(json.dumps(result))
    return result


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

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?",
                   help="our training checkpoint (.pt) or an official release (.pth.tar)")
    p.add_argument("--data-dir", help="dataset root holding val/ (default: the one the checkpoint records)")
    p.add_argument("--variant", help=f"model variant, one of {' '.join(VARIANTS)} (default: from the "
                                     "checkpoint, or inferred from the weights' shapes)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights, not the EMA ones")
    p.add_argument("--img-size", type=int, help="evaluation image size (default: the variant's)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (per process)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per evaluating process")
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
    if args.throughput:
        if args.checkpoint or not (args.variant or args.all) or (args.variant and args.all):
            p.error("--throughput takes either --variant NAME or --all (and no checkpoint)")
        if args.variant and args.variant not in VARIANTS:
            p.error(f"unknown variant {args.variant!r}; choose from {' '.join(VARIANTS)}")
        if args.iters < 1 or args.warmup < 0:
            p.error("--iters must be at least 1 and --warmup at least 0")
    elif not args.checkpoint:
        p.error("give a checkpoint to evaluate, or --throughput --variant NAME")
    elif args.all:
        p.error("--all goes with --throughput")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.variant and args.variant not in VARIANTS:
        p.error(f"unknown variant {args.variant!r}; choose from {' '.join(VARIANTS)}")
    return args


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
