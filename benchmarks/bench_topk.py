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

    python benchmarks/bench_topk.py [--moba | --select]   # --moba: MoBA's selection only
                                                          # --select: select() A/B (streams, registers)

Each case is checked against torch's path (torch.topk, tie repair, sort) before it is timed.

H200, 2026-11-30 (session 15). --select, two rounds each (device call 4, after the scoring changes):
stop 14's launch (one stream, no register bound) 7.49 / 7.48 ms; one stream, 64 registers 7.06 / 7.05;
two streams, no bound 7.40 / 7.43; two streams, 64 registers (the default) 6.95 / 6.95; the same with
the second stream at priority -1 6.95 / 6.97, with tiles of 2^26 scores 7.03 / 7.10, with an L2
prefetch of a later program's row (since removed) 7.06 / 7.07. Every variant gave the same indices.
Tiles (call 2): the register bound takes rows [12288, 16384) from 0.553 to 0.445 ms and [4096, 8192)
from 0.219 to 0.180; rows from 24576 keys are unchanged (0.918, 0.788); the L2 prefetch 0.930 against
0.918. --moba (call 11): select 1.56 ms with the bound on MoBA's 512-block rows against 1.50 without
(so rows under 4096 keys stay unbounded).
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
    "bits, lanes (stop 13)": dict(interp=0, group=0, tail=False, occupancy=False),
    "regula falsi, lanes": dict(interp=tk.INTERP, group=0, occupancy=False),
    "stop 14 (no register bound)": dict(occupancy=False),
    "64 registers (default)": dict(),
}


def regs_report():
    """Registers and spills of every compiled top-k kernel variant (Triton's compiled-kernel cache)."""
    try:
        for cache in tk.topk_rows_kernel.device_caches.values():
            for k in cache[0].values():
                md = k.metadata
                print(f"  topk_rows_kernel warps={md.num_warps} maxnreg={getattr(md, 'maxnreg', None)}: "
                      f"{k.n_regs} registers, {k.n_spills} spills")
    except Exception as exc:  # noqa: BLE001 - a Triton-version detail, not a result
        print(f"  (no register report: {type(exc).__name__}: {exc})")


def select_ab():
    """select() of the lightning indexer at T=32768, top-2048 (bench_select's inputs), with the top-k on a
    second stream or not, the top-k kernel's register bound or not, smaller tiles, the second
    stream's priority. Each variant's indices are compared with the first's; two rounds."""
    import sys
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import functools

    import bench_select
    import unifattn.select as us
    from unifattn.select import select
    from unifattn.codegen.selector import SelectConfig
    from unifattn.selectors import lightning_indexer
    x = bench_select.inputs(32768)
    real = tk.topk_rows
    cases = {               # name: (SelectConfig keywords, topk_rows keywords, side stream priority)
        "stop 14: one stream, no register bound": (dict(streams=1), dict(occupancy=False), 0),
        "one stream, 64 registers": (dict(streams=1), {}, 0),
        "two streams, no register bound": (dict(streams=2), dict(occupancy=False), 0),
        "two streams, 64 registers (default)": (dict(streams=2), {}, 0),
        "two streams, 64 registers, side priority -1": (dict(streams=2), {}, -1),
        "two streams, 64 registers, tiles / 2": (dict(streams=2, max_tile_elems=1 << 26), {}, 0),
    }
    want, times = None, {n: [] for n in cases}
    for rnd in range(2):
        for name, (cfg, kw, prio) in cases.items():
            tk.topk_rows = functools.partial(real, **kw)
            us.SIDE_PRIORITY = prio
            try:
                run = functools.partial(select, lightning_indexer, topk=K, config=SelectConfig(**cfg), **x)
                got = run()
                if want is None:
                    want = got
                same = torch.equal(got, want)
                times[name].append((triton.testing.do_bench(run, warmup=10, rep=200), same))
            finally:
                tk.topk_rows, us.SIDE_PRIORITY = real, 0
    print(f"\nselect() lightning indexer T=32768 top-{K}, check_inputs=True, two rounds")
    for name, r in times.items():
        print(f"{name:<48}" + "".join(f"{ms:>8.2f}" for ms, _ in r) + ("" if all(ok for _, ok in r)
                                                                        else "  DIFFERENT INDICES"))
    print(f"scoring alone: {triton.testing.do_bench(bench_select.scoring_only(x, SelectConfig()), rep=200):.2f} ms")
    regs_report()


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
    for name in ("bits, lanes (stop 13)", "stop 14 (no register bound)", "64 registers (default)"):
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
    for kind, W in (("random", T), ("indexer", T), ("indexer", 24576), ("indexer", 16384), ("indexer", 8192),
                    ("early", T), ("few", T)):
        s = tile(kind, g, W)
        kind = kind if W == T else f"{kind} {W // 1024}k"
        col, valid = _topk_rows(s, K)
        want = _finish(col, valid).permute(1, 0, 2)
        for name, kw in VARIANTS.items():
            out = torch.full((R, 1, K), -7, dtype=torch.int32, device="cuda")
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
    regs_report()
    print(f"\n{'scores':<12}{'top-k kernel':>44}{'ms':>8}  same as torch's path")
    for kind, w, ms, ok in rows:
        print(f"{kind:<12}{str(w):>44}{ms:>8.3f}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    import sys
    moba_rows() if "--moba" in sys.argv else select_ab() if "--select" in sys.argv else main()
