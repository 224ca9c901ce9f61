"""Chunk-local kernels of the chunkwise forward: gate cumsum, intra-chunk matrices, WY factors.

Shape legend (one for the whole chunk family):
    q, k   [B, T, H, K]        v, u, v_new  [B, T, HV, V]       w  [B, T, HV, K]
    g, gc  [B, T, HV] (scalar gate) or [B, T, HV, K] (diagonal gate), fp32
    beta   [B, T, HV] fp32     Aqk, Ai  [B, T, HV, BT]: row t holds its chunk's row
    qg     [B, T, HV, K] = q * 2^G (diagonal gate), for the output kernel

Within one chunk of BT rows (G = chunk-local cumsum of the log gate, stored in log2 units):

    Aqk[i, j] = sum_c q_ic k_jc 2^(G_ic - G_jc)                 i >= j   (diagonal gate only)
    Akk[i, j] = beta_i sum_c k_ic k_jc 2^(G_ic - G_jc)          i >  j   (delta rules)
    Ai        = (I + Akk)^-1
    w         = Ai Diag(beta) (k * 2^G)        u = Ai Diag(beta) v

How it is parallelized: every kernel here runs one program per (chunk, batch x value head);
programs never talk to each other. The chunk is cut into NC = BT / BC sub-chunks of BC = 16
rows. A per-channel gate may never form 2^(-G) over more than one sub-chunk, so an
off-diagonal sub-block (i > j) scales both factors by the gate relative to the first row n of
query sub-chunk i: (q_i 2^(G_i - G_n)) (k_j 2^(G_n - G_j))^T, both exponents <= 0. A diagonal
sub-block is anchored at its middle row when the gate's span over the sub-chunk is small enough
for fp32 (every exponent <= SPAN_LOG2), and is otherwise summed element-wise in fp32, one
column per step. The OFFDIAG "whole" candidates anchor a whole chunk at its middle row instead,
two tensor-core products, where its gate spans at most WHOLE_SPAN_LOG2 (other chunks: the
sub-blocks above). The triangular inverse is forward substitution on the 16 x 16 diagonal
blocks, merged to 32 / 64 with matmuls (A21^-1 = -A22^-1 A21 A11^-1).

Flags: GATE (0 none, 1 scalar, 2 diagonal), DELTA, IS_VARLEN (from cu_seqlens).
"""
from __future__ import annotations

import triton
import triton.language as tl

# gates are kept in log2 units so that every exponential is one exp2
RCP_LN2 = tl.constexpr(1.4426950408889634)
# per-step log gates are clamped here before the cumsum: exp(-104) = 7e-46 is already 0 in fp32 (2^-150.04,
# below the least subnormal), so a decay changes by nothing fp32 can hold. A finite g near -3.4e38 would
# otherwise sum to -inf in a chunk (-inf - -inf is NaN), and a clamp far lower (it was -1e4 = -14427 in log2)
# leaves every later cumulative gate of the chunk so large that fp32 keeps only ~3 digits of the in-chunk
# differences: one reset step (g <= -1e4) among ordinary gates cost 4e-4 to 1e-3 relative error
LOG_GATE_MIN = tl.constexpr(-104.0)
# a diagonal sub-block is anchored at its middle row when the gate spans at most this much
# (log2 units): factors stay within 2^(+-96), products within fp32 range
SPAN_LOG2 = tl.constexpr(96.0)
# a whole chunk is anchored at its middle row (two tensor-core products, OFFDIAG "whole"; the DPLR fast
# path) when its gate spans at most this much: every factor x 2^(G - G_m) stays within 2^(+-64) of x, so
# none underflows fp32's normal range unless |q| or |k| < 2^-62 (with 96 the limit would be 2^-30)
WHOLE_SPAN_LOG2 = tl.constexpr(64.0)


# launch candidates, timed once per shape on a GPU (the first is used under the interpreter)
CUMSUM_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=2)]
INTRA_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=2), triton.Config({}, num_warps=8),
                 triton.Config({"OFFDIAG": "fused"}, num_warps=4), triton.Config({"OFFDIAG": "fused"}, num_warps=2),
                 triton.Config({"OFFDIAG": "fused"}, num_warps=1), triton.Config({"OFFDIAG": "fused"}, num_warps=8),
                 triton.Config({"OFFDIAG": "fused", "BK": 32}, num_warps=4),
                 triton.Config({"OFFDIAG": "fused", "BK": 32}, num_warps=8),
                 triton.Config({"OFFDIAG": "fused", "BK": 16}, num_warps=4),
                 triton.Config({"OFFDIAG": "fused", "BK": 16}, num_warps=2),
                 # whole-chunk products where the gate's span allows (not yet timed or probed on a GPU)
                 triton.Config({"OFFDIAG": "whole", "BK": 32}, num_warps=4),
                 triton.Config({"OFFDIAG": "whole", "BK": 32}, num_warps=8),
                 triton.Config({"OFFDIAG": "whole", "BK": 16}, num_warps=4)]
# ptxas on sm_90 (benchmarks/ptxas_report.py, K=128): with BK=64 the fused variant spills 0.8-3.9 KB per
# thread on 1-4 warps for the per-channel-gate classes (1 KB on 8 warps for kda); BK=32 halves the
# tiles it holds. The tuner times them; the first config stays the untuned default. kda's tuned choice on
# the H200 (fused, BK=64, 2 warps) spills 1.9 KB; fused at BK=16 holds the diagonal_delta and diagonal
# classes with 0 B spilled on 4 warps (164 B on 2).
WU_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=3),
    triton.Config({"BV": 128}, num_warps=8, num_stages=2),
    triton.Config({"BV": 32}, num_warps=2, num_stages=2),
]


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_PREC "upcast" multiplies in fp32: the host picks it
    under the CPU interpreter for bf16, whose dot misreads bf16 operands (bf16 products are
    exact in fp32, so the result matches a bf16 tensor-core dot)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _exp2_masked(x, m):
    """2^x where m holds, 0 elsewhere, without ever evaluating 2^x on a masked (maybe huge) x."""
    return tl.exp2(tl.where(m, x, float("-inf")))


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(chunk index within its sequence, first row of the sequence, sequence length)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    return i_t, bos, T


