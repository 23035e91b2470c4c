"""Train MambaVision on ImageNet-style folders with the official recipe, on one GPU or many.

    torchrun --nproc_per_node=8 train.py --variant t --data-dir /data/imagenet   # the real run
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
                                                    # the official 32 GPUs: the same line on every node
    torchrun --nproc_per_node=1 train.py --variant t                             # built-in demo, CPU ok
    python train.py --variant t --benchmark                                      # time training steps

The file starts with the run: main, then the loop (train) top to bottom: set-up and resume, then
for each epoch its steps (train_one_epoch: learning rate, batch, step, log, save when due), then
evaluate and save (end_epoch); processes and data follow. recipe.py holds the settings (each
variant's recipe, the flags, the learning-rate schedule), checkpoint.py the run's folder
(checkpoints, the lock, the small files). One step (step.py) is forward, loss,
backward, clip, LAMB and EMA; on a CUDA GPU it is compiled and replayed as CUDA graphs (--eager
turns that off), and the training images are decoded and augmented on the GPU where it has JPEG
engines (--data-path). Several processes (torchrun) average gradients and BatchNorm statistics
after each backward (NCCL on GPUs, gloo on CPU); rank 0 prints and saves.
Re-running the same command resumes from <output-dir>/last.pt, mid-epoch included, also on another
number of GPUs as long as the global batch (GPUs x --batch-size x --accum-steps) is the same.
SIGTERM or Ctrl-C saves last.pt first (at the current step; under torchrun within 10 steps). Every
random choice is a function of (seed, rank, step) or (seed, epoch, position), so a resumed run
follows exactly the path of an uninterrupted one (bit-identical on CPU with deterministic kernels).
"""
import argparse
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist

import data
import synthetic
from checkpoint import (TrainingError, UsageError, check_finite, link_atomic, load_checkpoint, lock_output_dir, plain,
                        rng_state, save_atomic, set_rng_state, write_metrics, write_text_atomic)
from eval import evaluate as evaluation_sums
from model import VARIANTS, MambaVision, build_model
from recipe import DEMO, extend_schedule, get_parser, global_batch, lr_at, model_overrides, resolve_config
from step import CAPTURE_LOCK, Lamb, ModelEma, TrainStep, param_groups

DEMO_DIR = os.path.join("data", "demo")
# An epoch's running sums: finite steps' losses, steps, images, seconds and seconds waiting for data
EPOCH_SUMS = dict(loss=0.0, finite=0, steps=0, images=0, seconds=0.0, data_wait=0.0)
# A step's loss, gradient norm and finite flag stay on the GPU; reading them waits for it, so they are
# read every READ_EVERY steps (and at an epoch's end): the host queues steps ahead of the GPU meanwhile.
# Timed saves and, on several processes, signals are checked then too.
READ_EVERY = 10


# ----------------------------------------------------------------------------------------------
# The run

def main(argv=None):
    # 32 hardware work queues on the GPU instead of CUDA's 8, set before CUDA starts: with 8, the GPU
    # data path's streams share queues with the training's, and nvJPEG's decode waits behind the
    # queued steps (T's real run: 89% of its --benchmark rate against 70%, BENCHMARKS.md 2026-12-06)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    args = get_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    lock = None
    try:
        if args.benchmark:
            import bench
            return bench.train_steps(args, world)
        checkpoint, lock = prepare(args, rank, world)  # before the process group: errors stay one line
        rank, world, device = setup_distributed()
        stop = StopSignal()
        try:
            train(args, checkpoint, rank, world, device, stop)
        finally:
            stop.restore()
    except (UsageError, data.DataError, TrainingError) as e:
        # an error raised in a loader worker arrives with the worker's traceback: keep its last line
        message = str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")
        if rank == 0 or not isinstance(e, UsageError):  # a usage error is the same on every rank
            print(f"error: {message}" if world == 1 else f"error (rank {rank}): {message}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:  # now: an exception's traceback would keep the file, and the lock, alive
            lock.close()      # after main returns (train.main called in-process, as the tests do)


def prepare(args, rank, world):
    """Settings, folders and the checkpoint to resume, all checked before any process group starts."""
    args.demo = args.data_dir is None
    variant = args.variant or "t"
    args.output_dir = os.path.abspath(args.output_dir or os.path.join("runs", variant + ("_demo" if args.demo else "")))
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir} is a file: pass a folder")
    lock = lock_output_dir(args.output_dir) if rank == 0 else None
    try:
        return prepare_locked(args, world), lock
    except BaseException:
        if lock is not None:  # a refused run frees the folder at once (see main)
            lock.close()
        raise


