"""The only place that imports optional dependencies (the ``_C`` extension and Triton), and the one
place that picks and synchronizes a device (``resolve_device``, ``synchronize``).

Each probe runs once. A backend is usable when its dependency imports; Triton additionally needs a
CUDA device or the interpreter (``TRITON_INTERPRET=1``, which runs kernels on CPU tensors and is how
CI tests them). ``KDFAST_BACKEND`` in the environment picks a backend as if it were passed explicitly.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cpu", "torch")


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled ``kdfast._C`` module, or None when the package was not built."""
    try:
        return importlib.import_module("kdfast._C")
    except ImportError:
        return None


@functools.cache
def triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first."""
    names = []
    if triton_module() is not None and (torch.cuda.is_available() or triton_interpret()):
        names.append("triton")
    if cpu_extension() is not None:
        names.append("cpu")
    names.append("torch")
    return names


def requested_backend() -> str | None:
    """The backend named by ``KDFAST_BACKEND``, if any."""
    name = os.environ.get("KDFAST_BACKEND", "").strip().lower()
    return name or None


def unavailable_reason(name: str) -> str:
    if name == "cpu":
        return "the kdfast._C extension is not built (reinstall with `pip install .`)"
    if name == "triton":
        if triton_module() is None:
            return "triton is not installed (`pip install kdfast[triton]`)"
        return "triton needs a CUDA device or TRITON_INTERPRET=1"
    return "unknown backend"


def op_module(backend: str, op: str) -> ModuleType:
    """``kdfast.ops.<backend>.<op>``; imported lazily so that a missing dependency costs nothing."""
    return importlib.import_module(f"kdfast.ops.{backend}.{op}")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None / "auto": cuda:LOCAL_RANK when CUDA is available, else cpu; a bare "cuda" is cuda:LOCAL_RANK.
    A request this process cannot use raises ValueError here, not inside a model or kernel."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on CPU, where work is already done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
