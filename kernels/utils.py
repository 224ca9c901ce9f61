"""Small helpers shared by every kernel module: allocation, interpreter detection.

Outputs are allocated through `empty` so that tests can poison them: inside
`poisoned()` every allocation is filled with NaN (integers with -7), so an
element a kernel forgets to write fails the comparison instead of passing by
luck. Poisoning is a testing aid only; it never changes a written value.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

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
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """t filled with NaN (-7 for integers) inside `poisoned()`, for a reused output buffer; t itself."""
    if _POISON:
        t.fill_(float("nan") if t.dtype.is_floating_point else -7)
    return t


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (checked to work, once)."""
    on = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if on and not _INTERPRETER_CHECKED:
        check_interpreter()
    return on


_INTERPRETER_CHECKED = False


def _version(v: str) -> tuple[int, int]:
    major, minor = (v.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_interpreter(triton_version: str | None = None, numpy_version: str | None = None) -> None:
    """Triton 3.6's interpreter (and older) turns a runtime loop bound into an int through a 1-element
    numpy array, which NumPy 2.4 refuses: every kernel with such a loop would fail deep inside Triton.
    Raise a clear error instead; Triton 3.7 and NumPy up to 2.3 are fine."""
    global _INTERPRETER_CHECKED
    import numpy
    import triton
    tv, nv = triton_version or triton.__version__, numpy_version or numpy.__version__
    if _version(tv) < (3, 7) and _version(nv) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1: expected Triton >= 3.7 or NumPy < 2.4 (Triton {tv}'s interpreter "
                           f"cannot run loops with runtime bounds on NumPy >= 2.4); got Triton {tv} with NumPy {nv}. "
                           "Fix: pip install 'numpy<2.4', or pip install 'triton>=3.7'")
    _INTERPRETER_CHECKED = True


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------ tuned launch configs on disk
def _tuned_file() -> str:
    d = os.environ.get("UNIFATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "unifattn")
    return os.path.join(d, "tuned.json")


def tuned_key(key) -> str:
    """A tuning key made specific to this GPU and Triton version."""
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return repr((dev, triton.__version__) + tuple(key))


def load_tuned(key: str):
    try:
        with open(_tuned_file()) as f:
            return json.load(f).get(key)
    except (OSError, ValueError):
        return None


def save_tuned(key: str, choice) -> None:
    """Merge one choice into tuned.json, written atomically (a reader never sees a partial file)."""
    path = _tuned_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table[key] = choice
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
