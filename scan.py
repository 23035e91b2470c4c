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


def selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
    """The one entry the model calls. Arguments as in the module docstring; returns y (b, d, l)."""
    return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
