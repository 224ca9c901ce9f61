"""Triton kernels of sparse top-k attention (the math and the API: sparse_attention.py).

Glossary: B batch, T tokens, HQ query heads, HKV KV heads, G = HQ // HKV query heads
per KV head, K / V head dims of q,k / v, TOPK entries per index list, BLOCK keys
per entry (1: token granularity), NK = TOPK * BLOCK keys per list. Tiles: BG query
heads (G padded to >= 16), BS keys, BK / BV padded head dims, BQ selecting queries
(BR = BQ * G padded columns) in the key-centric dkv kernel.

How they are parallelized:
- sparse_attn_fwd_kernel, sparse_attn_bwd_kernel: one program per (token, KV head);
  the G query heads sharing the KV head and its index list are the M rows of each
  tensor-core dot; the program walks its list in tiles of BS gathered keys. The
  backward recomputes p from lse, owns its dq rows, and either scatters dk, dv
  with fp32 atomics (DKV=True: token granularity) or leaves them to
- sparse_attn_dkv_kernel: one program per (key block, KV head), block granularity;
  it loops over the queries that selected its block (a CSR list built on the host)
  and stores its rows of dk, dv without atomics.
The grids run the token (or block) fastest, so programs in flight share one KV
head and its keys stay in L2.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from unifattn.kernels.utils import interpreting

__all__ = ["SparseConfig", "sparse_config", "sparse_attn_fwd_kernel", "sparse_attn_bwd_kernel",
           "sparse_attn_dkv_kernel"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set for bf16 under the interpreter only):
    Triton's interpreter keeps bf16 as raw uint16 and multiplies the bits, so the
    operands go up to fp32 first; bf16 products are exact in fp32, as on tensor cores."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@triton.jit
def _key_tile(p_idx, i_n, t_local, NK, BLOCK: tl.constexpr, BS: tl.constexpr):
    """Positions (relative to the sequence start) and validity of keys i_n .. i_n+BS-1."""
    o_n = i_n + tl.arange(0, BS)
    if BLOCK == 1:
        # token granularity: one index per key, one vector load per tile
        b_j = tl.load(p_idx + o_n, mask=o_n < NK, other=-1)
        b_pos = b_j
    else:
        # block granularity: key n of the list lies in block indices[n // BLOCK]
        b_j = tl.load(p_idx + o_n // BLOCK, mask=o_n < NK, other=-1)
        # the block is compared before it is scaled: j * BLOCK of a huge unchecked entry would wrap
        # in int32 (2^26 * 64 reads as block 0, 2^25 * 64 as a negative row)
        b_j = tl.where(b_j <= t_local // BLOCK, b_j, -1)
        b_pos = b_j * BLOCK + o_n % BLOCK
    # causal mask also guards the memory accesses when checks are skipped
    m_n = (b_j >= 0) & (b_pos <= t_local)
    return b_pos, m_n


@triton.jit
def _query_program(bos, T, HKV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Grid (T, B * HKV) of the query-side passes: (token, batch, KV head, start of the token's
    sequence (indices are relative to it), position in that sequence, flat token row)."""
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    if IS_VARLEN:
        i_s = tl.load(bos + i_t).to(tl.int64)
    else:
        i_s = i_t * 0
    return i_t, i_b, i_h, i_s, i_t - i_s, i_b * T + i_t


