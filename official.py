"""The official MambaVision package (`mambavision` 1.2.0) as a yardstick for tests and benchmarks.

It is not a dependency of this project. Where it is wanted, install it with what it imports:
`pip install --no-deps mambavision==1.2.0 timm einops` (timm needs torchvision). Its import of
mamba_ssm's CUDA scan is pointed at our `scan.selective_scan` (the reference on the CPU, our kernel on
a GPU), so no mamba_ssm build is needed and only the code around the scan differs.
"""
import importlib
import sys
import types

from scan import selective_scan

OFFICIAL_NAMES = {"t": "mamba_vision_T", "t2": "mamba_vision_T2", "s": "mamba_vision_S",
                  "b": "mamba_vision_B", "l": "mamba_vision_L", "l2": "mamba_vision_L2"}


def _selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    assert z is None and not return_last_state  # the official mixer never asks for them
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)


def official_model(variant, **kwargs):
    """The official network for an ImageNet-1K alias; raises ImportError if the package is missing."""
    if "mamba_ssm" not in sys.modules:
        interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
        interface.selective_scan_fn = _selective_scan_fn
        sys.modules["mamba_ssm"] = types.ModuleType("mamba_ssm")
        sys.modules["mamba_ssm.ops"] = types.ModuleType("mamba_ssm.ops")
        sys.modules["mamba_ssm.ops.selective_scan_interface"] = interface
    module = importlib.import_module("mambavision.models.mamba_vision")
    return getattr(module, OFFICIAL_NAMES[variant])(**kwargs)
