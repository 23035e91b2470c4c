"""Train MambaVision on ImageNet-style folders with the official recipe, on one GPU or many.

    torchrun --nproc_per_node=8 train.py --variant t --data-dir /data/imagenet   # the real run
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
                                                    # the official 32 GPUs: the same line on every node
    torchrun --nproc_per_node=1 train.py --variant t                             # built-in demo, CPU ok
    python train.py --variant t --benchmark                                      # time training steps

Plain DistributedDataParallel through torchrun (NCCL on GPUs, gloo on CPU); rank 0 prints and saves.
Re-running the same command after a kill resumes from <output-dir>/last.pt, mid-epoch included,
also on another number of GPUs as long as the global batch (GPUs x --batch-size x --accum-steps)
is the same.
Every random choice is a function of (seed, rank, step) or (seed, epoch, position), so a resumed run
follows exactly the path of an uninterrupted one (bit-identical on CPU with deterministic kernels).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from eval import evaluate as evaluation_sums
from model import VARIANTS, MambaVision, build_model

# The official ImageNet-1K recipe per variant (NOTES.md, from the released configs).
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
              smoothing=0.1, mixup=0.8, cutmix=1.0, randaugment=True, reprob=0.25, seed=31,
              img_size=224, window_size=None, workers=8)
# With no --data-dir: the built-in demo set (10 texture classes of 72 px JPEGs), sized to run on a
# 2-core CPU in minutes. Small windows keep levels 2 and 3 unpadded at 64 px (64 / 16 = 4, 64 / 32
# = 2); window size owns no weights, so the network has exactly the variant's parameters. A lower
# lr suits batch 32 (the recipe's is for 4096), and a short EMA horizon suits ~300 steps. No loader
# workers: on 2 cores they would fight the math threads.
DEMO = dict(epochs=8, cooldown_epochs=1, warmup_epochs=1, batch_size=32, lr=2e-3, img_size=64,
            window_size=(8, 8, 4, 2), ema_decay=0.9, workers=0)
DEMO_DIR = os.path.join("data", "demo")


class UsageError(Exception):
    """A bad flag, folder or file: printed as one line, exit code 2."""


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss keeps diverging): printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------
# Configuration

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # None = "the variant's recipe" (or the demo's, without --data-dir); see resolve_config().
    p.add_argument("--variant", default="t", help=f"official recipe and model: {', '.join(RECIPES)}")
    p.add_argument("--data-dir", default=None, help="folder with train/<class>/ and val/<class>/; "
                   "without it, a small demo set is written to data/demo and used")
    p.add_argument("--output-dir", default=None, help="checkpoints and logs (default runs/<variant>)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (default: "
                   "<output-dir>/last.pt if it exists)")
    p.add_argument("--epochs", type=int, help="total epochs, cooldown included (recipe: 320)")
    p.add_argument("--cooldown-epochs", type=int, help="final epochs at --min-lr (recipe: 10)")
    p.add_argument("--warmup-epochs", type=float, help="linear warmup from --warmup-lr (recipe: per variant)")
    p.add_argument("--batch-size", type=int, help="images per GPU/process and micro-step (recipe: 128)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-steps (forward + backward) per optimizer "
                   "step: the global batch is processes x --batch-size x --accum-steps")
    p.add_argument("--lr", type=float, help="peak learning rate (recipe: 5e-3 at global batch 4096)")
    p.add_argument("--warmup-lr", type=float, help="learning rate at step 0 (recipe: 1e-6)")
    p.add_argument("--min-lr", type=float, help="end of the cosine and cooldown rate (recipe: 5e-6)")
    p.add_argument("--opt", choices=("lamb", "adamw"), help="optimizer (recipe: lamb)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (recipe: per variant)")
    p.add_argument("--clip-grad", type=float, help="gradient norm clip, 0 = off (recipe: 5.0)")
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
    p.add_argument("--model-overrides", type=json.loads, default={},
                   help='more build_model overrides as JSON, e.g. \'{"dim": 16, "depths": [1, 1, 2, 2]}\'')
    p.add_argument("--workers", type=int, help="loader worker processes per GPU/process")
    p.add_argument("--seed", type=int, help="base seed (recipe: 31)")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="autocast dtype (default bf16 on GPU, none on CPU); fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graph", action="store_true", help="replay forward + backward as one CUDA graph "
                   "(GPU only, --accum-steps 1, not fp16): removes the kernel-launch overhead")
    p.add_argument("--save-minutes", type=float, default=30.0, help="also write last.pt every N minutes")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many non-finite steps in a row")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (short runs, tests)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels only")
    p.add_argument("--step-log", action="store_true", help="append every step's loss (mean over ranks), lr, "
                   "gradient norm and data wait to <output-dir>/steps.jsonl")
    p.add_argument("--benchmark", action="store_true",
                   help="time training steps on synthetic batches (no data loading) and exit")
    p.add_argument("--benchmark-steps", type=int, default=50, help="timed steps for --benchmark")
    return p


def resolve_config(args, world_size):
    """Fill every unset flag from the demo preset (without --data-dir), else the variant's recipe."""
    if args.variant not in RECIPES:
        hint = " (the 21K / 512 px models are fine-tuned, not trained from scratch here)" \
            if args.variant in VARIANTS else ""
        raise UsageError(f"unknown variant {args.variant!r}{hint}: choose one of {', '.join(RECIPES)}")
    args.demo = args.data_dir is None and not args.benchmark
    defaults = COMMON | RECIPES[args.variant] | (DEMO if args.demo else {})
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.randaugment = bool(args.randaugment)
    args.window_size = list(args.window_size) if args.window_size else None
    args.betas = list(args.betas)
    args.data_dir = args.data_dir or DEMO_DIR
    args.output_dir = args.output_dir or os.path.join("runs", args.variant + ("_demo" if args.demo else ""))
    args.world_size = world_size
    for name in ("batch_size", "accum_steps", "epochs", "img_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, not {args.workers}")
    if not 0 <= args.warmup_epochs < args.epochs - args.cooldown_epochs:
        raise UsageError(f"--warmup-epochs ({args.warmup_epochs}) must be shorter than the cosine "
                         f"span --epochs minus --cooldown-epochs ({args.epochs - args.cooldown_epochs})")
    return args


