"""Parity with the official implementation, the `mambavision` 1.2.0 package, in float64.

Skipped where that package is not installed (as in CI); official.py says how to install it. Its scan
is pointed at ours, so this checks everything around the scan (the scan itself is checked against a
closed form in test_model.py).
"""
import pytest
import torch

from model import build_model
from official import official_model

try:
    official_model("t")
except ImportError as e:
    pytest.skip(f"the official package is not importable ({e})", allow_module_level=True)


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


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
@pytest.mark.parametrize("hw", [(224, 224), (200, 264)])
def test_same_logits_as_official(variant, hw):
    ours = randomised(build_model(variant, drop_path_rate=0.0))
    theirs = official_model(variant, drop_path_rate=0.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for train in (False, True):  # eval: running BN statistics; train: batch statistics
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert ((a - b).norm() / b.norm()).item() < 1e-10, (variant, hw, train)
