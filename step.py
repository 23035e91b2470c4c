"""One optimizer step of the MambaVision recipe, and the fast path that replays it as CUDA graphs.

    step = TrainStep(model, ema, optimizer, settings, num_classes, world_size, fast=True)
    loss, grad_norm, finite = step(micro_batches, lr, use_mesa).tolist()   # .tolist() waits for the GPU

A step, for each micro-batch (uint8 images, erase boxes, labels, mixup/cutmix choice, seed):
normalise and erase, mixup/cutmix, forward, soft-target cross-entropy (+ MESA's distillation from
the EMA teacher), backward of loss / micro-batches: it stores fresh gradients in .grad (no add into
zeros), and with several micro-batches their sum is kept aside between them. Then, on several processes, one
all-reduce averages the gradients and the BatchNorm running statistics (so every rank holds the
same network at every step), and the gradient norm decides:
    finite     -> clip, optimizer (LAMB), EMA update;
    not finite -> the step is skipped: the weights, the optimizer's moments and step count stay as
                  they were, the BatchNorm statistics its forward moved are put back (the EMA takes
                  its usual step towards the unchanged network, as timm's does).
The decision is taken on the device (the kernels read a 0/1 tensor), so the host never waits for
the GPU inside a step: it queues the next step while the GPU runs this one (and waits, without
spinning, only when it is QUEUED_STEPS ahead).

The fast path (`fast=True`, CUDA only): the model and the EMA teacher are torch.compile'd, and the
step's two halves, one micro-batch's forward + backward and the update (clip, optimizer, EMA), are
each captured once as a CUDA graph (`CapturedCall`) and replayed: two launches a micro-batch
instead of ~1,500 kernels launched one by one from Python, which is what bounds an eager
MambaVision step. The learning rate and the mixup choice enter the graphs as device tensors and
the finite test is one, so one capture serves the whole schedule; the forward graph is captured
again only when MESA switches on (and the update after it: it reads the gradients where the
forward graph's backward writes them). Where compiling or capturing fails, one warning names the reason
and the step goes on eagerly: the same function, with the same results up to rounding.
"""
import collections
import contextlib
import copy
import math
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data

LAMB_MAX_GRAD_NORM = 1.0  # the official LAMB (timm's) clips the global gradient norm to 1 in its step
# Steps the host may have queued on the GPU (TrainStep.__call__): one running, one waiting is all the
# GPU needs. Fewer queued steps shorten the GPU data path's waits behind them (T's real run +3% with
# CUDA's default 8 work queues, BENCHMARKS.md 2026-12-06; train.py now asks for 32).
QUEUED_STEPS = 2


# ----------------------------------------------------------------------------------------------
# Losses

def soft_cross_entropy(logits, target):
    """Cross-entropy against soft targets (B, K): -sum_k target * log_softmax(logits), mean over the
    batch, in float32 (F.cross_entropy takes probabilities as the target: fewer launches than the
    sum written out)."""
    return F.cross_entropy(logits.float(), target)


def mesa_loss(logits, ema_logits, weight, temperature=3.0):
    """MESA (Du et al. 2022): self-distillation from the EMA, weight * 50 * KL(student || teacher) at T=3."""
    return weight * 50 * F.kl_div(F.log_softmax(logits.float() / temperature, dim=-1),
                                  F.softmax(ema_logits.float() / temperature, dim=-1), reduction="batchmean")


# ----------------------------------------------------------------------------------------------
# Optimizer and EMA

