"""The selective scan of MambaVision's mixer (Mamba's S6 recurrence, Gu & Dao 2023, Sec. 3.2).

Glossary (code name -> paper symbol), shapes as the model passes them:
    u      (b, d, l)  input sequence x, one row per channel                    x_t
    delta  (b, d, l)  step size before the bias and softplus                   Delta_t
    A      (d, n)     state matrix (diagonal per channel, negative real)        A
    B      (b, n, l)  input matrix, shared by all d channels                    B_t
    C      (b, n, l)  output matrix, shared by all d channels                   C_t
    D      (d,)       skip connection                                           D
    delta_bias (d,)   added to delta before the softplus
    b batch (images x windows), d channels, l tokens in a window, n = d_state.

For every batch b, channel d and state n, with h_0 = 0 (zero-order-hold discretisation):
    dt_t  = softplus(delta_t + delta_bias_d)
    h_t,n = exp(dt_t * A_d,n) * h_{t-1},n + dt_t * B_t,n * u_t
    y_t   = sum_n C_t,n * h_t,n + D_d * u_t
"""
import ctypes
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
    """Readable sequential scan: a Python loop over l, vectorised over (b, d, n).

    This is the slow, obviously-correct form of the fused CUDA kernel. It accumulates in float32
    (float64 if the inputs are float64), returns y in u's dtype and is differentiable by autograd.
    """
    out_dtype, acc = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C, D, delta_bias = (t.to(acc) for t in (u, delta, A, B, C, D, delta_bias))
    dt = delta + delta_bias[:, None]                        # (b, d, l)
    if delta_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[..., None] * A[:, None, :])          # (b, d, l, n)  decay per step
    dBu = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, l, n)  input per step
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])     # (b, d, n)
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) + D[:, None] * u            # (b, d, l)
    return y.to(out_dtype)


def selective_scan_bwd_ref(u, delta, A, B, C, D, delta_bias, dy, delta_softplus=True):
    """Gradients of `selective_scan_ref` w.r.t. its seven tensors, written out by hand.

    This is the math the CUDA backward runs (scan_cuda.cu), in readable PyTorch: a forward loop
    keeps every state h_t, then a reverse-time loop carries g_t = dLoss/dh_t (per state n):
        g_t     = exp(dt_{t+1} A) g_{t+1} + dy_t C_t
        dC_t    = sum_d dy_t h_t          dB_t = sum_d g_t dt_t u_t
        du_t    = dt_t sum_n g_t B_t + D dy_t
        d(dt_t) = u_t sum_n g_t B_t + sum_n g_t h_{t-1} exp(dt_t A) A
        dA      = sum_{b,t} g_t h_{t-1} exp(dt_t A) dt_t,   ddelta = d(dt) * sigmoid(delta + delta_bias)
    Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype.
    """
    inputs = (u, delta, A, B, C, D, delta_bias)
    acc = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C, D, delta_bias, dy = (t.to(acc) for t in (*inputs, dy))
    x = delta + delta_bias[:, None]                         # (b, d, l)
    dt = F.softplus(x) if delta_softplus else x
    dA = torch.exp(dt[..., None] * A[:, None, :])          # (b, d, l, n)  decay per step
    Bt, Ct = B.transpose(1, 2)[:, None], C.transpose(1, 2)[:, None]  # (b, 1, l, n)
    dBu = (dt * u)[..., None] * Bt                          # (b, d, l, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])     # (b, d, n)
    hs = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        hs.append(h)
    hs = torch.stack(hs, dim=2)                             # (b, d, l, n)  h_t
    h_prev = F.pad(hs, (0, 0, 1, 0))[:, :, :-1]             # (b, d, l, n)  h_{t-1}
    g, gs = torch.zeros_like(h), []
    for t in reversed(range(u.shape[2])):
        g = g + dy[:, :, t, None] * Ct[:, :, t]             # dLoss/dh_t
        gs.append(g)
        g = dA[:, :, t] * g                                 # carried to h_{t-1}
    gs = torch.stack(gs[::-1], dim=2)                       # (b, d, l, n)
    gB = (gs * Bt).sum(-1)                                  # (b, d, l)
    gha = gs * h_prev * dA                                  # (b, d, l, n)  dLoss/d(decay) * decay
    du = dt * gB + D[:, None] * dy
    ddt = u * gB + (gha * A[:, None, :]).sum(-1)
    ddelta = ddt * torch.sigmoid(x) if delta_softplus else ddt
    grads = (
        du,
        ddelta,
        (gha * dt[..., None]).sum((0, 2)),                  # dA (d, n)
        (gs * (dt * u)[..., None]).sum(1).transpose(1, 2),  # dB (b, n, l)
        (dy[..., None] * hs).sum(1).transpose(1, 2),        # dC (b, n, l)
        (dy * u).sum((0, 2)),                               # dD (d,)
        ddelta.sum((0, 2)),                                 # ddelta_bias (d,)
    )
    return tuple(grad.to(inp.dtype).contiguous() for grad, inp in zip(grads, inputs))


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (scan_cuda.cu): built on first use, called directly in eager mode and through
# torch.library custom ops under torch.compile.

_KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dtype -> scan_cuda.cu's code
_KERNEL_MAX_STATE = 16
_build = {"tried": False, "error": None, "lib": None}  # outcome of the one build attempt of this process


def _scan_mode():
    """MAMBAVISION_SCAN: unset/'auto' (CUDA tensors -> kernel), 'ref' or 'cuda' force a path."""
    mode = os.environ.get("MAMBAVISION_SCAN", "") or "auto"
    if mode not in ("auto", "ref", "cuda"):
        raise ValueError(f"MAMBAVISION_SCAN={mode!r} is not valid: set it to 'ref' or 'cuda', or unset it")
    return mode


def _kernel_fits(u, A):
    return u.dtype in _KERNEL_DTYPES and A.shape[1] <= _KERNEL_MAX_STATE


def jit_build(source, what, include_paths=(), ldflags=(), cflags=()):
    """Compile `source` (a .cu file next to this one, with an extern "C" interface) for the visible
    GPU's architecture only, once: cached in ~/.cache/mambavision/<name>_sm<arch> (or under
    $MAMBAVISION_CACHE). Returns the library, loaded with ctypes. Used for the scan, jpeg.py's
    decoder and gpu_augment.py's kernels; `what` names it in the one line printed before a build."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (install nvcc or set CUDA_HOME)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    name = f"mambavision_{Path(source).stem.removesuffix('_cuda')}_sm{arch}"
    cache = Path(os.environ.get("MAMBAVISION_CACHE") or Path.home() / ".cache" / "mambavision") / name
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / f"{name}.so").exists():
        print(f"MambaVision: building {what} for sm_{arch} in {cache} (once, about 15 s)", file=sys.stderr, flush=True)
    path = cpp_extension.load(
        name=name,
        sources=[str(Path(__file__).with_name(source))],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", *cflags],
        extra_include_paths=list(include_paths),
        extra_ldflags=list(ldflags),
        build_directory=str(cache),
        is_python_module=False,  # a plain shared library, called by ctypes
    )
    return ctypes.CDLL(path)


def _build_extension():
    """Build scan_cuda.cu (jit_build); declare its functions and check its layout constants."""
    lib = jit_build("scan_cuda.cu", "the selective-scan kernel")
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.mv_scan_fwd.argtypes = [i32] * 6 + [ptr] * 10
    lib.mv_scan_bwd.argtypes = [i32] * 6 + [ptr] * 19
    lib.mv_scan_error_string.restype = ctypes.c_char_p
    for n in (1, 8, 9, 16):  # the fake impls must know the saved states' shape without the library
        if (lib.mv_scan_state_max(n), lib.mv_scan_seg_len(n)) != _state_layout(n):
            raise RuntimeError("scan.py's _state_layout disagrees with scan_cuda.cu (a stale build?)")
    return lib


def _kernels_ready(required):
    """Build the kernels once per process. On failure: raise if `required`, else warn once (with
    the reason) and return False so that the caller runs the reference."""
    if not _build["tried"]:
        _build["tried"] = True
        try:
            _build["lib"] = _build_extension()
        except Exception as e:  # a missing toolchain or a compiler error must not end the user's run
            _build["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if not required:
                warnings.warn(f"MambaVision: could not build the CUDA selective scan ({_build['error']}); "
                              "using the slower reference scan instead", RuntimeWarning, stacklevel=3)
    if _build["error"] is not None and required:
        raise RuntimeError(f"MAMBAVISION_SCAN=cuda, but the CUDA selective scan could not be built: "
                           f"{_build['error']}")
    return _build["error"] is None


def _check_launch(code):
    if code != 0:
        raise RuntimeError(f"selective scan CUDA kernel failed: {_build['lib'].mv_scan_error_string(code).decode()}")


def _state_layout(n):
    """(nmax, seg) of the segment states the training forward saves for d_state n, as in
    scan_cuda.cu: nmax floats per saved state (kernel's NMAX), one state every seg tokens (kSegLen)."""
    return (8, 8) if n <= 8 else (16, 4)


def _seg_state_shape(u, A):
    """Shape of the segment-entry states the training forward saves for the backward: (b, d,
    ceil(l / seg), nmax) float32 for tensors the kernel takes, (0,) for the reference."""
    (batch, dim, length), n = u.shape, A.shape[1]
    if not (u.device.type == "cuda" and _kernel_fits(u, A)):
        return (0,)
    nmax, seg = _state_layout(n)
    return (batch, dim, -(-length // seg), nmax)


def _kernel_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, y=None, seg_state=None):
    """y = scan(...) by scan_cuda.cu; inputs as _kernel_inputs returns them. `y`: an optional
    preallocated output (the tests pass one filled with NaN to prove every element is written).
    `seg_state` (shape from _seg_state_shape, float32): if given, the kernel also stores there the
    state entering every segment, for the backward; None (inference) skips that."""
    y = torch.empty_like(u) if y is None else y
    (batch, dim, length), n = u.shape, A.shape[1]
    if y.numel() == 0:
        return y
    with torch.cuda.device(u.device):
        _check_launch(_build["lib"].mv_scan_fwd(
            _KERNEL_DTYPES[u.dtype], batch, dim, length, n, int(delta_softplus),
            *(t.data_ptr() for t in (u, delta, A, B, C, D, delta_bias, y)),
            None if seg_state is None else seg_state.data_ptr(), torch.cuda.current_stream().cuda_stream))
    return y


def _kernel_bwd_buffers(u, A):
    """The backward's outputs, the seven gradients (du, ddelta in u's dtype and shape; dA (d, n),
    dD, ddelta_bias (d,) float32; dB, dC (b, n, l) in u's dtype), and its work buffers: per-block
    partials of dB and dC and per-(b, d) partials of dA, dD, ddelta_bias."""
    lib, (batch, dim, length), n = _build["lib"], u.shape, A.shape[1]
    nmax = lib.mv_scan_state_max(n)
    f32 = dict(device=u.device, dtype=torch.float32)
    return dict(du=torch.empty_like(u), ddelta=torch.empty_like(u), dA=torch.empty(dim, n, **f32),
                dB=u.new_empty(batch, n, length), dC=u.new_empty(batch, n, length),
                dD=torch.empty(dim, **f32), ddelta_bias=torch.empty(dim, **f32),
                dBC_part=torch.empty(lib.mv_scan_channel_blocks(dim), batch, 2 * n, length, **f32),
                dADb_part=torch.empty(batch, dim, nmax + 2, **f32))


def _kernel_bwd(u, delta, A, B, C, D, delta_bias, seg_state, dy, delta_softplus, buffers=None):
    """The seven gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) by scan_cuda.cu, from the
    segment states the training forward saved; two launches, the second summing the first's
    partials in a fixed order (deterministic). `buffers`: optional, as _kernel_bwd_buffers returns
    them (the tests pass NaN-filled ones)."""
    lib, (batch, dim, length), n = _build["lib"], u.shape, A.shape[1]
    buf = _kernel_bwd_buffers(u, A) if buffers is None else buffers
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
    if u.numel() == 0:
        for name in ("dA", "dD", "ddelta_bias"):
            buf[name].zero_()
    else:
        with torch.cuda.device(u.device):
            _check_launch(lib.mv_scan_bwd(
                _KERNEL_DTYPES[u.dtype], batch, dim, length, n, int(delta_softplus),
                *(t.data_ptr() for t in (u, delta, A, B, C, D, delta_bias, seg_state, dy)),
                *(buf[k].data_ptr() for k in ("du", "ddelta", "dBC_part", "dADb_part", "dB", "dC", "dA", "dD",
                                              "ddelta_bias")),
                torch.cuda.current_stream().cuda_stream))
    return tuple(buf[name] for name in names)


def _use_kernel(u, A):
    return u.is_cuda and _kernel_fits(u, A) and _kernels_ready(required=_scan_mode() == "cuda")


def _kernel_inputs(u, delta, A, B, C, D, delta_bias):
    """Contiguous inputs in the kernel's dtypes: u, delta, B, C share one dtype (float32 if mixed)."""
    dtype = u.dtype if delta.dtype == B.dtype == C.dtype == u.dtype else torch.float32
    return (*(t.to(dtype).contiguous() for t in (u, delta)), A.float().contiguous(),
            *(t.to(dtype).contiguous() for t in (B, C)), D.float().contiguous(), delta_bias.float().contiguous())


# Three custom ops, the kernels as torch.compile sees them (eager mode takes _EagerScan below, the
# same kernels with less dispatch). Inference runs `selective_scan` (y only). Training runs
# `selective_scan_train`, whose forward also returns the segment-entry states that
# `selective_scan_backward` starts from, so the backward needs no forward pass of its own; autograd
# saves them between the two.

@torch.library.custom_op("mambavision::selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool) -> torch.Tensor:
    with torch.autocast(u.device.type, enabled=False):
        if not _use_kernel(u, A):
            return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
        args = _kernel_inputs(u, delta, A, B, C, D, delta_bias)
        return _kernel_fwd(*args, delta_softplus).to(u.dtype)


@_scan_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    return u.new_empty(u.shape)


@torch.library.custom_op("mambavision::selective_scan_train", mutates_args=())
def _scan_train_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, seg_state): y as `selective_scan`, and the states the backward starts from (shape from
    _seg_state_shape; zeros where the reference runs, which needs none)."""
    seg_state = u.new_empty(_seg_state_shape(u, A), dtype=torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        if not _use_kernel(u, A):
            return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus), seg_state.zero_()
        args = _kernel_inputs(u, delta, A, B, C, D, delta_bias)
        return _kernel_fwd(*args, delta_softplus, seg_state=seg_state).to(u.dtype), seg_state


@_scan_train_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    return u.new_empty(u.shape), u.new_empty(_seg_state_shape(u, A), dtype=torch.float32)


@torch.library.custom_op("mambavision::selective_scan_backward", mutates_args=())
def _scan_backward_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    delta_bias: torch.Tensor, seg_state: torch.Tensor, dy: torch.Tensor, delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = (u, delta, A, B, C, D, delta_bias)
    with torch.autocast(u.device.type, enabled=False):
        if not _use_kernel(u, A):
            return selective_scan_bwd_ref(*inputs, dy, delta_softplus)
        args = _kernel_inputs(*inputs)
        grads = _kernel_bwd(*args, seg_state, dy.to(args[0].dtype).contiguous(), delta_softplus)
        return tuple(grad.to(inp.dtype) for grad, inp in zip(grads, inputs))


@_scan_backward_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, seg_state, dy, delta_softplus):
    return tuple(t.new_empty(t.shape) for t in (u, delta, A, B, C, D, delta_bias))


def _scan_setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.save_for_backward(*tensors)


def _scan_backward(ctx, dy):
    """Backward of the inference op (called with inputs that need gradients, which
    `selective_scan` routes to the training op instead): recompute the states first."""
    _, seg_state = _scan_train_op(*ctx.saved_tensors, ctx.delta_softplus)
    grads = _scan_backward_op(*ctx.saved_tensors, seg_state, dy, ctx.delta_softplus)
    return (*grads, None)


def _scan_train_setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, output[1])


def _scan_train_backward(ctx, dy, _dseg_state):
    *inputs, seg_state = ctx.saved_tensors
    grads = _scan_backward_op(*inputs, seg_state, dy, ctx.delta_softplus)
    return (*grads, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)
_scan_train_op.register_autograd(_scan_train_backward, setup_context=_scan_train_setup_context)


class _EagerScan(torch.autograd.Function):
    """The training op's forward and backward as a plain autograd.Function, for eager mode: the same
    kernels and results, without the custom ops' Python dispatch (about 0.3-0.5 ms of host time a
    call, which an eager training step pays twice per mixer, and which bounds it: the GPU waits)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        args = _kernel_inputs(u, delta, A, B, C, D, delta_bias)
        seg_state = u.new_empty(_seg_state_shape(u, A), dtype=torch.float32)
        y = _kernel_fwd(*args, delta_softplus, seg_state=seg_state)
        ctx.delta_softplus, ctx.dtypes = delta_softplus, [t.dtype for t in (u, delta, A, B, C, D, delta_bias)]
        ctx.save_for_backward(*args, seg_state)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, dy):
        *args, seg_state = ctx.saved_tensors
        grads = _kernel_bwd(*args, seg_state, dy.to(args[0].dtype).contiguous(), ctx.delta_softplus)
        return (*(grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)), None)


def selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
    """The one entry the model calls. Arguments as in the module docstring; returns y (b, d, l).

    CUDA tensors run the fused kernels of scan_cuda.cu (built on first use), others the reference;
    when gradients are needed, the training forward also saves the states the backward starts from;
    MAMBAVISION_SCAN=ref or =cuda forces one path. The kernels take u, delta, B, C in float32,
    float16 or bfloat16 and d_state up to 16; anything else runs the reference. Under torch.compile
    the kernels are reached through the custom ops above (it cannot trace a ctypes call), in eager
    mode directly (_EagerScan): the same kernels and the same bits.
    """
    if u.device.type == "meta":  # shapes only (FLOP counts, shape checks): the op's fake impl
        return _scan_op(u, delta, A, B, C, D, delta_bias, delta_softplus)
    mode = _scan_mode()
    if mode == "cuda" and not (u.is_cuda and _kernel_fits(u, A)):
        raise ValueError(f"MAMBAVISION_SCAN=cuda needs CUDA tensors in float32/float16/bfloat16 and d_state <= "
                         f"{_KERNEL_MAX_STATE}; got {u.dtype} on {u.device}, d_state {A.shape[1]}: unset it to "
                         "run the reference")
    if mode == "ref" or not (u.is_cuda and _kernel_fits(u, A)):
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    tensors = (u, delta, A, B, C, D, delta_bias)
    train = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        return _scan_train_op(*tensors, delta_softplus)[0] if train else _scan_op(*tensors, delta_softplus)
    if not _use_kernel(u, A):  # the kernel could not be built (warned once)
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if train:
        return _EagerScan.apply(*tensors, delta_softplus)
    return _kernel_fwd(*_kernel_inputs(*tensors), delta_softplus).to(u.dtype)


def scan_path(device):
    """Which scan the model runs on `device`: the CUDA kernel, or the reference and why. Read it after
    a forward pass, since the kernel is built on first use."""
    if device.type != "cuda" or _scan_mode() == "ref":
        return "reference (PyTorch loop)"
    if _build["lib"] is not None:
        return "CUDA kernel (scan_cuda.cu)"
    return f"reference (PyTorch loop; kernel unavailable: {_build['error']})"
