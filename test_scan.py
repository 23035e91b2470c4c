"""Tests of the selective scan's fast path (scan_cuda.cu, called directly in eager mode and through
scan.py's custom ops under torch.compile) and its dispatch.

CPU tests (CI): the hand-written backward against autograd, the plumbing of the eager path's
autograd.Function and of the custom ops (opcheck, torch.compile fullgraph), the MAMBAVISION_SCAN
switch and the build-failure fallback.
GPU tests (skipped without CUDA): the kernels against the float64 reference at many shapes,
every output proven written, bitwise determinism, opcheck, and the whole model.
"""
import math

import pytest
import torch

import scan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")


def make_inputs(batch, d, l, n, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random inputs in realistic ranges (never zeros); A, D, delta_bias in float32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    u, delta = rand(batch, d, l), 0.5 * rand(batch, d, l) - 1.0
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=g))
    B, C = rand(batch, n, l), rand(batch, n, l)
    D, delta_bias = rand(d), 0.5 * rand(d)
    tensors = [t.to(device) for t in (u, delta, A, B, C, D, delta_bias)]
    for i in (0, 1, 3, 4):
        tensors[i] = tensors[i].to(dtype)
    dy = rand(batch, d, l).to(device=device, dtype=dtype)
    return tensors, dy


def rel_err(a, b):
    """||a - b|| / ||b||; the plain ||a - b|| where b is exactly zero (e.g. dA when l = 1)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1.0 if b.abs().max() == 0 else 0.0)).item()


def ref_grads(inputs, dy, delta_softplus=True):
    """Forward and the seven gradients by autograd through the reference, in float64."""
    x = [t.detach().double().requires_grad_() for t in inputs]
    y = scan.selective_scan_ref(*x, delta_softplus=delta_softplus)
    return y, torch.autograd.grad(y, x, dy.double())


# ------------------------------------------------------------------ CPU: math and plumbing

@pytest.mark.parametrize("delta_softplus", [True, False])
def test_backward_reference_matches_autograd(delta_softplus):
    inputs, dy = make_inputs(2, 3, 9, 4, dtype=torch.float64)
    inputs = [t.double() for t in inputs]
    _, want = ref_grads(inputs, dy, delta_softplus)
    got = scan.selective_scan_bwd_ref(*inputs, dy, delta_softplus)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == inputs[NAMES.index(name)].dtype, name
        assert rel_err(g, w) < 1e-12, name


def test_op_on_cpu_runs_the_reference_with_gradients():
    inputs, dy = make_inputs(2, 5, 7, 3)
    want_y, want = ref_grads(inputs, dy)
    x = [t.clone().requires_grad_() for t in inputs]
    y = torch.ops.mambavision.selective_scan(*x, True)
    y.backward(dy)
    assert rel_err(y, want_y) < 1e-5
    for name, t, w in zip(NAMES, x, want):
        assert rel_err(t.grad, w) < 1e-4, name


def test_eager_function_plumbing_cpu(monkeypatch):
    """The eager path's autograd.Function (_EagerScan), its two kernel calls stood in by the
    reference: what it saves, its dtype casts and the order of its gradients give autograd's
    gradients of the reference. B in bfloat16 makes it cast the inputs to float32 and back."""
    monkeypatch.setattr(scan, "_kernel_fwd", lambda *args, seg_state=None: scan.selective_scan_ref(*args))
    monkeypatch.setattr(scan, "_kernel_bwd", lambda u, delta, A, B, C, D, bias, seg_state, dy, softplus:
                        scan.selective_scan_bwd_ref(u, delta, A, B, C, D, bias, dy, softplus))
    inputs, dy = make_inputs(2, 6, 11, 4, seed=9)
    inputs[3] = inputs[3].to(torch.bfloat16)
    want_y, want = ref_grads(inputs, dy)
    x = [t.clone().requires_grad_() for t in inputs]
    y = scan._EagerScan.apply(*x, True)
    y.backward(dy)
    assert y.dtype == torch.float32 and rel_err(y, want_y) < 1e-5
    for name, t, w in zip(NAMES, x, want):
        assert t.grad.dtype == t.dtype, name
        assert rel_err(t.grad, w) < (1e-2 if t.dtype == torch.bfloat16 else 1e-4), name


def opcheck_all(inputs, dy):
    """torch.library.opcheck on the three ops (schema, fake impl, autograd registration, AOT)."""
    x = [t.clone().requires_grad_() for t in inputs]
    ops = torch.ops.mambavision
    torch.library.opcheck(ops.selective_scan.default, (*x, True))
    torch.library.opcheck(ops.selective_scan_train.default, (*x, True))
    _, seg_state = ops.selective_scan_train(*inputs, True)
    torch.library.opcheck(ops.selective_scan_backward.default, (*inputs, seg_state, dy, True))


def test_opcheck_cpu():
    opcheck_all(*make_inputs(2, 3, 5, 2))


@pytest.mark.parametrize("op", ["selective_scan", "selective_scan_train"])
def test_op_compiles_fullgraph_cpu(op):
    inputs, dy = make_inputs(2, 3, 6, 2)

    def loss(*x):
        y = getattr(torch.ops.mambavision, op)(*x, True)
        return ((y[0] if isinstance(y, (tuple, list)) else y) * dy).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x1 = [t.clone().requires_grad_() for t in inputs]
    x2 = [t.clone().requires_grad_() for t in inputs]
    loss(*x1).backward()
    compiled(*x2).backward()
    for name, a, b in zip(NAMES, x1, x2):
        assert rel_err(b.grad, a.grad) < 1e-6, name


def test_mode_switch(monkeypatch):
    calls = []
    real_ref = scan.selective_scan_ref
    monkeypatch.setattr(scan, "selective_scan_ref", lambda *a, **k: calls.append(1) or real_ref(*a, **k))
    inputs, _ = make_inputs(1, 2, 3, 2)
    for mode in ("", "auto", "ref"):
        monkeypatch.setenv("MAMBAVISION_SCAN", mode)
        scan.selective_scan(*inputs)
    assert len(calls) == 3  # CPU tensors take the reference unless forced otherwise
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    with pytest.raises(ValueError, match="MAMBAVISION_SCAN=cuda needs CUDA tensors"):
        scan.selective_scan(*inputs)
    monkeypatch.setenv("MAMBAVISION_SCAN", "fast")
    with pytest.raises(ValueError, match="'ref' or 'cuda'"):
        scan.selective_scan(*inputs)


def test_build_failure_warns_once_then_reference(monkeypatch):
    def broken_build():
        raise RuntimeError("nvcc failed\nscan_cuda.cu(12): error: something")

    monkeypatch.setattr(scan, "_build_extension", broken_build)
    monkeypatch.setattr(scan, "_build", {"tried": False, "error": None})
    with pytest.warns(RuntimeWarning, match="could not build the CUDA selective scan .*error: something"):
        assert scan._kernels_ready(required=False) is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must stay silent
        assert scan._kernels_ready(required=False) is False
    with pytest.raises(RuntimeError, match="MAMBAVISION_SCAN=cuda, but .* could not be built"):
        scan._kernels_ready(required=True)


# ------------------------------------------------------------------ GPU: the kernels

def kernel_run(inputs, dy, delta_softplus=True):
    """Forward and the seven gradients straight from the kernels, into outputs and buffers filled
    with NaN beforehand: an element the kernels fail to write stays NaN. The training forward
    (which also saves the segment states) must give the same bits as the inference one."""
    assert scan._kernels_ready(required=True)
    args = scan._kernel_inputs(*inputs)
    nan = float("nan")
    y = scan._kernel_fwd(*args, delta_softplus, y=torch.full_like(args[0], nan))
    seg_state = torch.full(scan._seg_state_shape(args[0], args[2]), nan, device=args[0].device)
    y_train = scan._kernel_fwd(*args, delta_softplus, y=torch.full_like(args[0], nan), seg_state=seg_state)
    assert torch.equal(y_train, y), "the training forward's y differs from the inference forward's"
    assert not seg_state.isnan().any(), "the forward left segment states unwritten (NaN)"
    buffers = {k: b.fill_(nan) for k, b in scan._kernel_bwd_buffers(args[0], args[2]).items()}
    grads = scan._kernel_bwd(*args, seg_state, dy.to(args[0].dtype), delta_softplus, buffers=buffers)
    return y.to(inputs[0].dtype), tuple(g.to(x.dtype) for g, x in zip(grads, inputs))


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tolerance(name, dtype):
    """Relative error bound of output `name`: TOL[dtype], but at least 1e-3 for the float32
    parameters' gradients (dA, dD, ddelta_bias), summed in float32 whatever the input dtype."""
    return max(TOL[dtype], 1e-3) if name in ("dA", "dD", "ddelta_bias") and dtype != torch.float32 else TOL[dtype]