def prepare_locked(args, world):
    """prepare() with the output folder held: the checkpoint to resume, the settings, the data folder."""
    last = os.path.join(args.output_dir, "last.pt")
    resume = args.resume or (last if os.path.isfile(last) else None)
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        checkpoint["path"] = resume
    resolve_config(args, world, checkpoint["config"] if checkpoint else None)
    if args.data_path == "gpu" and not torch.cuda.is_available():
        raise UsageError("--data-path gpu needs a CUDA GPU: use --data-path cpu (Pillow in the loader workers)")
    args.data_dir = os.path.abspath(args.data_dir or DEMO_DIR)
    if args.demo and checkpoint is None:
        try:
            synthetic.make_demo_dataset(args.data_dir)  # once; concurrent writers on one machine are safe
        except OSError as e:
            raise UsageError(f"cannot write the demo set to {args.data_dir} ({e.strerror or e}): run from a "
                             f"writable folder, or pass --data-dir") from None
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"data folder {args.data_dir} does not exist: pass --data-dir holding train/ and val/")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, split)):
            raise UsageError(f"no {split}/ folder in {args.data_dir}: expected {args.data_dir}/train/<class>/ "
                             f"and {args.data_dir}/val/<class>/ (pass the right --data-dir)")
    return checkpoint


class Run(NamedTuple):
    """What one training run is made of, built once by set_up; the loop's counters live apart, in `state`."""
    args: argparse.Namespace
    config: dict                # the resolved settings, as config.json and every checkpoint hold them
    rank: int
    world: int
    device: torch.device
    log: Callable               # print on rank 0, nothing elsewhere
    train_set: data.ImageFolder
    val_set: data.ImageFolder
    sampler: data.EpochSampler
    train_loader: Iterable      # ((uint8 pictures, erase boxes), labels) batches
    val_loader: Iterable
    model: MambaVision
    ema: ModelEma | None
    optimizer: Lamb
    step: TrainStep


def train(args, checkpoint, rank, world, device, stop):
    """The loop: set-up and resume, then for each epoch its steps (train_one_epoch: learning rate,
    batch, step, log, save when due), then evaluate the model and its EMA, save, one line of metrics
    (end_epoch)."""
    run, state = set_up(args, checkpoint, rank, world, device)
    last_save = time.time()  # `stop` has caught signals since before the set-up: one arriving then is kept
    for epoch in range(state["epoch"], args.epochs):
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
        state, last_save = train_one_epoch(run, epoch, state, stop, last_save)
        if state["epoch_step"] < run.sampler.steps_per_epoch:  # stopped by --max-steps mid-epoch
            save(run, state, "last.pt")
            break
        state = end_epoch(run, epoch, state)
        last_save = time.time()
    run.log(f"done: best top-1 {state['best_top1']:.2f}; checkpoints in {args.output_dir}")


