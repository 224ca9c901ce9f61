"""Where the linear-attention forward spends its time, kernel by kernel, and the decode launch sweep.

    python benchmarks/profile_linear.py [--rules deltanet,kda] [--no-decode] [--fla]

1. For each rule: tune the chunk launch configs (tune=True), then 20 forwards of the generated
   module under torch.profiler at B=8 T=4096 H=16 K=V=128 bf16; prints each kernel's mean time
   (--fla: fla's forward of the same rule the same way, stage beside stage).
2. Decode (T = 1, state in place, B=16 H=16 K=V=128): every (BV, num_warps) launch of the
   generated recurrent kernel, checked against the default launch, with the effective state
   bandwidth (fp32 state read + written), timed from a launch loop and from CUDA-graph replay;
   the op and fla's fused_recurrent the same ways.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

import torch
import triton

import unifattn as ua
from unifattn import codegen

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import fla_decode, fla_fn, graph_bench, inputs  # noqa: E402


def kernel_times(fn, n=20):
    """Mean GPU ms per call of each kernel fn launches (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] += ev.device_time_total / n / 1e3 if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total / n / 1e3
    return per


def print_kernels(title, total, per):
    print(f"\n{title}: forward {total:.3f} ms (do_bench), kernel sum {sum(per.values()):.3f} ms; "
          "kernels (mean ms per forward):")
    for kname, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        if ms > 0.002:
            print(f"  {ms:8.3f}  {kname}")
    sys.stdout.flush()


def profile_fla(name, B=8, T=4096, H=16, K=128, V=128):
    f = fla_fn(name)
    if not callable(f):
        print(f"\nfla {name}: {f}")
        return
    q, k, v, e = inputs(name, B, T, H, K, V, torch.bfloat16, "cuda", seed=2)
    fn = lambda: f(q, k, v, e)  # noqa: E731
    fn()
    total = triton.testing.do_bench(fn, warmup=25, rep=100)
    print_kernels(f"fla {name}", total, kernel_times(fn))


def profile_chunk(name, B=8, T=4096, H=16, K=128, V=128):
    r = ua.rules.BUILTIN[name]
    q, k, v, e = inputs(name, B, T, H, K, V, torch.bfloat16, "cuda", seed=2)
    ua.ops.linear_attention(r, q, k, v, form="chunk", tune=True, **e)
    mod = codegen.module(r, "chunk")
    x = {"q": q, "k": k, "v": v, **e}
    heads = {s.name: x[s.name].shape[2] for s in r.inputs if s.kind == "token"}
    fn = lambda: mod.forward(x, heads, B, T, H, H, K, V, K ** -0.5, None, False, None)  # noqa: E731
    total = triton.testing.do_bench(fn, warmup=25, rep=100)
    print_kernels(name, total, kernel_times(fn))


def decode_sweep(name, B=16, H=16, K=128, V=128):
    """Every (BV, warps) launch of the generated decode kernel: ms per step from a launch loop
    (do_bench: includes Triton's host launch cost when that exceeds the kernel) and replayed from
    a CUDA graph (the kernel alone, as a serving loop runs it); fla's fused_recurrent the same two ways."""
    r = ua.rules.BUILTIN[name]
    q, k, v, e = inputs(name, B, 1, H, K, V, torch.bfloat16, "cuda")
    mod = codegen.module(r, "recurrent")
    x = {"q": q, "k": k, "v": v, **e}
    heads = {n: x[n].shape[2] for n in x if x[n].dim() >= 3}
    S0 = torch.randn(B, H, K, V, device="cuda") * 0.1
    ref_o, ref_S = torch.empty_like(v), torch.empty_like(S0)
    mod.launch(x, heads, ref_o, S0, ref_S, None, K ** -0.5, B, 1, H, K, V, 128, 8)
    gb = 2 * S0.numel() * 4 / 1e9
    rows = []
    for BV in (8, 16, 32, 64):
        for w in (1, 2, 4, 8):
            o, S = torch.empty_like(v), torch.empty_like(S0)
            try:
                fn = lambda: mod.launch(x, heads, o, S0, S, None, K ** -0.5, B, 1, H, K, V, BV, w)  # noqa: E731
                fn()
                err = max(float((o.float() - ref_o.float()).abs().max()), float((S - ref_S).abs().max()))
                rows.append((graph_bench(fn), triton.testing.do_bench(fn, warmup=50, rep=200), BV, w, err))
            except Exception as exc:  # noqa: BLE001
                print(f"  decode {name} BV={BV} warps={w}: failed {type(exc).__name__}")
    print(f"\ndecode {name} B={B} H={H} K=V={K}: graph ms (TB/s) / launch-loop ms (TB/s), BV, warps, "
          "max |diff| vs BV=128 w=8")
    for tg, tl_, BV, w, err in sorted(rows, key=lambda r: r[0] or 1e9)[:8]:
        print(f"  {tg:.4f} ({gb / tg:4.2f}) / {tl_:.4f} ({gb / tl_:4.2f})  BV={BV:<3} warps={w}  {err:.1e}")
    Sop = S0.clone()
    op = lambda: ua.ops.linear_attention(r, q, k, v, initial_state=Sop, form="recurrent",  # noqa: E731
                                         inplace_state=True, check_inputs=False, **e)
    op()
    tg = graph_bench(op)
    print(f"  op (check_inputs=False, in place): graph {tg if tg is None else f'{tg:.4f}'} ms, "
          f"loop {triton.testing.do_bench(op, warmup=50, rep=200):.4f} ms")
    f = fla_decode(name)
    if callable(f):
        Sf = S0.clone()
        fn = lambda: f(q, k, v, e, Sf)  # noqa: E731
        fn()
        tg = graph_bench(fn)
        tl_ = triton.testing.do_bench(fn, warmup=50, rep=200)
        print(f"  fla fused_recurrent: graph {tg if tg is None else f'{tg:.4f} ({gb / tg:4.2f} TB/s)'} / "
              f"loop {tl_:.4f} ms ({gb / tl_:4.2f} TB/s)")
    for kname, ms in kernel_times(lambda: mod.launch(x, heads, o, S0, S, None, K ** -0.5, B, 1, H, K, V, 16, 2)).items():
        print(f"  profiler: {kname} {ms * 1e3:.1f} us ({gb / ms:4.2f} TB/s)")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="linear_attention,gla,deltanet,gated_deltanet,kda")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--fla", action="store_true", help="also profile fla's forward of each rule")
    a = ap.parse_args()
    os.environ.setdefault("UNIFATTN_CACHE_DIR", tempfile.mkdtemp())
    if not a.no_decode:
        for name in ("gated_deltanet", "kda"):
            decode_sweep(name)
    for name in a.rules.split(","):
        profile_chunk(name)
        if a.fla:
            profile_fla(name)


if __name__ == "__main__":
    main()
