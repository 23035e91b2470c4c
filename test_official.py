"""Parity with the official implementation, the `mambavision` 1.2.0 package, in float64.

It needs mambavision, timm and einops, which are not this project's dependencies, so it is skipped
where they are missing (as in CI). To run it, install them in a scratch environment, e.g.
`pip install --no-deps mambavision==1.2.0 timm einops` beside a torch that has torchvision.
mamba_ssm is not needed: its scan is pointed at our reference scan, so this test checks everything
around the scan (the scan itself is checked against a closed form in test_model.py).
"""
import sys
import types

import pytest
import torch

from model import build_model
from scan import selective_scan_ref

pytest.importorskip("timm")
pytest.importorskip("einops")


def _scan_shim(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False):
    assert z is None and not return_last_state  # the official mixer never asks for them
    return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)


if "mamba_ssm" not in sys.modules:
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = _scan_shim
    sys.modules["mamba_ssm"] = types.ModuleType("mamba_ssm")
    sys.modules["mamba_ssm.ops"] = types.ModuleType("mamba_ssm.ops")
    sys.modules["mamba_ssm.ops.selective_scan_interface"] = interface
official = pytest.importorskip("mambavision.models.mamba_vision")

NAMES = {"t": "mamba_vision_T", "s": "mamba_vision_S", "b": "mamba_vision_B", "l": "mamba_vision_L"}


def randomised(model):
    """Weights away from their init (so every quirk shows), kept float32-exact."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, t in model.state_dict().items():
        if not t.is_floating_point():
            state[k] = t
        elif k.endswith("running_var"):
            state[k] = torch.rand(t.shape, generator=g) + 0.5
        elif k.endswith(("dt_proj.bias", "running_mean")):
            state[k] = torch.randn(t.shape, generator=g) * 0.5
        else:
            state[k] = t + torch.randn(t.shape, generator=g) * 0.02
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("variant", list(NAMES))
@pytest.mark.parametrize("hw", [(224, 224), (200, 264)])
def test_same_logits_as_official(variant, hw):
    ours = randomised(build_model(variant, drop_path_rate=0.0))
    theirs = getattr(official, NAMES[variant])(drop_path_rate=0.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for train in (False, True):  # eval: running BN statistics; train: batch statistics
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert ((a - b).norm() / b.norm()).item() < 1e-10, (variant, hw, train)