# ----------------------------------------------------------------------------------------------
# gate cumsum
# ----------------------------------------------------------------------------------------------

@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(
    g, gc, cu_seqlens, chunk_indices, T,
    HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """gc = chunk-local inclusive cumsum of max(g, LOG_GATE_MIN), times 1/ln2 (fp32). Grid (NT, B * HV)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    if GATE == 1:
        p_g = g + (bos + o_t) * HV + i_hv
        # [BT]
        b_g = tl.maximum(tl.load(p_g, mask=m_t, other=0.).to(tl.float32), LOG_GATE_MIN) * RCP_LN2
        tl.store(gc + (bos + o_t) * HV + i_hv, tl.cumsum(b_g, axis=0), mask=m_t)
    else:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m = m_t[:, None] & (o_k < K)[None, :]
            p_g = g + ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
            # [BT, BK]
            b_g = tl.maximum(tl.load(p_g, mask=m, other=0.).to(tl.float32), LOG_GATE_MIN) * RCP_LN2
            p_gc = gc + ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
            tl.store(p_gc, tl.cumsum(b_g, axis=0), mask=m)


# ----------------------------------------------------------------------------------------------
# intra-chunk sub-blocks (shared by every class that needs them)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _offdiag_block(
    q, k, gc, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_qk, s_g,
    K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, NEED_QK: tl.constexpr, NEED_KK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Sub-block (i_i, i_j), i_i > i_j: rows of sub-chunk i_i against rows of sub-chunk i_j.

    q, k, gc point at row 0 / head of the sequence; s_qk, s_g are their row strides.
    Returns ([BC, BC] q k^T part, [BC, BC] k k^T part), gated, fp32, beta not applied.
    """
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    o_s = t0 + i_j * BC + o_c
    m_r = o_r < T
    m_s = o_s < T
    # anchor: first row of the query sub-chunk (clamped into the sequence for a ragged last chunk)
    o_n = tl.minimum(t0 + i_i * BC, T - 1)
    b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BC, BK] in the input dtype; gated tiles become fp32 (tf32 dots for half inputs)
        b_ks = tl.load(k + o_s[:, None] * s_qk + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0.)
        b_kr = tl.load(k + o_r[:, None] * s_qk + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.)
        if NEED_QK:
            b_qr = tl.load(q + o_r[:, None] * s_qk + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.)
        if GATE == 2:
            # [BK]
            b_gn = tl.load(gc + o_n * s_g + o_k, mask=m_k, other=0.)
            # [BC, BK]
            b_gr = tl.load(gc + o_r[:, None] * s_g + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.)
            b_gs = tl.load(gc + o_s[:, None] * s_g + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0.)
            b_fr = _exp2_masked(b_gr - b_gn[None, :], m_r[:, None])       # rows after the anchor: <= 1
            b_ks = b_ks.to(tl.float32) * _exp2_masked(b_gn[None, :] - b_gs, m_s[:, None])  # rows before it: <= 1
            b_kr = b_kr.to(tl.float32) * b_fr
            if NEED_QK:
                b_qr = b_qr.to(tl.float32) * b_fr
        if NEED_KK:
            b_Akk += _dot(b_kr, tl.trans(b_ks), DOT_PREC)
        if NEED_QK:
            b_Aqk += _dot(b_qr, tl.trans(b_ks), DOT_PREC)
    if GATE == 1:
        # scalar gate: 2^(G_r - G_s) <= 1 for every r > s, no anchor needed
        b_gr = tl.load(gc + o_r * s_g, mask=m_r, other=0.)
        b_gs = tl.load(gc + o_s * s_g, mask=m_s, other=0.)
        b_f = _exp2_masked(b_gr[:, None] - b_gs[None, :], m_r[:, None] & m_s[None, :])
        b_Akk *= b_f
        b_Aqk *= b_f
    return b_Aqk, b_Akk


@triton.jit
def _gated_rows(x, gc, t0, T, i_s: tl.constexpr, o_k, m_k, s_x, s_g, BC: tl.constexpr):
    """Rows of sub-chunk i_s: x [BC, BK] (input dtype), their cumulative gates [BC, BK] and row mask."""
    o_r = t0 + i_s * BC + tl.arange(0, BC)
    m_r = o_r < T
    m = m_r[:, None] & m_k[None, :]
    b_x = tl.load(x + o_r[:, None] * s_x + o_k[None, :], mask=m, other=0.)
    b_g = tl.load(gc + o_r[:, None] * s_g + o_k[None, :], mask=m, other=0.)
    return b_x, b_g, m_r


@triton.jit
def _anchor(gc, t0, T, i_s: tl.constexpr, o_k, m_k, s_g, BC: tl.constexpr):
    """[BK] cumulative gate of the first row of sub-chunk i_s (clamped into the sequence)."""
    return tl.load(gc + tl.minimum(t0 + i_s * BC, T - 1) * s_g + o_k, mask=m_k, other=0.)