def set_up(args, checkpoint, rank, world, device):
    """Data, model, EMA, optimizer and the step, the checkpoint's state loaded into them when resuming;
    config.json written. Returns (Run, the counters)."""
    log = print if rank == 0 else (lambda *a, **k: None)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    fast = device.type == "cuda" and not args.eager
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.demo:
        log(f"no --data-dir: training on the built-in demo set in {args.data_dir} (10 texture classes, "
            f"written once) with the demo settings {DEMO}")
    train_set, val_set, sampler, train_loader, val_loader = build_data(args, rank, world, device)
    classes, spe = train_set.classes, sampler.steps_per_epoch
    torch.manual_seed(args.seed)
    if checkpoint is not None:
        model = MambaVision(**checkpoint["model_args"])
    else:
        model = build_model(args.variant, len(classes), drop_path_rate=args.drop_path_rate, **model_overrides(args))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    ema = ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None
    # the run's counters; `sums` are the current epoch's (a mid-epoch checkpoint carries them)
    state = dict(epoch=0, epoch_step=0, step=0, images=0, best_top1=0.0, val_top1=None, metrics=[], bad_steps=0,
                 sums=EPOCH_SUMS)
    if checkpoint is not None:
        state = resume(checkpoint, args, model, ema, optimizer, classes, spe, rank, state, log)
    args.steps_per_epoch = spe
    config = plain({k: v for k, v in vars(args).items() if k not in ("resume", "benchmark", "legacy_fast_flag")})
    step = TrainStep(model, ema, optimizer, args, len(classes), world, fast, log)
    log("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in config.items()))
    on_gpu = isinstance(train_loader, data.GpuBatches)
    log(f"model {args.variant}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{len(classes)} classes; {len(train_set)} train / {len(val_set)} val images; {world} process(es) on "
        f"{device.type}, {'fast path (torch.compile + CUDA graphs)' if fast else 'eager'}; {spe} steps per epoch; "
        f"training images decoded and augmented {'on the GPU' if on_gpu else 'by Pillow'} ({args.workers} loader "
        f"workers)")
    if rank == 0:
        write_text_atomic(os.path.join(args.output_dir, "config.json"), json.dumps(config, indent=1))
        write_metrics(args.output_dir, state["metrics"])
    return Run(args, config, rank, world, device, log, train_set, val_set, sampler, train_loader, val_loader,
               model, ema, optimizer, step), state


def train_one_epoch(run, epoch, state, stop, last_save):
    """The epoch's steps from state["epoch_step"] on: learning rate, batch, step; every READ_EVERY
    steps the results are read (and logged), a timed save or a signal's save made. Returns (state,
    time of the last save); on a signal, saves and exits with 128 + its number."""
    from tqdm import tqdm
    args, spe = run.args, run.sampler.steps_per_epoch
    use_mesa = run.ema is not None and args.mesa > 0 and epoch / args.epochs > args.mesa_start
    run.sampler.set_epoch(epoch)
    # k steps into the epoch, the first k x global batch positions are used, on any world size
    run.sampler.set_position(state["epoch_step"] * args.batch_size * args.accum_steps)
    run.model.train()
    t0, batches, pending = time.time(), iter(run.train_loader), []
    with tqdm(total=spe, initial=state["epoch_step"], desc=f"epoch {epoch}", disable=run.rank != 0,
              dynamic_ncols=True) as bar:
        for k in range(state["epoch_step"], spe):
            if args.max_steps is not None and state["step"] >= args.max_steps:
                break
            lr = lr_at(epoch + k / spe, args)
            micro_batches, wait = next_micro_batches(batches, args, run.rank, state["step"], run.device)
            result = run.step(micro_batches, lr, use_mesa)  # (loss, grad norm, finite), still on the GPU
            pending.append(dict(step=state["step"], lr=lr, wait=wait, time=time.time(), result=result))
            state = count_step(state, args, epoch, k, wait, time.time() - t0)
            t0 = time.time()
            bar.update(1)
            read_now = (state["step"] % READ_EVERY == 0 or k == spe - 1 or state["step"] == args.max_steps
                        or (run.world == 1 and stop.signum))  # several ranks agree on a signal at a reading
            if not read_now:
                continue
            state, loss = read_results(state, pending, args, run.device, run.rank == 0, run.log)
            pending, sums = [], state["sums"]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{sums['images'] / sums['seconds']:.0f}",
                            data_ms=f"{1000 * sums['data_wait'] / sums['steps']:.1f}")  # mean wait a step
            signum = stop.agreed(run.device)
            if signum or (state["step"] % (2 * READ_EVERY) == 0 and due(last_save, args, run.device)):
                last_save = save(run, state, "last.pt")
                if signum:
                    run.log(f"\nstopped by signal {signum} at step {state['step']}: saved last.pt; run the same "
                            f"command to resume")
                    sys.exit(128 + signum)
    return state, last_save


