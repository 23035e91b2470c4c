"""The official training recipe and train.py's command line: each variant's settings, the flags,
how the flags left unset are filled (from the recipe, the demo preset, or the checkpoint being
resumed) and checked, and the learning-rate schedule.
"""
import argparse
import json
import math

from checkpoint import UsageError, plain
from model import _ARCH_KEYS, VARIANTS

# The official ImageNet-1K recipe per variant, as the official release's training configs give it.
#         drop_path_rate, weight_decay, warmup_epochs, mesa (weight), mesa_start (fraction of epochs)
RECIPES = {
    "t":  dict(drop_path_rate=0.2, weight_decay=0.05, warmup_epochs=20, mesa=0.5, mesa_start=0.25),
    "t2": dict(drop_path_rate=0.2, weight_decay=0.05, warmup_epochs=20, mesa=0.75, mesa_start=0.25),
    "s":  dict(drop_path_rate=0.2, weight_decay=0.05, warmup_epochs=20, mesa=1.0, mesa_start=0.25),
    "b":  dict(drop_path_rate=0.3, weight_decay=0.075, warmup_epochs=35, mesa=1.0, mesa_start=0.3),
    "l":  dict(drop_path_rate=0.3, weight_decay=0.12, warmup_epochs=20, mesa=6.0, mesa_start=0.25),
    "l2": dict(drop_path_rate=0.3, weight_decay=0.12, warmup_epochs=20, mesa=6.0, mesa_start=0.25),
}
# Shared by all variants: 310 cosine epochs + 10 cooldown epochs; batch 128 per GPU on 32 GPUs.
COMMON = dict(epochs=320, cooldown_epochs=10, batch_size=128, lr=5e-3, warmup_lr=1e-6, min_lr=5e-6,
              opt="lamb", betas=(0.9, 0.999), eps=1e-8, clip_grad=5.0, ema_decay=0.9998,
              smoothing=0.1, mixup=0.8, cutmix=1.0, randaugment=1, reprob=0.25, seed=31,
              img_size=224, window_size=None, workers=8, accum_steps=1, model_overrides={})
# With no --data-dir: the built-in demo set (10 texture classes of 72 px JPEGs), sized to run on a
# 2-core CPU in minutes. Small windows keep levels 2 and 3 unpadded at 64 px (64 / 16 = 4, 64 / 32
# = 2); window size owns no weights, so the network has exactly the variant's parameters. A lower
# lr suits batch 32 (the recipe's is for 4096), and a short EMA horizon suits ~300 steps. No loader
# workers: on 2 cores they would fight the math threads.
DEMO = dict(epochs=8, cooldown_epochs=1, warmup_epochs=1, batch_size=32, lr=2e-3, img_size=64,
            window_size=[8, 8, 4, 2], ema_decay=0.9, workers=0)
