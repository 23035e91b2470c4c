"""Speed of this implementation beside the official one, on one GPU, in one run.

    python compare_official.py --variants t b --infer-batch 256 --train-batch 128

Both networks get the same weights, the same inputs and the same scan (official.py points the
official code's scan at ours), so the ratios measure the model code alone. Inference: eval mode, no
grad, bf16 autocast, channels_last. Training: forward, cross-entropy, backward and a fused AdamW step,
same settings. Each row is images/s (median of --repeats timed runs of --iters steps, CUDA events)
and the peak allocated memory.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from model import build_model
from official import official_model


def time_steps(step, iters, repeats):
    """Median seconds per call of step() over `repeats` runs of `iters` calls, after a warm-up."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def infer_step(model, x):
    def step():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(x)
    return step


def train_step(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(name, model, mode, batch, args):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    if mode == "infer":
        step = infer_step(model.eval(), x)
    else:
        step = train_step(model.train(), x, torch.randint(0, 1000, (batch,), device="cuda"))
    seconds = time_steps(step, args.iters, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"| {name} | {mode} | {batch} | {batch / seconds:,.0f} | {peak:.2f} |", flush=True)
    return batch / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["t", "b"], help="ImageNet-1K aliases to compare")
    p.add_argument("--infer-batch", type=int, default=256, help="inference batch size")
    p.add_argument("--train-batch", type=int, default=128, help="training batch size")
    p.add_argument("--iters", type=int, default=20, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | mode | batch | images/s | peak GiB |\n|---|---|---|---|---|")
    for variant in args.variants:
        for mode, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
            ours = build_model(variant).cuda().to(memory_format=torch.channels_last)
            theirs = official_model(variant).cuda().to(memory_format=torch.channels_last)
            theirs.load_state_dict(ours.state_dict())
            base = measure(f"official {variant}", theirs, mode, batch, args)
            del theirs
            rate = measure(f"ours {variant}", ours, mode, batch, args)
            print(f"|  ratio ours/official | | | {rate / base:.2f}x | |")
            if not args.no_compile:
                rate = measure(f"ours {variant}, compiled", torch.compile(ours, fullgraph=True), mode, batch, args)
                print(f"|  ratio compiled/official | | | {rate / base:.2f}x | |")


if __name__ == "__main__":
    main()
