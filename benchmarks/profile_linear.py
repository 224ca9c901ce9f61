"""Where the linear-attention forward spends its time, kernel by kernel, and the decode launch sweep.

    python benchmarks/profile_linear.py [--rules deltanet,kda] [--no-decode]

1. For each rule: tune the chunk launch configs (tune=True), then 20 forwards of the generated
   module under torch.profiler at B=8 T=4096 H=16 K=V=128 bf16; prints each kernel's mean time.
2. Decode (T = 1, state in place, B=16 H=16 K=V=128): every (BV, num_warps) launch of the
   generated recurrent kernel, checked against the default launch, with the effective state
   bandwidth (fp32 state read + written).
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
from bench_linear import inputs  # noqa: E402


def profile_chunk(name, B=8, T=4096, H=16, K=128, V=128):
    r = ua.rules.BUILTIN[name]
    q, k, v, e = inputs(name, B, T, H, K, V, torch.bfloat16, "cuda", seed=2)
    ua.ops.linear_attention(r, q, k, v, form="chunk", tune=True, **e)
    mod = codegen.module(r, "chunk")
    x = {"q": q, "k": k, "v": v, **e}
    heads = {s.name: x[s.name].shape[2] for s in r.inputs if s.kind == "token"}
    fn = lambda: mod.forward(x, heads, B, T, H, H, K, V, K ** -0.5, None, False, None)  # noqa: E731
    total = triton.testing.do_bench(fn, warmup=25, rep=100)
    n = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] += ev.device_time_total / n / 1e3 if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total / n / 1e3
    print(f"\n{name}: forward {total:.3f} ms (do_bench); kernels (mean ms per forward):")
    for kname, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        if ms > 0.002:
            print(f"  {ms:8.3f}  {kname}")
    sys.stdout.flush()


def decode_sweep(name, B=16, H=16, K=128, V=128):
    r = ua.rules.BUILTIN[name]
    q, k, v, e = inputs(name, B, 1, H, K, V, torch.bfloat16, "cuda")
    mod = codegen.module(r, "recurrent")
    x = {"q": q, "k": k, "v": v, **e}
    heads = {n: x[n].shape[2] for n in x if x[n].dim() >= 3}
    S0 = torch.randn(B, H, K, V, device="cuda") * 0.1
    ref_o, ref_S = torch.empty_like(v), torch.empty_like(S0)
    mod.launch(x, heads, ref_o, S0, ref_S, None, K ** -0.5, B, 1, H, K, V, 128, 8)
    rows = []
    for BV in (8, 16, 32, 64, 128):
        for w in (1, 2, 4, 8):
            o, S = torch.empty_like(v), torch.empty_like(S0)
            try:
                mod.launch(x, heads, o, S0, S, None, K ** -0.5, B, 1, H, K, V, BV, w)
                err = max(float((o.float() - ref_o.float()).abs().max()), float((S - ref_S).abs().max()))
                t = triton.testing.do_bench(lambda: mod.launch(x, heads, o, S0, S, None, K ** -0.5, B, 1, H, K, V,
                                                               BV, w), warmup=50, rep=200)
                rows.append((t, BV, w, err))
            except Exception as exc:  # noqa: BLE001
                print(f"  decode {name} BV={BV} warps={w}: failed {type(exc).__name__}")
    print(f"\ndecode {name} B={B} H={H} K=V={K}: (ms, TB/s effective, BV, warps, max |diff| vs BV=128 w=8)")
    for t, BV, w, err in sorted(rows)[:8]:
        print(f"  {t:.4f} ms  {2 * S0.numel() * 4 / t / 1e9:5.2f} TB/s  BV={BV:<3} warps={w}  {err:.1e}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="linear_attention,gla,deltanet,gated_deltanet,kda")
    ap.add_argument("--no-decode", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("UNIFATTN_CACHE_DIR", tempfile.mkdtemp())
    if not a.no_decode:
        for name in ("gated_deltanet", "kda"):
            decode_sweep(name)
    for name in a.rules.split(","):
        profile_chunk(name)


if __name__ == "__main__":
    main()
