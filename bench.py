"""Benchmark harnesses, one subcommand each:
    python bench.py loader [--workers 1 8 16] [--imagenet-sizes] [--gpu]    decode + augment images/s
    python bench.py stages [--imagenet-sizes] ...                           where one image's CPU time goes
    python bench.py scan [--kernels-only]                                   the selective-scan kernels (GPU)
    python train.py --benchmark [train.py's flags]                          the whole training step (GPU)
`python bench.py SUBCOMMAND --help` lists each one's options.
"""
import argparse
import io
import itertools
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import recipe
import scan
from data import (RANDOM_INTERPOLATIONS, EpochSampler, ImageFolder, Params, TrainTransform, apply_rand_augment,
                  load_rgb, make_loader, to_uint8_tensor)
from model import build_model
from step import CaptureLock, ModelEma, TrainStep
from synthetic import IMAGENET_SIZES, make_photo_dataset

# ----------------------------------------------------------------------------------------------
# python bench.py loader: decode + training transform, in one process and through DataLoader workers

ONE_PROCESS_IMAGES = 500  # files timed in one process: five cycles of IMAGENET_SIZES' 100 pictures


def add_loader_args(p):
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    p.add_argument("--images", type=int, default=512, help="JPEG files to write and read")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="JPEG width and height")
    sizes.add_argument("--imagenet-sizes", action="store_true",
                       help="instead, ImageNet's mix of sizes (synthetic.IMAGENET_SIZE_MIX)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--img-size", type=int, default=224, help="training image side")
    p.add_argument("--randaugment", type=int, choices=(0, 1), default=1, help="RandAugment on/off")
    p.add_argument("--batch-size", type=int, default=32, help="loader batch size")
    p.add_argument("--repeat", type=int, default=3, help="one-process passes per setting; fastest and median shown")
    p.add_argument("--draft", type=int, nargs="+", choices=(0, 1), default=[0, 1],
                   help="JPEG draft mode settings to time (0 off, 1 on)")
    p.add_argument("--gpu", action="store_true", help="also time the GPU data path (nvJPEG decode + gpu_augment; "
                   "needs a CUDA GPU)")
    p.add_argument("--data-threads", type=int, nargs="+", default=[3],
                   help="GPU data path: decoding threads to time (data.GpuBatches' threads)")


