"""Inter-chunk kernels of the chunkwise forward: the sequential state pass and the output.

Shape legend as in chunk_intra.py; h [NT_total, HV, K, V] holds the state entering each chunk
(chunks of all sequences in order), h0 / ht [N, HV, K, V] fp32. With G the chunk-local gate
cumsum (log2 units), G_C its value at the chunk's last row and S the state entering the chunk:

    v~     = u - w S                       (delta rules; v~ = v otherwise)
    S_next = Diag(2^G_C) S + (k * 2^(G_C - G))^T v~
    o      = scale * ((q * 2^G) S + A v~)   A = Aqk (diagonal gate, precomputed) or
                                            (q k^T) o 2^(G_i - G_j), masked to i >= j

The DPLR class (kernels/chunk_dplr.py) runs both kernels with their DPLR flag: v~ is the low-rank read
P = u - w S, and the terms k2^T v2 (state) and A2 v2 (output) add its k v^T write.

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
    # Probed again with the state pass as one code path (every config below, all six classes, deterministic
    # from run to run, 2026-11-29): KSPLIT (64, 4, 2) 0.222 ms for gated_deltanet, 0.251 for kda, 0.227 for
    # gla; (32, 4, 2) 0.145 for linear_attention; the whole-state configs 0.145-0.59. The whole-state configs
    # stay for padded key dimensions under 32, where the state cannot be halved.
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
]
# output (BV=32, warps 4, stages 1) raised an illegal memory access on the H200: not listed
OUTPUT_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=3),
    triton.Config({"BV": 128}, num_warps=8, num_stages=2),
    triton.Config({"BV": 64}, num_warps=8, num_stages=3),
]


@triton.jit
def _store_rows(b_h, h, o_k, m_k, o_v, m_v, V: tl.constexpr):
    """Store the rows o_k of one state block (fp32 in registers) at h, in h's dtype."""
    tl.store(h + o_k[:, None] * V + o_v[None, :], b_h.to(h.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _gated_keys(k, gc, b_gl, o_t, m_t, o_k, m_k, s_k, HV: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr,
                KG: tl.constexpr):
    """[rows of o_k, BT] keys transposed on load, gated as the state adds them: k * 2^(G_C - G) (per-channel
    gate without the wu kernel's kg); as loaded otherwise."""
    b_kt = tl.load(k + o_t[None, :] * s_k + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
    if GATE == 2 and not KG:
        b_gt = tl.load(gc + o_t[None, :] * (HV * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.)
        b_kt = (b_kt.to(tl.float32) * _exp2_masked(b_gl[:, None] - b_gt, m_t[None, :])).to(b_kt.dtype)
    return b_kt


@triton.heuristics({
    "USE_INITIAL_STATE": lambda a: a["h0"] is not None,
    "STORE_FINAL_STATE": lambda a: a["ht"] is not None,
    "IS_VARLEN": lambda a: a["cu_seqlens"] is not None,
    "DPLR": lambda a: a.get("k2") is not None,
})
@triton.jit(do_not_specialize=["T"])
def chunk_state_kernel(
    k, v, w, gc, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, KG: tl.constexpr = False, KSPLIT: tl.constexpr = False,
    k2=None, v2=None, DPLR: tl.constexpr = False,
):
    """States entering each chunk (and v~ for delta rules). Grid (cdiv(V, BV), N * HV).

    v is u for delta rules. BK >= K: the whole key dimension of the state is one block.
    KG: k is already k * 2^(G_C - G), [B, T, HV, K] (the wu kernel's kg, per-channel delta rules).
    KSPLIT: the [BK, BV] fp32 state is held as two halves of BK / 2 key rows (1 and 2 below), each
    with its own dots, as fla's state pass holds it; Triton pipelines that at 4 warps without the
    miscompiles the whole tile met on the H200. With BK < 32 (halves under tl.dot's 16 rows) the
    state stays whole: half 1 is all of it and half 2 is empty (its code is compiled out).
    DPLR (kernels/chunk_dplr.py): v~ is the low-rank read P = u - w S (w holds -W), k is a 2^(G_C - G),
    and the state also takes the write k2^T v2 (k2 = k 2^(G_C - G) [B, T, HV, K], v2 the values).
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
    if DPLR:
        k2 += bos * HV * K + i_hv * K
        v2 += bos * HV * V + i_hv * V

    TWO: tl.constexpr = KSPLIT and BK >= 32
    BKH: tl.constexpr = BK // 2 if TWO else BK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_k1 = tl.arange(0, BKH)
    o_k2 = BKH + tl.arange(0, BKH)
    m_k1, m_k2 = o_k1 < K, o_k2 < K
    # [BKH, BV] fp32 state halves
    b_h1 = tl.zeros([BKH, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BKH, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V
        b_h1 += tl.load(p_h0 + o_k1[:, None] * V + o_v[None, :], mask=m_k1[:, None] & m_v[None, :], other=0.)
        if TWO:
            b_h2 += tl.load(p_h0 + o_k2[:, None] * V + o_v[None, :], mask=m_k2[:, None] & m_v[None, :], other=0.)
    for i_t in range(NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        _store_rows(b_h1, h, o_k1, m_k1, o_v, m_v, V)
        if TWO:
            _store_rows(b_h2, h, o_k2, m_k2, o_v, m_v, V)
        h += HV * K * V  # pointer arithmetic is 64-bit: no int32 overflow over long sequences
        # [BT, BV] values written into the state by this chunk. The loads of v, w and k stay after the
        # stores of h: moving them above the stores miscompiled for delta rules in bf16 on the H200 under
        # Triton 3.6 (outputs changed from run to run). The order below is the one the H200 probes passed.
        b_v = tl.load(v + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        if DELTA:
            # v~ = u - w S, what the keys do not already recall; one half of the key dimension at a time
            b_w1 = tl.load(w + o_t[:, None] * (HV * K) + o_k1[None, :], mask=m_t[:, None] & m_k1[None, :], other=0.)
            b_v -= _dot(b_w1, b_h1.to(b_w1.dtype), DOT_PREC)
            if TWO:
                b_w2 = tl.load(w + o_t[:, None] * (HV * K) + o_k2[None, :], mask=m_t[:, None] & m_k2[None, :],
                               other=0.)
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
            if TWO:
                b_h2 *= tl.exp2(b_gl)
        elif GATE == 2:
            # [BKH] the gate at the chunk's last row
            b_gl1 = tl.load(gc + o_last * (HV * K) + o_k1, mask=m_k1, other=0.)
            b_h1 *= tl.exp2(b_gl1)[:, None]
            if TWO:
                b_gl2 = tl.load(gc + o_last * (HV * K) + o_k2, mask=m_k2, other=0.)
                b_h2 *= tl.exp2(b_gl2)[:, None]
        # [BKH, BT] keys of each half
        b_kt1 = _gated_keys(k, gc, b_gl1, o_t, m_t, o_k1, m_k1, s_k, HV, K, GATE, KG)
        b_h1 += _dot(b_kt1, b_v.to(b_kt1.dtype), DOT_PREC)
        if TWO:
            b_kt2 = _gated_keys(k, gc, b_gl2, o_t, m_t, o_k2, m_k2, s_k, HV, K, GATE, KG)
            b_h2 += _dot(b_kt2, b_v.to(b_kt2.dtype), DOT_PREC)
        if DPLR:
            # the write k v^T, its keys gated to the chunk's end by the wu kernel
            b_v2 = tl.load(v2 + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_tv, other=0.)
            b_k2t = tl.load(k2 + o_t[None, :] * (HV * K) + o_k1[:, None], mask=m_k1[:, None] & m_t[None, :], other=0.)
            b_h1 += _dot(b_k2t, b_v2.to(b_k2t.dtype), DOT_PREC)
            if TWO:
                b_k2t = tl.load(k2 + o_t[None, :] * (HV * K) + o_k2[:, None], mask=m_k2[:, None] & m_t[None, :],
                                other=0.)
                b_h2 += _dot(b_k2t, b_v2.to(b_k2t.dtype), DOT_PREC)
    if STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V
        tl.store(p_ht + o_k1[:, None] * V + o_v[None, :], b_h1, mask=m_k1[:, None] & m_v[None, :])
        if TWO:
            tl.store(p_ht + o_k2[:, None] * V + o_v[None, :], b_h2, mask=m_k2[:, None] & m_v[None, :])


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "QG": lambda a: a["qg"] is not None,
                    "DPLR": lambda a: a.get("A2") is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_output_kernel(
    q, k, v, gc, h, Aqk, qg, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, QG: tl.constexpr = False, A2=None, v2=None, DPLR: tl.constexpr = False,
):
    """o of one chunk and V block. Grid (cdiv(V, BV), NT, B * HV); v is v~ for delta rules.
    qg (diagonal gate): the intra kernel's q * 2^G [B, T, HV, K], read instead of q and the fp32 G.
    DPLR: Aqk holds A_qa and v the low-rank reads P; A2 (A_qk) times v2 (the values) is added."""
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
    # the per-channel gate enters only through qg (the intra kernel's q 2^G)
    tl.static_assert(QG == (GATE == 2), "chunk_output_kernel: qg is given exactly for the per-channel gate")
    if GATE == 1:
        gc += bos * HV + i_hv
    if QG:
        qg += bos * HV * K + i_hv * K

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BT, BK]
        if QG:
            b_q = tl.load(qg + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        else:
            b_q = tl.load(q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        # [BK, BV]
        b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        if QG:
            b_q = b_q.to(b_h.dtype)
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
    if DPLR:
        b_A2 = tl.load(A2 + ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :], mask=m_A, other=0.)
        b_v2 = tl.load(v2 + ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.)
        b_o += _dot(b_A2.to(b_v2.dtype), b_v2, DOT_PREC)
    p_o = o + ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
