"""The floor under token-granularity sparse attention at bench_sparse.py's shape, on one GPU: the K and V rows
that every (query token, KV head) must read, gathered by a kernel that does nothing else.

B=1, T=32768, HKV=4, D=128, bf16, random causal top-k lists (bench_sparse.random_indices). Each program owns
one (token, KV head) as the sparse kernels do (token fastest, so programs in flight share a KV head), loads
its list in tiles of 64 entries and reads those rows of K and V; a sum of what it read is stored so that the
reads stay. The forward must read these rows once and the backward again (it recomputes the scores and needs
V for dp), so forward + backward take at least twice this time, whatever their arithmetic; the backward's
fp32 dk, dv scatter comes on top.

    python benchmarks/gather_floor.py
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_sparse import random_indices  # noqa: E402


@triton.jit
def gather_rows(k, v, indices, out, T, TOPK, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    p_idx = indices + (i_t * HKV + i_h) * TOPK
    for i_n in range(0, TOPK, BS):
        o_n = i_n + tl.arange(0, BS)
        pos = tl.load(p_idx + o_n, mask=o_n < TOPK, other=-1)
        m = pos >= 0
        rows = (pos.to(tl.int64) * HKV + i_h) * D
        b_k = tl.load(k + rows[:, None] + o_d[None, :], mask=m[:, None], other=0.)
        b_v = tl.load(v + rows[:, None] + o_d[None, :], mask=m[:, None], other=0.)
        acc += tl.sum(b_k.to(tl.float32) + b_v.to(tl.float32), 0)
    tl.store(out + (i_t * HKV + i_h) * D + o_d, acc)


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    B, T, HKV, D = 1, 32768, 4, 128
    torch.manual_seed(0)
    k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(T, HKV, D, device="cuda")
    rows = []
    for topk in (2048, 1024):
        idx = random_indices(B, T, HKV, topk, device="cuda")
        n = int((idx >= 0).sum())
        gb = n * 2 * D * 2 / 1e9
        for bs, warps in ((64, 4), (128, 8), (64, 8)):
            ms = triton.testing.do_bench(lambda: gather_rows[(T, HKV)](k, v, idx, out, T, topk, HKV=HKV, D=D, BS=bs,
                                                                         num_warps=warps), rep=300)
            rows.append((topk, bs, warps, gb, ms))
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), rep=300)
    print(f"\nHBM copy of 1 GiB: {copy_ms:.3f} ms = {2 * 2 ** 30 / copy_ms / 1e9:.2f} TB/s (read + write)")
    print(f"\n{'topk':>6}{'BS':>5}{'warps':>6}{'GB read':>9}{'ms':>8}{'TB/s':>7}")
    for topk, bs, warps, gb, ms in rows:
        print(f"{topk:>6}{bs:>5}{warps:>6}{gb:>9.1f}{ms:>8.2f}{gb / ms:>7.2f}")


if __name__ == "__main__":
    main()
