"""kdfast: fused knowledge-distillation losses and teacher-target shards for large vocabularies."""
from kdfast.api import FusedLinearKDLoss, KDLoss, available_backends, fused_linear_kd_loss, kd_loss, last_backend
from kdfast.reference import LossComponents

__version__ = "0.1.0"

__all__ = [
    "kd_loss",
    "KDLoss",
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "LossComponents",
    "available_backends",
    "last_backend",
    "__version__",
]