def time_pass(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def loader_bench(args):
    """Images/s of decode alone and of decode + training transform in one process (the passes of
    the draft settings alternate, so a busy machine slows them alike), then through DataLoader
    workers, on freshly written photo-like JPEGs."""
    sizes = IMAGENET_SIZES if args.imagenet_sizes else (tuple(args.size),)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(make_photo_dataset(tmp, args.images, 0, classes=1, sizes=sizes,
                                               quality=args.quality), "train")
        sets = {draft: ImageFolder(root, TrainTransform(args.img_size, bool(args.randaugment), 0.25, draft=draft))
                for draft in args.draft}
        paths = [path for path, _ in sets[args.draft[0]].samples][:ONE_PROCESS_IMAGES]
        kb = np.mean([os.path.getsize(path) for path in paths]) / 1e3
        shape = "ImageNet's mix of sizes" if args.imagenet_sizes else f"{args.size[0]} x {args.size[1]} px"
        print(f"{args.images} JPEGs of {shape}, quality {args.quality}, {kb:.0f} KB on average; training "
              f"transform to {args.img_size} px (RandAugment {'on' if args.randaugment else 'off'}, random "
              f"erasing 0.25) to uint8 pictures + erase boxes (normalising and the erase noise run on the "
              f"GPU); torch threads 1; one process: {len(paths)} files, {args.repeat} passes")
        torch.set_num_threads(1)
        widths = []
        for path in paths:
            with Image.open(path) as img:
                widths.append(img.size[0])

        def decode_all(draft):  # -> how many came out at a reduced scale
            transform = sets[draft].transform
            images = (transform.load(path, random.Random(i))[0] if draft else load_rgb(path)
                      for i, path in enumerate(paths))
            return sum(img.size[0] < width for img, width in zip(images, widths))

        def transform_all(draft):
            return [sets[draft][(i, i)] for i in range(len(paths))]

        times = {(draft, step): [] for draft in args.draft for step in ("decode", "whole")}
        reduced = {}
        for _ in range(args.repeat):
            for draft in args.draft:
                seconds, reduced[draft] = time_pass(lambda: decode_all(draft))
                times[draft, "decode"].append(seconds)
                times[draft, "whole"].append(time_pass(lambda: transform_all(draft))[0])
        for draft in args.draft:
            decode, whole = (len(paths) / min(times[draft, step]) for step in ("decode", "whole"))
            median = len(paths) / statistics.median(times[draft, "whole"])
            print(f"draft {'on ' if draft else 'off'}: one process: decode {decode:.0f} images/s "
                  f"({100 * reduced[draft] / len(paths):.0f}% at reduced scale), decode + transform {whole:.0f} "
                  f"images/s ({1000 / whole:.2f} ms an image; median pass {median:.0f} images/s)")
        for draft in args.draft:
            ds = sets[draft]
            for workers in args.workers:
                sampler = EpochSampler(len(ds), shuffle=True, seed=0, batch_size=args.batch_size)
                loader = make_loader(ds, args.batch_size, sampler, workers, train=True)
                for _ in loader:  # the first epoch starts the (persistent) workers; the second is timed
                    pass
                n, t0 = 0, None
                for k, ((x, _), _) in enumerate(loader):  # ((uint8 pictures, erase boxes), labels)
                    n += x.shape[0] if t0 is not None else 0
                    if k == workers - 1:  # every worker's first batch is in: the steady state starts
                        t0 = time.perf_counter()
                rate = n / (time.perf_counter() - t0)
                print(f"draft {'on ' if draft else 'off'}: DataLoader, {workers} worker(s): {rate:.0f} "
                      f"images/s, {rate / workers:.0f} per worker")
                del loader
        if args.gpu:
            gpu_loader_bench(args, sets[args.draft[0]])


def gpu_loader_bench(args, ds):
    """Images/s of the GPU data path as training runs it (data.GpuBatches: workers read files and
    draw parameters, a thread decodes them with nvJPEG and augments them with gpu_augment), and the
    GPU memory it takes at its peak."""
    import gpu_augment
    import jpeg
    if not torch.cuda.is_available() or not (jpeg.available() and gpu_augment.available()):
        return print("GPU data path: not timed (needs a CUDA GPU, nvJPEG and gpu_augment's kernels)")
    print(f"GPU data path: nvJPEG {'with' if jpeg.uses_engines() else 'without'} the hardware JPEG engines")
    device = torch.device("cuda")
    for workers, threads in itertools.product(args.workers, args.data_threads):
        sampler = EpochSampler(len(ds), shuffle=True, seed=0, batch_size=args.batch_size)
        files = make_loader(data.FileSamples(ds), args.batch_size, sampler, workers, True, collate_fn=data.collate_files)
        batches = data.GpuBatches(files, ds, device, CaptureLock(), threads)
        for _ in batches:  # the first epoch starts the (persistent) workers and the decoder; the second is timed
            pass
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        n, t0 = 0, None
        for k, ((x, _), _) in enumerate(batches):
            n += x.shape[0] if t0 is not None else 0
            if k == workers - 1:  # every worker's first batch is in: the steady state starts
                torch.cuda.synchronize()
                t0 = time.perf_counter()
        torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        print(f"GPU data path: DataLoader, {workers} worker(s), {threads} thread(s): {rate:.0f} images/s; "
              f"GPU memory at its peak {(torch.cuda.max_memory_allocated() - before) / 2**20:.0f} MiB")
        del batches, files


# ----------------------------------------------------------------------------------------------
# python bench.py stages: one training image's CPU time, stage by stage, in one process

def stages_bench(args):
    """The training transform's stages timed one by one over the same files (one process, one torch
    thread): read the file's bytes, decode (Pillow's draft mode as the loader does, or in full),
    crop + resize, flip, RandAugment, uint8 tensor; then per image the batch's collate
    (torch.stack) and, on a GPU host, pinning and the copy to the GPU."""
    sizes = IMAGENET_SIZES if args.imagenet_sizes else (tuple(args.size),)
    S = args.img_size
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(make_photo_dataset(tmp, args.images, 0, classes=1, sizes=sizes,
                                               quality=args.quality), "train")
        paths = [path for path, _ in ImageFolder(root).samples]
        torch.set_num_threads(1)
        seconds = dict.fromkeys(("read", "draw parameters + decode (draft)", "crop + resize", "flip", "RandAugment",
                                 "uint8 tensor", "collate", "pin + copy to GPU", "decode in full"), 0.0)
        pictures = []
        transform = TrainTransform(S)
        for i, path in enumerate(paths):
            rng = random.Random(i)
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                raw = f.read()
            t1 = time.perf_counter()
            img, params = transform.load(io.BytesIO(raw), rng)  # draws the parameters, decodes for the crop
            p = Params(*params.tolist())
            t2 = time.perf_counter()
            img = img.resize((S, S), RANDOM_INTERPOLATIONS[int(p.interpolation)], box=(p.left, p.top, p.right, p.bottom))
            t3 = time.perf_counter()
            if p.flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            t4 = time.perf_counter()
            img = apply_rand_augment(img, [(p.op1, p.level1, p.sign1, p.interp1), (p.op2, p.level2, p.sign2, p.interp2)])
            t5 = time.perf_counter()
            pictures.append(to_uint8_tensor(img))
            t6 = time.perf_counter()
            load_rgb(io.BytesIO(raw))
            t7 = time.perf_counter()
            for name, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                seconds[name] += dt
            seconds["decode in full"] += t7 - t6
        batches = [pictures[k:k + args.batch_size] for k in range(0, len(pictures) - args.batch_size + 1, args.batch_size)]
        for batch in batches:
            t0 = time.perf_counter()
            x = torch.stack(batch)
            t1 = time.perf_counter()
            seconds["collate"] += (t1 - t0) * len(paths) / (len(batches) * len(batch))
            if torch.cuda.is_available():
                x.pin_memory().cuda(non_blocking=True)
                torch.cuda.synchronize()
                seconds["pin + copy to GPU"] += (time.perf_counter() - t1) * len(paths) / (len(batches) * len(batch))
        kb = np.mean([os.path.getsize(path) for path in paths]) / 1e3
        shape = "ImageNet's mix of sizes" if args.imagenet_sizes else f"{args.size[0]} x {args.size[1]} px"
        print(f"{len(paths)} JPEGs of {shape}, quality {args.quality}, {kb:.0f} KB on average, to {S} px; "
              f"one process, one torch thread")
        total = sum(dt for name, dt in seconds.items() if name != "decode in full")
        print("| stage | ms an image | share of the loader's work |\n|---|---|---|")
        for name, dt in seconds.items():
            share = "(instead of the draft decode)" if name == "decode in full" else f"{100 * dt / total:.0f}%"
            print(f"| {name} | {1e3 * dt / len(paths):.2f} | {share} |")
        print(f"| all but 'decode in full' | {1e3 * total / len(paths):.2f} | {len(paths) / total:.0f} images/s a core |")


# ----------------------------------------------------------------------------------------------
# python bench.py scan: the CUDA kernels against the reference at MambaVision's shapes, and the
# bytes floor

BENCH_SHAPES = (  # name, batch, d (channels of the scan = half the level width), l (window tokens), n
    ("T stage 3", 128, 160, 196, 8),
    ("T stage 4", 128, 320, 49, 8),
    ("B stage 3", 128, 256, 196, 8),
    ("L2-512 stage 3", 128, 392, 1024, 8),
)


def add_scan_args(p):
    p.add_argument("--kernels-only", action="store_true", help="time the kernels only, not the (slow) reference")


def _bench_inputs(batch, d, l, n, dtype, device="cuda"):
    """Fresh random inputs at MambaVision-like scales (never zeros)."""
    u = torch.randn(batch, d, l, device=device).to(dtype)
    delta = (0.5 * torch.randn(batch, d, l, device=device) - 1.0).to(dtype)
    A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1) * torch.rand(d, 1, device=device).add(0.5)
    B, C = (torch.randn(batch, n, l, device=device).to(dtype) for _ in range(2))
    D = torch.randn(d, device=device)
    delta_bias = 0.5 * torch.randn(d, device=device)
    return u, delta, A, B, C, D, delta_bias


