"""MoBA's select() timed alone, then after a token sparse forward + backward at bench_sparse.py's shape and
after lightning-indexer selections (the order bench_sparse uses), to tell a slower select from a slower
context.

    python benchmarks/moba_context.py
"""
from __future__ import annotations

import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_sparse import bench, random_indices  # noqa: E402

import unifattn as ua  # noqa: E402


def main():
    B, T, HQ, HKV, D = 1, 32768, 64, 4, 128
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV, HQ))
    mb = lambda: ua.ops.select(ua.rules.moba, topk=16, q=q, kmean=k)  # noqa: E731
    mbu = lambda: ua.ops.select(ua.rules.moba, topk=16, q=q, kmean=k, check_inputs=False)  # noqa: E731
    print(f"moba select, fresh process: {bench(mb):.2f} ms, unchecked {bench(mbu):.2f} ms")
    for x in (q, k, v):
        x.requires_grad_()
    idx = random_indices(B, T, HKV, 2048, device="cuda")
    run = lambda: ua.ops.sparse_attention(q, k, v, idx, check_indices=False, check_inputs=False).backward(do)  # noqa: E731
    print(f"token top-2048 fwd+bwd: {triton.testing.do_bench(run, rep=300):.2f} ms")
    mb = lambda: ua.ops.select(ua.rules.moba, topk=16, q=q.detach(), kmean=k.detach())  # noqa: E731
    mbu = lambda: ua.ops.select(ua.rules.moba, topk=16, q=q.detach(), kmean=k.detach(), check_inputs=False)  # noqa: E731
    print(f"moba select, after it: {bench(mb):.2f} ms, unchecked {bench(mbu):.2f} ms")
    import bench_select
    x = bench_select.inputs(T)
    print(f"lightning select: {bench(lambda: ua.ops.select(ua.rules.lightning_indexer, topk=2048, **x)):.2f} ms")
    print(f"moba select, after it: {bench(mb):.2f} ms, unchecked {bench(mbu):.2f} ms")
    from unifattn.select import SelectConfig
    one = SelectConfig(streams=1)
    print(f"lightning select, one stream: "
          f"{bench(lambda: ua.ops.select(ua.rules.lightning_indexer, topk=2048, config=one, **x)):.2f} ms")
    print(f"moba select, after it: {bench(mb):.2f} ms, unchecked {bench(mbu):.2f} ms")


if __name__ == "__main__":
    main()
