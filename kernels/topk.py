"""Exact top-k of score rows, in registers: columns ascending, ties to the lower column, -1 padded.

`topk_rows` replaces torch.topk + a tie repair + a sort for the selection of sparse attention.

Keys. A fp32 score becomes an order-preserving uint32 (-0.0 reads as +0.0; -inf, the mark of a
non-candidate, becomes 0x007FFFFF; lanes past the row become 0, below every score).

One program per row segment of at most MAX_ROW keys, all held in registers (16 warps: 64 keys per
thread at 32768; a row that is not a power of two in two tensors, ROW + TAIL: split()). Rows of 4096 to
20480 keys run under a 64-register bound (launch_config), so that two 16-warp programs (four of 8 warps)
share an SM and one loads while the other counts; longer rows take 128 registers, one program an SM:

1. n_valid = the keys above -inf's. At most k of them: keep them all, pad with -1.
2. Otherwise the k-th largest key (_kth_key): a bracket of keys closed by regula falsi on the scores
   (Illinois rule, a bisection where the guesses fall between clusters), then bits from the highest
   where the bracket's ends differ: a bit is set when at least k keys reach prefix | bit. Each step is
   one counting pass over the registers, no histogram; the search stops when exactly k keys reach the
   bracket's low end (the kept set is then known).
3. One pass in column order (the segment read again, from L2, in steps of 16 keys per thread)
   writes every column whose key is greater than the k-th, and the first k_eq columns whose key
   equals it: positions from prefix counts over runs of 4 neighbouring columns (_prefix), so the kept
   columns come out ascending and nothing is sorted. The tie rank is counted only when the k-th key is
   rationed.

H200, the last tile of a T=32768 selection (4096 rows x 32768 scores, causal; benchmarks/bench_topk.py,
2026-11-30, one run): 0.925 ms on N(0, 1) scores and 0.918 on lightning-indexer scores, against 1.146 /
1.140 for the bit search with prefix counts over a warp's 32 lanes (stop 13's kernel) and 1.68 for
torch.topk alone (which leaves the tie repair and the sort still to do); the tile of rows [20480, 24576)
(16384 + 8192 registers) 0.789 against 1.014; every score tied 0.805 against 1.679. Rows built against
regula falsi (2048 scores of 1e30 among N(0, 1)) take 1.219 against 1.066. Reading the tile once costs
0.13 ms. Measured and dropped on the way: runs of 16 or 32 columns (1.034, 1.035), 8 or 32 keys per
thread a step (1.021, 1.102 with runs of 16), ballots (PTX vote) for the prefix counts (slower, and
wrong on the H200 although a lane-order guard held), reading each row only to its causal end (slower:
1.076 against 0.925 with the end computed in the kernel, 0.1 ms more with it loaded), one tl.cumsum per output step (1.59 ms at the time), the
output pass straight from the registers without a second read (spills: 3.67), two bits per search pass
with three counts in one reduction (1.87 against 1.59 at the time), 8 or 32 warps (1.26, 1.20);
counting with plain compares instead of PTX set.ge: 1.25.

H200, session 15 (bench_topk.py, one run): the 64-register bound takes the tile of rows [12288, 16384) from
0.553 to 0.445 ms and [4096, 8192) from 0.219 to 0.180; longer rows are unchanged (one program an SM either
way). Measured and dropped: each program asking L2 for the row of the program one round of resident
programs later (prefetch.global.L2 per 128-byte line): 0.930 against 0.918 ms on the last tile.

Rows longer than MAX_ROW (T = 131072) take rounds: each MAX_ROW segment keeps its own top-k
(key, column) pairs in column order, until the concatenated candidates fit one program, which
selects from them (two launches at T = 131072, top-2048; more for longer rows; topk at most
MAX_ROW / 2 so that every round shrinks the row). Exact: a key among the row's k best (score
descending, column ascending) is among its segment's k best, and candidates stay in column order,
so ties still go to the lower column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unifattn.kernels.utils import interpreting

MAX_ROW = 32768                   # keys one program holds (16 warps x 64 registers)
KEYS_PER_THREAD = 16              # per step of the in-order output pass (one scan each)
INTERP = 24                       # regula falsi steps before the bit search (_kth_key), rows >= INTERP_ROW
INTERP_ROW = 4096                 # below: bits only (MoBA's 512-block rows, top-16: 1.19 ms against 2.02 with it)
GROUP = 4                         # neighbouring columns per run in the output pass's prefix counts (_prefix)
KEY_NEG_INF = tl.constexpr(8388607)   # the key of -inf: bits 0xFF800000 -> ~bits = 0x007FFFFF


@triton.jit
def _key_bits(x):
    """The key of fp32 x as int32 bits (read as uint32 they order like the scores)."""
    b = x.to(tl.int32, bitcast=True)
    b = tl.where(b == -2147483648, 0, b)                          # -0.0 reads as +0.0 (bits, not a float add)
    return tl.where(b >= 0, b ^ -2147483648, ~b)                  # flip the sign bit, or every bit


@triton.jit
def _keys(src, o, m, KEYS_IN: tl.constexpr):
    """uint32 keys ordered like the fp32 scores at src + o; 0 where m is off."""
    if KEYS_IN:                                                   # already keys (a later round)
        b_i = tl.load(src + o, mask=m, other=0)
    else:
        b_i = tl.where(m, _key_bits(tl.load(src + o, mask=m, other=0.)), 0)
    return b_i.to(tl.uint32, bitcast=True)


@triton.jit
def _prefix_count(x, BLOCK: tl.constexpr):
    """Inclusive prefix sum of x (int32 [BLOCK], BLOCK >= 32) as two short scans: within groups of
    32 neighbours (one warp's lanes) and over the group totals. One tl.cumsum over BLOCK has every
    thread read BLOCK / 32 partial sums one after another: 0.41 ms more on a 4096 x 32768 tile
    on the H200 (1.59 against 1.18 ms; 0.94 against 0.54 with no search)."""
    x2 = tl.reshape(x, [BLOCK // 32, 32])
    tot = tl.sum(x2, 1)
    before = tl.cumsum(tot, 0) - tot                              # [BLOCK // 32] exclusive
    return tl.reshape(tl.cumsum(x2, 1) + before[:, None], [BLOCK])


@triton.jit
def _count_ge(b_k, trial, ASM: tl.constexpr):
    """The keys >= trial. ASM (compiled, not interpreted): PTX set.ge gives 0 / -1 per key and a sum
    of those counts, two instructions a key; the plain form compiles to four (setp, selp into
    16-bit masks, shift, or, then popc)."""
    if ASM:
        ge = tl.inline_asm_elementwise("set.ge.u32.u32 $0, $1, $2;", "=r,r,r",
                                       [b_k, tl.broadcast_to(trial, b_k.shape)], dtype=tl.int32,
                                       is_pure=True, pack=1)
        return -tl.sum(ge, 0)
    else:
        return tl.sum((b_k >= trial).to(tl.int32), 0)


@triton.jit
def _prefix(x, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """(exclusive prefix count of x in its columns' order, total). x int32 0/1: [BLOCK // GROUP, GROUP] runs
    of GROUP neighbouring columns (GROUP > 0: the scan along a run stays mostly within a thread's registers,
    then one scan over the runs' totals), or [BLOCK] (GROUP == 0: _prefix_count's groups of 32 lanes)."""
    if GROUP > 0:
        tot = tl.sum(x, 1)
        before = tl.cumsum(tot, 0) - tot
        return tl.cumsum(x, 1) - x + before[:, None], tl.sum(tot, 0)
    else:
        return _prefix_count(x, BLOCK) - x, tl.sum(x, 0)


@triton.jit
def _value(key):
    """The fp32 score of an int64 key in [0, 2^32) (the inverse of _keys)."""
    b = tl.where(key >= 2147483648, key ^ 2147483648, key ^ 4294967295)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _key_of(x):
    """The int64 key of an fp32 score x (as _keys)."""
    return _key_bits(x).to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def _count2(b_k, b_t, trial, ASM: tl.constexpr, TAIL: tl.constexpr):
    """The keys >= trial in the row's registers: b_k, and the tail b_t when TAIL > 0."""
    n = _count_ge(b_k, trial, ASM)
    if TAIL > 0:
        n += _count_ge(b_t, trial, ASM)
    return n


@triton.jit
def _kth_key(b_k, b_t, n_valid, TOPK, ROW: tl.constexpr, TAIL: tl.constexpr, INTERP: tl.constexpr,
             ASM: tl.constexpr):
    """The TOPK-th largest key kth, or a lower bound with exactly TOPK keys >= it, and n_ge, the count of keys
    >= kth (n_valid > TOPK keys are above -inf's). The row's keys: b_k [ROW], and b_t [TAIL] when TAIL > 0.

    A bracket [lo, hi): keys >= lo number c_lo >= TOPK, keys >= hi number c_hi < TOPK. First up to INTERP
    steps of regula falsi on the scores at the ends, aimed at rank TOPK + 1/2, with the Illinois rule (an
    end kept twice in a row has its weight halved); a step bisects the keys instead where the scores at the
    ends are not finite, or after a step whose count equalled an end's (the guess fell into a gap between
    clusters of scores, where the scores' straight line says nothing). The bracket stops when c_lo == TOPK
    (keys >= lo are the set). Then bits, from the highest where lo and hi - 1 differ, one count each, until
    a count is TOPK or the last bit. INTERP = 0: the plain bit search from bit 31.

    Each step is one count over the registers. In a numpy model of this search (rows of 2048 to 32768
    candidates, top-2048), the mean count is ~12 against ~21 for bits on N(0, 1) and lightning-indexer
    rows, ~8 against 23 on uniform ones, 3 against 34 with every score tied; 18 to 24 against 18 to 21
    on rows built against it (log-normal, Cauchy, 2048 scores of 1e30, 64 of +inf); 47 at most."""
    lo = tl.full([], 0, tl.int64)
    hi = tl.full([], 4294967296, tl.int64)
    c_lo = n_valid * 0 + ROW + TAIL                               # every register holds a key >= 0
    if INTERP > 0:
        lo = tl.min(tl.where(b_k > KEY_NEG_INF, b_k, tl.full(b_k.shape, 4294967295, tl.uint32)), 0).to(tl.int64)
        hi = tl.max(b_k, 0).to(tl.int64) + 1
        if TAIL > 0:
            lo = tl.minimum(lo, tl.min(tl.where(b_t > KEY_NEG_INF, b_t, tl.full(b_t.shape, 4294967295, tl.uint32)),
                                       0).to(tl.int64))
            hi = tl.maximum(hi, tl.max(b_t, 0).to(tl.int64) + 1)
        c_lo = n_valid
        c_hi = n_valid * 0
        f_lo = (c_lo - TOPK).to(tl.float32) - 0.5
        f_hi = (c_hi - TOPK).to(tl.float32) - 0.5
        side = n_valid * 0
        stall = n_valid < 0
        step = 0
        while (c_lo != TOPK) & (hi - lo > 1) & (step < INTERP):
            v_lo = _value(lo)
            v_hi = _value(hi - 1)
            x = v_lo + (v_hi - v_lo) * (f_lo / (f_lo - f_hi))
            g = _key_of(x)
            ok = ((x - x) == 0) & (((v_hi - v_lo) - (v_hi - v_lo)) == 0) & (g > lo) & (g < hi) & ~stall
            g = tl.where(ok, g, lo + (hi - lo) // 2)
            cnt = _count2(b_k, b_t, g.to(tl.uint32), ASM, TAIL)
            stall = (cnt == c_lo) | (cnt == c_hi)
            up = cnt >= TOPK
            f = (cnt - TOPK).to(tl.float32) - 0.5
            f_hi = tl.where(up, tl.where(side == 1, f_hi * 0.5, f_hi), f)
            f_lo = tl.where(up, f, tl.where(side == -1, f_lo * 0.5, f_lo))
            lo = tl.where(up, g, lo)
            c_lo = tl.where(up, cnt, c_lo)
            hi = tl.where(up, hi, g)
            c_hi = tl.where(up, c_hi, cnt)
            side = tl.where(up, 1, -1)
            step += 1
    # bits below the highest where lo and hi - 1 differ (shifts kept in [0, 32]: a negative one is undefined)
    b = tl.full([], 31, tl.int32)
    while (b >= 0) & ((lo >> tl.maximum(b, 0).to(tl.int64)) == ((hi - 1) >> tl.maximum(b, 0).to(tl.int64))):
        b -= 1
    top = (b + 1).to(tl.int64)
    kth = tl.where(c_lo == TOPK, lo, (lo >> top) << top)
    n_ge = tl.where(kth == lo, c_lo, -1)                          # -1: not counted yet
    while (b >= 0) & (n_ge != TOPK):
        trial = kth | (tl.full([], 1, tl.int64) << tl.maximum(b, 0).to(tl.int64))
        cnt = _count2(b_k, b_t, trial.to(tl.uint32), ASM, TAIL)
        kth = tl.where(cnt >= TOPK, trial, kth)
        n_ge = tl.where(cnt >= TOPK, cnt, n_ge)
        b -= 1
    if n_ge < 0:
        n_ge = _count2(b_k, b_t, kth.to(tl.uint32), ASM, TAIL)
    return kth.to(tl.uint32), n_ge


@triton.jit
def topk_rows_kernel(src, col_in, out, out_col, bblk, c0, L, n_seg, nq, HKV, TOPK,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, KEYS_IN: tl.constexpr, FINAL: tl.constexpr,
                     TAIL: tl.constexpr = 0, ASM: tl.constexpr = False, GROUP: tl.constexpr = 0,
                     INTERP: tl.constexpr = 0):
    """Grid (rows, n_seg). Row r = h * nq + i of src [rows, L] (scores, or with KEYS_IN keys whose
    columns are in col_in [rows, L]); segment c holds entries [c * SEG, min(L, (c + 1) * SEG)), SEG = ROW +
    TAIL: ROW keys in one register tensor and, when TAIL > 0 (a smaller power of two), the rest in a second
    (a row of 20480 scores holds 16384 + 4096 keys, not 32768: every count of the search costs less).
    FINAL: out[i, h, :TOPK] = kept columns + (c0 - bblk[i]), ascending, -1 padded.
    Otherwise out / out_col [rows, n_seg, TOPK] = the segment's kept keys / columns, in column
    order, padded with key 0 (below every score)."""
    r, c = tl.program_id(0), tl.program_id(1)
    i_h, i_q = r // nq, r % nq
    n = tl.minimum(L - c * (ROW + TAIL), ROW + TAIL)
    seg = r.to(tl.int64) * L + c * (ROW + TAIL)
    o = tl.arange(0, ROW)
    b_k = _keys(src + seg, o, o < n, KEYS_IN)
    if TAIL > 0:
        o_t = ROW + tl.arange(0, TAIL)
        b_t = _keys(src + seg, o_t, o_t < n, KEYS_IN)
    else:
        b_t = b_k
    # at most TOPK candidates: keep every key above -inf's (keys are integers: >= its key + 1)
    kth = tl.full([], KEY_NEG_INF + 1, tl.uint32)
    n_valid = _count2(b_k, b_t, kth, ASM, TAIL)
    k_eq = n_valid * 0
    ration = n_valid < 0                                          # some keys equal to kth left out
    if n_valid > TOPK:
        kth, n_ge = _kth_key(b_k, b_t, n_valid, TOPK, ROW, TAIL, INTERP, ASM)
        # keep every key above kth and the first k_eq equal to it; when that is all of them (the
        # search stopped early, or the k-th key is not tied past TOPK) keys >= kth are the set
        ration = n_ge > TOPK
        if ration:
            at_kth = tl.sum((b_k == kth).to(tl.int32), 0)
            if TAIL > 0:
                at_kth += tl.sum((b_t == kth).to(tl.int32), 0)
            k_eq = TOPK - (n_ge - at_kth)

    # in column order, so the kept columns come out ascending
    if FINAL:
        p_out = out + (i_q.to(tl.int64) * HKV + i_h) * TOPK
        shift = c0 - tl.load(bblk + i_q)
    else:
        p_out = out + (r.to(tl.int64) * n_seg + c) * TOPK
        p_col = out_col + (r.to(tl.int64) * n_seg + c) * TOPK
    n_sel = n_valid * 0
    n_eq = n_valid * 0
    if GROUP > 0:                                                 # [BLOCK // GROUP, GROUP]: runs of columns
        o_g = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    else:
        o_g = tl.arange(0, BLOCK)
    b_next = _keys(src + seg, o_g, o_g < n, KEYS_IN)
    for i0 in range(0, n, BLOCK):
        o_b = i0 + o_g
        m_b = o_b < n
        b_kb = b_next
        b_next = _keys(src + seg, o_b + BLOCK, o_b + BLOCK < n, KEYS_IN)   # in flight while this step works
        sel = m_b & (b_kb >= kth)
        if ration:                                                # ties at the k-th key: lowest columns
            eq = (m_b & (b_kb == kth)).to(tl.int32)
            rank, n_eq_b = _prefix(eq, BLOCK, GROUP)
            sel = m_b & ((b_kb > kth) | ((eq != 0) & (rank + n_eq < k_eq)))
            n_eq += n_eq_b
        sel_i = sel.to(tl.int32)
        pos, n_sel_b = _prefix(sel_i, BLOCK, GROUP)
        pos += n_sel
        keep = sel & (pos < TOPK)                                  # never past the row
        if KEYS_IN:
            b_c = tl.load(col_in + seg + o_b, mask=m_b, other=0)
        else:
            b_c = c * (ROW + TAIL) + o_b
        if FINAL:
            tl.store(p_out + pos, (b_c + shift).to(tl.int32), mask=keep)
        else:
            tl.store(p_out + pos, b_kb.to(tl.int32, bitcast=True), mask=keep)
            tl.store(p_col + pos, b_c.to(tl.int32), mask=keep)
        n_sel += n_sel_b
    for j0 in range(0, TOPK, BLOCK):
        o_j = j0 + tl.arange(0, BLOCK)
        m_j = (o_j >= n_sel) & (o_j < TOPK)
        if FINAL:
            tl.store(p_out + o_j, tl.full([BLOCK], -1, tl.int32), mask=m_j)
        else:
            tl.store(p_out + o_j, tl.zeros([BLOCK], tl.int32), mask=m_j)


def _warps(row: int) -> int:
    return 16 if row >= 16384 else 8 if row >= 4096 else 4


def launch_config(main: int, tail: int, keys_in: bool = False, occupancy: bool = True, num_warps: int | None = None
                  ) -> tuple[int, int, int | None]:
    """(num_warps, keys per thread a step of the output pass, maxnreg) of a program holding main + tail keys.

    Warps by the row's power of two (16 from 16384 keys, 8 from 4096, else 4). A row of at most 32 keys
    a thread (40 with 4-key output steps, and 4-key steps when a round's columns are read too: keys_in)
    fits 64 registers a thread without spills (ptxas for sm_90; tests/sm90_compile.py checks), so that
    two 16-warp programs (four of 8 warps) share an SM and one loads while the other counts; unbounded,
    ptxas takes 128 registers at 16 warps and one program holds the SM. Rows under 4096 keys (4 warps, MoBA's 512-block rows) keep the unbounded launch: several
    programs share an SM already, and MoBA's select took 1.56 ms with the bound against 1.50 without.
    occupancy=False: the unbounded launch (bench_topk's A/B); num_warps: given warps."""
    warps = num_warps or _warps(max(32, triton.next_power_of_2(main + tail)))
    per_thread = (main + tail) // (32 * warps)
    bound = occupancy and main + tail >= 4096      # shorter rows (4 warps) share SMs unbounded already
    if bound and per_thread <= 32 and not keys_in:
        return warps, 8, 64
    if bound and per_thread <= 40:
        return warps, 4, 64
    return warps, KEYS_PER_THREAD, None


def launch_params(seg: int, keys_in: bool, final: bool, *, tail: bool = True, occupancy: bool = True,
                  num_warps: int | None = None, keys_per_thread: int | None = None, interp: int | None = None
                  ) -> tuple[dict, dict]:
    """(constexprs, launch options) of topk_rows_kernel for segments of seg keys: ROW / TAIL (split; a round's
    segments are max_row wide, one tensor), BLOCK, KEYS_IN, FINAL, INTERP, and num_warps / maxnreg from
    launch_config. topk_rows launches with them and tests/sm90_compile.py compiles them, so that the
    spill check sees what runs."""
    row = max(32, triton.next_power_of_2(seg))
    main, rest = split(seg) if tail and final else (row, 0)
    warps, kpt, maxnreg = launch_config(main, rest, keys_in, occupancy, num_warps)
    kpt = keys_per_thread or kpt
    const = dict(ROW=main, TAIL=rest, BLOCK=min(row, kpt * 32 * warps), KEYS_IN=keys_in, FINAL=final,
                 INTERP=(INTERP if row >= INTERP_ROW else 0) if interp is None else interp)
    opts = dict(num_warps=warps) if maxnreg is None else dict(num_warps=warps, maxnreg=maxnreg)
    return const, opts


def split(W: int) -> tuple[int, int]:
    """(ROW, TAIL): two powers of two (TAIL 0 or smaller than ROW) whose sum holds W keys, the smallest
    such: 20480 -> (16384, 4096), 24576 -> (16384, 8192), 28672 -> (32768, 0)."""
    p = max(32, triton.next_power_of_2(W))
    if p == 32 or W == p:
        return p, 0
    tail = max(32, triton.next_power_of_2(W - p // 2))
    return (p, 0) if tail >= p // 2 else (p // 2, tail)


def fits(W: int, topk: int, max_row: int | None = None) -> bool:
    """Whether topk_rows takes rows of W scores: one segment, or topk at most half a segment, so
    that each round of per-segment candidates is shorter than the row it came from."""
    max_row = MAX_ROW if max_row is None else max_row
    return W <= max_row or 2 * topk <= max_row


def _check_layout(s, out, bblk, topk, max_row):
    """The kernel indexes flat buffers: refuse what it would read or write wrong."""
    def bad(what, want, got):
        raise ValueError(f"topk_rows: {what}: expected {want}; got {got}. Fix: pass a fresh contiguous tensor")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        bad("topk", "a positive int", repr(topk))
    if not (isinstance(max_row, int) and max_row >= 32 and max_row & (max_row - 1) == 0):
        bad("max_row", "a power of two >= 32 (groups of 32 in _prefix_count)", repr(max_row))
    if s.dim() != 3 or s.dtype != torch.float32 or not s.is_contiguous():
        bad("s", "contiguous float32 [HKV, nq, W]", f"{tuple(s.shape)} {s.dtype}, contiguous={s.is_contiguous()}")
    HKV, nq, _ = s.shape
    if tuple(out.shape) != (nq, HKV, topk) or out.dtype != torch.int32 or not out.is_contiguous() or \
            out.device != s.device:
        bad("out", f"contiguous int32 [nq, HKV, topk] = [{nq}, {HKV}, {topk}] on {s.device}",
            f"{tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}")
    if bblk.dim() != 1 or bblk.numel() != nq or bblk.dtype != torch.int32 or not bblk.is_contiguous() or \
            bblk.device != s.device:
        bad("bblk", f"contiguous int32 [nq] = [{nq}] on {s.device}", f"{tuple(bblk.shape)} {bblk.dtype} on {bblk.device}")


def topk_rows(s: torch.Tensor, out: torch.Tensor, bblk: torch.Tensor, c0: int, topk: int,
              max_row: int | None = None, num_warps: int | None = None, asm: bool | None = None,
              group: int = GROUP, interp: int | None = None, tail: bool = True,
              keys_per_thread: int | None = None, occupancy: bool = True) -> None:
    """s fp32 [HKV, nq, W] (contiguous; -inf = not a candidate) -> out int32 [nq, HKV, topk]: per row the
    columns of its topk best scores + (c0 - bblk[i]), ascending, ties to the lower column, -1 padded.
    max_row (a power of two; tests lower it to reach the two-launch path at small W): keys per program.
    The launch (warps, output step, register bound) comes from launch_config; benchmarks and tests
    override it: num_warps, keys_per_thread (the output pass's step), occupancy (False: no register bound),
    asm (None: on when compiled; PTX set.ge counts), group (the output pass's runs of columns, _prefix; 0:
    one vector), interp (the search's regula falsi steps, _kth_key; 0: bits only; None: INTERP for rows of
    INTERP_ROW keys or more, else 0) and tail (rows held in two register tensors, split, rather than one of
    the next power of two)."""
    asm = (not interpreting()) if asm is None else asm               # PTX inline asm: compiled kernels only
    group = min(group, 32)                                               # BLOCK >= 32
    max_row = MAX_ROW if max_row is None else max_row
    if not (s.is_cuda or interpreting()):
        raise RuntimeError("topk_rows: expected CUDA tensors (or TRITON_INTERPRET=1); got " + str(s.device))
    _check_layout(s, out, bblk, topk, max_row)
    HKV, nq, W = s.shape
    if not fits(W, topk, max_row):
        raise ValueError(f"topk_rows: rows of W={W} scores with topk={topk}: over {max_row} scores a row is "
                         f"cut in segments, which needs topk <= {max_row // 2}. Fix: "
                         "SelectConfig(topk_impl='auto') (falls back to torch.topk there) or topk_impl='torch'")
    rows = HKV * nq
    if rows == 0:
        return

    def launch(src, col, dst, dst_col, L, n_seg, keys_in, final):
        const, opts = launch_params(min(L, max_row), keys_in, final, tail=tail, occupancy=occupancy,
                                    num_warps=num_warps, keys_per_thread=keys_per_thread, interp=interp)
        topk_rows_kernel[(rows, n_seg)](src, col, dst, dst_col, bblk, c0, L, n_seg, nq, HKV, topk, ASM=asm,
                                        GROUP=group, **const, **opts)

    from unifattn.kernels.checks import _on
    with _on(s.device):                      # Triton launches on the current device, not the tensor's
        # rows over max_row: rounds of per-segment candidates until one program holds them; each round
        # keeps topk of every max_row entries (at most half), in column order
        src, col, L, keys_in = s, s, W, False
        while L > max_row:
            n_seg = triton.cdiv(L, max_row)
            keys = torch.empty((rows, n_seg, topk), dtype=torch.int32, device=s.device)
            cols = torch.empty_like(keys)
            launch(src, col, keys, cols, L, n_seg, keys_in, False)
            src, col, L, keys_in = keys, cols, n_seg * topk, True
        launch(src, col, out, out, L, 1, keys_in, True)
