"""Where the top-k kernel's time goes (kernels/topk.py), on one GPU: the last query tile of a
T=32768 selection (4096 rows x 32768 scores, -inf right of each row's causal end) with scores
shaped so that the kernel's search runs its usual course or is cut short:

    random   N(0, 1) scores: the search runs until the k-th and (k+1)-th keys part
    early    2048 scores of 1e30 per row: the search stops after a few bits
    few      at most 2048 candidates per row: no search, the output pass only
    tied     every score equal: 32 bits, then the tie-rank scan
    indexer  lightning-indexer scores of random inputs (16 heads x 64 dims), causal

Variants of the kernel (A/B in one process, each checked first): the search (bits from bit 31, or
regula falsi first: kernels.topk._kth_key), the output pass's prefix counts (shuffle scans over the
32 lanes of a warp, or runs of neighbouring columns: kernels.topk._prefix) and its step, and rows
that are not a power of two held as one register tensor or two (kernels.topk.split).

    python benchmarks/bench_topk.py [--moba]      # --moba: MoBA's selection only

Each case is checked against torch's path (torch.topk, tie repair, sort) before it is timed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unifattn.kernels import topk as tk
from unifattn.select import _finish, _topk_rows

R, T, K = 4096, 32768, 2048


@triton.jit
def _row_sum(s, red, W, ROW: tl.constexpr):
    o = tl.arange(0, ROW)
    b = tl.load(s + tl.program_id(0).to(tl.int64) * W + o, mask=o < W, other=0.)
    tl.store(red + tl.program_id(0), tl.sum(tl.where(b > 0, 1, 0), 0).to(tl.float32))


def tile(kind: str, g: torch.Generator, T: int = T) -> torch.Tensor:
    """The tile of rows [T - R, T) of a T-token causal selection."""
    pos = torch.arange(T - R, T, device="cuda")
    s = torch.randn(1, R, T, device="cuda", generator=g)
    if kind == "early":
        hot = torch.rand(1, R, T, device="cuda", generator=g).argsort(-1)[..., :K]
        s.scatter_(-1, hot, 1e30)
    elif kind == "tied":
        s.fill_(1.0)
    elif kind == "indexer":
        qi = torch.randn(R, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        ki = torch.randn(T, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(R, 16, device="cuda", generator=g)
        s = torch.zeros(1, R, T, device="cuda")
        for h in range(16):
            s[0] += w[:, h, None] * torch.relu((qi[:, h] @ ki.T).float())
    causal = torch.arange(T, device="cuda")[None, None, :] > pos[None, :, None]
    if kind == "few":
        causal |= torch.arange(T, device="cuda")[None, None, :] >= K
    return torch.where(causal, float("-inf"), s)


def select_rows():
    """The whole lightning-indexer selection at T=32768 (bench_select's inputs), both top-k paths."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import bench_select
    from unifattn.codegen.selector import SelectConfig
    from unifattn.select import select
    from unifattn.selectors import lightning_indexer
    x = bench_select.inputs(32768)
    for check in (True, False):
        ms = triton.testing.do_bench(lambda: select(lightning_indexer, topk=K, check_inputs=check, **x),
                                     warmup=10, rep=200)
        print(f"select() T=32768 top-{K}, check_inputs={check}: {ms:.2f} ms")
    print(f"scoring alone: {triton.testing.do_bench(bench_select.scoring_only(x, SelectConfig()), rep=200):.2f} ms")


VARIANTS = {                       # name: topk_rows keywords
    "bits, lanes (stop 13)": dict(interp=0, group=0, tail=False),
    "regula falsi, lanes": dict(interp=tk.INTERP, group=0),
    "regula falsi, runs of 4": dict(interp=tk.INTERP, group=4),
    "regula falsi, runs of 16": dict(interp=tk.INTERP, group=16),
    "regula falsi, runs of 4, 8 keys a step": dict(interp=tk.INTERP, group=4, keys_per_thread=8),
    "regula falsi, runs of 4, one tensor": dict(interp=tk.INTERP, group=4, tail=False),
}


def moba_rows():
    """MoBA's selection at T=32768 (q [1, T, 64, 128], k [1, T, 4, 128] bf16, top-16 of 512 blocks): one
    query tile of short rows; select() with its kernel's search and output pass as in VARIANTS."""
    import functools

    from unifattn.select import select
    from unifattn.selectors import moba
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, T, 64, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    real = tk.topk_rows
    want = select(moba, topk=16, q=q, kmean=k)
    for name in ("bits, lanes (stop 13)", "regula falsi, lanes", "regula falsi, runs of 4", "default"):
        tk.topk_rows = functools.partial(real, **VARIANTS.get(name, {}))
        try:
            for check in (True, False):
                ok = torch.equal(select(moba, topk=16, q=q, kmean=k, check_inputs=check), want)
                ms = triton.testing.do_bench(lambda: select(moba, topk=16, q=q, kmean=k, check_inputs=check),
                                             warmup=10, rep=200)
                print(f"select(moba) T={T} top-16 x 64, {name}, check_inputs={check}: {ms:.2f} ms"
                      f"{'' if ok else '  DIFFERENT INDICES'}")
        finally:
            tk.topk_rows = real


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    bblk = torch.zeros(R, dtype=torch.int32, device="cuda")
    rows = []
    for kind, W in (("random", T), ("indexer", T), ("indexer", 24576), ("early", T), ("few", T)):
        s = tile(kind, g, W)
        kind = kind if W == T else f"{kind} {W // 1024}k"
        col, valid = _topk_rows(s, K)
        want = _finish(col, valid).permute(1, 0, 2)
        for name, kw in VARIANTS.items():
            out = torch.full((R, 1, K), -7, dtype=torch.int32, device="cuda")
            if kw.get("tail") is False and W == T and "stop 13" not in name:
                continue                    # a power-of-two row: no tail
            run = lambda o=out, kw=kw: tk.topk_rows(s, o, bblk, 0, K, **kw)  # noqa: E731
            run()
            ok = torch.equal(out, want)
            rows.append((kind, name, triton.testing.do_bench(run, warmup=25, rep=200), ok))
        rows.append((kind, "torch.topk alone", triton.testing.do_bench(
            lambda: torch.topk(s, K, dim=-1, sorted=False), warmup=25, rep=200), True))
        if kind == "random":        # the floor: each row read into registers once, one reduction
            for warps in (16, 32):
                red = torch.empty(R, device="cuda")
                run = lambda w=warps: _row_sum[(R,)](s, red, T, ROW=T, num_warps=w)  # noqa: E731
                rows.append((kind, f"read + 1 sum, {warps} warps", triton.testing.do_bench(run, warmup=25, rep=200),
                             True))
        del s
    select_rows()
    print(f"\n{'scores':<12}{'top-k kernel':>44}{'ms':>8}  same as torch's path")
    for kind, w, ms, ok in rows:
        print(f"{kind:<12}{str(w):>44}{ms:>8.3f}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    import sys
    moba_rows() if "--moba" in sys.argv else main()