def end_epoch(run, epoch, state):
    """The epoch's end: evaluate the model and its EMA, save last.pt (and best.pt), one line of
    metrics. Returns the state of the next epoch's start."""
    args, model, ema, device = run.args, run.model, run.ema, run.device
    check_replicas_in_sync(model, "weights and BatchNorm statistics")
    top1, top5 = evaluate(model, run.val_loader, device, args.amp)
    ema_top1, ema_top5 = evaluate(ema.module, run.val_loader, device, args.amp) if ema is not None else (None, None)
    if ema is not None:
        check_replicas_in_sync(ema.module, "EMA weights")
    metrics = epoch_metrics(state, args, epoch, run.sampler.steps_per_epoch, top1, top5, ema_top1, ema_top5, device,
                            bad_images=run.train_set.num_bad + run.val_set.num_bad)
    is_best = metrics["best_top1"] > state["best_top1"]
    state = state | dict(epoch=epoch + 1, epoch_step=0, best_top1=metrics["best_top1"], sums=EPOCH_SUMS,
                         metrics=state["metrics"] + [metrics], val_top1=dict(model=top1, ema=ema_top1))
    save(run, state, "last.pt", also="best.pt" if is_best else None)
    if run.rank == 0:
        write_metrics(args.output_dir, state["metrics"])
    run.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, val top-1 {top1:.2f} top-5 {top5:.2f}"
            + (f", weights{' and EMA' if ema is not None else ''} identical on {run.world} ranks"
               if run.world > 1 else "")
            + (f", EMA top-1 {ema_top1:.2f} top-5 {ema_top5:.2f}" if ema is not None else "")
            + f"; data wait {metrics['data_wait_ms_per_step']:.1f} ms a step, "
              f"{100 * metrics['data_wait_fraction']:.0f}% of training time ({metrics['epoch_seconds']:.0f} s)")
    return state


def save(run, state, name, also=None):
    """Write <output-dir>/name (rank 0; every rank gives its RNG state), and link `also` to it.
    Returns the time of the save."""
    model, ema = run.model, run.ema
    check_finite({"model": model} | ({"EMA": ema.module} if ema is not None else {}))
    rngs = [None] * run.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank == 0:
        path = os.path.join(run.args.output_dir, name)
        save_atomic(dict(variant=run.args.variant, model_args=plain(model.model_args), classes=run.train_set.classes,
                         model=model.state_dict(), ema=ema.module.state_dict() if ema is not None else None,
                         optimizer=run.optimizer.state_dict(), config=run.config, rng=rngs, **state), path)
        if also:  # the same bytes under a second name: a hard link, or a copy where links fail
            link_atomic(path, os.path.join(run.args.output_dir, also))
    return time.time()


def count_step(state, args, epoch, k, wait, seconds):
    """The run's counters after step k of the epoch (a new state); its loss comes in read_results."""
    images, sums = args.accum_steps * args.batch_size * args.world_size, state["sums"]
    sums = sums | dict(steps=sums["steps"] + 1, images=sums["images"] + images, seconds=sums["seconds"] + seconds,
                       data_wait=sums["data_wait"] + wait)
    return state | dict(epoch=epoch, epoch_step=k + 1, step=state["step"] + 1, images=state["images"] + images,
                        sums=sums)


