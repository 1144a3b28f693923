"""kdfast: fused knowledge-distillation losses and teacher-target shards for large vocabularies.

The public names below are loaded on first use (PEP 562 module ``__getattr__``), so that
``import kdfast`` and the command line's ``--help`` do not import torch.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "kd_loss": "kdfast.api",
    "KDLoss": "kdfast.api",
    "fused_linear_kd_loss": "kdfast.api",
    "FusedLinearKDLoss": "kdfast.api",
    "available_backends": "kdfast.api",
    "last_backend": "kdfast.api",
    "LossComponents": "kdfast.reference",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kdfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