@triton.heuristics({"IS_VARLEN": lambda a: a["bos"] is not None})
@triton.jit
def sparse_attn_fwd_kernel(
    q, k, v, indices, bos, o, lse,
    scale,              # softmax scale * log2(e): scores live in base 2
    T, NK, TOPK,        # tokens per batch row; keys per list = TOPK * BLOCK; list length
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t, i_b, i_h, i_s, t_local, i_row = _query_program(bos, T, HKV, IS_VARLEN)

    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    m_g, m_k, m_v = o_g < G, o_k < K, o_v < V
    # [BG, BK] the G query heads of KV head i_h, padded to BG rows of zeros
    p_q = q + (i_row * HQ + i_h * G + o_g[:, None]) * K + o_k[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_k[None, :], other=0.)
    p_idx = indices + (i_row * HKV + i_h) * TOPK

    # running max from -inf, not a finite floor such as -1e30: scores below the floor (a scale
    # >= ~1e29) would all give p = 0 and a row with valid keys would read as empty. While a row
    # has seen no valid key its max stays -inf; the exponent base is then 0 instead, so masked
    # scores give exp2(-inf - 0) = 0, never exp2(-inf - (-inf)) = NaN
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    for i_n in range(0, NK, BS):
        b_pos, m_n = _key_tile(p_idx, i_n, t_local, NK, BLOCK, BS)
        o_kv = (i_b * T + i_s + b_pos) * HKV + i_h          # [BS] flat K/V rows
        # [BS, BK] gathered keys, one contiguous row each
        b_k = tl.load(k + o_kv[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
        # [BG, BS]
        b_s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * scale
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_base = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_r = tl.exp2(b_m - b_base)
        b_p = tl.exp2(b_s - b_base[:, None])
        b_l = b_l * b_r + tl.sum(b_p, 1)
        # [BS, BV]
        b_v = tl.load(v + o_kv[:, None] * V + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.)
        b_acc = b_acc * b_r[:, None] + _dot(b_p.to(b_v.dtype), b_v, PREC, UPCAST)
        b_m = b_m_new

    # empty rows (l = 0, m = -inf): o = 0 and lse = -inf
    m_e = b_l > 0
    b_o = b_acc / tl.where(m_e, b_l, 1.)[:, None]
    b_lse = tl.where(m_e, (b_m + tl.log2(tl.where(m_e, b_l, 1.))) / 1.4426950408889634, float("-inf"))
    p_o = o + (i_row * HQ + i_h * G + o_g[:, None]) * V + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])
    tl.store(lse + i_row * HQ + i_h * G + o_g, b_lse, mask=m_g)


@triton.heuristics({
    "IS_VARLEN": lambda a: a["bos"] is not None,
    "HAS_DLSE": lambda a: a["dlse"] is not None,
})
@triton.jit
def sparse_attn_bwd_kernel(
    q, k, v, o, do, lse, dlse, indices, bos, dq, dk, dv, delta,
    scale,              # softmax scale (natural); scores are formed with scale * log2(e)
    T, NK, TOPK,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    DKV: tl.constexpr,  # True: also scatter dk, dv (fp32 atomics); False: store delta for the dkv kernel
):
    i_t, i_b, i_h, i_s, t_local, i_row = _query_program(bos, T, HKV, IS_VARLEN)

    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    m_g, m_k, m_v = o_g < G, o_k < K, o_v < V
    o_qh = i_row * HQ + i_h * G + o_g                       # [BG] flat query-head rows
    # [BG, BK], [BG, BV]
    b_q = tl.load(q + o_qh[:, None] * K + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.)
    b_do = tl.load(do + o_qh[:, None] * V + o_v[None, :], mask=m_g[:, None] & m_v[None, :], other=0.)
    b_o = tl.load(o + o_qh[:, None] * V + o_v[None, :], mask=m_g[:, None] & m_v[None, :], other=0.)
    # delta = rowsum(o * do), formed here: this program owns the row, no extra pass
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d s = p, so an lse gradient enters as a shift of delta
        b_delta -= tl.load(dlse + o_qh, mask=m_g, other=0.)
    # lse in base 2; empty rows (-inf) and padded rows become +inf so that p = 0
    if not DKV:
        tl.store(delta + o_qh, b_delta, mask=m_g)
    b_lse = tl.load(lse + o_qh, mask=m_g, other=float("inf")) * 1.4426950408889634
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    qk_scale = scale * 1.4426950408889634
    p_idx = indices + (i_row * HKV + i_h) * TOPK

    b_dq = tl.zeros([BG, BK], dtype=tl.float32)
    for i_n in range(0, NK, BS):
        b_pos, m_n = _key_tile(p_idx, i_n, t_local, NK, BLOCK, BS)
        o_kv = (i_b * T + i_s + b_pos) * HKV + i_h
        # [BS, BK], [BS, BV]
        b_k = tl.load(k + o_kv[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.)
        b_v = tl.load(v + o_kv[:, None] * V + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.)
        # Scores in both orientations instead of tl.trans of a dot result: Triton
        # 3.4-3.7 on sm_90 miscompiled dot(trans(ds), q) (ALGORITHMS.md 6b). The
        # extra two [BG x BS] dots are cheap; this kernel is bound by the gathers.
        # [BG, BS] for dq
        b_s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale
        b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = _dot(b_do, tl.trans(b_v), PREC, UPCAST)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, PREC, UPCAST)
        if DKV:
            # [BS, BG] for dk, dv
            b_sT = _dot(b_k, tl.trans(b_q), PREC, UPCAST) * qk_scale
            b_pT = tl.where(m_n[:, None], tl.exp2(b_sT - b_lse[None, :]), 0.)
            b_dpT = _dot(b_v, tl.trans(b_do), PREC, UPCAST)
            b_dsT = b_pT * (b_dpT - b_delta[None, :])
            # [BS, BV], [BS, BK]: the G heads are summed inside the dot
            b_dv = _dot(b_pT.to(b_do.dtype), b_do, PREC, UPCAST)
            b_dk = _dot(b_dsT.to(b_q.dtype), b_q, PREC, UPCAST) * scale
            m_kv = m_n[:, None]
            tl.atomic_add(dv + o_kv[:, None] * V + o_v[None, :], b_dv, mask=m_kv & m_v[None, :], sem="relaxed")
            tl.atomic_add(dk + o_kv[:, None] * K + o_k[None, :], b_dk, mask=m_kv & m_k[None, :], sem="relaxed")

    tl.store(dq + o_qh[:, None] * K + o_k[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_g[:, None] & m_k[None, :])


@triton.jit
def sparse_attn_dkv_kernel(
    q, k, v, do, lse, delta, blocks, csr_offsets, csr_queries, dk, dv,
    scale, T, NB,       # NB: key blocks per batch row (all sequences)
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BQ: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk, dv of one key block (block granularity): loop over the queries that selected it.

    Key-centric: the block's K and V stay in registers and BQ selecting queries at a
    time (BQ * G rows of q and do) are gathered, so no atomics are needed and each
    (query, block) pair moves 2 * G * D values instead of scattering 2 * n * D fp32.
    Every key row belongs to exactly one block, so each program stores its rows.
    """
    i_c, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    # rows [start, end) of this block: n keys, or fewer at a sequence end
    i_start, i_end = tl.load(blocks + 2 * i_c).to(tl.int64), tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    i_lo = tl.load(csr_offsets + i_bh * NB + i_c).to(tl.int64)
    i_hi = tl.load(csr_offsets + i_bh * NB + i_c + 1).to(tl.int64)

    o_s, o_k, o_v = i_start + tl.arange(0, BS), tl.arange(0, BK), tl.arange(0, BV)
    m_s, m_k, m_v = o_s < i_end, o_k < K, o_v < V
    o_kv = (i_b * T + o_s) * HKV + i_h
    # [BS, BK], [BS, BV]
    b_k = tl.load(k + o_kv[:, None] * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0.)
    b_v = tl.load(v + o_kv[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.)
    qk_scale = scale * 1.4426950408889634

    # column r of a query tile is head r % G of selecting query r // G (BR >= BQ * G, padded)
    o_r = tl.arange(0, BR)
    b_dk = tl.zeros([BS, BK], dtype=tl.float32)
    b_dv = tl.zeros([BS, BV], dtype=tl.float32)
    for i_q in range(i_lo, i_hi, BQ):
        o_j = i_q + o_r // G
        m_r = (o_j < i_hi) & (o_r < BQ * G)
        b_t = tl.load(csr_queries + o_j, mask=m_r, other=0).to(tl.int64)   # [BQG] query token (in batch row)
        o_qh = (i_b * T + b_t) * HQ + i_h * G + o_r % G
        # [BQG, BK], [BQG, BV], [BQG]
        b_q = tl.load(q + o_qh[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.)
        b_do = tl.load(do + o_qh[:, None] * V + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.)
        b_lse = tl.load(lse + o_qh, mask=m_r, other=0.) * 1.4426950408889634
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)   # empty rows: p = 0
        b_delta = tl.load(delta + o_qh, mask=m_r, other=0.)
        # keys after the query are masked (causal inside the query's own block)
        m_p = m_r[None, :] & (o_s[:, None] <= b_t[None, :]) & m_s[:, None]
        # [BS, BQG]
        b_sT = _dot(b_k, tl.trans(b_q), PREC, UPCAST) * qk_scale
        b_pT = tl.where(m_p, tl.exp2(b_sT - b_lse[None, :]), 0.)
        b_dpT = _dot(b_v, tl.trans(b_do), PREC, UPCAST)
        b_dsT = b_pT * (b_dpT - b_delta[None, :])
        b_dv += _dot(b_pT.to(b_do.dtype), b_do, PREC, UPCAST)
        b_dk += _dot(b_dsT.to(b_q.dtype), b_q, PREC, UPCAST)
    tl.store(dk + o_kv[:, None] * K + o_k[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_s[:, None] & m_k[None, :])
    tl.store(dv + o_kv[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_s[:, None] & m_v[None, :])


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SparseConfig:
    """Launch configuration of one pass: keys per tile, warps, pipeline stages."""
    BS: int
    num_warps: int
    num_stages: int


def sparse_config(pass_: str, BK: int, BV: int, BG: int) -> SparseConfig:
    """The launch configuration of one pass ('fwd', 'bwd' or 'dkv') for padded dims BK, BV, BG.

    For 'dkv', BS is the number of columns BR (selecting queries x G) per tile.

    Under the interpreter the tile is fixed at 32 keys: its cost is per tile, and
    32 keeps test lists short while still crossing tile boundaries.
    """
    if interpreting():
        return SparseConfig(32, 1, 1)
    # Chosen by benchmarks/bench_sparse.py --sweep on an H200 (Triton 3.6,
    # HQ=64, HKV=4, D=128, T=32768): fwd 64/4/2 16.9 ms vs 64/4/3 19.6, 32/4/3 24.4;
    # bwd (token, atomics) 64/4/2 92 ms vs 32/4/2 116; dkv 32..64/4/2 22 ms vs 128/8/2 28.
    wide = max(BK, BV) > 128 or BG > 32
    if pass_ == "fwd":
        return SparseConfig(32 if wide else 64, 4, 2)
    if pass_ == "dkv":
        return SparseConfig(max(BG, 32 if wide else 64), 4, 2)
    return SparseConfig(32 if wide else 64, 4, 1 if wide else 2)
