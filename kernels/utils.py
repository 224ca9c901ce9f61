"""Small helpers shared by every kernel module: allocation, interpreter detection.

Outputs are allocated through `empty` so that tests can poison them: inside
`poisoned()` every allocation is filled with NaN (integers with -7), so an
element a kernel forgets to write fails the comparison instead of passing by
luck. Poisoning is a testing aid only; it never changes a written value.
"""
from __future__ import annotations

import contextlib
import os

import torch

_POISON = False


@contextlib.contextmanager
def poisoned():
    """Fill every kernel output allocated through `empty` with NaN (tests only)."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor inside `poisoned()`."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