class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), as the official run had it.

    Per step t, with g the gradient (already clipped by TrainStep):
        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p
        r = ||p|| / ||u||   (1 where either norm is 0; only where wd > 0, else r = 1)
        p = p - lr * r * u
    The layer-wise trust ratio r is skipped for the no-decay group (biases, norms), as in the
    reference implementation the authors trained with. With trust_ratio=False this is AdamW
    (p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps), the decay decoupled from the moments).
    `lr` is given to step(), a float or a 0-dim tensor on the device, and the step count t lives
    on the device too: no host value changes from step to step, so a CUDA graph can hold the step.
    Fused and torch._foreach_* kernels: a few launches per step for all parameters, not a dozen per tensor.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, trust_ratio=True):
        super().__init__(params, dict(betas=tuple(betas), eps=eps, weight_decay=0.0))
        self.trust_ratio, self.scratch, self.lists = trust_ratio, {}, None

    @torch.no_grad()
    def step(self, lr, grad_scale=None, skip=None):
        """One step. grad_scale (0-dim tensor): the gradients are divided by it first (the clip and
        the fp16 loss scale in one number); skip (0-dim float tensor): 1 leaves the weights, the
        moments and t as they were (a non-finite step), decided on the device, not the host.
        The Adam part (m, v, and the bias-corrected direction) is PyTorch's fused AdamW kernel,
        one pass over the parameters; LAMB adds the trust ratio on top."""
        keep = 1 - skip if skip is not None else 1.0
        for index, (group, (params, m, v, steps)) in enumerate(zip(self.param_groups, self._state_lists())):
            if not params:
                continue
            (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            grads = [p.grad for p in params]
            torch._foreach_add_(steps, [keep] * len(steps))  # a list: adding one tensor to all is not capturable
            adam = dict(beta1=b1, beta2=b2, eps=eps, amsgrad=False, maximize=False, grad_scale=grad_scale,
                        found_inf=skip)
            if wd > 0 and self.trust_ratio:
                # u = m_hat / (sqrt(v_hat) + eps): AdamW with lr -1 and no decay, run on zeros
                update = self._zeros(index, params)
                torch._fused_adamw_(update, grads, m, v, [], steps, lr=-1.0, weight_decay=0.0, **adam)
                torch._foreach_add_(update, params, alpha=wd)                      # u + wd * p
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(update))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(update, list((-lr * keep * trust).unbind()))  # -lr * r, one per tensor
                torch._foreach_add_(params, update)
            else:  # p = p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps)
                torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, weight_decay=wd, **adam)

    def _state_lists(self):
        """Per group: (params, exp_avg, exp_avg_sq, t) as lists, made when the state is (first step,
        load_state_dict) and kept: four lookups per tensor are host time an eager step waits on."""
        if self.lists is None:
            for p in (p for g in self.param_groups for p in g["params"]):
                if not self.state[p]:  # t as a float tensor: load_state_dict moves it to p's device
                    self.state[p].update(t=torch.zeros((), dtype=p.dtype, device=p.device), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
            self.lists = [(g["params"], *([self.state[p][k] for p in g["params"]] for k in ("exp_avg", "exp_avg_sq", "t")))
                          for g in self.param_groups]
        return self.lists

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.lists = None  # the state's tensors are new ones

    def _zeros(self, index, params):
        """Zeroed tensors shaped as group `index`'s `params`, made once and kept (a CUDA graph needs
        fixed addresses)."""
        if index not in self.scratch:
            self.scratch[index] = [torch.zeros_like(p) for p in params]
        torch._foreach_zero_(self.scratch[index])
        return self.scratch[index]


def param_groups(model, weight_decay):
    """Two groups: weights that decay, and 1-D parameters (norms, layer scales, D) and biases that don't."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class ModelEma:
    """An exponential moving average of the weights (and BatchNorm statistics), kept in eval mode:
    ema = decay * ema + (1 - decay) * model after every optimizer step."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.floats = [[e for e, m in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()]]
        self.others = [[e for e, m in pairs if not e.is_floating_point()],  # BatchNorm's num_batches_tracked
                       [m for e, m in pairs if not e.is_floating_point()]]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(*self.floats, 1 - self.decay)
        if self.others[0]:
            torch._foreach_copy_(*self.others)


def batchnorm_statistics(model):
    """The BatchNorm running means and variances: what a training forward changes besides the weights."""
    return [buf for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None for buf in (m.running_mean, m.running_var)]


class BufferSnapshot:
    """A module's buffers (BatchNorm statistics and counters), saved before a step and put back after
    a skipped one in a few launches: per dtype one flat copy and multi-tensor copies through views
    made once, not two kernels and a few Python calls a buffer."""

    def __init__(self, buffers):
        groups = {}
        for b in buffers:
            groups.setdefault(b.dtype, []).append(b)
        self.groups = list(groups.values())
        self.saved = [torch.cat([b.reshape(-1) for b in g]) for g in self.groups]  # flat, one per dtype
        self.current = [torch.empty_like(f) for f in self.saved]
        self.saved_views, self.current_views = ([self._views(f, g) for f, g in zip(flats, self.groups)]
                                                for flats in (self.saved, self.current))

    @staticmethod
    def _views(flat, buffers):
        return [f.view_as(b) for f, b in zip(flat.split([b.numel() for b in buffers]), buffers)]

    def save(self):
        for group, saved in zip(self.groups, self.saved_views):
            torch._foreach_copy_(saved, group)

    def restore(self, unless=None):
        """Put the saved values back; with `unless` (a 0-dim bool tensor), only where it is False."""
        for i, group in enumerate(self.groups):
            if unless is None:
                torch._foreach_copy_(group, self.saved_views[i])
                continue
            torch._foreach_copy_(self.current_views[i], group)  # group -> flat, where, flat -> group
            torch.where(unless, self.current[i], self.saved[i], out=self.current[i])
            torch._foreach_copy_(group, self.current_views[i])


def all_reduce_mean_(tensors):
    """Average tensors over the ranks, in place, with one collective on one flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


# ----------------------------------------------------------------------------------------------
# The step

class TrainStep:
    """One optimizer step (see the module docstring); `fast` turns on the fast path.

    settings: the run's configuration with mesa, smoothing, clip_grad, opt, amp, accum_steps.
    __call__(micro_batches, lr, use_mesa) with micro_batches [(x uint8 (B, 3, S, S) channels_last,
    erase boxes (B, 4), labels (B,), mix (6,) from data.draw_mix, seed)], all on the device.
    Returns a (3,) float tensor on the device: (mean loss over the micro-batches, gradient norm
    before clipping, finite 1 or 0); 0 means the step was skipped. Reading it waits for the GPU, so
    the caller reads several steps' results at once, now and then."""

    def __init__(self, model, ema, optimizer, settings, num_classes, world_size, fast, log=print):
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.num_classes, self.world_size, self.settings = num_classes, world_size, settings
        device = next(model.parameters()).device
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads = []  # the gradients the update reads: where the last backward stored them
        self.grad_sum = None  # with several micro-batches: the sum of those before the last
        self.statistics = batchnorm_statistics(model)
        self.buffers = BufferSnapshot(list(model.buffers()))
        self.mean = torch.tensor(data.IMAGENET_MEAN, device=device)
        self.std = torch.tensor(data.IMAGENET_STD, device=device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[settings.amp]
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        # One clip: the recipe's --clip-grad 5 followed by LAMB's own clip at 1 is a clip at 1.
        limits = [settings.clip_grad] if settings.clip_grad > 0 else []
        if settings.clip_grad > 0 and settings.opt == "lamb":
            limits.append(LAMB_MAX_GRAD_NORM)
        self.max_norm = min(limits, default=math.inf)
        # fp16: dynamic loss scaling (the loss is multiplied by `loss_scale` before backward; halved
        # on every overflow, which skips the step, doubled after 2000 good steps in a row)
        self.loss_scale = torch.ones((), device=device)
        self.lr = torch.zeros((), device=device)  # filled each step: the graphs read it there
        self.scaling, self.good_steps = settings.amp == "fp16", torch.zeros((), device=device)
        if self.scaling:
            self.loss_scale.fill_(2.0 ** 16)
        self.fast = fast
        self.student, self.teacher = model, ema.module if ema is not None else None
        self.forward_backward, self.update = self._forward_backward, self._update
        if fast:
            self.student = torch.compile(model)
            self.teacher = torch.compile(self.teacher) if self.teacher is not None else None
            self.forward_backward = CapturedCall(self._forward_backward, "forward + backward", log)
            self.update = CapturedCall(self._update, "clip + optimizer + EMA", log)
        self.queued = collections.deque()  # CUDA: an event after each step still queued on the GPU

    def _forward_backward(self, x, boxes, labels, mix, use_mesa):
        """One micro-batch: returns its loss (detached); its gradients are stored fresh in .grad."""
        for p in self.params:  # inside a captured graph: into the graph's memory, rewritten by every replay
            p.grad = None
        self.grads = []  # nor keep the last ones alive beside them (a replay does not run this line)
        x = data.normalize_and_erase(x, boxes, self.mean, self.std)       # uint8 -> normalised float32
        x, target = data.mix_batch(x, labels, mix, self.num_classes, self.settings.smoothing)
        with self.autocast:
            logits = self.student(x)                                        # (B, num_classes)
            loss = soft_cross_entropy(logits, target)
            if use_mesa:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                loss = loss + mesa_loss(logits, teacher_logits, self.settings.mesa)
        (loss * (self.loss_scale / self.settings.accum_steps)).backward()
        return loss.detach()

    def _update(self, loss, lr):
        """After the micro-batches: the gradient norm, the finite test, clip (and undo the fp16 loss
        scale), optimizer step, EMA update; returns (loss, grad_norm, finite).
        Everything stays on the device: a non-finite step is skipped by the kernels (`skip`), and
        the BatchNorm statistics its forward moved are put back, without the host waiting."""
        norms = torch.stack(torch._foreach_norm(self.grads + self.statistics))  # one launch for both
        grad_norm = torch.linalg.vector_norm(norms[:len(self.grads)]) / self.loss_scale
        # inf or NaN anywhere, or a gradient norm too large to square; ranks agree: the norms are of
        # the averaged gradients and statistics
        finite = torch.isfinite(grad_norm + norms.sum())
        clip = torch.clamp(self.max_norm / (grad_norm + 1e-6), max=1.0) if self.max_norm < math.inf else 1.0
        self.optimizer.step(lr, grad_scale=self.loss_scale / clip, skip=(~finite).float())
        self.buffers.restore(unless=finite)
        if self.ema is not None:  # as timm's: the EMA steps also when the step was skipped
            self.ema.update()
        if self.scaling:  # halve the scale on an overflow, double it after 2000 good steps in a row
            good = torch.where(finite, self.good_steps + 1, 0)
            self.loss_scale.mul_(torch.where(finite, torch.where(good == 2000, 2.0, 1.0), 0.5))
            self.good_steps.copy_(torch.where(good == 2000, 0, good))
        return torch.stack([loss, grad_norm, finite.float()])

    def __call__(self, micro_batches, lr, use_mesa):
        result = self._fast_or_eager_step(micro_batches, lr, use_mesa)
        if result.is_cuda:  # the host keeps at most QUEUED_STEPS ahead; waiting lets go of the CPU
            self.queued.append(torch.cuda.Event(blocking=True))
            self.queued[-1].record()
            while len(self.queued) > QUEUED_STEPS:
                self.queued.popleft().synchronize()
        return result

    def _fast_or_eager_step(self, micro_batches, lr, use_mesa):
        if self.fast:
            try:
                return self._step(micro_batches, lr, use_mesa)
            except FastPathUnavailable as e:
                warnings.warn(f"the fast training path is off ({e}): training eagerly", stacklevel=2)
                self.buffers.restore()  # the failed try moved nothing else
                self.fast, self.student = False, self.model
                self.teacher = self.ema.module if self.ema is not None else None
                self.forward_backward, self.update = self._forward_backward, self._update
        return self._step(micro_batches, lr, use_mesa)

    def _step(self, micro_batches, lr, use_mesa):
        self.buffers.save()  # a skipped step puts the statistics back
        loss = 0.0
        for i, (x, boxes, labels, mix, seed) in enumerate(micro_batches):
            torch.manual_seed(seed)  # erase noise and drop path draw from torch's generator
            loss = loss + self.forward_backward(x, boxes, labels, mix, use_mesa=use_mesa)
            if i < len(micro_batches) - 1:  # the next backward overwrites .grad: keep the sum so far
                if self.grad_sum is None:
                    self.grad_sum = [torch.zeros_like(p) for p in self.params]
                (torch._foreach_add_ if i else torch._foreach_copy_)(self.grad_sum, self._gradients())
        grads = self._gradients()
        if len(micro_batches) > 1:
            torch._foreach_add_(grads, self.grad_sum)
        if self.world_size > 1:
            all_reduce_mean_(self.grads + self.statistics)
        return self.update(loss / len(micro_batches), self.lr.fill_(lr)).clone()  # a replay overwrites its output

    def _gradients(self):
        """The parameters' .grad as the last backward left them (zeros where it reached none), kept in
        self.grads for the update. Where they moved (eager steps; a new forward graph), the update's
        graph, which reads them at fixed addresses, is captured again."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if len(grads) != len(self.grads) or any(g is not h for g, h in zip(grads, self.grads)):
            self.grads = grads
            if isinstance(self.update, CapturedCall):
                self.update.forget()
        return self.grads


# ----------------------------------------------------------------------------------------------
# The fast path's one piece of machinery

class FastPathUnavailable(RuntimeError):
    """Compiling or capturing the step failed: TrainStep goes on eagerly."""


class CaptureLock:
    """Keeps other threads' GPU work out of a CUDA graph capture: the GPU data path's threads each
    hold it `shared()` around a batch's decode and augmentation, together; a capture holds it
    `exclusive()`, alone. A capture waiting for it holds off new shared holders, so it gets it."""

    def __init__(self):
        self.cond, self.holders, self.capturing = threading.Condition(), 0, False

    @contextlib.contextmanager
    def shared(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.capturing)
            self.holders += 1
        try:
            yield
        finally:
            with self.cond:
                self.holders -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.capturing)
            self.capturing = True
            self.cond.wait_for(lambda: self.holders == 0)
        try:
            yield
        finally:
            with self.cond:
                self.capturing = False
                self.cond.notify_all()


CAPTURE_LOCK = CaptureLock()  # the one of this process (data.GpuBatches takes it too)


class CapturedCall:
    """fn(*tensors, **static) replayed as a CUDA graph.

    For each new value of the keyword arguments (MESA on or off), the first `warmup` calls run fn
    on a side stream (compilation, cuDNN autotuning and lazy allocations happen there, for real:
    they are training steps), the next one captures fn and replays it; after that every call copies
    its tensor arguments into the captured inputs and replays. Only the latest capture is kept.
    The capture runs in thread-local mode (the loader's pin-memory thread may use CUDA meanwhile) and
    holds CAPTURE_LOCK alone (the GPU data path's threads share it around each batch's GPU work).
    A replay recomputes everything fn computed, so fn must not branch on tensor values, and reads
    random numbers from torch's generator as seeded before the call (torch.manual_seed).
    """

    def __init__(self, fn, name, log, warmup=2):
        self.fn, self.name, self.log, self.warmup = fn, name, log, warmup
        self.key, self.calls, self.graph = None, 0, None

    def forget(self):
        """Drop the capture (what it reads moved): the next calls warm up and capture again."""
        self.key = None

    def __call__(self, *args, **static):
        if static != self.key:
            self.key, self.calls, self.graph = static, 0, None  # drop the old graph and its memory
            self.started = time.time()
        try:
            if self.graph is None and self.calls < self.warmup:
                self.calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.fn(*args, **static)
                torch.cuda.current_stream().wait_stream(side)
                return out
            if self.graph is None:
                self.inputs = [a.clone() for a in args]  # same strides: channels_last stays channels_last
                graph = torch.cuda.CUDAGraph()
                with CAPTURE_LOCK.exclusive(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.output = self.fn(*self.inputs, **static)
                self.graph = graph
                self.log(f"fast path: {self.name}{''.join(f', {k} {v}' for k, v in static.items())} compiled "
                         f"and captured in {time.time() - self.started:.1f} s ({self.warmup} warm-up steps, one capture)")
        except Exception as e:  # compiling or capturing failed; a capture has changed nothing yet
            raise FastPathUnavailable(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from e
        for captured, a in zip(self.inputs, args):
            captured.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.output
