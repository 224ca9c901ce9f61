"""A/B of the lightning-indexer scoring's head loop, on one GPU (T=32768, bench_select's inputs).

The generated scoring kernel (codegen/selector.py) runs, per indexer head, a tensor-core dot and then its
relu / weight / add epilogue on the CUDA cores: each dot waits for the epilogue before it. This script
times a hand-written kernel of the same tiling in two forms, to see whether deferring each head's epilogue
behind the next head's dot (the dot in flight while the previous one's epilogue runs) pays, before the
template learns it:

    plain     dot h, then its epilogue (the generated kernel's order)
    deferred  dot h + 1 issued, then the epilogue of dot h

and the generated kernel as select() runs it (with and without its clamp of inf / NaN scores: FINITE, when
the inputs' bound keeps the scores finite), and without its masks along the head dimension.
H200, 2026-11-30 (session 15), one process, two rounds: plain 64x128 on 4 warps 2.60 ms against 3.01 for the
generated kernel; deferred 3.00 (slower at every shape); the generated kernel without its forced-key mask
2.87 / 2.91, without the clamp 2.92 / 2.98, without the head-dim masks 3.02 / 3.25 (noise). The scoring is
bound by its epilogue's CUDA-core work: the template now builds its [BT, BS] masks after the head loop from
per-row bounds, applies the forced-key mask only with `always`, and leaves the clamp out when FINITE.
After that (call 4): generated 2.77 / 2.77 ms, FINITE 2.68 / 2.89 (noise in the second round), against
plain 2.57: what is left of the gap is the query positions' loads and the programs' skip test (varlen).

Both sum the heads in the same order as the generated kernel: their scores are compared with its, bitwise.

    python benchmarks/ab_score_pipeline.py
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_select  # noqa: E402

from ab_score_emission import import_sources  # noqa: E402

from unifattn.codegen import selector as cgs  # noqa: E402
from unifattn.codegen.selector import SelectConfig  # noqa: E402
from unifattn.select import _plan, _prepare, _run_tiles  # noqa: E402
from unifattn.selectors import lightning_indexer  # noqa: E402


@triton.jit
def score_ab(qi, ki, w, o, q0, c0, NQ, W, NH: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
             BS: tl.constexpr, DEFER: tl.constexpr):
    """o [NQ, W] = sum_h w[t, h] relu(qi[t, h] . ki[s]) for the causal columns (s <= t), -inf elsewhere;
    B = 1, one sequence, rows q0 + [0, NQ), columns c0 + [0, W)."""
    i_t, i_s = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_s = i_s * BS + tl.arange(0, BS)
    m_t = o_t < NQ
    m_s = o_s < W
    rows = (q0 + o_t).to(tl.int64)
    cols = (c0 + o_s).to(tl.int64)
    o_d = tl.arange(0, D)
    acc = tl.zeros([BT, BS], dtype=tl.float32)
    if c0 + i_s * BS <= q0 + tl.minimum(i_t * BT + BT, NQ) - 1:
        b_k = tl.load(ki + cols[None, :] * D + o_d[:, None], mask=m_s[None, :], other=0.0)
        p_q = qi + rows[:, None] * (NH * D) + o_d[None, :]
        p_w = w + rows * NH
        if DEFER:
            prev = tl.dot(tl.load(p_q, mask=m_t[:, None], other=0.0), b_k)
            for h in range(1, NH):
                cur = tl.dot(tl.load(p_q + h * D, mask=m_t[:, None], other=0.0), b_k)
                b_w = tl.load(p_w + (h - 1), mask=m_t, other=0.0).to(tl.float32)[:, None]
                acc += b_w * tl.maximum(prev, 0.0)
                prev = cur
            acc += tl.load(p_w + (NH - 1), mask=m_t, other=0.0).to(tl.float32)[:, None] * tl.maximum(prev, 0.0)
        else:
            for h in range(NH):
                b_w = tl.load(p_w + h, mask=m_t, other=0.0).to(tl.float32)[:, None]
                b = tl.dot(tl.load(p_q + h * D, mask=m_t[:, None], other=0.0), b_k)
                acc += b_w * tl.maximum(b, 0.0)
    sc = tl.where(cols[None, :] <= rows[:, None], acc, float("-inf"))
    tl.store(o + o_t[:, None].to(tl.int64) * W + o_s[None, :], sc, mask=m_t[:, None] & m_s[None, :])


EDITS = {                  # tag: [(text in the generated module, replacement)]
    "no head-dim masks": [("mask=m_t[:, None] & m_d_DI[None, :]", "mask=m_t[:, None]"),
                          ("mask=m_d_DI[:, None] & m_s[None, :]", "mask=m_s[None, :]")],
}


def edited(x):
    """The generated module, and with EDITS applied, timed as select times its scoring (FINITE or not)."""
    text = cgs.source(lightning_indexer)
    texts = {"generated": text}
    for tag, subs in EDITS.items():
        t = text
        for a, b in subs:
            assert a in t, f"{tag}: {a!r} not in the generated text"
            t = t.replace(a, b)
        texts[tag] = t
    mods = import_sources(texts, "pipe")
    real = cgs.module
    rows = []
    p, _ = _prepare(lightning_indexer, x, None, bench_select.TOPK)
    try:
        for rnd in range(2):
            for tag, m in mods.items():
                cgs.module = lambda sel, m=m: m if sel is lightning_indexer else real(sel)
                for finite in (False, True):
                    run = lambda f=finite: _run_tiles(lightning_indexer, p, _plan(lightning_indexer, p, SelectConfig()),  # noqa: E731,E501
                                                      lambda *a: None, finite=f)
                    ms = triton.testing.do_bench(run, warmup=10, rep=300)
                    rows.append((f"generated, {tag}{', finite' if finite else ''} ({rnd})", ms, "-"))
    finally:
        cgs.module = real
    return rows


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    T, HI, DI = 32768, bench_select.HI, bench_select.DI
    x = bench_select.inputs(T)
    cfg = SelectConfig()
    p, _ = _prepare(lightning_indexer, x, None, bench_select.TOPK)
    plan = _plan(lightning_indexer, p, cfg)
    tiles = plan[2]
    outs = {}

    def generated():
        _run_tiles(lightning_indexer, p, plan, lambda q0, q1, c0, s: outs.__setitem__(q0, s))

    qi, ki, w = (x[n].reshape(T, -1).contiguous() for n in ("qi", "ki", "w"))
    bufs = {q0: torch.empty((q1 - q0) * W, device="cuda") for q0, q1, _, W in tiles}

    def hand(defer, bt, bs, warps, stages):
        def run():
            for q0, q1, c0, W in tiles:
                grid = (triton.cdiv(q1 - q0, bt), triton.cdiv(W, bs))
                score_ab[grid](qi, ki, w, bufs[q0], q0, c0, q1 - q0, W, NH=HI, D=DI, BT=bt, BS=bs, DEFER=defer,
                               num_warps=warps, num_stages=stages)
        return run

    generated()
    ref = {q0: s.clone() for q0, s in outs.items()}
    rows = [("generated (select's)", triton.testing.do_bench(generated, warmup=10, rep=300), "-")]
    for defer in (False, True):
        for bt, bs, warps, stages in ((64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)):
            run = hand(defer, bt, bs, warps, stages)
            try:
                run()
                same = all(torch.equal(bufs[q0].view(ref[q0].shape[1:]), ref[q0][0]) for q0 in ref)
                ms = triton.testing.do_bench(run, warmup=10, rep=300)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row, not a stop
                ms, same = float("nan"), f"{type(exc).__name__}"
            rows.append((f"{'deferred' if defer else 'plain'} {bt}x{bs} w{warps} s{stages}", ms, same))
    rows += edited(x)
    print(f"\n{'scoring, T=32768, all tiles':<36}{'ms':>8}  bitwise as generated")
    for name, ms, same in rows:
        print(f"{name:<36}{ms:>8.3f}  {same}")


if __name__ == "__main__":
    main()
