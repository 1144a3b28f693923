"""The only place that imports optional dependencies: the ``_C`` extension and Triton.

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
