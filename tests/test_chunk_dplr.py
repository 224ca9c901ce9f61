"""The DPLR chunk pipeline (kernels/chunk_dplr.py) against the recurrence in float64, on the CPU interpreter
(CUDA when present). Outputs are NaN-poisoned before the kernels run: an unwritten element fails."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from unifattn.kernels.chunk_dplr import CHUNK, chunk_dplr_fwd, dplr_stages
from unifattn.kernels.utils import poisoned
from unifattn.testing.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def recurrence(q, k, v, a, b, g, scale, h0, cu_seqlens):
    """S_t = (Diag(exp g_t) + a_t b_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t, one token at a time."""
    q, k, v, a, b = (x.double() for x in (q, k, v, a, b))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    g = torch.zeros(B, T, HV, K, dtype=torch.float64) if g is None else g.double()
    seqs = [(i, 0, T) for i in range(B)] if cu_seqlens is None else \
        [(0, int(cu_seqlens[n]), int(cu_seqlens[n + 1])) for n in range(len(cu_seqlens) - 1)]
    o = torch.zeros(B, T, HV, V, dtype=torch.float64)
    finals = []
    for n, (i, t0, t1) in enumerate(seqs):
        S = h0[n].double().clone() if h0 is not None else torch.zeros(HV, K, V, dtype=torch.float64)
        for t in range(t0, t1):
            for hv in range(HV):
                h = hv // (HV // H)
                S[hv] = (g[i, t, hv].exp()[:, None] * S[hv] + torch.outer(a[i, t, hv], S[hv].T @ b[i, t, hv])
                         + torch.outer(k[i, t, h], v[i, t, hv]))
                o[i, t, hv] = scale * S[hv].T @ q[i, t, h]
        finals.append(S)
    return o, torch.stack(finals)


def make(B=1, T=40, H=1, HV=1, K=16, V=16, gates="real", lowrank="rwkv", N=None, seed=0):
    """Inputs with a bounded state: b a unit vector and a = -c b, c in (0, 1) (RWKV-7's removal), or a
    small a not parallel to b ("free")."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = 0.3 * torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    b = F.normalize(torch.randn(B, T, HV, K, generator=gen), dim=-1)
    if lowrank == "rwkv":
        a = -torch.rand(B, T, HV, 1, generator=gen) * b
    else:
        a = 0.3 * K ** -0.5 * torch.randn(B, T, HV, K, generator=gen)
    u = torch.rand(B, T, HV, K, generator=gen)
    g = {"real": F.logsigmoid(torch.randn(B, T, HV, K, generator=gen)),
         "low": -8.0 - 8.0 * u,
         "near_zero": -1e-4 * u,
         "mixed": torch.where(torch.rand(B, T, HV, K, generator=gen) < 0.5, -8.0 - 8.0 * u, -1e-4 * u),
         # a 64-row chunk spans ~115 log2 (> WHOLE_SPAN_LOG2: sub-blocks), a 16-row sub-chunk ~30 (< SPAN_LOG2:
         # its diagonal block mid-anchored)
         "steep": -1.2 - 0.2 * u,
         "none": None}[gates]
    h0 = torch.randn(N if N is not None else B, HV, K, V, generator=gen)
    return dict(q=q, k=k, v=v, a=a, b=b, g=g, h0=h0)


def dev(x):
    return None if x is None else x.to(DEVICE)


def check(x, dtype=torch.float32, scale=0.5, use_h0=True, final=True, cu_seqlens=None):
    q, k, v = (x[n].to(dtype) for n in ("q", "k", "v"))
    h0 = x["h0"] if use_h0 else None
    with poisoned():
        o, ht = chunk_dplr_fwd(dev(q), dev(k), dev(v), dev(x["a"]), dev(x["b"]), dev(x["g"]), scale=scale,
                               initial_state=dev(h0), output_final_state=final, cu_seqlens=dev(cu_seqlens))
    ref_o, ref_ht = recurrence(q, k, v, x["a"], x["b"], x["g"], scale, h0, cu_seqlens)
    assert o.dtype == dtype and o.shape == v.shape
    assert_close(o.cpu(), ref_o, dtype, "o")
    if final:
        assert ht.dtype == torch.float32
        assert_close(ht.cpu(), ref_ht, dtype, "final state")
    else:
        assert ht is None


@pytest.mark.parametrize("T", [1, 15, 17, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 33])
def test_by_length(T):
    check(make(B=2, T=T, H=1, HV=2, seed=T))


@pytest.mark.parametrize("gates", ["low", "near_zero", "mixed", "steep", "none"])
def test_gate_extremes(gates):
    check(make(T=100, gates=gates, seed=1))


def test_free_low_rank_pair_and_odd_dims():
    # a not parallel to b; K = 40 (a partly masked key block), V = 24
    check(make(B=1, T=35, K=40, V=24, lowrank="free", seed=2))
    # K = 80: two key blocks of 64 in the intra and wu kernels, the state in halves of 64 rows
    check(make(B=1, T=20, K=80, V=16, lowrank="free", seed=7))


def test_varlen_through_both_intra_paths():
    """One sequence's chunks take the whole-chunk products, the others the sub-blocks."""
    x = make(B=1, T=200, H=1, HV=2, K=40, V=16, gates="steep", N=3, seed=12)
    x["g"][:, :100] = x["g"][:, :100] / 8
    check(x, cu_seqlens=torch.tensor([0, 17, 100, 200]))
    check(x, cu_seqlens=torch.tensor([0, 17, 100, 200]), dtype=torch.bfloat16, scale=40 ** -0.5)


def test_varlen_empty_sequence_grouped_value_heads():
    cu = torch.tensor([0, 17, 17, 60])
    check(make(B=1, T=60, H=2, HV=4, N=3, seed=3), cu_seqlens=cu)
    # sequences of one token and one chunk plus one, V under tl.dot's 16
    check(make(B=1, T=21, H=1, HV=2, V=5, N=4, seed=8), cu_seqlens=torch.tensor([0, 1, 2, 19, 21]))


def test_three_key_blocks_and_half_inputs_with_grouped_heads():
    # K = 130: three key blocks of 64 (the last one of 2 rows), the state in halves of 128
    check(make(B=1, T=17, K=130, V=16, lowrank="free", seed=9))
    check(make(B=1, T=33, H=1, HV=2, K=32, V=16, seed=10), dtype=torch.bfloat16, scale=32 ** -0.5)


def test_astronomically_negative_gates_stay_finite():
    # finite g near the bottom of fp32 would sum to -inf in a chunk (then -inf - -inf = NaN); the cumsum
    # clamps each step at -104, where exp already underflows to 0
    x = make(T=20, seed=11)
    x["g"] = torch.full_like(x["g"], -3e38)
    check(x)


def test_no_initial_or_final_state():
    check(make(T=33, seed=4), use_h0=False, final=False)
    check(make(T=33, seed=5), use_h0=False, final=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    check(make(B=1, T=40, K=32, V=16, seed=6), dtype=dtype, scale=32 ** -0.5)


def test_low_rank_pair_in_any_float_dtype():
    """a, b are read as they come (fp32, bf16, fp16) or made fp32 (float64): the reference sees the same values."""
    for dt, qdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float64, torch.float32)):
        x = make(B=1, T=70, K=32, V=16, seed=13)
        x["a"], x["b"] = x["a"].to(dt), x["b"].to(dt)
        check(x, dtype=qdt, scale=32 ** -0.5)


def test_bad_arguments_name_what_was_expected():
    x = make(T=8)
    with pytest.raises(ValueError, match=r"a: expected \[B, T, HV, K\] = \[1, 8, 1, 16\]"):
        chunk_dplr_fwd(x["q"], x["k"], x["v"], x["a"][..., :8], x["b"], x["g"])
    with pytest.raises(ValueError, match="initial_state: expected"):
        chunk_dplr_fwd(x["q"], x["k"], x["v"], x["a"], x["b"], x["g"], initial_state=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="every stage after the ones it reads"):
        chunk_dplr_fwd(x["q"], x["k"], x["v"], x["a"], x["b"], x["g"],
                       stages=("cumsum", "wu", "intra", "state", "output"))
    assert list(dplr_stages()) == ["cumsum", "intra", "wu", "state", "output"]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 70),
    H=st.integers(1, 2),
    group=st.integers(1, 2),
    K=st.integers(1, 40),
    V=st.integers(1, 24),
    gates=st.sampled_from(["real", "mixed", "none"]),
    lowrank=st.sampled_from(["rwkv", "free"]),
)
def test_random_shapes(T, H, group, K, V, gates, lowrank):
    check(make(B=1, T=T, H=H, HV=H * group, K=K, V=V, gates=gates, lowrank=lowrank, seed=T))