def read_results(state, pending, args, device, master, log):
    """Read the pending steps' (loss, grad norm, finite) from the GPU, one wait for all of them, and
    count them: a non-finite step is warned about, too many in a row stop the run. Returns the new
    state and the last step's loss; with --step-log, writes their lines."""
    values = torch.stack([p["result"] for p in pending]).tolist()
    bad_steps, sums = state["bad_steps"], state["sums"]
    for p, (loss, _, finite) in zip(pending, values):
        bad_steps = 0 if finite else bad_steps + 1
        if not finite and args.amp != "fp16":  # fp16's loss scale skips overflows by design
            log(f"warning: non-finite loss or gradient at step {p['step']} (loss {loss}): step skipped, the "
                f"network unchanged ({bad_steps} in a row)")
        if bad_steps >= args.max_bad_steps:
            raise TrainingError(f"{bad_steps} non-finite steps in a row at step {p['step']}: lower --lr, use "
                                f"--amp bf16, or resume from an earlier checkpoint")
        sums = sums | dict(loss=sums["loss"] + (loss if finite else 0.0), finite=sums["finite"] + int(finite))
    if args.step_log:
        write_step_log(args, pending, values, device, master)
    return state | dict(bad_steps=bad_steps, sums=sums), values[-1][0]


def epoch_metrics(state, args, epoch, spe, top1, top5, ema_top1, ema_top5, device, bad_images):
    """The epoch's line of metrics.jsonl, from its running sums (data waits summed over the ranks)."""
    sums = state["sums"]
    wait, steps_run = all_reduce_sum([sums["data_wait"], sums["steps"]], device)
    return dict(epoch=epoch, step=state["step"], lr=lr_at(epoch + (spe - 1) / spe, args),
                train_loss=sums["loss"] / max(sums["finite"], 1), top1=top1, top5=top5, ema_top1=ema_top1,
                ema_top5=ema_top5, best_top1=max(top1, ema_top1 or 0.0, state["best_top1"]),
                train_images_per_s=sums["images"] / max(sums["seconds"], 1e-9),
                data_wait_ms_per_step=1000 * wait / max(steps_run, 1),
                data_wait_fraction=wait / args.world_size / max(sums["seconds"], 1e-9),
                epoch_seconds=sums["seconds"], bad_images=bad_images)


def resume(checkpoint, args, model, ema, optimizer, classes, spe, rank, state, log):
    """Load the checkpoint's weights, EMA, optimizer and counters into this run, after checking that
    it is the same run: same classes (by name), same global batch (checked with the settings)."""
    path = checkpoint["path"]
    if checkpoint["classes"] != classes:
        gone, new = sorted(set(checkpoint["classes"]) - set(classes)), sorted(set(classes) - set(checkpoint["classes"]))
        detail = (f"missing now: {', '.join(gone[:5])}; new: {', '.join(new[:5])}" if gone or new
                  else "the same names in another order")
        raise UsageError(f"{path} was trained on other classes than {args.data_dir} holds ({detail}): the labels "
                         f"would shift; resume on the same class folders, or use a new --output-dir")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} does not fit its own model_args ({str(e).splitlines()[0][:100]}): "
                         f"delete it or pass another --resume") from None
    state = {k: checkpoint.get(k, v) for k, v in state.items()}
    old = checkpoint["config"]
    if old["steps_per_epoch"] != spe:  # images were added or removed: the schedule counts epochs
        done = round(state["epoch_step"] * spe / old["steps_per_epoch"])
        log(f"notice: the training set now gives {spe} steps an epoch (was {old['steps_per_epoch']}): epoch "
            f"{state['epoch']} goes on at step {done} of {spe}, with the new set's order")
        state["epoch_step"] = done
    extend_schedule(args, old, state["epoch"] + state["epoch_step"] / spe, log)
    if rank < len(checkpoint.get("rng") or []):  # ranks new to the run start from torch.manual_seed(seed)
        set_rng_state(checkpoint["rng"][rank])
    split = (old["world_size"], old["batch_size"], old["accum_steps"])
    log(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}, {state['images']} images"
        + (f" (global batch {global_batch(old)} as {' x '.join(map(str, split))} processes x batch x micro-steps, "
           f"now {args.world_size} x {args.batch_size} x {args.accum_steps})"
           if split != (args.world_size, args.batch_size, args.accum_steps) else ""))
    return state