# ----------------------------------------------------------------------------------------------
# Optimisation: LAMB, parameter groups, the per-step schedule, EMA

class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), as the official run had it.

    Per step t, with g the gradient after a global-norm clip to `max_grad_norm`:
        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p
        r = ||p|| / ||u||   (1 where either norm is 0; only where wd > 0, else r = 1)
        p = p - lr * r * u
    The layer-wise trust ratio r is skipped for the no-decay group (biases, norms), as in the
    reference implementation the authors trained with. Uses torch._foreach_* ops: a few launches
    per step for all parameters instead of a dozen per tensor.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self):
        grads_all = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads_all:
            return
        clip = None
        if self.max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads_all)))
            clip = torch.clamp(norm / self.max_grad_norm, min=1.0)  # a tensor: no host sync
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            if clip is not None:
                grads = torch._foreach_div(grads, clip)
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                self.state[p]["step"] += 1
            t = self.state[params[0]]["step"]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_lerp_(m, grads, 1 - b1)                        # m = b1 m + (1 - b1) g
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)        # v = b2 v + (1 - b2) g^2
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
            torch._foreach_add_(denom, group["eps"])                      # sqrt(v_hat) + eps
            update = torch._foreach_div(m, denom)
            torch._foreach_div_(update, 1 - b1 ** t)                      # m_hat / (sqrt(v_hat) + eps)
            if group["weight_decay"] > 0:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(update))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(update, list(trust.unbind()))
            torch._foreach_add_(params, update, alpha=-group["lr"])


def param_groups(model, weight_decay):
    """Two groups: weights that decay, and 1-D parameters (norms, layer scales, D) and biases that don't."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(step, steps_per_epoch, args):
    """The per-step learning rate (a timm-style cosine, counted from step 0, warmup included):
    linear warmup_lr -> lr over the warmup, then a cosine from lr (at step 0) to min_lr at the end of
    the cosine span (epochs - cooldown), of which the warmup is the first part; then min_lr."""
    warmup_steps = args.warmup_epochs * steps_per_epoch
    cosine_steps = (args.epochs - args.cooldown_epochs) * steps_per_epoch
    if step < warmup_steps:
        return args.warmup_lr + (args.lr - args.warmup_lr) * step / warmup_steps
    if step < cosine_steps:
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * step / cosine_steps))
    return args.min_lr


class ModelEma:
    """An exponential moving average of the weights (and BatchNorm statistics), kept in eval mode:
    ema = decay * ema + (1 - decay) * model after every optimizer step."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.float_pairs = [(e, m) for e, m in zip(self.module.state_dict().values(), model.state_dict().values())
                            if e.is_floating_point()]
        self.other_pairs = [(e, m) for e, m in zip(self.module.state_dict().values(), model.state_dict().values())
                            if not e.is_floating_point()]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_([e for e, _ in self.float_pairs], [m for _, m in self.float_pairs], 1 - self.decay)
        for e, m in self.other_pairs:  # e.g. BatchNorm's num_batches_tracked
            e.copy_(m)


