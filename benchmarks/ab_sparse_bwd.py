"""Where the token-granularity sparse backward's time goes, on one GPU (B=1, T=32768, HQ=64, HKV=4, D=128,
bf16, random top-2048 lists as in bench_sparse.py):

    fwd            the forward (the gathers of K and V rows, two dots a tile)
    bwd            the backward as sparse_attention runs it: dq, and dk, dv scattered with fp32 atomics
    bwd, no dk/dv  the same kernel with DKV=False: the gathers and the dq dots only (no transposed dots,
                   no atomics); the difference to `bwd` is what the scatter costs

    python benchmarks/ab_sparse_bwd.py

H200, 2026-11-30 (session 15), one run: top-2048 fwd 16.97 ms, bwd 91.72, bwd without dk/dv 18.08 (top-1024:
8.81, 46.27, 9.37): the dk, dv scatter (two transposed score dots, two [BS, D] dots, 2 x BS x D fp32 atomics a
tile) is 80% of the backward. Tried and dropped in the same run (as in session 7, in
another form): the atomics sent as pairs (red.v2.f32 through inline PTX where the two elements a thread holds
are adjacent and both unmasked, element by element otherwise): 127.2 ms against 91.7 (top-1024: 64.3 / 46.3).
"""
from __future__ import annotations

import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_sparse import random_indices  # noqa: E402

from unifattn.kernels.sparse_attention import _launch_args, _sparse_bwd, _sparse_fwd  # noqa: E402
from unifattn.kernels.sparse_kernels import sparse_attn_bwd_kernel, sparse_config  # noqa: E402


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    B, T, HQ, HKV, D = 1, 32768, 64, 4, 128
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV, HQ))
    scale = D ** -0.5
    rows = []
    for topk in (2048, 1024):
        idx = random_indices(B, T, HKV, topk, device="cuda")
        o, lse = _sparse_fwd(q, k, v, idx, None, 1, scale)
        (_, _, _, _, _, _), meta = _launch_args(q, k, v, idx, 1)
        cfg = sparse_config("bwd", meta["BK"], meta["BV"], meta["BG"])
        dq = torch.empty_like(q)
        delta = torch.empty((B, T, HQ), dtype=torch.float32, device="cuda")

        def dq_only():
            sparse_attn_bwd_kernel[(T, B * HKV)](q, k, v, o, do, lse, None, idx, None, dq, None, None, delta, scale,
                                                 **meta, DKV=False, BS=cfg.BS, num_warps=cfg.num_warps,
                                                 num_stages=cfg.num_stages)
        rows.append((topk, "fwd", triton.testing.do_bench(lambda: _sparse_fwd(q, k, v, idx, None, 1, scale), rep=300)))
        rows.append((topk, "bwd", triton.testing.do_bench(
            lambda: _sparse_bwd(q, k, v, o, lse, do, None, idx, None, 1, scale), rep=300)))
        rows.append((topk, "bwd, no dk/dv", triton.testing.do_bench(dq_only, rep=300)))
    print(f"\n{'topk':>6} {'pass':<28}{'ms':>8}")
    for topk, name, ms in rows:
        print(f"{topk:>6} {name:<28}{ms:>8.2f}")


if __name__ == "__main__":
    main()
