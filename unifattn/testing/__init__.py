"""Property-test any rule's kernels against its own float64 reference.

    from hypothesis import given
    from unifattn.testing import rule_inputs, assert_matches_reference

    @given(rule_inputs(my_rule))
    def test_my_rule(case):
        assert_matches_reference(my_rule, form="recurrent", **case)

`rule_inputs` draws valid calls for a rule (shapes, grouped value heads, dtypes,
gate ranges the checker asks for, varlen splits, initial states); the case is a
dict of keyword arguments for `unifattn.ops.linear_attention`.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from unifattn.testing.tolerance import TOLERANCE, assert_close

__all__ = ["rule_inputs", "make_inputs", "assert_matches_reference", "TOLERANCE", "assert_close"]


def make_inputs(r, *, B=1, T=16, H=1, HV=None, K=8, V=8, dtype=torch.float32, device="cpu", seed=0,
                gate_low=-2.0, initial_state=False, cu_seqlens=None) -> dict:
    """Deterministic valid inputs for rule r: q, k, v, its extra inputs, optional state / varlen."""
    from unifattn.dsl import check
    f = check(r)
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    uni = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dims = {r.state_dims[0]: K, r.state_dims[1]: V}
    checks = {name: cond for name, cond, _ in f.runtime_checks}
    unit_key = f.delta and f.key is not None and f.key.op == "input"
    # a low-rank term a b^T taken raw from the inputs: b a unit vector and a = -c b, c in (0, 1), keep
    # the transition Diag(exp g) + a b^T a contraction (random a, b grow the state ~K-fold per step)
    # (two distinct per-token value-head inputs only: q, k have H heads; a b^T with a = b is no contraction)
    lowrank = tuple(x.name for x in (f.lowrank or ()) if x.op == "input")
    per_token = {s.name for s in r.inputs if s.kind != "param"}
    lowrank = lowrank if len(set(lowrank)) == 2 and set(lowrank) <= per_token - {"q", "k", "v"} else ()
    out = {}
    for s in r.inputs:
        tail = tuple(dims[d] for d in s.shape)
        shape = ((HV,) if s.kind == "param" else (B, T, H if s.name in ("q", "k") else HV)) + tail
        if checks.get(s.name) == "<= 0":
            x = uni(gate_low, 0.0, *shape)
        elif checks.get(s.name) == "in (0, 1]":
            x = uni(0.5, 1.0, *shape)
        elif f.beta is not None and f.beta.op == "input" and f.beta.name == s.name:
            x = uni(0.0, 1.0, *shape)
        elif (s.name == "k" and unit_key) or (lowrank and s.name == lowrank[1]):
            x = torch.nn.functional.normalize(rnd(*shape), dim=-1)
        elif lowrank and s.name == lowrank[0]:
            x = None  # filled from b below
        elif s.kind == "param":
            x = 0.5 * rnd(*shape)
        else:
            x = rnd(*shape)
        out[s.name] = x
    if lowrank:
        out[lowrank[0]] = -uni(0.0, 1.0, *out[lowrank[1]].shape[:-1], 1) * out[lowrank[1]]
    for name, x in out.items():
        out[name] = x.to(dtype if name in ("q", "k", "v") else torch.float32 if dtype != torch.float64
                         else torch.float64).to(device)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state:
        out["initial_state"] = (0.5 * rnd(N, HV, K, V)).to(torch.float64 if dtype == torch.float64
                                                            else torch.float32).to(device)
    if cu_seqlens is not None:
        out["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    return out


@st.composite
def rule_inputs(draw, r, *, dtypes=(torch.float32,), max_T=70, max_K=16, varlen=True, device="cpu"):
    """Hypothesis strategy: a valid linear_attention call (keyword arguments) for rule r."""
    H = draw(st.sampled_from([1, 2]))
    HV = H * draw(st.sampled_from([1, 2]))
    K = draw(st.sampled_from([k for k in (4, 8, 16) if k <= max_K]))
    V = draw(st.sampled_from([k for k in (4, 8, 16) if k <= max_K]))
    dtype = draw(st.sampled_from(list(dtypes)))
    use_varlen = varlen and draw(st.booleans())
    if use_varlen:
        lens = draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=3))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        B, T = 1, cu[-1]
    else:
        cu, B, T = None, draw(st.integers(1, 2)), draw(st.integers(1, max_T))
    return make_inputs(r, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, device=device,
                       seed=draw(st.integers(0, 2 ** 16)), gate_low=draw(st.sampled_from([-0.1, -2.0, -8.0])),
                       initial_state=draw(st.booleans()), cu_seqlens=cu)


def assert_matches_reference(r, *, form="chunk", scale=None, **case):
    """Run `form` and the float64 reference on the same inputs; compare output and final state."""
    from unifattn.kernels.utils import poisoned
    from unifattn.ops import linear_attention
    dtype = case["q"].dtype
    ref_case = {n: (x.to(torch.float64) if torch.is_tensor(x) and x.is_floating_point() else x)
                for n, x in case.items()}
    o_ref, S_ref = linear_attention(r, form="reference", scale=scale, output_final_state=True, **ref_case)
    with poisoned():
        o, S = linear_attention(r, form=form, scale=scale, output_final_state=True, **case)
    assert o.dtype == case["v"].dtype, f"output dtype {o.dtype} != v's {case['v'].dtype}"
    assert_close(o, o_ref, dtype, f"{r.name} {form} output")
    assert_close(S, S_ref, dtype if dtype != torch.float64 else torch.float64, f"{r.name} {form} final state")