# Settings that a resumed run takes from its checkpoint. Given again with another value they are
# refused, except --epochs (a longer run continues its schedule) and the split of the global batch.
RUN_KEYS = tuple(k for k in COMMON | RECIPES["t"] if k != "workers") + ("variant",)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # None = "the variant's recipe" (or the demo's, without --data-dir; or the checkpoint's, when
    # resuming); see resolve_config().
    p.add_argument("--variant", help=f"official recipe and model: {', '.join(RECIPES)} (default t)")
    p.add_argument("--data-dir", default=None, help="folder with train/<class>/ and val/<class>/; "
                   "without it, a small demo set is written to data/demo and used")
    p.add_argument("--output-dir", default=None, help="checkpoints and logs (default runs/<variant>)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (default: "
                   "<output-dir>/last.pt if it exists)")
    p.add_argument("--epochs", type=int, help="total epochs, cooldown included (recipe: 320); more "
                   "epochs on a resumed run continue its learning rate from where it is")
    p.add_argument("--cooldown-epochs", type=int, help="final epochs at --min-lr (recipe: 10)")
    p.add_argument("--warmup-epochs", type=float, help="linear warmup from --warmup-lr (recipe: per variant)")
    p.add_argument("--batch-size", type=int, help="images per GPU/process and micro-step (recipe: 128)")
    p.add_argument("--accum-steps", type=int, help="micro-steps (forward + backward) per optimizer "
                   "step: the global batch is processes x --batch-size x --accum-steps (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (recipe: 5e-3 at global batch 4096)")
    p.add_argument("--warmup-lr", type=float, help="learning rate at step 0 (recipe: 1e-6)")
    p.add_argument("--min-lr", type=float, help="end of the cosine and cooldown rate (recipe: 5e-6)")
    p.add_argument("--opt", choices=("lamb", "adamw"), help="optimizer (recipe: lamb)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (recipe: per variant)")
    p.add_argument("--clip-grad", type=float, help="gradient norm clip, 0 = no clipping at all (recipe: 5.0). "
                   "The official LAMB also clips at 1.0 inside its step, so with lamb the clip is at "
                   "min(--clip-grad, 1.0)")
    p.add_argument("--drop-path-rate", type=float, help="stochastic depth (recipe: per variant)")
    p.add_argument("--ema-decay", type=float, help="model EMA decay per step, 0 = no EMA (recipe: 0.9998)")
    p.add_argument("--mesa", type=float, help="MESA weight, 0 = off (recipe: per variant)")
    p.add_argument("--mesa-start", type=float, help="MESA starts past this fraction of the epochs")
    p.add_argument("--smoothing", type=float, help="label smoothing (recipe: 0.1)")
    p.add_argument("--mixup", type=float, help="mixup alpha, 0 = off (recipe: 0.8)")
    p.add_argument("--cutmix", type=float, help="cutmix alpha, 0 = off (recipe: 1.0)")
    p.add_argument("--randaugment", type=int, choices=(0, 1), help="RandAugment rand-m9-mstd0.5-inc1 on/off")
    p.add_argument("--reprob", type=float, help="random erasing probability (recipe: 0.25)")
    p.add_argument("--img-size", type=int, help="training and evaluation image side (recipe: 224)")
    p.add_argument("--window-size", type=int, nargs=4, help="override the model's 4 window sizes")
    p.add_argument("--model-overrides", type=json.loads, default=None,
                   help='more build_model overrides as JSON, e.g. \'{"dim": 16, "depths": [1, 1, 2, 2]}\'')
    p.add_argument("--workers", type=int, help="loader worker processes per GPU/process")
    p.add_argument("--seed", type=int, help="base seed (recipe: 31)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast dtype (default bf16 on GPU, none on CPU); fp16 scales the loss")
    p.add_argument("--eager", action="store_true", help="turn the GPU's fast path off (torch.compile "
                   "and CUDA graphs of the whole step): plain PyTorch, for debugging")
    p.add_argument("--data-path", choices=("auto", "gpu", "cpu"), default="auto", help="where training images "
                   "are decoded and augmented: gpu (nvJPEG on the JPEG engines + gpu_augment; the loader workers only "
                   "read files), cpu (Pillow in the loader workers, the reference), auto (gpu where the GPU has JPEG "
                   "engines: A100, H100, H200; else cpu)")
    p.add_argument("--gpu-data", dest="data_path", action="store_const", const="gpu",
                   help=argparse.SUPPRESS)  # the earlier spelling of --data-path gpu
    p.add_argument("--compile", "--cuda-graph", dest="legacy_fast_flag", action="store_true",
                   help=argparse.SUPPRESS)  # the fast path is the default now; accepted and ignored
    p.add_argument("--save-minutes", type=float, default=30.0, help="also write last.pt every N minutes")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many non-finite steps in a row")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (short runs, tests)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels only")
    p.add_argument("--step-log", action="store_true", help="append every step's loss (mean over ranks), lr, "
                   "gradient norm and data wait to <output-dir>/steps.jsonl")
    p.add_argument("--benchmark", action="store_true",
                   help="time training steps on synthetic batches (no data loading) and exit (bench.py)")
    p.add_argument("--benchmark-steps", type=int, default=50, help="timed steps for --benchmark")
    return p


def resolve_config(args, world_size, saved=None):
    """Fill every unset flag: from the checkpoint's config when resuming (`saved`), else from the
    demo preset (without --data-dir), else from the variant's recipe. Then check the values."""
    check_signs(args)  # first: a resumed run's own checks would misread a negative size
    if saved is not None:
        check_resume_settings(args, saved, world_size)
        defaults = {k: saved[k] for k in RUN_KEYS} | dict(workers=saved["workers"],
                                                         extended_from=saved.get("extended_from"))
    else:
        args.variant = args.variant or "t"
        if args.variant not in RECIPES:
            hint = " (the 21K / 512 px models are fine-tuned, not trained from scratch here)" \
                if args.variant in VARIANTS else ""
            raise UsageError(f"unknown variant {args.variant!r}{hint}: choose one of {', '.join(RECIPES)}")
        defaults = COMMON | RECIPES[args.variant] | (DEMO if args.demo else {}) | dict(extended_from=None)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.window_size = list(args.window_size) if args.window_size else None
    args.betas = list(args.betas)
    args.world_size = world_size
    unknown = sorted(set(args.model_overrides) - set(_ARCH_KEYS) - {"mlp_ratio", "in_chans"})
    if unknown:
        raise UsageError(f"--model-overrides: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_ARCH_KEYS)}")
    if not 0 <= args.warmup_epochs < args.epochs - args.cooldown_epochs:
        raise UsageError(f"--warmup-epochs ({args.warmup_epochs}) must be shorter than the cosine "
                         f"span --epochs minus --cooldown-epochs ({args.epochs - args.cooldown_epochs})")
    if args.ema_decay >= 1 or args.reprob > 1 or args.smoothing >= 1:
        raise UsageError("--ema-decay and --smoothing must be below 1, --reprob at most 1")
    return args


