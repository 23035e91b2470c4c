"""Speed of this implementation beside the official one, on one GPU, in one run.

    python compare_official.py --variants t b --infer-batch 256 --train-batch 128

Both networks get the same weights, the same inputs and the same scan (official.py points the
official code's scan at ours), so the ratios measure the model code alone. Inference: eval mode, no
grad, bf16 autocast, channels_last. Training: forward, cross-entropy, backward and a fused AdamW step,
same settings, then train.py's own step (step.TrainStep: uint8 batch normalised on the GPU,
soft-target cross-entropy, backward, AdamW; mixup's kernels run with its "neither" choice; no EMA,
MESA or clip) eager (`train.py --eager`) and on its default fast path (torch.compile + CUDA graphs of
the whole step). Each row is images/s (median of --repeats timed runs of --iters steps, CUDA events;
the rows of a table block are set up first and then timed in turns, one run each, so that drift of
the GPU's clocks or the host's load over the minutes of a block touches every row alike) and the
peak memory allocated by the row's own set-up and steps. With --profile, each row is followed by
where its GPU time goes (torch.profiler over 3 steps): kernel time per step by kind, the largest
kernels, and how busy the GPU was (kernel time over wall time; well under 100% means the step waits
on the CPU to launch work).
"""
import argparse
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model import build_model
from official import official_model
from step import Lamb, TrainStep


def seconds_per_call(step, iters):
    """GPU seconds per call of step() over `iters` calls in a row (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def time_steps(step, iters, repeats):
    """Median seconds per call of step() over `repeats` runs of `iters` calls, after a warm-up."""
    for _ in range(3):
        step()
    return statistics.median(seconds_per_call(step, iters) for _ in range(repeats))


KERNEL_KINDS = (  # first match wins; names as cuDNN, cuBLAS, Triton and PyTorch give their kernels
    ("scan", ("selective_scan", "scan_")),
    ("fused (Triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention")),
    ("convolution", ("conv", "dgrad", "wgrad", "fprop", "implicit_gemm", "winograd")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
    ("norm", ("norm", "bn_")),
    ("optimizer", ("adam", "multi_tensor")),
    ("reduction", ("reduce",)),
    ("elementwise / copy", ("elementwise", "copy", "cat", "memcpy", "memset", "fill", "index")),
)


def kernel_kind(name):
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_steps(step, steps=3, top=12):
    """Print the GPU kernel time per step by kind and the `top` largest kernels of `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall_ms = 1e3 * seconds_per_call(step, steps)
    kernels = {}  # name -> (total us, calls)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            us, calls = kernels.get(e.key, (0.0, 0))
            kernels[e.key] = (us + e.device_time_total, calls + e.count)
    by_kind = {}
    for name, (us, calls) in kernels.items():
        kind = by_kind.setdefault(kernel_kind(name), [0.0, 0])
        kind[0], kind[1] = kind[0] + us, kind[1] + calls
    busy_ms = sum(us for us, _ in kernels.values()) / 1e3 / steps
    print(f"    GPU busy {busy_ms:.1f} of {wall_ms:.1f} ms a step ({100 * busy_ms / wall_ms:.0f}%), "
          f"{sum(c for _, c in kernels.values()) // steps} kernels a step")
    for kind, (us, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"    {kind:20s} {us / 1e3 / steps:7.2f} ms {100 * us / 1e3 / steps / busy_ms:5.1f}%  "
              f"{calls // steps} kernels")
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"      {us / 1e3 / steps:6.2f} ms x{calls // steps:<4d} {name[:110]}")


def infer_step(model, x):
    def step():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(x)
    return step


def train_step(model, x, y):
    """Forward, cross-entropy, backward, fused AdamW: the plain loop both codes can run."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_py_step(model, x, y, fast):
    """train.py's step with the recipe's extras off: normalise, forward, loss, backward, AdamW."""
    settings = SimpleNamespace(amp="bf16", clip_grad=0.0, opt="adamw", accum_steps=1, smoothing=0.0, mesa=0.0)
    step = TrainStep(model, None, Lamb(model.parameters(), trust_ratio=False), settings, 1000, 1, fast)
    pixels = torch.randint(0, 256, x.shape, dtype=torch.uint8, device="cuda").contiguous(memory_format=torch.channels_last)
    batch = [(pixels, torch.zeros(len(x), 4, device="cuda"), y, torch.tensor([1.0, 0, 0, 0, 0, 1.0], device="cuda"), 0)]
    return lambda: step(batch, 1e-4, use_mesa=False)


def prepare(model, mode, batch, path=None):
    """The step of one row and its peak memory: allocated during its set-up and warm-up, over what
    was allocated before (the other rows' models stay alive, to be timed beside it)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = model()
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if mode == "infer":
        step = infer_step(model.eval(), x)
    elif path is None:
        step = train_step(model.train(), x, y)
    else:
        step = train_py_step(model.train(), x, y, fast=path == "fast")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step, (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def compare(variant, mode, batch, args):
    """One table block: each row's step set up in turn, then timed in rounds, one run of each row a
    round, so that the GPU's clocks and the host's load drift alike for all rows; the median run."""
    ours = lambda: build_model(variant).cuda().to(memory_format=torch.channels_last)  # noqa: E731

    def theirs():
        model = official_model(variant).cuda().to(memory_format=torch.channels_last)
        model.load_state_dict(build_model(variant).state_dict())
        return model

    rows = [(f"official {variant}", theirs, None), (f"ours {variant}", ours, None)]
    if mode == "infer" and not args.no_compile:
        rows.append((f"ours {variant}, compiled", lambda: torch.compile(ours(), fullgraph=True), None))
    if mode == "train":
        rows += [(f"ours {variant}, train.py --eager", ours, "eager"),
                 (f"ours {variant}, train.py default", ours, "fast")]
    steps = {name: prepare(model, mode, batch, path) for name, model, path in rows}
    seconds = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, _) in steps.items():
            seconds[name].append(seconds_per_call(step, args.iters))
    base = batch / statistics.median(seconds[rows[0][0]])
    for name, (step, peak) in steps.items():
        rate = batch / statistics.median(seconds[name])
        print(f"| {name} | {mode} | {batch} | {rate:,.0f} | {rate / base:.2f}x | {peak:.2f} |", flush=True)
        if args.profile:
            profile_steps(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["t", "b"], help="ImageNet-1K aliases to compare")
    p.add_argument("--infer-batch", type=int, default=256, help="inference batch size")
    p.add_argument("--train-batch", type=int, default=128, help="training batch size")
    p.add_argument("--iters", type=int, default=20, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each row, interleaved; the median is reported")
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"],
                   help="inference and/or training rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile inference row")
    p.add_argument("--profile", action="store_true", help="after each row, where its GPU time goes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_official.py needs a CUDA GPU")
    try:
        official_model("t")
    except ImportError as e:
        sys.exit(f"the official package is not importable ({e}): pip install --no-deps mambavision==1.2.0 "
                 "timm einops (timm needs torchvision)")
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | mode | batch | images/s | ratio to official | peak GiB |\n|---|---|---|---|---|---|")
    for variant in args.variants:
        for mode in args.modes:
            compare(variant, mode, args.infer_batch if mode == "infer" else args.train_batch, args)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
