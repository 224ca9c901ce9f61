"""Inter-chunk kernels of the chunkwise forward: the sequential state pass and the output.

Shape legend as in chunk_intra.py; h [NT_total, HV, K, V] holds the state entering each chunk
(chunks of all sequences in order), h0 / ht [N, HV, K, V] fp32. With G the chunk-local gate
cumsum (log2 units), G_C its value at the chunk's last row and S the state entering the chunk:

    v~     = u - w S                       (delta rules; v~ = v otherwise)
    S_next = Diag(2^G_C) S + (k * 2^(G_C - G))^T v~
    o      = scale * ((q * 2^G) S + A v~)   A = Aqk (diagonal gate, precomputed) or
                                            (q k^T) o 2^(G_i - G_j), masked to i >= j

How it is parallelized: the state pass runs one program per (V block, sequence x value head)
and walks that sequence's chunks in order, holding the [K, BV] fp32 state in registers; it is
the only sequential part. The output kernel runs one program per (V block, chunk, batch x value
head). Every exponent formed here is <= 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk_intra import _chunk_bounds, _dot, _exp2_masked

# (BV, num_warps, num_stages) candidates; the host times them once per shape on a GPU and
# uses the first under the interpreter. ALGORITHMS.md 6b: Hopper miscompiles; only configs that passed
# the H200 probes (benchmarks/diag_chunk_configs.py) are listed. With a padded key dimension under 32
# the host leaves the KSPLIT ones out (chunk._state_configs).
STATE_CONFIGS = [
    # The state as two key halves (KSPLIT), pipelined by Triton: H200, Triton 3.6, B=8 T=4096 H=16 K=V=128
    # bf16, state kernel alone (benchmarks/diag_chunk_configs.py --time, 2026-11-29): gated_deltanet 0.221 ms
    # at (BV=64, 4 warps, 2 stages) against 0.337 for the best whole-state config (BV=32, 8 warps, 2 stages)
    # and fla's 0.210; kda 0.248 against 0.370 (fla 0.298). Every KSPLIT config here was probed for all six
    # classes at that shape against the fp32 recurrent form (no faults, same error as the whole-state pass).
    triton.Config({"BV": 64, "KSPLIT": True}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32, "KSPLIT": True}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32, "KSPLIT": True}, num_warps=4, num_stages=3),
    triton.Config({"BV": 64, "KSPLIT": True}, num_warps=8, num_stages=2),
    # The whole state in one tile. Admitted after a sweep on the H200 (Triton 3.6, benchmarks/diag_chunk_configs.py):
    # for gate 'none' without delta, (BV=64, warps 4/8, stages 2) raised illegal memory accesses and
    # (BV=32, warps 2, stages 2) / (BV=32, warps 4, stages 3) gave wrong states (relative error 0.27-0.32);
    # ALGORITHMS.md 6b: Hopper miscompiles; only configs that passed stay.
    triton.Config({"BV": 32}, num_warps=4, num_stages=1),
    # ptxas on sm_90 (benchmarks/ptxas_report.py, K=V=128): the first spills 72-432 B for every gated or
    # delta class; 8 warps holds the same tile without spills.
    triton.Config({"BV": 32}, num_warps=8, num_stages=1),
    triton.Config({"BV": 32}, num_warps=8, num_stages=2),
    # the next chunk's loads issued by hand before this chunk's dots: probed on the H200 for every class;
    # the same at BV=32 on 8 warps gave wrong outputs for the three delta classes, so it is not listed
    triton.Config({"BV": 64, "PREFETCH": True}, num_warps=8, num_stages=1),
]
# output (BV=32, warps 4, stages 1) raised an illegal memory access on the H200: not listed
OUTPUT_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=3),
    triton.Config({"BV": 128}, num_warps=8, num_stages=2),
    triton.Config({"BV": 64}, num_warps=8, num_stages=3),
]


@triton.jit
def _state_chunk_loads(k, v, w, gc, i_t, T, o_k, m_k, o_v, m_v, s_k, HV: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                       KG: tl.constexpr):
    """What chunk i_t feeds the state pass, none of it depending on the state: values [BT, BV] (u for
    delta rules), w [BT, BK] (delta rules), keys transposed [BK, BT] (gated by the wu kernel when KG)
    and the gate at the chunk's rows [BK, BT] (per-channel gate without KG). A chunk past the end
    loads zeros (the prefetch of the last iteration)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_v = tl.load(v + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_w = b_v
    if DELTA:
        b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
    b_kt = tl.load(k + o_t[None, :] * s_k + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
    b_gt = b_kt
    if GATE == 2 and not KG:
        b_gt = tl.load(gc + o_t[None, :] * (HV * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
    return b_v, b_w, b_kt, b_gt


@triton.jit
def _state_half_rows(b_h, h, o_k, m_k, o_v, m_v, V: tl.constexpr):
    tl.store(h + o_k[:, None] * V + o_v[None, :], b_h.to(h.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _state_half_keys(k, gc, b_gl, o_t, m_t, o_k, m_k, s_k, HV: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr,
                     KG: tl.constexpr):
    """[BKH, BT] keys of one half, transposed on load, gated as the state adds them."""
    b_kt = tl.load(k + o_t[None, :] * s_k + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
    if GATE == 2 and not KG:
        b_gt = tl.load(gc + o_t[None, :] * (HV * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_kt = (b_kt.to(tl.float32) * _exp2_masked(b_gl[:, None] - b_gt, m_t[None, :])).to(b_kt.dtype)
    return b_kt


@triton.jit
def _state_pass_split(k, v, w, gc, h, v_new, h0, ht, i_nh, T, NT, s_k, o_v, m_v,
                      HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKH: tl.constexpr,
                      BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                      STORE_FINAL_STATE: tl.constexpr, DOT_PREC: tl.constexpr, KG: tl.constexpr):
    """The state pass of chunk_state_kernel with the state as two halves of BKH key rows (pointers already at
    this sequence and head): the same arithmetic, each dot split along the key dimension."""
    o_k1 = tl.arange(0, BKH)
    o_k2 = BKH + tl.arange(0, BKH)
    m_k1, m_k2 = o_k1 < K, o_k2 < K
    b_h1 = tl.zeros([BKH, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BKH, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V
        b_h1 += tl.load(p_h0 + o_k1[:, None] * V + o_v[None, :], mask=m_k1[:, None] & m_v[None, :], other=0.)
        b_h2 += tl.load(p_h0 + o_k2[:, None] * V + o_v[None, :], mask=m_k2[:, None] & m_v[None, :], other=0.)
    for i_t in range(NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        _state_half_rows(b_h1, h, o_k1, m_k1, o_v, m_v, V)
        _state_half_rows(b_h2, h, o_k2, m_k2, o_v, m_v, V)
        h += HV * K * V
        # [BT, BV]
        b_v = tl.load(v + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        if DELTA:
            # v~ = u - w S, one half of the key dimension at a time
            b_w1 = tl.load(w + o_t[:, None] * (HV * K) + o_k1[None, :], mask=m_t[:, None] & m_k1[None, :], other=0.)
            b_v -= _dot(b_w1, b_h1.to(b_w1.dtype), DOT_PREC)
            b_w2 = tl.load(w + o_t[:, None] * (HV * K) + o_k2[None, :], mask=m_t[:, None] & m_k2[None, :], other=0.)
            b_v -= _dot(b_w2, b_h2.to(b_w2.dtype), DOT_PREC)
            tl.store(v_new + o_t[:, None] * (HV * V) + o_v[None, :], b_v.to(v_new.dtype.element_ty), mask=m_tv)
        o_last = tl.minimum(i_t * BT + BT, T) - 1
        b_gl1 = tl.zeros([BKH], dtype=tl.float32)
        b_gl2 = tl.zeros([BKH], dtype=tl.float32)
        if GATE == 1:
            b_gl = tl.load(gc + o_last * HV)
            b_g = tl.load(gc + o_t * HV, mask=m_t, other=0.)
            b_v *= _exp2_masked(b_gl - b_g, m_t)[:, None]
            b_h1 *= tl.exp2(b_gl)
            b_h2 *= tl.exp2(b_gl)
        elif GATE == 2:
            b_gl1 = tl.load(gc + o_last * (HV * K) + o_k1, mask=m_k1, other=0.)
            b_gl2 = tl.load(gc + o_last * (HV * K) + o_k2, mask=m_k2, other=0.)
            b_h1 *= tl.exp2(b_gl1)[:, None]
            b_h2 *= tl.exp2(b_gl2)[:, None]
        b_kt1 = _state_half_keys(k, gc, b_gl1, o_t, m_t, o_k1, m_k1, s_k, HV, K, GATE, KG)
        b_h1 += _dot(b_kt1, b_v.to(b_kt1.dtype), DOT_PREC)
        b_kt2 = _state_half_keys(k, gc, b_gl2, o_t, m_t, o_k2, m_k2, s_k, HV, K, GATE, KG)
        b_h2 += _dot(b_kt2, b_v.to(b_kt2.dtype), DOT_PREC)
    if STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V
        tl.store(p_ht + o_k1[:, None] * V + o_v[None, :], b_h1, mask=m_k1[:, None] & m_v[None, :])
        tl.store(p_ht + o_k2[:, None] * V + o_v[None, :], b_h2, mask=m_k2[:, None] & m_v[None, :])


@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "STORE_FINAL_STATE": lambda a: a["ht"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
})
@triton.jit(do_not_specialize=["T"])
def chunk_state_kernel(
    k, v, w, gc, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, KG: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    KSPLIT: tl.constexpr = False,
):
    """States entering each chunk (and v~ for delta rules). Grid (cdiv(V, BV), N * HV).

    v is u for delta rules. BK >= K: the whole key dimension of the state is one block.
    KG: k is already k * 2^(G_C - G), [B, T, HV, K] (the wu kernel's kg, per-channel delta rules).
    PREFETCH: the loads of chunk i + 1 are issued before chunk i's dots, by hand (one stage, no
    pipeliner), so their latency hides behind the sequential part.
    KSPLIT: the state is held as two [BK / 2, BV] halves of the key dimension, each its own pair of
    dots (_state_pass_split), as fla's state pass holds it (BK >= 32; smaller runs whole).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        NT = tl.cdiv(T, BT)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        NT = tl.cdiv(T, BT)
        boh = i_n.to(tl.int64) * NT

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    # move pointers to row 0 of this sequence / head
    if KG:
        k += bos * HV * K + i_hv * K
        s_k = HV * K
    else:
        k += bos * H * K + i_h * K
        s_k = H * K
    v += bos * HV * V + i_hv * V
    h += (boh * HV + i_hv) * K * V
    if DELTA:
        w += bos * HV * K + i_hv * K
        v_new += bos * HV * V + i_hv * V
    if GATE == 1:
        gc += bos * HV + i_hv
    elif GATE == 2:
        gc += bos * HV * K + i_hv * K

    if KSPLIT and BK >= 32:          # halves of at least 16 rows: tl.dot's smallest inner dimension
        _state_pass_split(k, v, w, gc, h, v_new, h0, ht, i_nh, T, NT, s_k, o_v, m_v, HV, K, V, BT, BK // 2, BV,
                          GATE, DELTA, USE_INITIAL_STATE, STORE_FINAL_STATE, DOT_PREC, KG)
        return
    # [BK, BV] fp32 state
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.)

    if PREFETCH:
        b_vn, b_wn, b_ktn, b_gtn = _state_chunk_loads(k, v, w, gc, 0, T, o_k, m_k, o_v, m_v, s_k, HV, K, V, BT,
                                                      GATE, DELTA, KG)
    for i_t in range(NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        if PREFETCH:
            b_v, b_w, b_kt, b_gt = b_vn, b_wn, b_ktn, b_gtn
            b_vn, b_wn, b_ktn, b_gtn = _state_chunk_loads(k, v, w, gc, i_t + 1, T, o_k, m_k, o_v, m_v, s_k, HV, K,
                                                          V, BT, GATE, DELTA, KG)
        tl.store(h + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        h += HV * K * V  # pointer arithmetic is 64-bit: no int32 overflow over long sequences
        # [BT, BV] values written into the state by this chunk
        if not PREFETCH:
            # loads in this order, after the store (a reordering of them miscompiled for delta rules in
            # bf16 on the H200 under Triton 3.6: outputs changed from run to run)
            b_v = tl.load(v + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_tv, other=0.)
        b_v = b_v.to(tl.float32)
        if DELTA:
            # v~ = u - w S: what the keys do not already recall
            if not PREFETCH:
                # [BT, BK]
                b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
            b_v -= _dot(b_w, b_h.to(b_w.dtype), DOT_PREC)
            tl.store(v_new + o_t[:, None] * (HV * V) + o_v[None, :], b_v.to(v_new.dtype.element_ty), mask=m_tv)
        if not PREFETCH:
            # [BK, BT] keys, transposed on load
            b_kt = tl.load(k + o_t[None, :] * s_k + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        o_last = tl.minimum(i_t * BT + BT, T) - 1
        if GATE == 1:
            b_gl = tl.load(gc + o_last * HV)
            b_g = tl.load(gc + o_t * HV, mask=m_t, other=0.)
            b_v *= _exp2_masked(b_gl - b_g, m_t)[:, None]
            b_h *= tl.exp2(b_gl)
        elif GATE == 2:
            # [BK]
            b_gl = tl.load(gc + o_last * (HV * K) + o_k, mask=m_k, other=0.)
            if not KG:
                if not PREFETCH:
                    # [BK, BT]
                    b_gt = tl.load(gc + o_t[None, :] * (HV * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                                   other=0.)
                b_kt = (b_kt.to(tl.float32) * _exp2_masked(b_gl[:, None] - b_gt, m_t[None, :])).to(k.dtype.element_ty)
            b_h *= tl.exp2(b_gl)[:, None]
        b_h += _dot(b_kt, b_v.to(b_kt.dtype), DOT_PREC)

    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_output_kernel(
    q, k, v, gc, h, Aqk, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """o of one chunk and V block. Grid (cdiv(V, BV), NT, B * HV); v is v~ for delta rules."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
    else:
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]

    q += bos * H * K + i_h * K
    k += bos * H * K + i_h * K
    h += (i_tg * HV + i_hv) * K * V
    if GATE == 1:
        gc += bos * HV + i_hv
    elif GATE == 2:
        gc += bos * HV * K + i_hv * K

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BT, BK]
        b_q = tl.load(q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        # [BK, BV]
        b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        if GATE == 2:
            b_g = tl.load(gc + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
            b_q = (b_q.to(tl.float32) * tl.exp2(b_g)).to(b_h.dtype)
        else:
            # [BK, BT]
            b_kt = tl.load(k + o_t[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
            b_A += _dot(b_q, b_kt, DOT_PREC)
        b_o += _dot(b_q, b_h, DOT_PREC)

    if GATE == 1:
        # [BT]
        b_g = tl.load(gc + o_t * HV, mask=m_t, other=0.)
        b_o *= tl.exp2(b_g)[:, None]
        b_A *= _exp2_masked(b_g[:, None] - b_g[None, :], m_A)
    if GATE == 2:
        p_A = Aqk + ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
        b_A = tl.load(p_A, mask=m_A, other=0.).to(tl.float32)
    else:
        b_A = tl.where(m_A, b_A, 0.)
    # [BT, BV]
    p_v = v + ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
    b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += _dot(b_A.to(b_v.dtype), b_v, DOT_PREC)
    p_o = o + ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
