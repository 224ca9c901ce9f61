"""Bad inputs found by fuzzing the public API: each one used to give a silent wrong answer or an
untyped error, and must now raise a typed error that names what was expected."""
import os
import subprocess
import sys

import pytest
import torch

import unifattn as ua
from unifattn.testing import make_inputs

from conftest import DEVICE


def _sparse_inputs(T=8, HQ=2, HKV=1, D=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, D, generator=g).to(DEVICE) for h in (HQ, HKV, HKV))
    idx = torch.arange(4, dtype=torch.int32).repeat(1, T, HKV, 1)
    idx = torch.where(idx <= torch.arange(T).view(1, T, 1, 1), idx, -1).to(torch.int32).to(DEVICE)
    return q, k, v, idx


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_sparse_attention_rejects_nan(name):
    x = dict(zip("qkv", _sparse_inputs()[:3]))
    idx = _sparse_inputs()[3]
    x[name][0, 3, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: expected finite values"):
        ua.ops.sparse_attention(x["q"], x["k"], x["v"], idx)
    o = ua.ops.sparse_attention(x["q"], x["k"], x["v"], idx, check_inputs=False)      # the caller's choice
    assert o.shape == x["q"].shape


def _indexer_inputs(T=8):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, T, 2, 8, generator=g), torch.randn(1, T, 1, 8, generator=g)
    qi, ki, w = torch.randn(1, T, 2, 4, generator=g), torch.randn(1, T, 4, generator=g), torch.rand(1, T, 2, generator=g)
    return [x.to(DEVICE) for x in (q, k, qi, ki, w)]


@pytest.mark.parametrize("i", range(5))
def test_indexer_loss_rejects_nan_and_inf(i):
    xs = _indexer_inputs()
    xs[i].view(-1)[3] = float("nan") if i % 2 else float("inf")
    with pytest.raises(ValueError, match="expected finite values"):
        ua.ops.indexer_loss(*xs)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True])
def test_scale_must_be_a_finite_number(scale):
    with pytest.raises((ValueError, TypeError), match="scale"):
        ua.ops.indexer_loss(*_indexer_inputs(), scale=scale)
    r = ua.rules.simple_gla
    case = make_inputs(r, T=4, K=4, V=4)
    for form in ("reference", "recurrent"):
        with pytest.raises((ValueError, TypeError), match="scale"):
            ua.ops.linear_attention(r, form=form, scale=scale, **{n: x.to(DEVICE) for n, x in case.items()})


def test_reference_form_checks_gate_ranges_like_the_kernels():
    r = ua.rules.simple_gla
    case = {n: x.to(DEVICE) for n, x in make_inputs(r, T=4, K=4, V=4).items()}
    case["g"] = case["g"].abs() + 1.0                          # a positive log-gate: a growing state
    for form in ("reference", "recurrent"):
        with pytest.raises(ValueError, match="g: expected values <= 0"):
            ua.ops.linear_attention(r, form=form, **case)