@triton.jit
def _offdiag_diagonal_gate_4(
    q, k, gc, t0, T, s_qk, s_g, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    NEED_KK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """All six off-diagonal sub-blocks (i > j) of a 4-sub-chunk chunk with a per-channel gate, in one
    pass over K: each sub-chunk's rows and gates are loaded once per K block, the row factor
    2^(G_i - G_n(i)) once per query sub-chunk, and the gated tiles go to the dot in the input dtype
    (as _offdiag_block's anchoring: both exponents <= 0). Returns (Aqk 10, 20, 21, 30, 31, 32, then
    Akk in the same order), fp32, beta not applied."""
    DT = k.dtype.element_ty
    Aq10 = tl.zeros([BC, BC], dtype=tl.float32)
    Aq20 = tl.zeros([BC, BC], dtype=tl.float32)
    Aq21 = tl.zeros([BC, BC], dtype=tl.float32)
    Aq30 = tl.zeros([BC, BC], dtype=tl.float32)
    Aq31 = tl.zeros([BC, BC], dtype=tl.float32)
    Aq32 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak10 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak20 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak21 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak30 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak31 = tl.zeros([BC, BC], dtype=tl.float32)
    Ak32 = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k0, b_g0, m_0 = _gated_rows(k, gc, t0, T, 0, o_k, m_k, s_qk, s_g, BC)
        b_k1, b_g1, m_1 = _gated_rows(k, gc, t0, T, 1, o_k, m_k, s_qk, s_g, BC)
        b_k2, b_g2, m_2 = _gated_rows(k, gc, t0, T, 2, o_k, m_k, s_qk, s_g, BC)
        b_k3, b_g3, m_3 = _gated_rows(k, gc, t0, T, 3, o_k, m_k, s_qk, s_g, BC)
        b_n1 = _anchor(gc, t0, T, 1, o_k, m_k, s_g, BC)
        b_n2 = _anchor(gc, t0, T, 2, o_k, m_k, s_g, BC)
        b_n3 = _anchor(gc, t0, T, 3, o_k, m_k, s_g, BC)
        # query side: rows after their sub-chunk's anchor
        b_f1 = _exp2_masked(b_g1 - b_n1[None, :], m_1[:, None])
        b_f2 = _exp2_masked(b_g2 - b_n2[None, :], m_2[:, None])
        b_f3 = _exp2_masked(b_g3 - b_n3[None, :], m_3[:, None])
        # key side: rows before the anchor of the query sub-chunk they meet
        b_s10 = (b_k0 * _exp2_masked(b_n1[None, :] - b_g0, m_0[:, None])).to(DT)
        b_s20 = (b_k0 * _exp2_masked(b_n2[None, :] - b_g0, m_0[:, None])).to(DT)
        b_s21 = (b_k1 * _exp2_masked(b_n2[None, :] - b_g1, m_1[:, None])).to(DT)
        b_s30 = (b_k0 * _exp2_masked(b_n3[None, :] - b_g0, m_0[:, None])).to(DT)
        b_s31 = (b_k1 * _exp2_masked(b_n3[None, :] - b_g1, m_1[:, None])).to(DT)
        b_s32 = (b_k2 * _exp2_masked(b_n3[None, :] - b_g2, m_2[:, None])).to(DT)
        b_q1 = tl.load(q + (t0 + BC + tl.arange(0, BC))[:, None] * s_qk + o_k[None, :],
                       mask=m_1[:, None] & m_k[None, :], other=0.)
        b_q2 = tl.load(q + (t0 + 2 * BC + tl.arange(0, BC))[:, None] * s_qk + o_k[None, :],
                       mask=m_2[:, None] & m_k[None, :], other=0.)
        b_q3 = tl.load(q + (t0 + 3 * BC + tl.arange(0, BC))[:, None] * s_qk + o_k[None, :],
                       mask=m_3[:, None] & m_k[None, :], other=0.)
        b_r1 = (b_q1 * b_f1).to(DT)
        b_r2 = (b_q2 * b_f2).to(DT)
        b_r3 = (b_q3 * b_f3).to(DT)
        Aq10 += _dot(b_r1, tl.trans(b_s10), DOT_PREC)
        Aq20 += _dot(b_r2, tl.trans(b_s20), DOT_PREC)
        Aq21 += _dot(b_r2, tl.trans(b_s21), DOT_PREC)
        Aq30 += _dot(b_r3, tl.trans(b_s30), DOT_PREC)
        Aq31 += _dot(b_r3, tl.trans(b_s31), DOT_PREC)
        Aq32 += _dot(b_r3, tl.trans(b_s32), DOT_PREC)
        if NEED_KK:
            b_c1 = (b_k1 * b_f1).to(DT)
            b_c2 = (b_k2 * b_f2).to(DT)
            b_c3 = (b_k3 * b_f3).to(DT)
            Ak10 += _dot(b_c1, tl.trans(b_s10), DOT_PREC)
            Ak20 += _dot(b_c2, tl.trans(b_s20), DOT_PREC)
            Ak21 += _dot(b_c2, tl.trans(b_s21), DOT_PREC)
            Ak30 += _dot(b_c3, tl.trans(b_s30), DOT_PREC)
            Ak31 += _dot(b_c3, tl.trans(b_s31), DOT_PREC)
            Ak32 += _dot(b_c3, tl.trans(b_s32), DOT_PREC)
    return Aq10, Aq20, Aq21, Aq30, Aq31, Aq32, Ak10, Ak20, Ak21, Ak30, Ak31, Ak32


@triton.jit
def _scalar_gate_factor(gc, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_g, BC: tl.constexpr, STRICT: tl.constexpr):
    """[BC, BC] 2^(G_r - G_s) for rows r of sub-chunk i_i and s of i_j (scalar gate), 0 where masked:
    rows past T, and on a diagonal block (i_i == i_j) r <= s (STRICT) or r < s."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    o_s = t0 + i_j * BC + o_c
    m = (o_r < T)[:, None] & (o_s < T)[None, :]
    if i_i == i_j:
        if STRICT:
            m = m & (o_c[:, None] > o_c[None, :])
        else:
            m = m & (o_c[:, None] >= o_c[None, :])
    b_gr = tl.load(gc + o_r * s_g, mask=o_r < T, other=0.)
    b_gs = tl.load(gc + o_s * s_g, mask=o_s < T, other=0.)
    return _exp2_masked(b_gr[:, None] - b_gs[None, :], m)


@triton.jit
def _kk_all_4(k, gc, t0, T, s_qk, s_g, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """All ten k k^T sub-blocks (i >= j) of a 4-sub-chunk chunk without a per-channel gate, in one pass
    over K (each sub-chunk's rows loaded once per K block), then the scalar gate 2^(G_r - G_s) and
    the strict lower-triangular mask. Returns (00, 10, 11, 20, 21, 22, 30, 31, 32, 33), fp32."""
    A00 = tl.zeros([BC, BC], dtype=tl.float32)
    A10 = tl.zeros([BC, BC], dtype=tl.float32)
    A11 = tl.zeros([BC, BC], dtype=tl.float32)
    A20 = tl.zeros([BC, BC], dtype=tl.float32)
    A21 = tl.zeros([BC, BC], dtype=tl.float32)
    A22 = tl.zeros([BC, BC], dtype=tl.float32)
    A30 = tl.zeros([BC, BC], dtype=tl.float32)
    A31 = tl.zeros([BC, BC], dtype=tl.float32)
    A32 = tl.zeros([BC, BC], dtype=tl.float32)
    A33 = tl.zeros([BC, BC], dtype=tl.float32)
    o_c = tl.arange(0, BC)
    m_0 = (t0 + o_c) < T
    m_1 = (t0 + BC + o_c) < T
    m_2 = (t0 + 2 * BC + o_c) < T
    m_3 = (t0 + 3 * BC + o_c) < T
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k0 = tl.load(k + (t0 + o_c)[:, None] * s_qk + o_k[None, :], mask=m_0[:, None] & m_k[None, :], other=0.)
        b_k1 = tl.load(k + (t0 + BC + o_c)[:, None] * s_qk + o_k[None, :], mask=m_1[:, None] & m_k[None, :],
                       other=0.)
        b_k2 = tl.load(k + (t0 + 2 * BC + o_c)[:, None] * s_qk + o_k[None, :], mask=m_2[:, None] & m_k[None, :],
                       other=0.)
        b_k3 = tl.load(k + (t0 + 3 * BC + o_c)[:, None] * s_qk + o_k[None, :], mask=m_3[:, None] & m_k[None, :],
                       other=0.)
        A00 += _dot(b_k0, tl.trans(b_k0), DOT_PREC)
        A10 += _dot(b_k1, tl.trans(b_k0), DOT_PREC)
        A11 += _dot(b_k1, tl.trans(b_k1), DOT_PREC)
        A20 += _dot(b_k2, tl.trans(b_k0), DOT_PREC)
        A21 += _dot(b_k2, tl.trans(b_k1), DOT_PREC)
        A22 += _dot(b_k2, tl.trans(b_k2), DOT_PREC)
        A30 += _dot(b_k3, tl.trans(b_k0), DOT_PREC)
        A31 += _dot(b_k3, tl.trans(b_k1), DOT_PREC)
        A32 += _dot(b_k3, tl.trans(b_k2), DOT_PREC)
        A33 += _dot(b_k3, tl.trans(b_k3), DOT_PREC)
    m_s = (o_c[:, None] > o_c[None, :])
    if GATE == 1:
        A00 *= _scalar_gate_factor(gc, t0, T, 0, 0, s_g, BC, True)
        A10 *= _scalar_gate_factor(gc, t0, T, 1, 0, s_g, BC, True)
        A11 *= _scalar_gate_factor(gc, t0, T, 1, 1, s_g, BC, True)
        A20 *= _scalar_gate_factor(gc, t0, T, 2, 0, s_g, BC, True)
        A21 *= _scalar_gate_factor(gc, t0, T, 2, 1, s_g, BC, True)
        A22 *= _scalar_gate_factor(gc, t0, T, 2, 2, s_g, BC, True)
        A30 *= _scalar_gate_factor(gc, t0, T, 3, 0, s_g, BC, True)
        A31 *= _scalar_gate_factor(gc, t0, T, 3, 1, s_g, BC, True)
        A32 *= _scalar_gate_factor(gc, t0, T, 3, 2, s_g, BC, True)
        A33 *= _scalar_gate_factor(gc, t0, T, 3, 3, s_g, BC, True)
    else:
        A00 = tl.where(m_s & m_0[:, None], A00, 0.)
        A11 = tl.where(m_s & m_1[:, None], A11, 0.)
        A22 = tl.where(m_s & m_2[:, None], A22, 0.)
        A33 = tl.where(m_s & m_3[:, None], A33, 0.)
    return A00, A10, A11, A20, A21, A22, A30, A31, A32, A33


@triton.jit
def _diag_block(
    q, k, gc, qg, t0, T, i_i: tl.constexpr, s_qk, s_g,
    K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    GATE: tl.constexpr, NEED_QK: tl.constexpr, NEED_KK: tl.constexpr, DOT_PREC: tl.constexpr, QG: tl.constexpr,
):
    """Diagonal sub-block i_i: q k^T masked to i >= j, k k^T masked to i > j (fp32, no beta).
    QG (per-channel gate): also store the sub-chunk's rows of qg = q * 2^G, laid out as gc."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    m_r = o_r < T
    m_qk = (o_c[:, None] >= o_c[None, :]) & m_r[:, None]
    m_kk = (o_c[:, None] > o_c[None, :]) & m_r[:, None]
    b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
    if GATE == 2:
        # rows spanned by this sub-chunk, clamped into the sequence
        o_first = tl.minimum(t0 + i_i * BC, T - 1)
        o_mid = tl.minimum(t0 + i_i * BC + BC // 2, T - 1)
        o_last = tl.minimum(t0 + i_i * BC + BC - 1, T - 1)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        # [BC, BK] in the input dtype; fp32 where a gate multiplies them
        b_k = tl.load(k + o_r[:, None] * s_qk + o_k[None, :], mask=m_rk, other=0.)
        if NEED_QK:
            b_q = tl.load(q + o_r[:, None] * s_qk + o_k[None, :], mask=m_rk, other=0.)
        if GATE == 2:
            b_k = b_k.to(tl.float32)
            if NEED_QK:
                b_q = b_q.to(tl.float32)
            b_g = tl.load(gc + o_r[:, None] * s_g + o_k[None, :], mask=m_rk, other=0.)
            if QG:
                # the output kernel's gated queries, formed here where q and G are loaded anyway
                tl.store(qg + o_r[:, None] * s_g + o_k[None, :], (b_q * tl.exp2(b_g)).to(qg.dtype.element_ty),
                         mask=m_rk)
            # largest |G_first - G_last| over the channels of this block (G is non-increasing)
            b_g0 = tl.load(gc + o_first * s_g + o_k, mask=m_k, other=0.)
            b_g1 = tl.load(gc + o_last * s_g + o_k, mask=m_k, other=0.)
            b_span = tl.max(b_g0 - b_g1, axis=0)
            if b_span <= SPAN_LOG2:
                # anchored at the middle row: every factor stays within 2^(+-SPAN_LOG2)
                b_gm = tl.load(gc + o_mid * s_g + o_k, mask=m_k, other=0.)
                b_kc = b_k * _exp2_masked(b_gm[None, :] - b_g, m_r[:, None])
                b_fr = _exp2_masked(b_g - b_gm[None, :], m_r[:, None])
                if NEED_KK:
                    b_Akk += tl.where(m_kk, _dot(b_k * b_fr, tl.trans(b_kc), DOT_PREC), 0.)
                if NEED_QK:
                    b_Aqk += tl.where(m_qk, _dot(b_q * b_fr, tl.trans(b_kc), DOT_PREC), 0.)
            else:
                # element-wise in fp32: column j is sum_c x_ic k_jc 2^(G_ic - G_jc), rows i >= j only
                for j in range(0, BC):
                    # a column past the sequence end only feeds rows past it, which are masked
                    o_j = tl.minimum(t0 + i_i * BC + j, T - 1)
                    # [BK]
                    b_kj = tl.load(k + o_j * s_qk + o_k, mask=m_k, other=0.).to(tl.float32)
                    b_gj = tl.load(gc + o_j * s_g + o_k, mask=m_k, other=0.)
                    # [BC, BK]
                    b_kjg = b_kj[None, :] * _exp2_masked(b_g - b_gj[None, :], (o_c >= j)[:, None] & m_rk)
                    m_col = o_c[None, :] == j
                    if NEED_KK:
                        b_Akk += tl.where(m_col & m_kk, tl.sum(b_k * b_kjg, axis=1)[:, None], 0.)
                    if NEED_QK:
                        b_Aqk += tl.where(m_col & m_qk, tl.sum(b_q * b_kjg, axis=1)[:, None], 0.)
        else:
            if NEED_KK:
                b_Akk += _dot(b_k, tl.trans(b_k), DOT_PREC)
            if NEED_QK:
                b_Aqk += _dot(b_q, tl.trans(b_k), DOT_PREC)
    if GATE == 1:
        b_gr = tl.load(gc + o_r * s_g, mask=m_r, other=0.)
        b_Akk *= _exp2_masked(b_gr[:, None] - b_gr[None, :], m_kk)
        b_Aqk *= _exp2_masked(b_gr[:, None] - b_gr[None, :], m_qk)
    b_Akk = tl.where(m_kk, b_Akk, 0.)
    b_Aqk = tl.where(m_qk, b_Aqk, 0.)
    return b_Aqk, b_Akk


@triton.jit
def _inv_unit_lower(b_A, BC: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular [BC, BC] A, by forward substitution (fp32)."""
    o_c = tl.arange(0, BC)
    b_X = (o_c[:, None] == o_c[None, :]).to(tl.float32)
    for r in range(1, BC):
        # row r of the inverse: e_r - A[r, :r] X[:r, :]  (rows < r of X are final)
        b_a = tl.sum(tl.where(o_c[:, None] == r, b_A, 0.), axis=0)
        b_x = tl.sum(b_a[:, None] * b_X, axis=0)
        b_X = tl.where(o_c[:, None] == r, b_X - b_x[None, :], b_X)
    return b_X


@triton.jit
def _inv_store_4(Ai, b_a00, b_a10, b_a11, b_a20, b_a21, b_a22, b_a30, b_a31, b_a32, b_a33, t0, T, s_A,
                 BC: tl.constexpr):
    """Store (I + A)^-1 for a strictly lower-triangular A given as its ten lower BC x BC blocks a_ij, as
    ten blocks of Ai: forward substitution on the diagonal blocks, then each block below from the
    finished blocks above it, first the sub-diagonal (A21^-1 = -A22^-1 A21 A11^-1), in fp32."""
    b_i00 = _inv_unit_lower(b_a00, BC)
    b_i11 = _inv_unit_lower(b_a11, BC)
    b_i22 = _inv_unit_lower(b_a22, BC)
    b_i33 = _inv_unit_lower(b_a33, BC)
    b_i10 = -tl.dot(tl.dot(b_i11, b_a10, input_precision="ieee"), b_i00, input_precision="ieee")
    b_i21 = -tl.dot(tl.dot(b_i22, b_a21, input_precision="ieee"), b_i11, input_precision="ieee")
    b_i32 = -tl.dot(tl.dot(b_i33, b_a32, input_precision="ieee"), b_i22, input_precision="ieee")
    b_s20 = tl.dot(b_a20, b_i00, input_precision="ieee") + tl.dot(b_a21, b_i10, input_precision="ieee")
    b_i20 = -tl.dot(b_i22, b_s20, input_precision="ieee")
    b_s31 = tl.dot(b_a31, b_i11, input_precision="ieee") + tl.dot(b_a32, b_i21, input_precision="ieee")
    b_i31 = -tl.dot(b_i33, b_s31, input_precision="ieee")
    b_s30 = (tl.dot(b_a30, b_i00, input_precision="ieee") + tl.dot(b_a31, b_i10, input_precision="ieee")
             + tl.dot(b_a32, b_i20, input_precision="ieee"))
    b_i30 = -tl.dot(b_i33, b_s30, input_precision="ieee")
    _store_block(Ai, b_i00, t0, T, 0, 0, s_A, BC)
    _store_block(Ai, b_i10, t0, T, 1, 0, s_A, BC)
    _store_block(Ai, b_i11, t0, T, 1, 1, s_A, BC)
    _store_block(Ai, b_i20, t0, T, 2, 0, s_A, BC)
    _store_block(Ai, b_i21, t0, T, 2, 1, s_A, BC)
    _store_block(Ai, b_i22, t0, T, 2, 2, s_A, BC)
    _store_block(Ai, b_i30, t0, T, 3, 0, s_A, BC)
    _store_block(Ai, b_i31, t0, T, 3, 1, s_A, BC)
    _store_block(Ai, b_i32, t0, T, 3, 2, s_A, BC)
    _store_block(Ai, b_i33, t0, T, 3, 3, s_A, BC)


@triton.jit
def _store_block(p, b, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_A, BC: tl.constexpr):
    """Store a [BC, BC] sub-block (i_i, i_j) of a chunk's [BT, BT] matrix (rows inside the sequence)."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    tl.store(p + o_r[:, None] * s_A + (i_j * BC + o_c)[None, :], b.to(p.dtype.element_ty), mask=(o_r < T)[:, None])


@triton.jit
def _beta_rows(beta, t0, T, i_i: tl.constexpr, HV: tl.constexpr, BC: tl.constexpr):
    o_r = t0 + i_i * BC + tl.arange(0, BC)
    return tl.load(beta + o_r * HV, mask=o_r < T, other=0.).to(tl.float32)


@triton.jit
def _sub_blocks(q, k, gc, qg, Aqk, t0, T, s_qk, s_g, s_A, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                GATE: tl.constexpr, NEED_QK: tl.constexpr, NEED_KK: tl.constexpr, DOT_PREC: tl.constexpr,
                QG: tl.constexpr, FUSED: tl.constexpr, NC: tl.constexpr):
    """The chunk's q k^T and k k^T as NC x NC sub-blocks of BC rows (every gate): q k^T is stored (Aqk),
    the k k^T blocks (00, 10, 11, 20, 21, 22, 30, 31, 32, 33; zeros past NC) are returned.
    FUSED: the six off-diagonal blocks of a per-channel gate in one pass (_offdiag_diagonal_gate_4)."""
    b_kk10 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk11 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk20 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk21 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk22 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk30 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk31 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk32 = tl.zeros([BC, BC], dtype=tl.float32)
    b_kk33 = tl.zeros([BC, BC], dtype=tl.float32)
    if FUSED:
        (b_qk10, b_qk20, b_qk21, b_qk30, b_qk31, b_qk32,
         b_kk10, b_kk20, b_kk21, b_kk30, b_kk31, b_kk32) = _offdiag_diagonal_gate_4(
            q, k, gc, t0, T, s_qk, s_g, K, BC, BK, NEED_KK, DOT_PREC)
    b_qk00, b_kk00 = _diag_block(q, k, gc, qg, t0, T, 0, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK, DOT_PREC, QG)
    if NEED_QK:
        _store_block(Aqk, b_qk00, t0, T, 0, 0, s_A, BC)
    if NC > 1:
        if not FUSED:
            b_qk10, b_kk10 = _offdiag_block(q, k, gc, t0, T, 1, 0, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
        b_qk11, b_kk11 = _diag_block(q, k, gc, qg, t0, T, 1, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                         DOT_PREC, QG)
        if NEED_QK:
            _store_block(Aqk, b_qk10, t0, T, 1, 0, s_A, BC)
            _store_block(Aqk, b_qk11, t0, T, 1, 1, s_A, BC)
    if NC > 2:
        if not FUSED:
            b_qk20, b_kk20 = _offdiag_block(q, k, gc, t0, T, 2, 0, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
            b_qk21, b_kk21 = _offdiag_block(q, k, gc, t0, T, 2, 1, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
            b_qk30, b_kk30 = _offdiag_block(q, k, gc, t0, T, 3, 0, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
            b_qk31, b_kk31 = _offdiag_block(q, k, gc, t0, T, 3, 1, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
            b_qk32, b_kk32 = _offdiag_block(q, k, gc, t0, T, 3, 2, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                            DOT_PREC)
        b_qk22, b_kk22 = _diag_block(q, k, gc, qg, t0, T, 2, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                         DOT_PREC, QG)
        b_qk33, b_kk33 = _diag_block(q, k, gc, qg, t0, T, 3, s_qk, s_g, K, BC, BK, GATE, NEED_QK, NEED_KK,
                                         DOT_PREC, QG)
        if NEED_QK:
            _store_block(Aqk, b_qk20, t0, T, 2, 0, s_A, BC)
            _store_block(Aqk, b_qk21, t0, T, 2, 1, s_A, BC)
            _store_block(Aqk, b_qk22, t0, T, 2, 2, s_A, BC)
            _store_block(Aqk, b_qk30, t0, T, 3, 0, s_A, BC)
            _store_block(Aqk, b_qk31, t0, T, 3, 1, s_A, BC)
            _store_block(Aqk, b_qk32, t0, T, 3, 2, s_A, BC)
            _store_block(Aqk, b_qk33, t0, T, 3, 3, s_A, BC)
    return b_kk00, b_kk10, b_kk11, b_kk20, b_kk21, b_kk22, b_kk30, b_kk31, b_kk32, b_kk33


@triton.jit
def _chunk_span(gc, t0, T, s_g, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """A bound on the per-channel gate's span over a chunk: max over channels of -G_last, which is
    >= G_first - G_last, and is the span from the first row's exclusive gate (0) to the last row's G
    (G is the chunk-local cumsum, non-increasing, <= 0)."""
    o_last = tl.minimum(t0 + BT, T) - 1
    b_span = tl.zeros([], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_span = tl.maximum(b_span, -tl.min(tl.load(gc + o_last * s_g + o_k, mask=o_k < K, other=0.), axis=0))
    return b_span


@triton.jit
def _split_cols_4(x):
    """The four [R, C / 4] column blocks of an [R, C] tensor, left to right."""
    R: tl.constexpr = x.shape[0]
    C4: tl.constexpr = x.shape[1] // 4
    # column c = 2 C4 j1 + C4 j0 + cc: block j = 2 j1 + j0
    y = tl.permute(tl.reshape(x, [R, 2, 2, C4]), (0, 3, 1, 2))      # [R, C4, j1, j0]
    even, odd = tl.split(y)                                            # j0 = 0, 1: [R, C4, j1]
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _lower_blocks_4(A):
    """The ten lower blocks (00, 10, 11, 20, 21, 22, 30, 31, 32, 33) of a [4 BC, 4 BC] matrix."""
    c0, c1, c2, c3 = _split_cols_4(A)
    # the column blocks of column block j's transpose are its row blocks, transposed
    t00, t10, t20, t30 = _split_cols_4(tl.trans(c0))
    _, t11, t21, t31 = _split_cols_4(tl.trans(c1))
    _, _, t22, t32 = _split_cols_4(tl.trans(c2))
    _, _, _, t33 = _split_cols_4(tl.trans(c3))
    return (tl.trans(t00), tl.trans(t10), tl.trans(t11), tl.trans(t20), tl.trans(t21), tl.trans(t22),
            tl.trans(t30), tl.trans(t31), tl.trans(t32), tl.trans(t33))


@triton.jit
def _whole_chunk_pair(xa, s_xa, xb, s_xb, B_EXCL: tl.constexpr, y, s_y, gc, qg, t0, T, s_g, K: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_B: tl.constexpr,
                      QG: tl.constexpr):
    """The [BT, BT] products (xa 2^(G - G_m)) (y 2^(G_m - G))^T and (xb 2^(Gb - G_m)) (y 2^(G_m - G))^T of a
    chunk, all factors anchored at its middle row m (tensor-core dots over the whole chunk); Gb is G, or
    the exclusive gate Gx (the previous row's G, 0 at the chunk's first row) if B_EXCL. The caller has
    checked that the per-channel gate spans at most WHOLE_SPAN_LOG2 over the chunk, so every factor
    stays within 2^(+-WHOLE_SPAN_LOG2) of its input; entries above the diagonal may overflow and are the
    caller's to mask. Rows x*, y have strides s_*; G, qg stride s_g. QG: also store qg = xa 2^G."""
    o_i = tl.arange(0, BT)
    o_r = t0 + o_i
    m_r = o_r < T
    o_mid = tl.minimum(t0 + BT // 2, T - 1)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_B = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_r[:, None] & m_k[None, :]
        p_g = o_r[:, None] * s_g + o_k[None, :]
        # [BT, BK] fp32
        b_g = tl.load(gc + p_g, mask=m, other=0.)
        b_gm = tl.load(gc + o_mid * s_g + o_k, mask=m_k, other=0.)
        b_xa = tl.load(xa + o_r[:, None] * s_xa + o_k[None, :], mask=m, other=0.).to(tl.float32)
        if QG:
            tl.store(qg + p_g, (b_xa * tl.exp2(b_g)).to(qg.dtype.element_ty), mask=m)
        b_yc = tl.load(y + o_r[:, None] * s_y + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_yc = b_yc * _exp2_masked(b_gm[None, :] - b_g, m)
        b_A += _dot(b_xa * _exp2_masked(b_g - b_gm[None, :], m), tl.trans(b_yc), DOT_PREC)
        if NEED_B:
            if B_EXCL:
                b_gb = tl.load(gc + p_g - s_g, mask=m & (o_r > t0)[:, None], other=0.)
            else:
                b_gb = b_g
            b_xb = tl.load(xb + o_r[:, None] * s_xb + o_k[None, :], mask=m, other=0.).to(tl.float32)
            b_B += _dot(b_xb * _exp2_masked(b_gb - b_gm[None, :], m), tl.trans(b_yc), DOT_PREC)
    return b_A, b_B


@triton.jit
def _store_chunk(p, b, t0, T, s_A, BT: tl.constexpr):
    """Store a chunk's [BT, BT] matrix (rows inside the sequence)."""
    o_i = tl.arange(0, BT)
    tl.store(p + (t0 + o_i)[:, None] * s_A + o_i[None, :], b.to(p.dtype.element_ty), mask=(t0 + o_i < T)[:, None])


@triton.jit
def _whole_chunk(q, k, gc, qg, Aqk, t0, T, s_qk, s_g, s_A, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                 BK: tl.constexpr, NEED_KK: tl.constexpr, DOT_PREC: tl.constexpr, QG: tl.constexpr):
    """q k^T and k k^T of a chunk whose per-channel gate spans at most WHOLE_SPAN_LOG2 over it, as two
    whole-chunk products (_whole_chunk_pair). q k^T is stored (Aqk; QG: also qg = q 2^G); k k^T is
    returned as _sub_blocks returns it."""
    o_i = tl.arange(0, BT)
    m_r = t0 + o_i < T
    b_Aqk, b_Akk = _whole_chunk_pair(q, s_qk, k, s_qk, False, k, s_qk, gc, qg, t0, T, s_g, K, BT, BK, DOT_PREC,
                                     NEED_KK, QG)
    _store_chunk(Aqk, tl.where((o_i[:, None] >= o_i[None, :]) & m_r[:, None], b_Aqk, 0.), t0, T, s_A, BT)
    return _lower_blocks_4(tl.where((o_i[:, None] > o_i[None, :]) & m_r[:, None], b_Akk, 0.))


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None, "QG": lambda a: a["qg"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_intra_kernel(
    q, k, gc, beta, Aqk, Ai, qg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, QG: tl.constexpr = False, OFFDIAG: tl.constexpr = "blocks",
):
    """Aqk (diagonal gate) and Ai = (I + Akk)^-1 (delta rules) of one chunk. Grid (NT, B * HV).
    qg (diagonal gate; None otherwise) = q * 2^G [B, T, HV, K], for the output kernel."""
    tl.static_assert(BT == BC or BT == 2 * BC or BT == 4 * BC)
    NC: tl.constexpr = BT // BC
    # OFFDIAG "fused": the per-channel-gate, 4-sub-chunk case computes its six off-diagonal blocks
    # in one pass (_offdiag_diagonal_gate_4); "blocks": one _offdiag_block / _diag_block call per block
    FUSED: tl.constexpr = (OFFDIAG == "fused") and (GATE == 2) and (NC == 4)
    # the same for k k^T without a per-channel gate: all ten blocks in one pass (_kk_all_4)
    FUSED_KK: tl.constexpr = (OFFDIAG == "fused") and (GATE != 2) and DELTA and (NC == 4)
    # OFFDIAG "whole": a per-channel gate's 4-sub-chunk chunk whose gate spans at most WHOLE_SPAN_LOG2 is two
    # whole-chunk products anchored at its middle row (_whole_chunk); wider spans take the fused blocks
    WHOLE: tl.constexpr = (OFFDIAG == "whole") and (GATE == 2) and (NC == 4)
    NEED_QK: tl.constexpr = GATE == 2
    NEED_KK: tl.constexpr = DELTA
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    t0 = i_t * BT

    # move every pointer to row 0 of this sequence and this head
    q += bos * H * K + i_h * K
    k += bos * H * K + i_h * K
    s_qk = H * K
    if GATE == 1:
        gc += bos * HV + i_hv
        s_g = HV
    elif GATE == 2:
        gc += (bos * HV + i_hv) * K
        s_g = HV * K
    else:
        s_g = 0
    if NEED_QK:
        Aqk += (bos * HV + i_hv) * BT
    if QG:
        qg += (bos * HV + i_hv) * K
    if DELTA:
        beta += bos * HV + i_hv
        Ai += (bos * HV + i_hv) * BT
    s_A = HV * BT

    # --- sub-blocks of the chunk (q k^T stored at once, k k^T kept for the solve) ---
    if FUSED_KK:
        b_kk00, b_kk10, b_kk11, b_kk20, b_kk21, b_kk22, b_kk30, b_kk31, b_kk32, b_kk33 = _kk_all_4(
            k, gc, t0, T, s_qk, s_g, K, BC, BK, GATE, DOT_PREC)
    elif WHOLE:
        if _chunk_span(gc, t0, T, s_g, K, BT, BK) <= WHOLE_SPAN_LOG2:
            b_kk00, b_kk10, b_kk11, b_kk20, b_kk21, b_kk22, b_kk30, b_kk31, b_kk32, b_kk33 = _whole_chunk(
                q, k, gc, qg, Aqk, t0, T, s_qk, s_g, s_A, K, BT, BC, BK, NEED_KK, DOT_PREC, QG)
        else:
            b_kk00, b_kk10, b_kk11, b_kk20, b_kk21, b_kk22, b_kk30, b_kk31, b_kk32, b_kk33 = _sub_blocks(
                q, k, gc, qg, Aqk, t0, T, s_qk, s_g, s_A, K, BC, BK, GATE, NEED_QK, NEED_KK, DOT_PREC, QG, True, NC)
    else:
        b_kk00, b_kk10, b_kk11, b_kk20, b_kk21, b_kk22, b_kk30, b_kk31, b_kk32, b_kk33 = _sub_blocks(
            q, k, gc, qg, Aqk, t0, T, s_qk, s_g, s_A, K, BC, BK, GATE, NEED_QK, NEED_KK, DOT_PREC, QG, FUSED, NC)

    if DELTA:
        # --- Ai = (I + Diag(beta) Akk)^-1, blockwise: invert diagonal blocks, merge with matmuls ---
        b_b0 = _beta_rows(beta, t0, T, 0, HV, BC)
        if NC == 4:
            b_b1 = _beta_rows(beta, t0, T, 1, HV, BC)
            b_b2 = _beta_rows(beta, t0, T, 2, HV, BC)
            b_b3 = _beta_rows(beta, t0, T, 3, HV, BC)
            _inv_store_4(Ai, b_kk00 * b_b0[:, None], b_kk10 * b_b1[:, None], b_kk11 * b_b1[:, None],
                         b_kk20 * b_b2[:, None], b_kk21 * b_b2[:, None], b_kk22 * b_b2[:, None],
                         b_kk30 * b_b3[:, None], b_kk31 * b_b3[:, None], b_kk32 * b_b3[:, None],
                         b_kk33 * b_b3[:, None], t0, T, s_A, BC)
        else:
            b_i00 = _inv_unit_lower(b_kk00 * b_b0[:, None], BC)
            _store_block(Ai, b_i00, t0, T, 0, 0, s_A, BC)
            if NC == 2:
                b_b1 = _beta_rows(beta, t0, T, 1, HV, BC)
                b_i11 = _inv_unit_lower(b_kk11 * b_b1[:, None], BC)
                b_i10 = -tl.dot(tl.dot(b_i11, b_kk10 * b_b1[:, None], input_precision="ieee"), b_i00,
                                input_precision="ieee")
                _store_block(Ai, b_i10, t0, T, 1, 0, s_A, BC)
                _store_block(Ai, b_i11, t0, T, 1, 1, s_A, BC)


# ----------------------------------------------------------------------------------------------
# WY factors w, u (delta rules)
# ----------------------------------------------------------------------------------------------

@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_wu_kernel(
    k, v, gc, beta, Ai, w, u, kg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """w = Ai Diag(beta) (k * 2^G), u = Ai Diag(beta) v for one chunk. Grid (NT, B * HV).

    kg (per-channel gate; None otherwise) = k * 2^(G_C - G) [B, T, HV, K], the keys as the state
    pass adds them (G_C: the gate at the chunk's last row): formed here, where k and G are loaded
    anyway, once per chunk instead of once per V block of the state pass."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T

    # [BT, BT] lower-triangular Ai; the upper triangle is never written, so mask it on load
    p_A = Ai + ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
    b_A = tl.load(p_A, mask=m_t[:, None] & (o_i[:, None] >= o_i[None, :]), other=0.)
    # [BT]
    b_b = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    if GATE == 1:
        b_g = tl.load(gc + (bos + o_t) * HV + i_hv, mask=m_t, other=0.)
        b_b = b_b * tl.exp2(b_g)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        # [BT, BK]
        b_k = tl.load(k + ((bos + o_t) * H + i_h)[:, None] * K + o_k[None, :], mask=m, other=0.).to(tl.float32)
        if GATE == 2:
            b_g = tl.load(gc + ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :], mask=m, other=0.)
            if kg is not None:
                o_last = tl.minimum(i_t * BT + BT, T) - 1
                b_gl = tl.load(gc + ((bos + o_last) * HV + i_hv) * K + o_k, mask=o_k < K, other=0.)
                b_kg = b_k * _exp2_masked(b_gl[None, :] - b_g, m)
                tl.store(kg + ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :], b_kg.to(kg.dtype.element_ty),
                         mask=m)
            b_k = b_k * tl.exp2(b_g)
        b_k = (b_k * b_b[:, None]).to(b_A.dtype)
        b_w = _dot(b_A, b_k, DOT_PREC)
        tl.store(w + ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)
    b_b = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_v = ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
        # [BT, BV]
        b_v = (tl.load(v + p_v, mask=m, other=0.).to(tl.float32) * b_b[:, None]).to(b_A.dtype)
        b_u = _dot(b_A, b_v, DOT_PREC)
        tl.store(u + p_v, b_u.to(u.dtype.element_ty), mask=m)
