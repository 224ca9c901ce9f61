"""chunk_fwd, the one chunkwise forward of the six affine classes, against flash-linear-attention.

Shape: B=8, T=4096, H=16, K=V=128, bf16. Inputs: q, k L2-normalized for the delta classes,
log gates logsigmoid(randn) / 16 (GLA's gate normalizer: per-step decay ~0.95), beta =
sigmoid(randn). fla counterparts: identity / scalar -> chunk_simple_gla (g=None / g),
diagonal -> chunk_gla, delta -> chunk_delta_rule, scalar_delta -> chunk_gated_delta_rule,
diagonal_delta -> chunk_kda.

First a correctness check of every class on a slice (B=1, T=512, same heads and dims, plus a
packed-varlen call) against a float32 torch recurrence, then one table of forward medians
(triton.testing.do_bench) and the memory traffic the forward must move at least (inputs,
o, and the per-chunk states it writes and reads back), as TB/s.

    python benchmarks/bench_chunk_kernels.py             # check + table
    python benchmarks/bench_chunk_kernels.py --no-fla    # ours only
    python benchmarks/bench_chunk_kernels.py --T 8192 --B 4
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

from unifattn.kernels.chunk import CLASS_FLAGS, chunk_fwd
from unifattn.testing.tolerance import assert_close

CLASSES = CLASS_FLAGS


def make_inputs(cls, B, T, H, K, V, dtype=torch.bfloat16, seed=0, device="cuda"):
    gate, delta = CLASSES[cls]
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=gen)
    k = torch.randn(B, T, H, K, device=device, generator=gen)
    if delta:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, device=device, generator=gen)
    g = None
    if gate != "none":
        shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
        g = F.logsigmoid(torch.randn(shape, device=device, generator=gen)) / 16
    beta = torch.randn(B, T, H, device=device, generator=gen).sigmoid() if delta else None
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g, beta=beta, gate=gate, delta=delta)


def recurrence_fp32(x, scale, cu_seqlens=None):
    """Token-by-token float32 reference on the GPU: (o [B, T, H, V], final state [N, H, K, V])."""
    q, k, v = (x[n].float() for n in ("q", "k", "v"))
    g, beta, gate, delta = x["g"], x["beta"], x["gate"], x["delta"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    o = torch.zeros(B, T, H, V, device=q.device)
    finals = []
    for b, start, end in spans:
        S = torch.zeros(H, K, V, device=q.device)
        for t in range(start, end):
            if gate == "scalar":
                S = S * g[b, t].exp()[:, None, None]
            elif gate == "diagonal":
                S = S * g[b, t].exp()[:, :, None]
            kt, vt = k[b, t], v[b, t]
            if delta:
                err = vt - torch.einsum("hk,hkv->hv", kt, S)
                S = S + beta[b, t][:, None, None] * kt[:, :, None] * err[:, None, :]
            else:
                S = S + kt[:, :, None] * vt[:, None, :]
            o[b, t] = scale * torch.einsum("hkv,hk->hv", S, q[b, t])
        finals.append(S)
    return o, torch.stack(finals)


def ours(x, scale, cu_seqlens=None, final=False, tune=False):
    return chunk_fwd(x["q"], x["k"], x["v"], x["g"], x["beta"], gate=x["gate"], delta=x["delta"], scale=scale,
                     output_final_state=final, cu_seqlens=cu_seqlens, tune=tune)


def fla_fn(cls):
    """fla's forward for a class, as a function of our inputs (raises ImportError without fla)."""
    if cls in ("identity", "scalar"):
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda x, s: chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"], scale=s)
    if cls == "diagonal":
        from fla.ops.gla import chunk_gla
        return lambda x, s: chunk_gla(x["q"], x["k"], x["v"], g=x["g"], scale=s)
    if cls == "delta":
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda x, s: chunk_delta_rule(x["q"], x["k"], x["v"], beta=x["beta"].to(x["q"].dtype), scale=s)
    if cls == "scalar_delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda x, s: chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"].to(x["q"].dtype),
                                                   scale=s)
    from fla.ops.kda import chunk_kda
    return lambda x, s: chunk_kda(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"].to(x["q"].dtype), scale=s)


def min_bytes(x, B, T, H, K, V, BT=64):
    """Bytes the forward must move at least: inputs and o once, per-chunk states written and read once."""
    el = x["q"].element_size()
    n = B * T * H * (2 * K + 2 * V) * el                       # q, k, v in, o out
    if x["g"] is not None:
        n += x["g"].numel() * 4
    if x["beta"] is not None:
        n += x["beta"].numel() * 4
    n += 2 * B * triton.cdiv(T, BT) * H * K * V * el          # h written by the state pass, read by the output
    return n


def check(args):
    scale = args.K ** -0.5
    print(f"correctness vs float32 recurrence (B=1, T={args.check_T}, H={args.H}, K={args.K}, V={args.V}, bf16; "
          f"varlen {args.check_cu})")
    ok = True
    cu = torch.tensor(args.check_cu, dtype=torch.int32, device="cuda")
    for cls in CLASSES:
        x = make_inputs(cls, 1, args.check_T, args.H, args.K, args.V, seed=1)
        ref_o, ref_h = recurrence_fp32(x, scale)
        o, h = ours(x, scale, final=True)
        ref_vo, ref_vh = recurrence_fp32(x, scale, cu)
        vo, vh = ours(x, scale, cu, final=True)
        line = f"  {cls:15s} max|o - ref| {float((o.float() - ref_o).abs().max()):.2e}  (|ref| {float(ref_o.abs().max()):.2f})"
        try:
            for a, b, name in ((o, ref_o, "o"), (h, ref_h, "state"), (vo, ref_vo, "varlen o"), (vh, ref_vh, "varlen state")):
                assert_close(a, b, torch.bfloat16, name)
            line += "  ok"
        except AssertionError as e:
            ok, line = False, line + f"  FAILED: {e}"
        if not args.no_fla:
            try:
                fo = fla_fn(cls)(x, scale)[0]
                line += f"   fla max|o - ref| {float((fo.float() - ref_o).abs().max()):.2e}"
            except Exception as e:  # noqa: BLE001 - report and go on
                line += f"   fla: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        print(line, flush=True)
    return ok


def bench(args):
    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    scale = K ** -0.5
    print(f"\nforward, B={B} T={T} H={H} K={K} V={V} bf16 (median ms, triton.testing.do_bench)")
    head = f"{'class':15s} {'ours ms':>8s} {'TB/s':>6s}   {'fla op':24s} {'fla ms':>8s} {'fla/ours':>8s}"
    print(head)
    print("-" * len(head))
    fla_names = {"identity": "chunk_simple_gla(g=None)", "scalar": "chunk_simple_gla", "diagonal": "chunk_gla",
                 "delta": "chunk_delta_rule", "scalar_delta": "chunk_gated_delta_rule", "diagonal_delta": "chunk_kda"}
    for cls in CLASSES:
        x = make_inputs(cls, B, T, H, K, V)
        ours(x, scale, tune=True)  # tunes the launch configs for this shape (tuning is explicit)
        ms = triton.testing.do_bench(lambda: ours(x, scale), warmup=25, rep=200, return_mode="median")
        line = f"{cls:15s} {ms:8.3f} {min_bytes(x, B, T, H, K, V) / ms / 1e9:6.2f}   {fla_names[cls]:24s}"
        if args.no_fla:
            print(line + f" {'-':>8s}")
            continue
        try:
            fn = fla_fn(cls)
            with torch.no_grad():
                fn(x, scale)
                fms = triton.testing.do_bench(lambda: fn(x, scale), warmup=25, rep=200, return_mode="median")
            line += f" {fms:8.3f} {fms / ms:8.2f}"
        except Exception as e:  # noqa: BLE001 - fla refuses some ops on some GPUs; report and go on
            msg = str(e).splitlines()[0][:70] if str(e) else ""
            line += f" {type(e).__name__}: {msg}"
        print(line, flush=True)
        del x
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--check-T", type=int, default=512)
    p.add_argument("--check-cu", type=int, nargs="+", default=[0, 100, 100, 331, 512])
    p.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_chunk_kernels.py needs a CUDA GPU")
    if not args.no_fla:
        try:
            import fla  # noqa: F401
        except ImportError:
            print("fla is not importable: timing ours only")
            args.no_fla = True
    ok = True if args.no_check else check(args)
    bench(args)
    if not ok:
        sys.exit("correctness check FAILED (see above)")


if __name__ == "__main__":
    main()