def test_cpu_tensors_without_the_interpreter_get_a_typed_error():
    code = """
import torch, unifattn as ua
from unifattn.testing import make_inputs
case = make_inputs(ua.rules.gla, T=3, K=4, V=4)
for form in ("recurrent", "chunk"):
    try:
        ua.ops.linear_attention(ua.rules.gla, form=form, **case)
    except ValueError as e:
        assert "CUDA tensors" in str(e) and "TRITON_INTERPRET=1" in str(e), e
    else:
        raise SystemExit("no error")
q = torch.randn(1, 4, 1, 16)
try:
    ua.ops.sparse_attention(q, q, q, torch.zeros(1, 4, 1, 1, dtype=torch.int32))
except ValueError as e:
    assert "CUDA tensors" in str(e), e
else:
    raise SystemExit("no error")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_hybrid_lm_token_ids_out_of_range():
    lm = ua.hybrid.HybridLM(50, "A", d_model=16, num_heads=2).to(DEVICE)
    for bad in (50, -1):
        tokens = torch.zeros(1, 5, dtype=torch.long, device=DEVICE)
        tokens[0, 2] = bad
        with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, vocab_size=50\)"):
            lm(tokens)


@pytest.mark.parametrize("cu, B, match", [
    ([0, 3, 9], 1, "offsets from 0 to T=10"),
    ([0, 7, 3, 10], 1, "non-decreasing"),
    ([0, 10], 2, "batch size 1"),
])
def test_dense_attention_checks_cu_seqlens(cu, B, match):
    from unifattn.hybrid import DenseAttention
    layer = DenseAttention(16, 2, 1, 8).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(B, 10, 16, device=DEVICE), cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"x: expected \[B, T, d_model=16\]"):
        layer(torch.randn(10, 16, device=DEVICE))


def test_sparse_layer_with_no_tokens():
    layer = ua.layers.SparseAttention(16, num_heads=2, num_kv_heads=1, head_dim=8,
                                      selector=ua.rules.lightning_indexer, topk=4).to(DEVICE)
    y, idx = layer(torch.randn(2, 0, 16, device=DEVICE), return_indices=True)
    assert y.shape == (2, 0, 16) and idx.shape[:2] == (2, 0)


def test_block_size_bool_is_refused():
    q, k, v, idx = _sparse_inputs()
    with pytest.raises(ValueError, match="block_size: expected None or a positive int"):
        ua.ops.sparse_attention(q, k, v, idx, block_size=True)


def test_interpreter_that_cannot_run_the_kernels_is_named():
    """Triton 3.6's CPU interpreter on NumPy 2.4 fails inside Triton on every runtime-bound loop: a clear
    error names the versions and the fix instead; the pairs that work pass."""
    from unifattn.kernels.utils import check_interpreter
    with pytest.raises(RuntimeError, match=r"expected Triton >= 3.7 or NumPy < 2.4.*got Triton 3.6.0 with NumPy "
                                           r"2.4.6\. Fix: pip install 'numpy<2.4'"):
        check_interpreter("3.6.0", "2.4.6")
    for ok in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.4.6"), ("3.6.0+git1234", "1.26.4")):
        check_interpreter(*ok)


def test_fp16_chunk_state_past_the_range_raises():
    # the chunk form keeps per-chunk states in the input dtype: past 65504 an fp16 state is inf, which
    # would reach the output although the true output (~450 here) fits; the op raises instead
    B, T, H, K = 1, 70, 1, 16
    q = torch.full((B, T, H, K), 1e-3, dtype=torch.float16, device=DEVICE)
    k = torch.full((B, T, H, K), 40., dtype=torch.float16, device=DEVICE)
    v = torch.full((B, T, H, K), 40., dtype=torch.float16, device=DEVICE)
    with pytest.raises(OverflowError, match=r"fp16's range \(65504\).*Fix: use bf16 or fp32"):
        ua.ops.linear_attention(ua.rules.linear_attention, q, k, v, form="chunk")
    o, _ = ua.ops.linear_attention(ua.rules.linear_attention, q, k, v, form="recurrent")     # fp32 state
    ref, _ = ua.ops.linear_attention(ua.rules.linear_attention, q.double(), k.double(), v.double())
    assert torch.isfinite(o).all() and torch.allclose(o.double(), ref, rtol=2e-3)
    o, _ = ua.ops.linear_attention(ua.rules.linear_attention, q.bfloat16(), k.bfloat16(), v.bfloat16(), form="chunk")
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("form", ["reference", "recurrent"])
def test_tune_outside_the_chunk_form_is_refused(form):
    x = make_inputs(ua.rules.simple_gla, T=4, device=DEVICE)
    with pytest.raises(ValueError, match=r"tune: expected form='chunk' .*got form='" + form + r"'\. Fix: drop tune"):
        ua.ops.linear_attention(ua.rules.simple_gla, form=form, tune=True, **x)
