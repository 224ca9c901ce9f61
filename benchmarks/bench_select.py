"""Lightning-indexer top-k selection vs dense SDPA forward, on one GPU.

    python benchmarks/bench_select.py                 # T = 32768 and 131072, a config sweep at 32768
    python benchmarks/bench_select.py --T 32768 --no-check

Indexer: B=1, HI=16 heads x DI=64, topk=2048, bf16 inputs (DeepSeek V3.2's indexer
shape scaled down as asked: 16 x 64). Measured: scoring (the generated Triton kernel
alone, every query tile) and the whole select() (scoring + top-k + tie repair +
sort; and the default top-k kernel). Baseline: torch SDPA forward, causal, B=1, T=32768, HQ=64, HKV=4, D=128,
bf16, torch's default dispatch with enable_gqa (as in bench_sparse.py). Target: select
at T=32768 takes at most a quarter of the SDPA forward.

H200, 2026-11-29 (session 12), T=32768, one sweep (call 4; SDPA forward 29.14 ms):

    BT   BS  warps stages  score ms  select ms  unchecked
    64   64      4      2      3.52      11.04       9.65   (the default until then)
    64  128      4      2      3.10      10.42       9.38
    64  128      8      2      3.56      11.13       9.97
    64  128      4      3      3.04      10.84       9.32   (the default since)
   128  128      8      2      4.07      11.38      10.46
    64  256      8      2      4.06      11.95      10.46
    32  256      4      2      5.01      12.76      11.42
   128   64      8      2      3.78      11.40      10.13
With the new default alone (call 6): select 10.15 ms (9.28 unchecked, scoring 3.03) = 0.350x the
SDPA forward (28.97 ms); T=131072: 152.10 ms (scoring 46.76; torch.topk path 294.69).
benchmarks/ab_score_emission.py (call 5): the head sum added straight into acc against a separate
head-sum tile: scoring 3.01-3.08 against 3.05-3.10 ms, ~1% (A B A B at three configs).
Session 12's call 6 timed select before the NaN-score flag (CHECK) joined checked calls. Session 13,
with it (call 4: select 11.07, unchecked 9.28, scoring 3.04 ms; T=131072 166.58 / 149.63; call 5,
after the flag became a per-row max and atomic: select 11.67, unchecked 9.30 = 0.390x / 0.311x the
SDPA forward, 29.90 ms). The flag's own cost, one process: benchmarks/ab_nan_flag.py (scoring 3.50 against
3.06-3.09 ms without it); the rest of the checked call's extra is the host sync.

Session 15 (2026-11-30, bench_sparse.py's table, one run): select 6.95 ms = 0.238x the SDPA forward
(29.17 ms), 6.96 unchecked; scoring 2.62 ms of GPU time (was 2.97: the template's masks built after the
head loop, the forced-key mask only with `always`, no clamp when the inputs' bound proves the scores
finite: benchmarks/ab_score_pipeline.py), top-k 4.48 (was 4.87: a 64-register bound for rows of 4096 to 20480
keys), each tile's top-k on a second stream beside the next tile's scoring (bench_topk.py --select:
7.80 -> 7.37 ms for the register bound, -> 7.25 with the stream, -> 6.95 with the scoring changes).

--check (default) first compares the compiled kernel with the float64 reference
at T=512 (scores within the bf16 tolerance, selection optimal within it).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import triton

from unifattn.codegen.selector import SelectConfig
from unifattn.select import _plan, _prepare, _run_tiles, reference_scores, select, select_scores
from unifattn.selectors import lightning_indexer
from unifattn.testing.tolerance import TOLERANCE

HI, DI, TOPK = 16, 64, 2048


def inputs(T, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qi = torch.randn(1, T, HI, DI, device="cuda", dtype=dtype, generator=g)
    ki = torch.randn(1, T, DI, device="cuda", dtype=dtype, generator=g)
    w = torch.rand(1, T, HI, device="cuda", dtype=dtype, generator=g) * HI ** -0.5
    return dict(qi=qi, ki=ki, w=w)


def bench(fn, rep_ms=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms)


def scoring_only(x, cfg):
    p, _ = _prepare(lightning_indexer, x, None, TOPK)
    return lambda: _run_tiles(lightning_indexer, p, _plan(lightning_indexer, p, cfg), lambda *a: None)


def sdpa_ms(T=32768, HQ=64, HKV=4, D=128):
    """The dense anchor as bench_sparse.py times it: torch's default SDPA dispatch, causal, GQA.
    (Forcing the flash backend gave 50.8 ms on the H200 against 29.5 ms for the default.)"""
    F = torch.nn.functional
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "default dispatch, gqa"


def check(cfg):
    x = inputs(512, seed=1)
    got = select_scores(lightning_indexer, config=cfg, **x).double()
    ref = reference_scores(lightning_indexer, **x)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), "candidate masks differ"
    tol = TOLERANCE[torch.bfloat16] * max(1.0, float(ref[fin].abs().max()))
    err = float((got[fin] - ref[fin]).abs().max())
    assert err <= tol, f"scores: max error {err:.3e} > {tol:.3e}"
    idx = select(lightning_indexer, topk=64, config=cfg, **x)[0, :, 0].long()
    s = ref[0, :, 0]
    for t in range(512):
        kept = idx[t][idx[t] >= 0]
        assert kept.numel() == min(64, t + 1) and bool((kept[1:] > kept[:-1]).all()) and int(kept.max()) <= t
        m = torch.ones(512, dtype=torch.bool, device=s.device)
        m[kept] = False
        left = s[t][m & fin[0, t, 0]]
        if left.numel():
            assert float(left.max()) <= float(s[t][kept].min()) + 2 * tol, f"row {t}: a better key left out"
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    # the scoring program loads a [BT, HI * DI] query block per BS key columns: its arithmetic
    # intensity grows with BS (~BS FLOP per byte), so the sweep leans to wide key blocks
    cfgs = [SelectConfig()] if a.no_sweep else [SelectConfig()] + [
        SelectConfig(block_t=bt, block_s=bs, num_warps=w, num_stages=st)
        for bt, bs, w, st in [(64, 64, 4, 2), (64, 128, 4, 2), (64, 128, 8, 2), (64, 128, 4, 3),
                              (128, 128, 8, 2), (64, 256, 8, 2), (32, 256, 4, 2), (128, 64, 8, 2)]
        if (bt, bs, w, st) != (SelectConfig().block_t, SelectConfig().block_s, SelectConfig().num_warps,
                               SelectConfig().num_stages)]
    if not a.no_check:
        for cfg in cfgs:
            print(f"check {cfg}: max score error {check(cfg):.2e} (bf16 tolerance), selection optimal")

    base, how = sdpa_ms()
    print(f"\nSDPA forward ({how}) B=1 T=32768 HQ=64 HKV=4 D=128 bf16: {base:.2f} ms")
    rows = []
    for T in a.T:
        x = inputs(T)
        for cfg in (cfgs if T == 32768 else [cfgs[0]]):
            torch.cuda.reset_peak_memory_stats()
            s_ms = bench(scoring_only(x, cfg))
            t_ms = bench(lambda c=cfg, x=x: select(lightning_indexer, topk=TOPK, config=c, **x))
            rcfg = dataclasses.replace(cfg, topk_impl="torch")
            r_ms = bench(lambda c=rcfg, x=x: select(lightning_indexer, topk=TOPK, config=c, **x)) \
                if cfg == cfgs[0] else float("inf")          # the torch.topk path once, not per config
            u_ms = bench(lambda c=cfg, x=x: select(lightning_indexer, topk=TOPK, config=c, check_inputs=False, **x))
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            rows.append((T, cfg, s_ms, t_ms, r_ms, u_ms, peak))
            print(f"  T={T} {cfg}: scoring {s_ms:.2f} select {t_ms:.2f} unchecked {u_ms:.2f} torch {r_ms:.2f} ms",
                  flush=True)
        del x
        torch.cuda.empty_cache()

    print(f"\n{'T':>7} {'BT':>4} {'BS':>4} {'warps':>5} {'stages':>6} {'score ms':>9} {'select ms':>10} "
          f"{'unchecked':>10} {'torch ms':>9} {'/ SDPA':>7} {'peak GiB':>9}")
    for T, cfg, s_ms, t_ms, r_ms, u_ms, peak in rows:
        print(f"{T:>7} {cfg.block_t:>4} {cfg.block_s:>4} {cfg.num_warps:>5} {cfg.num_stages:>6} {s_ms:>9.2f} "
              f"{t_ms:>10.2f} {u_ms:>10.2f} {r_ms:>9.2f} {min(t_ms, r_ms) / base:>7.3f} {peak:>9.2f}")
    best = min((r for r in rows if r[0] == 32768), key=lambda r: min(r[3], r[4]), default=None)
    if best:
        flops = HI * DI * 2 * 32768 ** 2 / 2
        ms = min(best[3], best[4])
        print(f"\nT=32768 best: select {ms:.2f} ms = {ms / base:.3f} x SDPA forward "
              f"(target <= 0.25: {'MET' if ms <= base / 4 else 'NOT MET'}); scoring {best[2]:.2f} ms "
              f"= {flops / best[2] / 1e9:.0f} TFLOP/s on the causal half; {best[1]}")


if __name__ == "__main__":
    main()