# ----------------------------------------------------------------------------------------------
# Distributed helpers

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a plain `python train.py` is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, world, device


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (a no-op on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean_(tensors):
    """Average tensors over the ranks, in place, with one collective on one flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def broadcast_from_rank0_(module):
    """Make every rank's parameters and buffers rank 0's (what the DDP wrapper does when it is built)."""
    if dist.is_initialized():
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def average_bn_stats(model):
    """Average BatchNorm running statistics over ranks, so every rank evaluates the same network."""
    if not dist.is_initialized():
        return
    all_reduce_mean_([buf for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                      for buf in (m.running_mean, m.running_var)])


def check_replicas_in_sync(model, what="weights"):
    """Raise if the ranks' weights differ (a sum and a sum of squares per tensor, compared exactly)."""
    if not dist.is_initialized():
        return
    sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise TrainingError(f"the ranks' {what} differ: DDP lost synchronisation; resume from last.pt")


def step_seed(args, rank, step):
    """A seed for everything random in one training step of one rank (drop path, mixup/cutmix)."""
    return ((args.seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


# ----------------------------------------------------------------------------------------------
# Checkpoints

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
    """Write to a temporary file in the same folder, then rename: a kill leaves the old file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def link_atomic(src, dst):
    """dst becomes another name of src's file (src is later replaced, never rewritten in place)."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def global_batch(config):
    """Images per optimizer step, over all ranks and micro-steps."""
    return config["world_size"] * config["batch_size"] * config.get("accum_steps", 1)


def check_resumable(ckpt, path, args, steps_per_epoch, num_classes):
    """A checkpoint resumes this run if it has the same model, data and global batch. The world size
    and per-rank batch may differ: the schedule counts optimizer steps, and the sampler's position
    is the number of images used, which is steps x global batch on any world size."""
    old = ckpt["config"]
    ours = dict(variant=args.variant, global_batch=global_batch(vars(args)), steps_per_epoch=steps_per_epoch,
                num_classes=num_classes)
    theirs = dict(old, global_batch=global_batch(old), num_classes=ckpt["model_args"].get("num_classes"))
    differ = [f"{k.replace('_', ' ')} {theirs.get(k)} (now {v})" for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise UsageError(f"{path} comes from a different run: {', '.join(differ)}; resume with the same "
                         f"settings (global batch = processes x --batch-size), or use a new --output-dir")


def load_checkpoint(path):
    """torch.load(weights_only=True) with a clear error for a missing, corrupt or foreign file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                         f"delete it or pass another --resume") from None
    needed = {"model", "model_args", "optimizer", "epoch", "step", "config"}
    missing = needed - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UsageError(f"{path} is not a train.py checkpoint (no {', '.join(sorted(missing))}): "
                         f"pass another --resume or --output-dir")
    return ckpt


# ----------------------------------------------------------------------------------------------
# One step, one epoch, evaluation

def soft_cross_entropy(logits, target):
    """Cross-entropy against soft targets (B, K), mean over the batch, in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mesa_loss(logits, ema_logits, weight, temperature=3.0):
    """MESA (Du et al. 2022): self-distillation from the EMA, weight * 50 * KL(student || teacher) at T=3."""
    return weight * 50 * F.kl_div(F.log_softmax(logits.float() / temperature, dim=-1),
                                  F.softmax(ema_logits.float() / temperature, dim=-1), reduction="batchmean")


def forward_backward(model, ema, x, target, args, use_mesa, autocast, scale=lambda loss: loss):
    """Forward, loss (+ MESA) and backward of one micro-batch; returns the loss, detached."""
    with autocast:
        logits = model(x)
        loss = soft_cross_entropy(logits, target)
        if use_mesa:
            with torch.no_grad():
                ema_logits = ema.module(x)
            loss = loss + mesa_loss(logits, ema_logits, args.mesa)
    scale(loss).backward()
    return loss.detach()


class CudaGraphStep:
    """forward_backward of one micro-batch as a CUDA graph (--cuda-graph): captured on first use,
    and again when MESA switches on, then replayed with each batch copied into its input buffers.

    Why: MambaVision-T's eager training step launches ~1,500 small kernels, and the GPU idles for
    most of the step while Python launches them (BENCHMARKS.md); one replay launches them all.
    What it needs: fixed shapes (training batches are all full), no host sync inside the step, and
    gradients that stay the tensors the captured backward wrote, so .grad is never set to None
    (each replay overwrites it). Random draws (drop path) follow torch.manual_seed at each replay.
    """

    def __init__(self, model, fn):
        self.model, self.fn, self.graph, self.key = model, fn, None, None

    def __call__(self, x, target, key):
        if self.graph is None or key != self.key:
            self._capture(x, target, key)
        self.x.copy_(x)
        self.target.copy_(target)
        self.graph.replay()
        return self.loss

    def _capture(self, x, target, key):
        self.graph = self.loss = None  # drop the previous graph and its memory first
        self.x, self.target, self.key = x.clone(), target.clone(), key
        buffers = [b.clone() for b in self.model.buffers()]  # warm-up must not move BatchNorm stats
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream: cuDNN autotuning, compilation
            for _ in range(3):
                self.model.zero_grad(set_to_none=True)
                self.fn(self.x, self.target, key)
        torch.cuda.current_stream().wait_stream(side)
        for b, saved in zip(self.model.buffers(), buffers):
            b.copy_(saved)
        self.model.zero_grad(set_to_none=True)  # so the captured backward allocates the .grad tensors
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.fn(self.x, self.target, key)


def train_step(model, ema, optimizer, scaler, micro_batches, seeds, args, num_classes, use_mesa, autocast,
               no_sync=contextlib.nullcontext, graph=None):
    """One optimizer step over a list of micro-batches [(uint8 x, erase boxes, labels)], each with its
    seed: per micro-batch normalising and erasing (data.normalize_and_erase), mixup/cutmix, forward,
    loss (+ MESA), backward of loss / len(micro_batches); then clip, optimizer step, EMA update.
    Returns (mean loss, grad_norm) as tensors on the device; a non-finite grad_norm means the update
    was skipped (identical on every rank, since the gradients are averaged by then).
    With a CudaGraphStep (one micro-batch, no DDP wrapper), the gradients are averaged over the
    ranks here, in one collective, after the replay."""
    loss_sum = 0.0
    scale = lambda loss: scaler.scale(loss / len(micro_batches))  # noqa: E731  .grad: the micro-batch mean
    for m, ((x, boxes, labels), seed) in enumerate(zip(micro_batches, seeds)):
        torch.manual_seed(seed)  # erase noise and drop path draw from the global generator
        x = data.normalize_and_erase(x, boxes)  # uint8 -> normalised float32, the boxes filled with noise
        x, target = data.mixup_cutmix(x, labels, num_classes, random.Random(seed), args.mixup, args.cutmix,
                                      smoothing=args.smoothing)
        if graph is not None:
            loss_sum = loss_sum + graph(x, target, use_mesa)
            continue
        # DDP all-reduces gradients inside backward(). Only the sum over all micro-steps is needed,
        # so every micro-step but the last skips that communication (no_sync) and just accumulates
        # into .grad locally; the last backward all-reduces the accumulated gradients once.
        last = m == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():  # the forward too: DDP prepares there
            loss_sum = loss_sum + forward_backward(model, ema, x, target, args, use_mesa, autocast, scale)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if graph is not None and dist.is_initialized():
        all_reduce_mean_([p.grad for p in params])
    scaler.unscale_(optimizer)
    max_norm = args.clip_grad if args.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the step itself on inf/NaN gradients
        scaler.update()
    elif torch.isfinite(grad_norm):
        optimizer.step()
    if graph is None:
        optimizer.zero_grad(set_to_none=True)
    if ema is not None and torch.isfinite(grad_norm):
        ema.update()
    return loss_sum / len(micro_batches), grad_norm


def wrap_for_training(model, ema, args, autocast):
    """(the model the step calls, its no_sync, the CudaGraphStep or None). Without --cuda-graph: DDP
    on several processes (it all-reduces gradients during backward), then torch.compile if asked.
    With it: no DDP wrapper (a graph cannot hold DDP's per-step Python hooks; train_step averages the
    gradients after the replay instead), weights taken from rank 0 as DDP would, and the captured
    forward_backward calls the (compiled) model."""
    if args.cuda_graph:
        broadcast_from_rank0_(model)
        if ema is not None:
            broadcast_from_rank0_(ema.module)
        step_model = torch.compile(model) if args.compile else model
        graph = CudaGraphStep(model, lambda x, target, use_mesa: forward_backward(
            step_model, ema, x, target, args, use_mesa, autocast))
        return step_model, contextlib.nullcontext, graph
    ddp_model = nn.parallel.DistributedDataParallel(model) if args.world_size > 1 else model
    no_sync = ddp_model.no_sync if args.world_size > 1 else contextlib.nullcontext
    return torch.compile(ddp_model) if args.compile else ddp_model, no_sync, None


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 / top-5 accuracy (%) over the whole set, every rank's share added up (eval.py's loop)."""
    sums = evaluation_sums(model, loader, device, dtype, progress=False)  # [loss, top-1, top-5, images]
    if dist.is_initialized():
        dist.all_reduce(sums)
    _, correct1, correct5, count = sums.tolist()
    return 100 * correct1 / count, 100 * correct5 / count


def write_step_log(step, lr, loss, grad_norm, data_wait, args, ctx):
    """One line of <output-dir>/steps.jsonl: the step's loss and data wait averaged over the ranks
    (so 1, 2 or 4 processes at the same global batch log comparable numbers), lr, gradient norm,
    and the wall-clock time (differences: seconds a step)."""
    loss_sum, wait_sum = all_reduce_sum([loss, data_wait], ctx["device"])
    if ctx["rank"] == 0:
        line = dict(step=step, lr=lr, loss=loss_sum / args.world_size, grad_norm=float(grad_norm),
                    data_wait_ms=1000 * wait_sum / args.world_size, time=time.time())  # time: step ends
        with open(os.path.join(args.output_dir, "steps.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def train_one_epoch(epoch, state, loader, ema, args, ctx):
    """One pass over this rank's share of the epoch (what is left of it, after a mid-epoch resume),
    up to --max-steps. Saves last.pt every --save-minutes. Returns the mean training loss.
    Also measures the data wait: the time spent blocked on the loader, which the GPU spends idle."""
    model, optimizer, scaler = ctx["model"], ctx["optimizer"], ctx["scaler"]
    model.train()
    steps_per_epoch = ctx["steps_per_epoch"]
    use_mesa = ema is not None and args.mesa > 0 and epoch / args.epochs > args.mesa_start
    loss_sum, n_steps, t0, images = 0.0, 0, time.time(), 0
    data_wait, steps_run = 0.0, 0  # seconds blocked on the loader, steps taken
    with ctx["tqdm"](total=steps_per_epoch, initial=state["step"] - epoch * steps_per_epoch,
                     desc=f"epoch {epoch}", disable=ctx["rank"] != 0, dynamic_ncols=True) as bar:
        batches = iter(loader)
        for step in range(state["step"], (epoch + 1) * steps_per_epoch):
            if args.max_steps is not None and step >= args.max_steps:
                break
            lr = lr_at(step, steps_per_epoch, args)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro_batches, step_wait = [], 0.0
            for _ in range(args.accum_steps):
                t_wait = time.perf_counter()
                (x, boxes), labels = next(batches)
                step_wait += time.perf_counter() - t_wait
                x = x.to(ctx["device"], non_blocking=True).contiguous(memory_format=torch.channels_last)
                micro_batches.append((x, boxes.to(ctx["device"], non_blocking=True),
                                      labels.to(ctx["device"], non_blocking=True)))
            # micro-step m of rank r holds the sampler's chunk m x world + r of this step's images: the
            # same chunk, and so the same seed, as rank m x world + r of a run without accumulation
            seeds = [step_seed(args, m * args.world_size + ctx["rank"], step) for m in range(args.accum_steps)]
            loss, grad_norm = train_step(model, ema, optimizer, scaler, micro_batches, seeds, args,
                                         ctx["num_classes"], use_mesa, ctx["autocast"], ctx["no_sync"], ctx["graph"])
            state["step"] = step + 1
            data_wait += step_wait
            loss, finite = loss.item(), bool(torch.isfinite(grad_norm))
            if args.step_log:
                write_step_log(step, lr, loss, grad_norm, step_wait, args, ctx)
            state["bad_steps"] = 0 if finite else state["bad_steps"] + 1
            if not finite and not scaler.is_enabled():  # fp16's scaler skips overflows by design
                ctx["log"](f"warning: non-finite loss or gradient at step {step} (loss {loss}): step skipped "
                           f"({state['bad_steps']} in a row)")
            if state["bad_steps"] >= args.max_bad_steps:
                raise TrainingError(f"{state['bad_steps']} non-finite steps in a row at step {step}: lower "
                                    f"--lr, use --amp bf16, or resume from an earlier checkpoint")
            if finite:
                loss_sum, n_steps = loss_sum + loss, n_steps + 1
            step_images = len(micro_batches) * x.shape[0] * args.world_size
            images += step_images
            state["images"] += step_images
            bar.update(1)
            steps_run += 1
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images / (time.time() - t0):.0f}",
                            data_ms=f"{1000 * data_wait / steps_run:.1f}")  # mean wait a step, this epoch
            if ctx["time_to_save"]():
                state["epoch"] = epoch
                ctx["save"]("last.pt")
    ctx["train_images_per_s"] = images / max(time.time() - t0, 1e-9)
    ctx["data_wait"] = (data_wait, steps_run, time.time() - t0)
    return loss_sum / max(n_steps, 1)


def benchmark(args, device, log):
    """Time training steps (mixup, forward, loss, backward, clip, optimizer, EMA) on synthetic
    batches already on the device: images/s and peak memory, without data loading. Under torchrun
    the gradients are averaged over the processes as in training (DDP, or after the replay with
    --cuda-graph), and images/s counts all processes."""
    torch.manual_seed(args.seed)
    model = build_model(args.variant, drop_path_rate=args.drop_path_rate, **model_overrides(args))
    model = model.to(device, memory_format=torch.channels_last).train()
    ema = ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    autocast = make_autocast(args, device)
    step_model, no_sync, graph = wrap_for_training(model, ema, args, autocast)
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    boxes = torch.tensor([data.erase_box(args.img_size, args.img_size, random.Random(i), args.reprob)
                          for i in range(args.batch_size)], device=device)  # (batch, 4), about reprob of them boxes
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    use_mesa = ema is not None and args.mesa > 0  # MESA's extra EMA forward, as late in training

    def run(n):
        for i in range(n):
            micro_batches = [(x.clone().contiguous(memory_format=torch.channels_last), boxes, labels)
                             for _ in range(args.accum_steps)]
            train_step(step_model, ema, optimizer, scaler, micro_batches, [i] * args.accum_steps, args, 1000,
                       use_mesa, autocast, no_sync, graph)
        sync()

    if device.type == "cuda" and graph is not None:  # a replay allocates nothing: count the capture
        torch.cuda.reset_peak_memory_stats()
    run(10)  # warm-up: allocator, cuDNN autotuning, compilation, graph capture
    if device.type == "cuda" and graph is None:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run(args.benchmark_steps)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    images = args.benchmark_steps * global_batch(vars(args))
    log(f"benchmark: variant {args.variant}, {args.world_size} process(es) x batch {args.batch_size} x "
        f"{args.accum_steps} micro-steps, {args.img_size} px, amp {args.amp}, opt {args.opt}, "
        f"EMA {'on' if ema else 'off'}, MESA {'on' if use_mesa else 'off'}, compile {args.compile}, "
        f"CUDA graph {args.cuda_graph}: "
        f"{images / seconds:.0f} images/s ({images / seconds / args.world_size:.0f} per process), "
        f"{1000 * seconds / args.benchmark_steps:.1f} ms/step, peak memory {peak:.2f} GiB"
        + (" (warm-up and capture included)" if graph is not None else ""))


def model_overrides(args):
    """build_model overrides from --model-overrides and --window-size (lists become tuples)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.model_overrides.items()}
    if args.window_size:
        overrides["window_size"] = tuple(args.window_size)
    return overrides


def make_optimizer(model, args, device):
    groups = param_groups(model, args.weight_decay)
    if args.opt == "lamb":
        return Lamb(groups, lr=args.lr, betas=args.betas, eps=args.eps)
    return torch.optim.AdamW(groups, lr=args.lr, betas=args.betas, eps=args.eps, fused=device.type == "cuda")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


def make_autocast(args, device):
    dtype = AMP_DTYPES[args.amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def build_data(args, rank, world, device):
    """Datasets, samplers and loaders; writes the demo set first when there is no --data-dir."""
    if args.demo:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once per machine (concurrent writers are safe)
            data.make_demo_dataset(args.data_dir)
        if dist.is_initialized():
            dist.barrier()
    if not os.path.isdir(args.data_dir):
        raise data.DataError(f"data folder {args.data_dir} does not exist: pass --data-dir holding train/ and val/")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, split)):
            raise data.DataError(f"no {split}/ folder in {args.data_dir}: expected "
                                 f"{args.data_dir}/train/<class>/ and {args.data_dir}/val/<class>/")
    train_dir, val_dir = os.path.join(args.data_dir, "train"), os.path.join(args.data_dir, "val")
    classes = data.list_classes(train_dir)
    data.check_same_classes(classes, data.list_classes(val_dir))
    train_set = data.ImageFolder(train_dir, data.TrainTransform(args.img_size, args.randaugment, args.reprob),
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
    train_loader = data.make_loader(train_set, args.batch_size, train_sampler, args.workers, True, device.type)
    val_loader = data.make_loader(val_set, args.batch_size, val_sampler, args.workers, False, device.type)
    return train_set, val_set, train_sampler, train_loader, val_loader


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        run(args, rank, world, device)
    except (UsageError, data.DataError, TrainingError) as e:
        # an error raised in a loader worker arrives with the worker's traceback: keep its last line
        message = str(e).strip().splitlines()[-1].removeprefix("data.DataError: ")
        if rank == 0 or not isinstance(e, UsageError):  # a usage error is the same on every rank
            print(f"error: {message}" if world == 1 else f"error (rank {rank}): {message}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device):
    from tqdm import tqdm

    args = resolve_config(args, world)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    master = rank == 0

    def log(msg):
        if master:
            print(msg, flush=True)

    if args.cuda_graph and (device.type != "cuda" or args.accum_steps > 1 or args.amp == "fp16"):
        problem = "a CUDA GPU" if device.type != "cuda" else "--accum-steps 1" if args.accum_steps > 1 else \
            "--amp bf16 or none (fp16's loss scaler is not captured)"
        raise UsageError(f"--cuda-graph needs {problem}: drop --cuda-graph or change that setting")
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.benchmark:
        return benchmark(args, device, log)

    if args.demo:
        log(f"no --data-dir: training on the built-in demo set in {args.data_dir} (10 texture "
            f"classes, written once) with the demo settings {DEMO}")
    train_set, val_set, train_sampler, train_loader, val_loader = build_data(args, rank, world, device)
    num_classes = len(train_set.classes)
    steps_per_epoch = train_sampler.steps_per_epoch
    args.steps_per_epoch = steps_per_epoch
    os.makedirs(args.output_dir, exist_ok=True)
    resume = args.resume or (os.path.join(args.output_dir, "last.pt")
                             if os.path.isfile(os.path.join(args.output_dir, "last.pt")) else None)
    ckpt = load_checkpoint(resume) if resume else None

    torch.manual_seed(args.seed)
    if ckpt is not None:
        check_resumable(ckpt, resume, args, steps_per_epoch, num_classes)
        model = MambaVision(**ckpt["model_args"])
    else:
        model = build_model(args.variant, num_classes, drop_path_rate=args.drop_path_rate, **model_overrides(args))
    model = model.to(device, memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    state = dict(epoch=0, step=0, images=0, best_top1=0.0, bad_steps=0)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"{resume} does not fit its own model_args ({str(e).splitlines()[0][:100]}): "
                             f"delete it or pass another --resume") from None
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.update(epoch=ckpt["epoch"], step=ckpt["step"], images=ckpt.get("images", 0),
                     best_top1=ckpt["best_top1"])
        if rank < len(ckpt.get("rng") or []):  # ranks new to the run start from torch.manual_seed(seed)
            set_rng_state(ckpt["rng"][rank])
    ema = ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])
    autocast = make_autocast(args, device)
    step_model, no_sync, graph = wrap_for_training(model, ema, args, autocast)

    config = {k: v for k, v in vars(args).items()}
    log("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in config.items()))
    log(f"model {args.variant}: {n_params / 1e6:.2f} M parameters, {num_classes} classes; "
        f"{len(train_set)} train / {len(val_set)} val images; {world} process(es) on {device.type}; "
        f"{steps_per_epoch} steps per epoch")
    if master:
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    if ckpt is not None:
        old = ckpt["config"]
        log(f"resumed from {resume}: epoch {state['epoch']}, step {state['step']}, {state['images']} images"
            + (f" (global batch {global_batch(old)} as {old['world_size']} x {old['batch_size']} x "
               f"{old.get('accum_steps', 1)} processes x batch x micro-steps, now {world} x {args.batch_size} x "
               f"{args.accum_steps})" if (old["world_size"], old["batch_size"], old.get("accum_steps", 1))
               != (world, args.batch_size, args.accum_steps) else ""))

    last_save = [time.time()]

    def time_to_save():
        """Rank 0's clock decides, every 20 steps, for every rank (saving needs all of them)."""
        if state["step"] % 20:
            return False
        flag = torch.tensor([time.time() - last_save[0] > 60 * args.save_minutes], device=device)
        if dist.is_initialized():
            dist.broadcast(flag, 0)
        return bool(flag)

    def save(name, also=None):
        rngs = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        last_save[0] = time.time()
        if not master:
            return
        ckpt = dict(variant=args.variant, model_args=plain(model.model_args), model=model.state_dict(),
                    ema=ema.module.state_dict() if ema is not None else None,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                    epoch=state["epoch"], step=state["step"], images=state["images"], config=plain(config),
                    best_top1=state["best_top1"], rng=rngs)
        path = os.path.join(args.output_dir, name)
        save_atomic(ckpt, path)
        if also:  # the same bytes under a second name: a hard link, or a copy where links fail
            link_atomic(path, os.path.join(args.output_dir, also))

    ctx = dict(model=step_model, no_sync=no_sync, graph=graph,
               optimizer=optimizer, scaler=scaler, device=device, rank=rank, log=log,
               num_classes=num_classes, steps_per_epoch=steps_per_epoch, autocast=autocast,
               tqdm=tqdm, time_to_save=time_to_save, save=save)
    for epoch in range(state["epoch"], args.epochs):
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
        train_sampler.set_epoch(epoch)
        # k steps into the epoch, the first k x global batch positions are used, on any world size
        train_sampler.set_position((state["step"] - epoch * steps_per_epoch) * args.batch_size * args.accum_steps)
        t0 = time.time()
        train_loss = train_one_epoch(epoch, state, train_loader, ema, args, ctx)
        if state["step"] < (epoch + 1) * steps_per_epoch:  # stopped by --max-steps mid-epoch
            state["epoch"] = epoch
            save("last.pt")
            break
        wait, steps_run, seconds = all_reduce_sum(list(ctx["data_wait"]), device)  # sums over ranks
        wait_ms, wait_fraction = 1000 * wait / max(steps_run, 1), wait / max(seconds, 1e-9)  # rank means
        check_replicas_in_sync(model)
        if ema is not None:
            check_replicas_in_sync(ema.module, "EMA weights")
        average_bn_stats(model)
        top1, top5 = evaluate(model, val_loader, device, AMP_DTYPES[args.amp])
        ema_top1 = ema_top5 = None
        if ema is not None:
            average_bn_stats(ema.module)
            ema_top1, ema_top5 = evaluate(ema.module, val_loader, device, AMP_DTYPES[args.amp])
        best = max(top1, ema_top1 or 0.0)
        is_best = best > state["best_top1"]
        state.update(epoch=epoch + 1, best_top1=max(best, state["best_top1"]))
        save("last.pt", also="best.pt" if is_best else None)
        metrics = dict(epoch=epoch, step=state["step"], lr=optimizer.param_groups[0]["lr"],
                       train_loss=train_loss, top1=top1, top5=top5, ema_top1=ema_top1, ema_top5=ema_top5,
                       best_top1=state["best_top1"], train_images_per_s=ctx["train_images_per_s"],
                       data_wait_ms_per_step=wait_ms, data_wait_fraction=wait_fraction,
                       epoch_seconds=time.time() - t0, bad_images=train_set.num_bad + val_set.num_bad)
        log(f"epoch {epoch}: train loss {train_loss:.4f}, val top-1 {top1:.2f} top-5 {top5:.2f}"
            + (f", weights{' and EMA' if ema is not None else ''} identical on {world} ranks" if world > 1 else "")
            + (f", EMA top-1 {ema_top1:.2f} top-5 {ema_top5:.2f}" if ema is not None else "")
            + f"; data wait {wait_ms:.1f} ms a step, {100 * wait_fraction:.0f}% of training time"
            + f" ({time.time() - t0:.0f} s)")
        if master:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
    log(f"done: best top-1 {state['best_top1']:.2f}; checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