def check_signs(args):
    """Refuse a flag given with an impossible value (sizes and counts <= 0, rates below 0). Unset
    flags are None and skipped: the recipe's and a checkpoint's values are valid."""
    for name in ("batch_size", "accum_steps", "epochs", "img_size", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for name in ("workers", "warmup_lr", "min_lr", "weight_decay", "clip_grad", "drop_path_rate", "ema_decay",
                 "mesa", "smoothing", "mixup", "cutmix", "reprob", "cooldown_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(args, name)}")
    if args.window_size and min(args.window_size) <= 0:
        raise UsageError(f"--window-size takes 4 positive sizes, not {' '.join(map(str, args.window_size))}")


def check_resume_settings(args, saved, world_size):
    """A resumed run keeps its settings: refuse flags that contradict the checkpoint's, except a
    longer --epochs and another split of the same global batch."""
    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}
    if "window_size" in given:
        given["window_size"] = list(given["window_size"])
    batch_split = {k: given.pop(k, saved[k]) for k in ("batch_size", "accum_steps")}
    if world_size * batch_split["batch_size"] * batch_split["accum_steps"] != global_batch(saved):
        raise UsageError(f"the checkpoint's run has global batch {global_batch(saved)} (now "
                         f"{world_size * batch_split['batch_size'] * batch_split['accum_steps']} = processes x "
                         f"--batch-size x --accum-steps): keep it, or use a new --output-dir")
    if given.get("epochs", saved["epochs"]) < saved["epochs"]:
        raise UsageError(f"--epochs {given['epochs']} is shorter than the checkpoint's run ({saved['epochs']} "
                         f"epochs): a run can be extended, not shortened; use a new --output-dir")
    given.pop("epochs", None)
    differ = [f"--{k.replace('_', '-')} {v} (the run has {saved[k]})" for k, v in given.items()
              if plain(v) != plain(saved[k])]
    if differ:
        raise UsageError(f"resuming keeps the run's settings, but {'; '.join(differ)}: drop these flags, "
                         f"or start a new run with another --output-dir")


def extend_schedule(args, saved, progress, log):
    """A longer --epochs on resume: the learning rate goes on from its current value, with a cosine
    to --min-lr at the new end of the cosine span (then the cooldown): no jump."""
    if args.epochs == saved["epochs"]:
        return
    if progress >= args.warmup_epochs:
        args.extended_from = [progress, lr_at(progress, argparse.Namespace(**saved))]
    log(f"notice: --epochs {saved['epochs']} -> {args.epochs}: the learning rate continues from "
        f"{lr_at(progress, argparse.Namespace(**saved)):.3g} at epoch {progress:.2f} and follows a cosine to "
        f"{args.min_lr:g} at epoch {args.epochs - args.cooldown_epochs}, then {args.cooldown_epochs} cooldown epochs")


def lr_at(progress, s):
    """The learning rate after `progress` epochs (a float: epoch + steps done / steps per epoch),
    a timm-style cosine counted from epoch 0, warmup included: linear warmup_lr -> lr over the
    warmup, then a cosine from lr (at 0) to min_lr at the end of the cosine span (epochs - cooldown),
    of which the warmup is the first part; then min_lr. A run extended after its warmup
    (s.extended_from = [progress, lr]) follows a cosine from that point instead."""
    cosine_end = s.epochs - s.cooldown_epochs
    if progress < s.warmup_epochs:
        return s.warmup_lr + (s.lr - s.warmup_lr) * progress / s.warmup_epochs
    if progress >= cosine_end:
        return s.min_lr
    start, peak = getattr(s, "extended_from", None) or (0.0, s.lr)
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1 + math.cos(math.pi * (progress - start) / (cosine_end - start)))


def global_batch(config):
    """Images per optimizer step, over all ranks and micro-steps."""
    return config["world_size"] * config["batch_size"] * config["accum_steps"]


def model_overrides(args):
    """build_model overrides from --model-overrides and --window-size (lists become tuples)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.model_overrides.items()}
    if args.window_size:
        overrides["window_size"] = tuple(args.window_size)
    return overrides
