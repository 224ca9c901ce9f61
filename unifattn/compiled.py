"""Run generated kernels: the bridge from ops.linear_attention to codegen's modules."""
from __future__ import annotations

import torch

from unifattn import codegen, validate
from unifattn.dsl import check
from unifattn.dsl.checker import require_chunk
from unifattn.kernels.utils import empty, interpreting


def _contig(x):
    return x if x.is_contiguous() else x.contiguous()


def run(r, form, q, k, v, inputs, d, scale, initial_state, output_final_state, cu_seqlens,
        inplace_state=False, tune=False, check_inputs=True):
    facts = check(r)
    if form == "chunk":
        require_chunk(r, facts)
    full = {"q": q, "k": k, "v": v, **inputs}
    if q.device.type != "cuda" and not interpreting():
        validate.fail(f"q, k, v for form={form!r}", "CUDA tensors (the generated Triton kernels need a GPU)",
                      f"tensors on {q.device}", "move them with .cuda(), set TRITON_INTERPRET=1 to run the kernels "
                      "on the CPU (slow), or use form='reference', which runs anywhere")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        validate.fail(f"q, k, v for form={form!r}", "bf16, fp16 or fp32 (the generated kernels compute in fp32)",
                      str(q.dtype), "use form='reference' for float64, or cast the inputs", TypeError)
    if any(torch.is_tensor(x) and x.requires_grad for x in list(full.values()) + [initial_state]) \
            and torch.is_grad_enabled():
        validate.fail(f"linear_attention(form={form!r})", "inputs that do not require grad (the generated "
                      "backward is not there yet)", "a tensor with requires_grad=True",
                      "use form='reference' to train through the rule, or call under torch.no_grad()", RuntimeError)
    # The input scan syncs with the host. Run after the kernels, that sync also covers them, and the GPU
    # no longer idles while the host launches the forward; the fresh outputs of a bad call are dropped
    # before the error. An in-place state update (or tuning, which remembers what it measured) must
    # not see bad inputs at all: there the scan runs first.
    scan_first = inplace_state or tune
    if check_inputs and scan_first:
        validate.finite({"initial_state": initial_state, **full}, facts.runtime_checks)
    if form == "recurrent":
        out = _recurrent(r, facts, full, d, scale, initial_state, output_final_state, cu_seqlens, inplace_state)
    else:
        from unifattn.codegen.chunk import run_chunk
        out = run_chunk(codegen.module(r, "chunk"), r, facts, full, d, scale, initial_state, output_final_state,
                        cu_seqlens, tune=tune)
    if check_inputs and not scan_first:
        validate.finite({"initial_state": initial_state, **full}, facts.runtime_checks)
    if check_inputs and form == "chunk" and q.dtype == torch.float16:
        _fp16_range(out[0])
    return out


def _fp16_range(o):
    """fp16 chunk form: the chunk states and the delta rules' corrected values are kept in fp16 between
    kernels, and past 65504 they become inf. Inputs that passed the scan are finite, so a non-finite
    output means the range ran out: raise rather than return it (one more read of o, fp16 calls only)."""
    from unifattn.kernels.checks import scan
    if o.numel() and scan([(o, None)]):
        validate.fail("output of form='chunk' in fp16", "finite values (the inputs are finite)",
                      "inf/NaN: the output or a chunk state passed fp16's range (65504)",
                      "use bf16 or fp32 inputs (same speed for bf16), or form='recurrent' (fp32 state throughout)",
                      OverflowError)


def _recurrent(r, facts, full, d, scale, initial_state, output_final_state, cu_seqlens, inplace_state):
    from unifattn.codegen.recurrent import splittable_v
    import triton
    mod = codegen.module(r, "recurrent")
    dev = full["q"].device
    tensors = {n: _contig(x) for n, x in full.items()}
    heads = {s.name: tensors[s.name].shape[2] for s in r.inputs if s.kind == "token"}
    o = empty((d.B, d.T, d.HV, d.V), full["v"].dtype, dev)
    h0 = None if initial_state is None else _contig(initial_state.float())
    if inplace_state:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            validate.fail("inplace_state", "a contiguous float32 initial_state to update in place",
                          "none" if initial_state is None else
                          f"{initial_state.dtype}, {'' if initial_state.is_contiguous() else 'not '}contiguous",
                          "pass initial_state=torch.zeros(N, HV, K, V) (float32, contiguous)")
        h0 = ht = initial_state
    else:
        ht = empty((d.N, d.HV, d.K, d.V), torch.float32, dev) if output_final_state else None
    BVfull = triton.next_power_of_2(d.V)
    if splittable_v(r, facts) and not interpreting():
        # H200, decode B=16 H=16 K=V=128: BV=16 on 2 warps, 16.5 / 17.0 us (gated_deltanet / kda, state
        # updated in place). The sweep of benchmarks/profile_linear.py (separate in/out states) favoured
        # BV=32 on one warp (14.9 / 16.0 us), but in place that gave 22.7 / 16.9 us: kept BV=16.
        BV = min(BVfull, 32 if d.K <= 64 else 16)
        warps = 4 if BV * d.K >= 4096 else 2
    else:
        BV = BVfull
        warps = 4 if BV * d.K >= 4096 else 2
    if d.N * d.HV and d.V:
        cu = None if cu_seqlens is None else _contig(cu_seqlens.to(device=dev, dtype=torch.int32))
        mod.launch(tensors, heads, o, h0, ht, cu, scale, d.N, d.T, d.HV, d.K, d.V, BV, warps)
    return o, (ht if (output_final_state or inplace_state) else None)
