"""The one tolerance table: kernel vs float64 reference, per input dtype.

Errors are measured relative to the reference's scale (max |ref| over the
tensor, at least 1), so a tensor of large values does not get a looser test
than a tensor of small ones. Never loosen these for CI.
"""
from __future__ import annotations

import torch

# input dtype -> (absolute error allowed per unit of reference scale)
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,   # tf32 is off in tests; fp32 accumulation over T<=256
    torch.float16: 4e-3,
    torch.bfloat16: 2.5e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output"):
    """Assert |actual - expected| <= TOLERANCE[dtype] * max(1, max|expected|), NaN-strict."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        n = int(torch.isnan(actual).sum())
        raise AssertionError(f"{name}: {n} NaN element(s) (unwritten or overflowed), reference has none")
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    tol = TOLERANCE[dtype] * scale
    if not err <= tol:
        raise AssertionError(f"{name}: max abs error {err:.3e} > tolerance {tol:.3e} ({dtype}, scale {scale:.3g})")