@cuda
@pytest.mark.parametrize("l", [1, 7, 49, 64, 196, 256, 1024, 2049])
@pytest.mark.parametrize("n", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(monkeypatch, l, n, dtype):
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    # 300 channels: 5 blocks of 64 channels, the last one partly idle; batch 3
    inputs, dy = make_inputs(3, 300, l, n, dtype=dtype, device="cuda", seed=l * n)
    want_y, want = ref_grads(inputs, dy)
    y, grads = kernel_run(inputs, dy)
    assert y.dtype == dtype and not y.isnan().any()
    errs = {"y": rel_err(y, want_y)}
    for name, g, w, inp in zip(NAMES, grads, want, inputs):
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
        errs[name] = rel_err(g, w)
    bad = {k: e for k, e in errs.items() if not e < tolerance(k, dtype)}
    assert not bad, f"relative errors over tolerance: {bad} (all: {errs})"


@cuda
@pytest.mark.parametrize("n", [1, 5, 12])
def test_kernel_odd_state_counts_and_no_softplus(monkeypatch, n):
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    inputs, dy = make_inputs(2, 33, 50, n, device="cuda", seed=n)
    inputs[1], inputs[6] = inputs[1].abs() * 0.1, inputs[6].abs()  # without softplus, keep dt positive
    want_y, want = ref_grads(inputs, dy, delta_softplus=False)
    y, grads = kernel_run(inputs, dy, delta_softplus=False)
    assert rel_err(y, want_y) < 2e-5
    for name, g, w in zip(NAMES, grads, want):
        assert rel_err(g, w) < 2e-5, name


@cuda
def test_kernel_batch_over_one_finish_round(monkeypatch):
    """Batch 260: the finish kernel sums dA, dD, ddelta_bias over 128 batch rows per round; 260 x 4
    blocks (200 channels) are more than 3 per SM, so the 64-register instances run."""
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    inputs, dy = make_inputs(260, 200, 40, 8, device="cuda", seed=11)
    want_y, want = ref_grads(inputs, dy)
    y, grads = kernel_run(inputs, dy)
    assert rel_err(y, want_y) < 2e-5
    for name, g, w in zip(NAMES, grads, want):
        assert rel_err(g, w) < 2e-5, name


@cuda
@pytest.mark.parametrize("l", [50, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_two_lane_instances(monkeypatch, l, dtype):
    """Batch 2 x SMs, 100 channels: more than 3 blocks per SM with 4 lanes per channel, one wave at
    2 blocks per SM with 2 lanes (7 warps of 16 channels, 12 rows past the channel count), so the
    2-lane forward and backward run (the ones B stage 3 takes); two runs give the same bits."""
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    inputs, dy = make_inputs(2 * sms, 100, l, 8, dtype=dtype, device="cuda", seed=13)
    want_y, want = ref_grads(inputs, dy)
    y, grads = kernel_run(inputs, dy)
    assert rel_err(y, want_y) < TOL[dtype]
    for name, g, w in zip(NAMES, grads, want):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert rel_err(g, w) < tolerance(name, dtype), name
    _, again = kernel_run(inputs, dy)
    for name, a, b in zip(NAMES, grads, again):
        assert torch.equal(a, b), f"{name} differs between two runs"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_deterministic(dtype):
    inputs, dy = make_inputs(16, 320, 196, 8, dtype=dtype, device="cuda", seed=7)
    first = kernel_run(inputs, dy)
    second = kernel_run(inputs, dy)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(NAMES, first[1], second[1]):
        assert torch.equal(a, b), f"{name} differs between two runs"


@cuda
def test_kernel_mixed_dtypes_and_noncontiguous(monkeypatch):
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    inputs, dy = make_inputs(2, 40, 30, 8, device="cuda", seed=3)
    inputs[1] = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)  # (b, l, d) memory, as dt_proj gives
    inputs[3] = inputs[3].to(torch.bfloat16)
    want_y, want = ref_grads(inputs, dy)
    x = [t.clone().requires_grad_() for t in inputs]
    y = scan.selective_scan(*x)
    y.backward(dy)
    assert y.dtype == torch.float32 and rel_err(y, want_y) < 2e-5
    for name, t, w in zip(NAMES, x, want):
        assert t.grad.dtype == t.dtype
        assert rel_err(t.grad, w) < (1e-2 if t.dtype == torch.bfloat16 else 2e-5), name


@cuda
def test_opcheck_cuda(monkeypatch):
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    opcheck_all(*make_inputs(2, 40, 20, 8, device="cuda"))


@cuda
def test_eager_path_and_custom_ops_agree_bitwise(monkeypatch):
    """The three ways to the kernels give the same bits: `selective_scan` in eager mode
    (_EagerScan), the training op torch.compile sees, and the inference op's backward (which
    recomputes the states)."""
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    inputs, dy = make_inputs(3, 70, 100, 8, dtype=torch.bfloat16, device="cuda", seed=5)
    runs = {"eager": lambda *x: scan.selective_scan(*x),
            "training op": lambda *x: torch.ops.mambavision.selective_scan_train(*x, True)[0],
            "inference op": lambda *x: torch.ops.mambavision.selective_scan(*x, True)}
    results = {}
    for name, run in runs.items():
        x = [t.clone().requires_grad_() for t in inputs]
        y = run(*x)
        y.backward(dy)
        results[name] = [y] + [t.grad for t in x]
        assert all(g.dtype == t.dtype for g, t in zip(results[name][1:], inputs)), name
    with torch.no_grad():
        results["eager, no grad"] = [scan.selective_scan(*inputs)]
    for name, got in results.items():
        for what, a, b in zip(("y",) + NAMES, got, results["training op"]):
            assert torch.equal(a, b), f"{name}: {what} differs from the training op's"


# ------------------------------------------------------------------ GPU: the whole model

def _model_and_images():
    model_lib = pytest.importorskip("model")
    torch.manual_seed(0)
    model = model_lib.build_model("t", drop_path_rate=0.0).cuda().eval()
    images = torch.randn(3, 3, 224, 224, device="cuda")
    return model, images


def _logits_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


@cuda
def test_model_kernel_matches_reference(monkeypatch):
    model, images = _model_and_images()
    monkeypatch.setenv("MAMBAVISION_SCAN", "ref")
    want_logits, want_grads = _logits_and_grads(model, images)
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    logits, grads = _logits_and_grads(model, images)
    assert rel_err(logits, want_logits) < 1e-4
    assert rel_err(grads, want_grads) < 1e-3


@cuda
def test_model_compiled_fullgraph_matches_eager(monkeypatch):
    monkeypatch.setenv("MAMBAVISION_SCAN", "cuda")
    model, images = _model_and_images()
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True)(images)
    assert math.isfinite(compiled.sum().item())
    assert rel_err(compiled, eager) < 1e-3
