"""Functional ops: linear attention from a rule (reference, chunk, recurrent forms).

    o, S_T = linear_attention(rule, q, k, v, g=g, beta=beta, initial_state=S0,
                              output_final_state=True, cu_seqlens=None, form="chunk")

Layout: q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H, value head i
reads q/k head i // (HV // H)); extra per-token inputs [B, T, H or HV, ...],
per-head params [HV, ...]; state [N, HV, K, V] float32; output [B, T, HV, V]
in v's dtype. o_t = scale * readout_t, scale defaulting to K ** -0.5 (for the
read-out S^T q this is the usual "scale multiplies q").
"""
from __future__ import annotations

import torch

from unifattn import validate
from unifattn.dsl import check
from unifattn.dsl.rule import Rule

FORMS = validate.FORMS              # the forms of linear_attention


def _expand_heads(x: torch.Tensor, H: int, HV: int) -> torch.Tensor:
    return x.repeat_interleave(HV // H, dim=2) if x.shape[2] == H and H != HV else x


def linear_attention(r: Rule, q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, form="reference", inplace_state=False, tune=False, check_inputs=True,
                     **inputs):
    """Run rule r over the sequences in q, k, v. Returns (o, final_state or None).

    inplace_state=True (form="recurrent", the decoding path) writes the final state into
    initial_state itself (float32, contiguous) and returns it: no state allocation per token.
    tune=True (form="chunk", GPU) picks launch configs for this shape once (each admitted only if it
    reproduces the default config's outputs) and remembers them on disk; otherwise the remembered
    choice, or the default config, runs.
    check_inputs=False skips the scan for NaN/inf and out-of-range gates (one read of every input
    and one host sync per call, kernels.checks; it runs after the kernels, whose outputs a bad call
    never returns, and before them when inplace_state or tune is set): for decode loops whose inputs
    are known good. Shapes, dtypes and devices are always checked.
    """
    if not isinstance(r, Rule):
        validate.fail("rule", "a rule declared with @unifattn.dsl.rule (e.g. unifattn.rules.kda)",
                      type(r).__name__, "pass the rule object first", TypeError)
    validate.form("form", form)
    d = validate.linear_inputs(r, q, k, v, inputs, initial_state, cu_seqlens, scale)
    scale = d.K ** -0.5 if scale is None else float(scale)
    if tune and form != "chunk":
        validate.fail("tune", "form='chunk' (launch configs are tuned for the chunk kernels)", f"form={form!r}",
                      "drop tune=True, or pass form='chunk'")
    if inplace_state and form != "recurrent":
        validate.fail("inplace_state", "form='recurrent' (the decoding kernel updates the state in place)",
                      f"form={form!r}", "pass form='recurrent', or drop inplace_state")
    if form == "reference":
        if check_inputs:     # the same value checks as the kernels' forms: NaN/inf and gate ranges
            validate.finite({"q": q, "k": k, "v": v, "initial_state": initial_state, **inputs},
                            check(r).runtime_checks)
        return _reference(r, q, k, v, inputs, d, scale, initial_state, output_final_state, cu_seqlens)
    from unifattn import compiled  # codegen path: imported lazily, it pulls in triton
    return compiled.run(r, form, q, k, v, inputs, d, scale, initial_state, output_final_state, cu_seqlens,
                        inplace_state=inplace_state, tune=tune, check_inputs=check_inputs)


def _reference(r, q, k, v, inputs, d, scale, initial_state, output_final_state, cu_seqlens):
    from unifattn.reference import run_reference
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kinds = {s.name: s.kind for s in r.inputs}
    full = {"q": q, "k": k, "v": v, **inputs}
    env = {}
    for name, x in full.items():
        x = x.to(cdt)
        env[name] = x if kinds[name] == "param" else _expand_heads(x, d.H, d.HV)
    if initial_state is None:
        S0 = torch.zeros(d.N, d.HV, d.K, d.V, dtype=cdt, device=q.device)
    else:
        S0 = initial_state.to(cdt)
    if cu_seqlens is None:
        o, S = run_reference(r, env, S0)
    else:
        c = cu_seqlens.tolist()
        os_, Ss = [], []
        for i in range(d.N):
            sl = {n: (x if kinds[n] == "param" else x[:, c[i]:c[i + 1]]) for n, x in env.items()}
            o_i, S_i = run_reference(r, sl, S0[i:i + 1])
            os_.append(o_i)
            Ss.append(S_i)
        o, S = torch.cat(os_, 1), torch.cat(Ss, 0)
    if S is initial_state:            # T = 0 hands S0 back: the caller's tensor must not be the final state
        S = S.clone()
    o = (o * scale).to(v.dtype)
    return o, (S if output_final_state else None)


# ------------------------------------------------------------------ sparse attention
def select(sel, *, topk=None, cu_seqlens=None, config=None, check_inputs=True, **inputs):
    """Top-k key (or key block) indices per query from a selector: int32 [B, T, HKV, topk], -1 padded.

    See unifattn.select.select for shapes; e.g. select(rules.lightning_indexer, qi=qi, ki=ki, w=w).
    """
    from unifattn.select import select as _select
    return _select(sel, topk=topk, cu_seqlens=cu_seqlens, config=config, check_inputs=check_inputs, **inputs)


def sparse_attention(q, k, v, indices, *, block_size=None, scale=None, cu_seqlens=None, return_lse=False,
                     check_indices=True, check_inputs=True):
    """Softmax attention of each query over its selected keys (token or block indices), with backward.

    q [B, T, HQ, D]; k, v [B, T, HKV, D]; indices int32 [B, T, HKV, topk] shared by the HQ / HKV query
    heads of a group; -1 entries are skipped and a row with no key gives zeros. check_indices=False
    skips the range, causality and duplicate check (a sort only for lists not in select()'s order);
    out-of-range entries are still never read. check_inputs=False skips the NaN/inf scan of q, k, v.
    """
    from unifattn.kernels.sparse_attention import sparse_attention as _sparse
    return _sparse(q, k, v, indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
                   return_lse=return_lse, check_indices=check_indices, check_inputs=check_inputs)


def indexer_loss(q, k, qi, ki, w, *, indices=None, scale=None, cu_seqlens=None, check_inputs=True):
    """KL(head-summed attention || softmax(lightning-indexer scores)), gradients to qi, ki, w only.

    Dense warm-up (indices None): over all causal keys. Sparse stage: each head's softmax over the
    selected keys (what sparse attention computes), summed over heads, against the indexer's softmax
    over the same keys. check_inputs=False skips the NaN/inf scan of q, k, qi, ki, w.
    """
    from unifattn.kernels.indexer_loss import lightning_indexer_loss
    return lightning_indexer_loss(q, k, qi, ki, w, indices=indices, scale=scale, cu_seqlens=cu_seqlens,
                                  check_inputs=check_inputs)