def due(last_save, args, device):
    """Is a timed save due? Rank 0's clock decides for every rank (saving needs all of them)."""
    flag = torch.tensor([time.time() - last_save > 60 * args.save_minutes], device=device)
    if dist.is_initialized():
        dist.broadcast(flag, 0)
    return bool(flag)


def write_step_log(args, pending, values, device, master):
    """Lines of <output-dir>/steps.jsonl, one a step: its loss and data wait averaged over the ranks
    (so 1, 2 or 4 processes at the same global batch log comparable numbers), lr, gradient norm,
    and the wall-clock time at which the step was queued (differences: seconds a step)."""
    sums = all_reduce_sum([x for p, v in zip(pending, values) for x in (v[0], p["wait"])], device)
    if master:
        lines = [dict(step=p["step"], lr=p["lr"], loss=loss_sum / args.world_size, grad_norm=v[1],
                      data_wait_ms=1000 * wait_sum / args.world_size, time=p["time"])
                 for p, v, loss_sum, wait_sum in zip(pending, values, sums[0::2], sums[1::2])]
        path = os.path.join(args.output_dir, "steps.jsonl")
        try:
            with open(path, "a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
        except OSError as e:  # one line, exit 1, as for the other files
            raise TrainingError(f"cannot write {path} ({e.strerror or e}); the last checkpoint is intact: free "
                                f"space, then run the same command to resume") from None


def make_optimizer(model, args):
    """LAMB as the recipe has it, or AdamW (the same update without the trust ratio)."""
    return Lamb(param_groups(model, args.weight_decay), betas=args.betas, eps=args.eps,
                trust_ratio=args.opt == "lamb")


# ----------------------------------------------------------------------------------------------
# Processes and signals

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a plain `python train.py` is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        # Before the group: torch._dynamo (imported by the first optimizer) imports modules whose default
        # arguments hold the group; imported after it, they keep it past destroy_process_group, and gloo's
        # threads, still running, crash the interpreter's exit (torch 2.13, one CPU run in a few).
        from torch import _dynamo  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, world, device


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (a no-op on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def check_replicas_in_sync(module, what):
    """Raise if the ranks' weights or buffers differ (a sum and a sum of squares per tensor, exactly)."""
    if not dist.is_initialized():
        return
    sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                        for t in module.state_dict().values()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"the ranks' {what} differ: they lost synchronisation; resume from last.pt")


class StopSignal:
    """SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT (Ctrl-C) only set a flag:
    the loop saves last.pt after the current step (several processes: at the next reading of the
    steps' results, every READ_EVERY steps, where they agree) and exits with 128 + the signal number."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.catch) for s in (signal.SIGTERM, signal.SIGINT)}

    def catch(self, signum, frame):
        self.signum = signum

    def agreed(self, device):
        """This process's signal, or SIGTERM if another rank got one: ranks stop at the same step. The
        answer follows the ranks' sum alone: a signal caught after the flag was read (during the
        all-reduce) waits for the next reading, else this rank would stop and the others go on."""
        signum = self.signum
        if not dist.is_initialized():
            return signum
        return (signum or signal.SIGTERM) if all_reduce_sum([signum], device)[0] > 0 else 0

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# Data and evaluation

def build_data(args, rank, world, device):
    """Datasets, samplers and loaders; writes the demo set first when there is no --data-dir."""
    train_dir, val_dir = os.path.join(args.data_dir, "train"), os.path.join(args.data_dir, "val")
    classes = data.list_classes(train_dir)
    data.check_same_classes(classes, data.list_classes(val_dir))
    train_set = data.ImageFolder(train_dir, data.TrainTransform(args.img_size, bool(args.randaugment), args.reprob),
                                 classes=classes)
    v = VARIANTS[args.variant]
    val_set = data.ImageFolder(val_dir, data.eval_transform(args.img_size, v["crop_pct"], v["crop_mode"]),
                               classes=classes)
    if len(train_set) < global_batch(vars(args)):
        raise data.DataError(f"{len(train_set)} training images is less than one global batch "
                             f"({world} x {args.batch_size} x {args.accum_steps}): lower --batch-size")
    train_sampler = data.EpochSampler(len(train_set), world, rank, shuffle=True, seed=args.seed,
                                      batch_size=args.batch_size, accum_steps=args.accum_steps)
    val_sampler = data.EpochSampler(len(val_set), world, rank, shuffle=False, seed=args.seed)
    if gpu_data_path(args, device):
        files = data.make_loader(data.FileSamples(train_set), args.batch_size, train_sampler, args.workers, True,
                                 collate_fn=data.collate_files)
        train_loader = data.GpuBatches(files, train_set, device, CAPTURE_LOCK)
    else:
        train_loader = data.make_loader(train_set, args.batch_size, train_sampler, args.workers, True, device.type)
    val_loader = data.make_loader(val_set, args.batch_size, val_sampler, args.workers, False, device.type)
    return train_set, val_set, train_sampler, train_loader, val_loader


def gpu_data_path(args, device):
    """Whether training images are decoded (nvJPEG) and augmented (gpu_augment) on the GPU (--data-path).
    auto takes the GPU where it has JPEG engines: without them nvJPEG decodes on the CPU, in one
    process, slower than Pillow in the loader workers. Where the GPU path cannot run (one warning
    names the reason), Pillow in the loader workers does it."""
    if args.data_path == "cpu" or device.type != "cuda":  # prepare() refused --data-path gpu without CUDA
        return False
    import gpu_augment
    import jpeg
    if args.data_path == "auto" and not jpeg.uses_engines(device):  # False too where nvJPEG could not start
        return False
    if jpeg.available(device) and gpu_augment.available(device):
        return True
    print("the GPU data path is not available (see the warning above): training images are decoded and "
          "augmented by Pillow in the loader workers", file=sys.stderr)
    return False


def next_micro_batches(batches, args, rank, step, device):
    """This step's micro-batches on the device, each with its mixup/cutmix choice and seed, and the
    seconds spent blocked on the loader (the GPU idles then)."""
    micro_batches, wait = [], 0.0
    for m in range(args.accum_steps):
        t0 = time.perf_counter()
        (x, boxes), labels = next(batches)
        wait += time.perf_counter() - t0
        # micro-step m of rank r holds the sampler's chunk m x world + r of this step's images: the
        # same chunk, and so the same seed, as rank m x world + r of a run without accumulation
        seed = step_seed(args, m * args.world_size + rank, step)
        mix = data.draw_mix(random.Random(seed), args.img_size, args.img_size, args.mixup, args.cutmix)
        micro_batches.append((x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                              boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                              torch.tensor(mix, dtype=torch.float32).to(device, non_blocking=True), seed))
    return micro_batches, wait


def step_seed(args, rank, step):
    """A seed for everything random in one training step of one rank (drop path, mixup/cutmix)."""
    return ((args.seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


@torch.no_grad()
def evaluate(model, loader, device, amp):
    """Top-1 (%) over the whole set, every rank's share added up (eval.py's loop)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[amp]
    every_class = list(range(model.model_args["num_classes"]))
    sums = evaluation_sums(model, loader, every_class, device, dtype, progress=False)  # [loss, top-1, top-5, images]
    if dist.is_initialized():
        dist.all_reduce(sums)
    _, correct1, correct5, count = sums.tolist()
    return 100 * correct1 / count, 100 * correct5 / count


if __name__ == "__main__":
    main()