def _graph_time_us(fn, sets, reps=20):
    """Median time of one call of fn(*inputs), from CUDA-graph replays that cycle over `sets`
    (several input sets, so that repeated calls do not just reread the L2 cache)."""
    for args in sets:  # warm-up outside the graph (build, allocator)
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(sets))
    return sorted(times)[len(times) // 2]


def _eager_time_us(fn, args, reps=3):
    fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth():
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    us = _graph_time_us(lambda: dst.copy_(src), [()], reps=10)
    return 2 * src.numel() * 4 / (us * 1e-6)


def _min_bytes(batch, d, l, n, dtype):
    """Fewest bytes each pass must move: every input read once, every output written once."""
    es = torch.finfo(dtype).bits // 8
    rows, states = batch * d * l * es, batch * n * l * es  # one (b, d, l) tensor, one (b, n, l) tensor
    params = d * (n + 2) * 4
    fwd = 3 * rows + 2 * states + params                    # u, delta, B, C in; y out
    bwd = 5 * rows + 4 * states + 2 * params                # u, delta, dy, B, C in; du, ddelta, dB, dC, dA.. out
    return fwd, fwd + bwd


def scan_bench(reference=True):
    if not torch.cuda.is_available():
        sys.exit("bench.py scan needs a CUDA GPU")
    os.environ["MAMBAVISION_SCAN"] = "cuda"  # fail loudly instead of timing the reference twice
    t0 = time.perf_counter()
    scan._kernels_ready(required=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"kernel build/load {time.perf_counter() - t0:.1f} s")
    copy_bw = _copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    ops = torch.ops.mambavision
    fwd_op, train_op, bwd_op = ops.selective_scan, ops.selective_scan_train, ops.selective_scan_backward

    def kernel_fwd_bwd(u, delta, A, B, C, D, delta_bias, dy):  # what a training step runs for the scan
        _, seg_state = train_op(u, delta, A, B, C, D, delta_bias, True)
        bwd_op(u, delta, A, B, C, D, delta_bias, seg_state, dy, True)

    def ref_fwd_bwd(u, delta, A, B, C, D, delta_bias, dy):
        inputs = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, delta_bias)]
        torch.autograd.grad(scan.selective_scan_ref(*inputs), inputs, dy)

    rows = []
    for name, batch, d, l, n in BENCH_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            sets = []
            for _ in range(3):
                inputs = _bench_inputs(batch, d, l, n, dtype)
                sets.append((*inputs, torch.randn(batch, d, l, device="cuda").to(dtype)))
            fwd = _graph_time_us(lambda *a: fwd_op(*a[:7], True), sets)
            train_fwd = _graph_time_us(lambda *a: train_op(*a[:7], True), sets)
            both = _graph_time_us(kernel_fwd_bwd, sets)
            ref_fwd = ref_both = float("nan")
            if reference:
                with torch.no_grad():
                    ref_fwd = _eager_time_us(lambda *a: scan.selective_scan_ref(*a[:7]), sets[0])
                ref_both = _eager_time_us(ref_fwd_bwd, sets[0])
            del sets
            fwd_bytes, both_bytes = _min_bytes(batch, d, l, n, dtype)
            rows.append((name, batch, d, l, n, str(dtype).replace("torch.", ""), fwd, train_fwd, both, ref_fwd,
                         ref_both, both_bytes / 1e6, both_bytes / (both * 1e-6) / copy_bw))
            torch.cuda.empty_cache()
    print("\n| shape (batch, d, l, n) | dtype | kernel fwd us | kernel train fwd us | kernel fwd+bwd us | ref fwd us "
          "| ref fwd+bwd us | fwd+bwd min MB | floor us | fwd+bwd / copy bw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, d, l, n, dt, fwd, train_fwd, both, ref_fwd, ref_both, mb, frac in rows:
        floor = mb * 1e6 / copy_bw * 1e6
        print(f"| {name} ({batch}, {d}, {l}, {n}) | {dt} | {fwd:.1f} | {train_fwd:.1f} | {both:.1f} | {ref_fwd:.0f} "
              f"| {ref_both:.0f} | {mb:.1f} | {floor:.1f} | {100 * frac:.0f}% |")


# ----------------------------------------------------------------------------------------------
# python train.py --benchmark: the training step on synthetic batches (train.py's flags)

def train_steps(args, world):
    """Time train.py's whole step (normalise + erase, mixup/cutmix, forward, loss, MESA's teacher
    forward unless --mesa 0, backward, clip, LAMB, EMA) on synthetic uint8 batches already on the
    device: no data loading. Every train.py flag applies (--eager, --mesa 0, --batch-size, ...).
    Under torchrun the step averages gradients over the processes as in training, and images/s
    counts all processes. Prints the one-off warm-up (compile + capture) time, images/s and the
    peak memory."""
    import train  # here, not at the top: train.py imports this module for --benchmark
    rank, world, device = train.setup_distributed()
    on_cpu = device.type == "cpu"
    if on_cpu and args.batch_size is None:
        args.batch_size = 8  # the recipe's 128 takes minutes a step on a CPU
    args.demo = False
    recipe.resolve_config(args, world)
    args.amp = args.amp or ("bf16" if not on_cpu else "none")
    log = print if rank == 0 else (lambda *a, **k: None)
    if on_cpu:
        log(f"benchmark on the CPU: slow (seconds a step at batch {args.batch_size}); the figures that matter "
            f"come from a GPU")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = build_model(args.variant, drop_path_rate=args.drop_path_rate, **recipe.model_overrides(args))
    model = model.to(device, memory_format=torch.channels_last).train()
    ema = ModelEma(model, args.ema_decay) if args.ema_decay > 0 else None
    fast = not on_cpu and not args.eager
    step = TrainStep(model, ema, train.make_optimizer(model, args), args, 1000, world, fast, log)
    batch, size = args.batch_size, args.img_size
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([data.erase_box(size, size, random.Random(i), args.reprob) for i in range(batch)],
                         device=device)  # (batch, 4), about reprob of them boxes
    labels = torch.randint(0, 1000, (batch,), device=device)
    use_mesa = ema is not None and args.mesa > 0  # MESA's teacher forward, as in the recipe's last 75%

    def run(n):
        for i in range(n):
            mix = torch.tensor(data.draw_mix(random.Random(i), size, size, args.mixup, args.cutmix), device=device)
            step([(x, boxes, labels, mix, i)] * args.accum_steps, 1e-3, use_mesa)
        if not on_cpu:
            torch.cuda.synchronize()

    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run(5)  # warm-up: the fast path compiles and captures here
    warmup = time.time() - t0
    t0 = time.time()
    run(args.benchmark_steps)
    seconds = time.time() - t0
    images = args.benchmark_steps * world * batch * args.accum_steps
    memory = "n/a on the CPU" if on_cpu else (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                                              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    log(f"benchmark: variant {args.variant}, {world} process(es) x batch {batch} x {args.accum_steps} micro-steps, "
        f"{size} px, amp {args.amp}, opt {args.opt}, EMA {'on' if ema else 'off'}, MESA {'on' if use_mesa else 'off'}, "
        f"{'fast path' if step.fast else 'eager'}: {images / seconds:.0f} images/s "
        f"({images / seconds / world:.0f} per process), {1000 * seconds / args.benchmark_steps:.1f} ms/step; "
        f"5 warm-up steps {warmup:.1f} s; peak memory {memory} (warm-up and capture included)")
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark harnesses: the data loader, one image's CPU stages, the selective scan (GPU)")
    commands = p.add_subparsers(dest="command", required=True)
    loader = commands.add_parser("loader", help="decode + augment images/s on photo-like JPEGs: Pillow "
                                 "(with and without JPEG draft mode) and, with --gpu, the GPU data path")
    add_loader_args(loader)
    stages = commands.add_parser("stages", help="where one training image's CPU time goes, stage by stage")
    stages.add_argument("--images", type=int, default=500, help="JPEG files to write and time")
    shape = stages.add_mutually_exclusive_group()
    shape.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="JPEG width and height")
    shape.add_argument("--imagenet-sizes", action="store_true", help="instead, ImageNet's mix of sizes")
    stages.add_argument("--quality", type=int, default=90, help="JPEG quality")
    stages.add_argument("--img-size", type=int, default=224, help="training image side")
    stages.add_argument("--batch-size", type=int, default=128, help="batch size for collate and transfer")
    add_scan_args(commands.add_parser("scan", help="time the CUDA selective-scan kernels against the "
                                      "reference at MambaVision's shapes (needs a GPU)"))
    args = p.parse_args(argv)
    if args.command == "loader":
        if min(args.workers) < 1 or args.images < (max(args.workers) + 2) * args.batch_size:
            loader.error("--workers must be >= 1 and --images at least (max --workers + 2) x --batch-size")
        loader_bench(args)
    elif args.command == "stages":
        if args.images < args.batch_size:
            stages.error("--images must be at least --batch-size")
        stages_bench(args)
    elif args.command == "scan":
        scan_bench(reference=not args.kernels_only)


if __name__ == "__main__":
    main()
