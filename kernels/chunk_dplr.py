"""Chunkwise forward of the diagonal-plus-low-rank (DPLR) transition class (RWKV-7 and kin).

Per (sequence, value head), state S in R^{K x V}, alpha_t = exp(g_t) per key channel:

    S_t = (Diag(alpha_t) + a_t b_t^T) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

Within a chunk of C rows entering with state H (G = chunk-local cumsum of g, Gx = G - g the
exclusive one, both per channel; Gamma = 2^G in the log2 units the kernels keep):

    p_t = S_{t-1}^T b_t                          the low-rank read, one V-row per token
    P   = (I - A_ab)^-1 (Bx H + A_bk V) = W H + U      Bx = b * 2^Gx
    O   = (q * 2^G) H + A_qa P + A_qk V
    S_C = Diag(2^{G_C}) H + (a * 2^{G_C - G})^T P + (k * 2^{G_C - G})^T V

    A_qk[i, j] = sum_c q_ic k_jc 2^(G_ic - G_jc)    i >= j      A_qa: a in place of k
    A_bk[i, j] = sum_c b_ic k_jc 2^(Gx_ic - G_jc)   i >  j      A_ab: a in place of k

Every exponent above is <= 0. dsl.checker.chunk_identity proves these equations equal to the
recurrence on symbolic tokens. The chunk is C = 64 rows. Where the gate spans at most
WHOLE_SPAN_LOG2 over a chunk, the four gated matrices are four whole-chunk tensor-core products
anchored at its middle row. Other chunks are cut into four sub-chunks of 16 as in
kernels/chunk_intra.py, so that no factor ever leaves fp32's range, for any gate: an off-diagonal
sub-block anchors both factors at the exclusive gate of its query sub-chunk's first row (every
exponent <= 0, tensor-core dots); a diagonal sub-block is anchored at its middle row when the gate
spans at most SPAN_LOG2 over it (factors within 2^(+-SPAN_LOG2)), and is otherwise summed
element-wise in fp32, one column per step (every exponent <= 0). (I - A_ab)^-1 is the delta rule's
blockwise inverse (chunk_intra._inv_store_4); its conditioning is the recurrence's own: for
RWKV-7's removal (a = -c b, |b| = 1, c in (0, 1)) A_ab is the gated delta rule's beta k k^T with
the roles of rows and columns exchanged. P = W H + U has the shape of the delta rule's
v~ = u - w H (with w = -W), so the state and output kernels of kernels/chunk_state.py run it with
their DPLR flag, which adds the k v^T terms:

    chunk_cumsum_kernel      G (fp32, log2 units)                         kernels/chunk_intra.py
    chunk_dplr_intra_kernel  A_qk, A_qa, A_bk, Ai = (I - A_ab)^-1, qg = q 2^G
    chunk_dplr_wu_kernel     w = -Ai Bx, u = (Ai A_bk) V, ag = a 2^(G_C - G), kg = k 2^(G_C - G)
    chunk_state_kernel       states entering each chunk, v~ = P             kernels/chunk_state.py
    chunk_output_kernel      o                                               kernels/chunk_state.py

Shapes: q, k [B, T, H, K]; v [B, T, HV, V]; a, b, g [B, T, HV, K] (HV % H == 0); states
[N, HV, K, V] fp32; with cu_seqlens (B == 1) the N sequences are packed along T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_intra import (SPAN_LOG2, WHOLE_SPAN_LOG2, _chunk_bounds, _chunk_span, _dot, _exp2_masked,
                          _inv_store_4, _store_block, _store_chunk, _whole_chunk_pair)
from .utils import empty, interpreting, next_pow2

CHUNK = 64
# launch candidates (the first runs under the interpreter and until tune=True picks). The H200 picked the
# first of each at B=8 T=4096 H=16 K=V=128 bf16 (2026-11-29, among five intra and four wu candidates;
# ptxas on sm_90, intra: 1.2 KB spilled at BK=32 on 4 warps, 52 B on 8; 152 B at BK=16; 0.6 KB at BK=64 on 8)
INTRA_CONFIGS = [triton.Config({"BK": 32}, num_warps=4), triton.Config({"BK": 32}, num_warps=8),
                 triton.Config({"BK": 16}, num_warps=4), triton.Config({}, num_warps=8)]
WU_CONFIGS = [
    triton.Config({"BV": 128, "BK": 32}, num_warps=8, num_stages=2),
    triton.Config({"BV": 64, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=8, num_stages=2),
]


@triton.jit
def _tiles(q, k, a, b, gc, o_r, m_r, o_k, m_k, t0, s_qk, s_x):
    """[BC, BK] fp32 tiles of rows o_r, columns o_k: q, k, a, b, G and the exclusive gate Gx (the
    previous row's G; 0 at the chunk's first row t0). Zeros where masked."""
    m = m_r[:, None] & m_k[None, :]
    p_qk = o_r[:, None] * s_qk + o_k[None, :]
    p_x = o_r[:, None] * s_x + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m, other=0.).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m, other=0.).to(tl.float32)
    b_a = tl.load(a + p_x, mask=m, other=0.).to(tl.float32)
    b_b = tl.load(b + p_x, mask=m, other=0.).to(tl.float32)
    b_g = tl.load(gc + p_x, mask=m, other=0.)
    b_gx = tl.load(gc + p_x - s_x, mask=m & (o_r > t0)[:, None], other=0.)
    return b_q, b_k, b_a, b_b, b_g, b_gx


@triton.jit
def _four_dots(b_q, b_b, b_k, b_a, b_Aqk, b_Aqa, b_Abk, b_Aab, DOT_PREC: tl.constexpr):
    """Accumulate the four products of gated row tiles (q, b) and column tiles (k, a)."""
    b_Aqk += _dot(b_q, tl.trans(b_k), DOT_PREC)
    b_Aqa += _dot(b_q, tl.trans(b_a), DOT_PREC)
    b_Abk += _dot(b_b, tl.trans(b_k), DOT_PREC)
    b_Aab += _dot(b_b, tl.trans(b_a), DOT_PREC)
    return b_Aqk, b_Aqa, b_Abk, b_Aab


@triton.jit
def _dplr_offdiag(q, k, a, b, gc, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_qk, s_x,
                  K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sub-block (i_i, i_j), i_i > i_j, of A_qk, A_qa, A_bk, A_ab ([BC, BC] fp32 each). Both factors are
    anchored at G of the row before sub-chunk i_i (the exclusive gate of its first row), so every
    exponent is <= 0: 2^(G_r - G_n), 2^(Gx_r - G_n) for its rows r, 2^(G_n - G_s) for rows s <= n."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    o_s = t0 + i_j * BC + o_c
    m_r = o_r < T
    m_s = o_s < T
    o_n = tl.minimum(t0 + i_i * BC - 1, T - 1)
    b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aqa = tl.zeros([BC, BC], dtype=tl.float32)
    b_Abk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aab = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # rows r of sub-chunk i_i: q, b and their gates; rows s of i_j: k, a and G
        b_q, _, _, b_b, b_g, b_gx = _tiles(q, k, a, b, gc, o_r, m_r, o_k, m_k, t0, s_qk, s_x)
        m = m_s[:, None] & m_k[None, :]
        b_k = tl.load(k + o_s[:, None] * s_qk + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_a = tl.load(a + o_s[:, None] * s_x + o_k[None, :], mask=m, other=0.).to(tl.float32)
        b_gs = tl.load(gc + o_s[:, None] * s_x + o_k[None, :], mask=m, other=0.)
        b_gn = tl.load(gc + o_n * s_x + o_k, mask=m_k, other=0.)
        b_fc = _exp2_masked(b_gn[None, :] - b_gs, m_s[:, None])
        b_qr = b_q * _exp2_masked(b_g - b_gn[None, :], m_r[:, None])
        b_br = b_b * _exp2_masked(b_gx - b_gn[None, :], m_r[:, None])
        b_Aqk, b_Aqa, b_Abk, b_Aab = _four_dots(b_qr, b_br, b_k * b_fc, b_a * b_fc, b_Aqk, b_Aqa, b_Abk, b_Aab,
                                                DOT_PREC)
    return b_Aqk, b_Aqa, b_Abk, b_Aab


@triton.jit
def _dplr_diag(q, k, a, b, gc, qg, t0, T, i_i: tl.constexpr, s_qk, s_x,
               K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Diagonal sub-block i_i of A_qk, A_qa (r >= s) and A_bk, A_ab (r > s), fp32; also stores the
    sub-chunk's rows of qg = q 2^G. Per K block: anchored at the middle row (tensor-core dots) when
    the gate spans at most SPAN_LOG2 over the sub-chunk (from the first row's Gx to the last row's
    G), so every factor stays within 2^(+-SPAN_LOG2); otherwise summed element-wise in fp32, one
    column per step, every exponent <= 0."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    m_r = o_r < T
    m_ge = (o_c[:, None] >= o_c[None, :]) & m_r[:, None]
    m_gt = (o_c[:, None] > o_c[None, :]) & m_r[:, None]
    # rows spanned by this sub-chunk, clamped into the sequence; o_top's G is the first row's Gx
    o_top = tl.minimum(t0 + i_i * BC - 1, T - 1)
    o_mid = tl.minimum(t0 + i_i * BC + BC // 2, T - 1)
    o_last = tl.minimum(t0 + i_i * BC + BC - 1, T - 1)
    b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aqa = tl.zeros([BC, BC], dtype=tl.float32)
    b_Abk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aab = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_r[:, None] & m_k[None, :]
        b_q, b_k, b_a, b_b, b_g, b_gx = _tiles(q, k, a, b, gc, o_r, m_r, o_k, m_k, t0, s_qk, s_x)
        tl.store(qg + o_r[:, None] * s_x + o_k[None, :], (b_q * tl.exp2(b_g)).to(qg.dtype.element_ty), mask=m)
        # largest Gx_first - G_last over the channels of this block (G is non-increasing)
        b_gt = tl.load(gc + o_top * s_x + o_k, mask=m_k & (i_i > 0), other=0.)
        b_gl = tl.load(gc + o_last * s_x + o_k, mask=m_k, other=0.)
        if tl.max(b_gt - b_gl, axis=0) <= SPAN_LOG2:
            b_gm = tl.load(gc + o_mid * s_x + o_k, mask=m_k, other=0.)
            b_fc = _exp2_masked(b_gm[None, :] - b_g, m)
            b_Aqk, b_Aqa, b_Abk, b_Aab = _four_dots(
                b_q * _exp2_masked(b_g - b_gm[None, :], m), b_b * _exp2_masked(b_gx - b_gm[None, :], m),
                b_k * b_fc, b_a * b_fc, b_Aqk, b_Aqa, b_Abk, b_Aab, DOT_PREC)
        else:
            for j in range(0, BC):
                # column j (clamped into the sequence: a column past T only meets rows past T, masked)
                o_j = tl.minimum(t0 + i_i * BC + j, T - 1)
                b_kj = tl.load(k + o_j * s_qk + o_k, mask=m_k, other=0.).to(tl.float32)
                b_aj = tl.load(a + o_j * s_x + o_k, mask=m_k, other=0.).to(tl.float32)
                b_gj = tl.load(gc + o_j * s_x + o_k, mask=m_k, other=0.)
                # [BC, BK] 2^(G_r - G_j) for rows r >= j, 2^(Gx_r - G_j) for rows r > j; both <= 1
                b_eq = _exp2_masked(b_g - b_gj[None, :], m & (o_c >= j)[:, None])
                b_eb = _exp2_masked(b_gx - b_gj[None, :], m & (o_c > j)[:, None])
                m_col = o_c[None, :] == j
                b_Aqk += tl.where(m_col, tl.sum(b_q * b_eq * b_kj[None, :], axis=1)[:, None], 0.)
                b_Aqa += tl.where(m_col, tl.sum(b_q * b_eq * b_aj[None, :], axis=1)[:, None], 0.)
                b_Abk += tl.where(m_col, tl.sum(b_b * b_eb * b_kj[None, :], axis=1)[:, None], 0.)
                b_Aab += tl.where(m_col, tl.sum(b_b * b_eb * b_aj[None, :], axis=1)[:, None], 0.)
    # the anchored products are unbounded above the diagonal: keep the triangle only
    return (tl.where(m_ge, b_Aqk, 0.), tl.where(m_ge, b_Aqa, 0.), tl.where(m_gt, b_Abk, 0.),
            tl.where(m_gt, b_Aab, 0.))


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_dplr_intra_kernel(
    q, k, a, b, gc, Aqk, Aqa, Abk, Aab, Ai, qg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """A_qk, A_qa (r >= s), A_bk (r > s), Ai = (I - A_ab)^-1 and qg = q 2^G of one chunk of BT = 64
    rows. Grid (NT, B * HV). Aab: fp32 scratch [B, T, HV, BT] for A_ab, written, then read back as
    16 x 16 blocks for the blockwise inverse.

    Where the gate spans at most WHOLE_SPAN_LOG2 over the chunk (every key channel; RWKV-7's decay of at
    most e^-0.61 a step always does), the four matrices are four tensor-core products anchored at
    the middle row; elsewhere, 4 x 4 sub-blocks of BC = 16 rows anchored per sub-chunk
    (_dplr_offdiag, _dplr_diag: no exponent ever leaves fp32's range, for any gate)."""
    BC: tl.constexpr = BT // 4
    tl.static_assert(BC == 16)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    t0 = i_t * BT
    # row 0 of this sequence and head: q, k per key head; a, b, gc, qg per value head; A per value head
    q += bos * H * K + i_h * K
    k += bos * H * K + i_h * K
    s_qk = H * K
    a += (bos * HV + i_hv) * K
    b += (bos * HV + i_hv) * K
    gc += (bos * HV + i_hv) * K
    qg += (bos * HV + i_hv) * K
    s_x = HV * K
    Aqk += (bos * HV + i_hv) * BT
    Aqa += (bos * HV + i_hv) * BT
    Abk += (bos * HV + i_hv) * BT
    Aab += (bos * HV + i_hv) * BT
    Ai += (bos * HV + i_hv) * BT
    s_A = HV * BT

    # the gate's span over the chunk: from the first row's Gx (0) to the last row's G, per channel
    if _chunk_span(gc, t0, T, s_x, K, BT, BK) <= WHOLE_SPAN_LOG2:
        o_i = tl.arange(0, BT)
        m_ge = (o_i[:, None] >= o_i[None, :]) & (t0 + o_i < T)[:, None]
        m_gt = (o_i[:, None] > o_i[None, :]) & (t0 + o_i < T)[:, None]
        # rows q (gate G) and b (gate Gx) against the columns k, then a
        b_qk, b_bk = _whole_chunk_pair(q, s_qk, b, s_x, True, k, s_qk, gc, qg, t0, T, s_x, K, BT, BK, DOT_PREC,
                                       True, True)
        _store_chunk(Aqk, tl.where(m_ge, b_qk, 0.), t0, T, s_A, BT)
        _store_chunk(Abk, tl.where(m_gt, b_bk, 0.), t0, T, s_A, BT)
        b_qa, b_ab = _whole_chunk_pair(q, s_qk, b, s_x, True, a, s_x, gc, qg, t0, T, s_x, K, BT, BK, DOT_PREC,
                                       True, False)
        _store_chunk(Aqa, tl.where(m_ge, b_qa, 0.), t0, T, s_A, BT)
        _store_chunk(Aab, tl.where(m_gt, b_ab, 0.), t0, T, s_A, BT)
    else:
        _dplr_blocks(q, k, a, b, gc, qg, Aqk, Aqa, Abk, Aab, t0, T, s_qk, s_x, s_A, K, BC, BK, DOT_PREC)
    # A_ab's blocks are read back by the threads that need them, not those that wrote them
    tl.debug_barrier()

    # Ai = (I - A_ab)^-1: A_ab is strictly lower triangular; forward substitution on the diagonal
    # blocks, merged with matmuls
    ab00 = _load_block(Aab, t0, T, 0, 0, s_A, BC)
    ab10 = _load_block(Aab, t0, T, 1, 0, s_A, BC)
    ab11 = _load_block(Aab, t0, T, 1, 1, s_A, BC)
    ab20 = _load_block(Aab, t0, T, 2, 0, s_A, BC)
    ab21 = _load_block(Aab, t0, T, 2, 1, s_A, BC)
    ab22 = _load_block(Aab, t0, T, 2, 2, s_A, BC)
    ab30 = _load_block(Aab, t0, T, 3, 0, s_A, BC)
    ab31 = _load_block(Aab, t0, T, 3, 1, s_A, BC)
    ab32 = _load_block(Aab, t0, T, 3, 2, s_A, BC)
    ab33 = _load_block(Aab, t0, T, 3, 3, s_A, BC)
    _inv_store_4(Ai, -ab00, -ab10, -ab11, -ab20, -ab21, -ab22, -ab30, -ab31, -ab32, -ab33, t0, T, s_A, BC)


@triton.jit
def _dplr_blocks(q, k, a, b, gc, qg, Aqk, Aqa, Abk, Aab, t0, T, s_qk, s_x, s_A,
                 K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """The four matrices of a chunk whose gate spans more than WHOLE_SPAN_LOG2, block by block (lower blocks
    only)."""
    qk, qa, bk, ab = _dplr_diag(q, k, a, b, gc, qg, t0, T, 0, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 0, 0, s_A, BC)
    qk, qa, bk, ab = _dplr_diag(q, k, a, b, gc, qg, t0, T, 1, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 1, 1, s_A, BC)
    qk, qa, bk, ab = _dplr_diag(q, k, a, b, gc, qg, t0, T, 2, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 2, 2, s_A, BC)
    qk, qa, bk, ab = _dplr_diag(q, k, a, b, gc, qg, t0, T, 3, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 3, 3, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 1, 0, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 1, 0, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 2, 0, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 2, 0, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 2, 1, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 2, 1, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 3, 0, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 3, 0, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 3, 1, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 3, 1, s_A, BC)
    qk, qa, bk, ab = _dplr_offdiag(q, k, a, b, gc, t0, T, 3, 2, s_qk, s_x, K, BC, BK, DOT_PREC)
    _store_four(Aqk, Aqa, Abk, Aab, qk, qa, bk, ab, t0, T, 3, 2, s_A, BC)


@triton.jit
def _store_four(Aqk, Aqa, Abk, Aab, b_qk, b_qa, b_bk, b_ab, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_A,
                BC: tl.constexpr):
    _store_block(Aqk, b_qk, t0, T, i_i, i_j, s_A, BC)
    _store_block(Aqa, b_qa, t0, T, i_i, i_j, s_A, BC)
    _store_block(Abk, b_bk, t0, T, i_i, i_j, s_A, BC)
    _store_block(Aab, b_ab, t0, T, i_i, i_j, s_A, BC)


@triton.jit
def _load_block(p, t0, T, i_i: tl.constexpr, i_j: tl.constexpr, s_A, BC: tl.constexpr):
    """A [BC, BC] sub-block (i_i, i_j) of a chunk's [BT, BT] matrix; zeros for rows past T."""
    o_c = tl.arange(0, BC)
    o_r = t0 + i_i * BC + o_c
    return tl.load(p + o_r[:, None] * s_A + (i_j * BC + o_c)[None, :], mask=(o_r < T)[:, None], other=0.)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_dplr_wu_kernel(
    k, v, a, b, gc, Abk, Ai, w, u, ag, kg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """w = -Ai (b 2^Gx), u = (Ai A_bk) v, ag = a 2^(G_C - G), kg = k 2^(G_C - G) of one chunk.
    Grid (NT, B * HV). The state pass then forms v~ = u - w S = P."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    o_last = tl.minimum(i_t * BT + BT, T) - 1
    p_A = ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
    # [BT, BT]: Ai unit lower triangular, A_bk strictly lower; the other entries are never written
    b_Ai = tl.load(Ai + p_A, mask=m_t[:, None] & (o_i[:, None] >= o_i[None, :]), other=0.)
    o_row = (bos + o_t) * HV + i_hv
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p_x = o_row[:, None] * K + o_k[None, :]
        b_g = tl.load(gc + p_x, mask=m, other=0.)
        b_gx = tl.load(gc + p_x - HV * K, mask=m & (o_i > 0)[:, None], other=0.)
        b_bx = (tl.load(b + p_x, mask=m, other=0.).to(tl.float32) * tl.exp2(b_gx)).to(b_Ai.dtype)
        b_w = -_dot(b_Ai, b_bx, DOT_PREC)
        tl.store(w + p_x, b_w.to(w.dtype.element_ty), mask=m)
        b_gl = tl.load(gc + ((bos + o_last) * HV + i_hv) * K + o_k, mask=m_k, other=0.)
        b_e = _exp2_masked(b_gl[None, :] - b_g, m)
        b_a = tl.load(a + p_x, mask=m, other=0.).to(tl.float32)
        tl.store(ag + p_x, (b_a * b_e).to(ag.dtype.element_ty), mask=m)
        b_k = tl.load(k + ((bos + o_t) * H + i_h)[:, None] * K + o_k[None, :], mask=m, other=0.).to(tl.float32)
        tl.store(kg + p_x, (b_k * b_e).to(kg.dtype.element_ty), mask=m)
    # after the K loop, so that its tiles and M are never live together
    b_Abk = tl.load(Abk + p_A, mask=m_t[:, None] & (o_i[:, None] > o_i[None, :]), other=0.)
    b_M = _dot(b_Ai, b_Abk, DOT_PREC).to(b_Ai.dtype)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        p_v = o_row[:, None] * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m, other=0.).to(b_M.dtype)
        tl.store(u + p_v, _dot(b_M, b_v, DOT_PREC).to(u.dtype.element_ty), mask=m)


def dplr_stages() -> dict[str, dict[str, str]]:
    """The stages chunk_dplr_fwd runs: stage -> {stage it reads from: tensor it reads} (codegen's plan).
    Without a gate the cumsum stage launches nothing: gc is zeros."""
    return {"cumsum": {}, "intra": {"cumsum": "gc"},
            "wu": {"intra": "Ai, A_bk", "cumsum": "gc"},
            "state": {"wu": "w, u, ag, kg", "cumsum": "gc"},
            "output": {"state": "h, P", "intra": "A_qa, A_qk, qg"}}


def _validate(q, k, v, a, b, g, initial_state, cu_seqlens):
    from .chunk import validate_qkv, validate_sequences
    B, T, H, K, HV, V = validate_qkv(q, k, v)
    for name, x in (("a", a), ("b", b), ("g", g)):
        if (x is None and name != "g") or (x is not None and tuple(x.shape) != (B, T, HV, K)):
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"{name}: expected [B, T, HV, K] = [{B}, {T}, {HV}, {K}], got {got}")
    return B, T, H, K, HV, V, validate_sequences(initial_state, cu_seqlens, B, HV, K, V)


def chunk_dplr_fwd(q, k, v, a, b, g=None, *, scale: float = 1.0, initial_state=None, output_final_state=False,
                   cu_seqlens=None, tune=False, stages=None):
    """Chunkwise forward of S_t = (Diag(exp g_t) + a_t b_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

    Args as chunk.chunk_fwd, plus a, b [B, T, HV, K] (the low-rank vectors, any float dtype; used in
    fp32 and, for the factors the dots take, in q's dtype) and g [B, T, HV, K] fp32 <= 0 or None
    (no decay). stages: the launch order of dplr_stages() (codegen's plan), checked; it must be the
    listed order, as each stage reads the one before. Returns (o [B, T, HV, V] in v's dtype, final
    state [N, HV, K, V] fp32 or None).
    """
    from . import chunk, chunk_intra, chunk_state
    B, T, H, K, HV, V, N = _validate(q, k, v, a, b, g, initial_state, cu_seqlens)
    if stages is not None:
        chunk._check_order(tuple(stages), dplr_stages())
    device, dt, BT = q.device, q.dtype, CHUNK
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # the kernels read a, b in fp32 from fp32 / bf16 / fp16 as they come (no copy); other dtypes become fp32
    a, b = (x.contiguous() if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.contiguous().float()
            for x in (a, b))
    g = None if g is None else g.contiguous().float()
    h0 = None if initial_state is None else initial_state.contiguous().to(torch.float32)
    DOT_PREC = "ieee" if dt == torch.float32 else ("upcast" if interpreting() and dt == torch.bfloat16 else "tf32")
    BK_STATE = max(16, next_pow2(K))
    BK = min(64, BK_STATE)
    chunk.check_sequence_extent(T, cu_seqlens, HV, K, V, BT)
    cu_seqlens, chunk_indices, chunk_offsets, NT_grid, NB, n_chunks = chunk.chunk_grid(cu_seqlens, B, T, BT, device)
    if n_chunks == 0:
        return chunk.empty_result(v, N, K, h0, output_final_state)
    per_chunk = lambda kwargs: (NT_grid, NB * HV)  # noqa: E731
    key = (H, HV, K, V, BT, "dplr", str(dt), cu_seqlens is not None)
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T)
    if g is None:      # no decay: the cumulative gate is 0 everywhere, no cumsum pass
        gc = torch.zeros((B, T, HV, K), dtype=torch.float32, device=device)
    else:
        gc = empty(g.shape, torch.float32, device)
        chunk._launch("cumsum", chunk_intra.chunk_cumsum_kernel, chunk_intra.CUMSUM_CONFIGS, per_chunk, key,
                      dict(g=g, gc=gc, **common, HV=HV, K=K, BT=BT, BK=BK, GATE=2), V, ("gc",), tune=tune)
    A = {n: empty((B, T, HV, BT), dt, device) for n in ("Aqk", "Aqa", "Abk", "Ai")}
    A["Aab"] = empty((B, T, HV, BT), torch.float32, device)      # scratch: A_ab before the inverse
    qg = empty((B, T, HV, K), dt, device)
    chunk._launch("dplr_intra", chunk_dplr_intra_kernel, INTRA_CONFIGS, per_chunk, key,
                  dict(q=q, k=k, a=a, b=b, gc=gc, **A, qg=qg, **common, H=H, HV=HV, K=K, BT=BT, BK=BK,
                       DOT_PREC=DOT_PREC), V,
                  ("Aqk", "Aqa", "Abk", "Ai", "qg"), tune=tune)
    w, ag, kg = (empty((B, T, HV, K), dt, device) for _ in range(3))
    u = empty((B, T, HV, V), dt, device)
    chunk._launch("dplr_wu", chunk_dplr_wu_kernel, WU_CONFIGS, per_chunk, key,
                  dict(k=k, v=v, a=a, b=b, gc=gc, Abk=A["Abk"], Ai=A["Ai"], w=w, u=u, ag=ag, kg=kg, **common,
                       H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, DOT_PREC=DOT_PREC), V, ("w", "u", "ag", "kg"), tune=tune)
    # the sequential pass: P = u - w S is the delta rule's v~; the k v^T terms enter through k2, v2
    h = empty((n_chunks, HV, K, V), dt, device)
    p = empty(v.shape, v.dtype, device)
    ht = empty((N, HV, K, V), torch.float32, device) if output_final_state else None
    chunk._launch("state", chunk_state.chunk_state_kernel, chunk._state_configs(BK_STATE),
                  lambda kwargs: (chunk.cdiv(V, kwargs["BV"]), N * HV), key + (h0 is None, ht is None),
                  dict(k=ag, v=u, w=w, gc=gc, h=h, v_new=p, h0=h0, ht=ht, k2=kg, v2=v, cu_seqlens=cu_seqlens,
                       chunk_offsets=chunk_offsets, T=T, H=H, HV=HV, K=K, V=V, BT=BT, BK=BK_STATE, GATE=2,
                       DELTA=True, DOT_PREC=DOT_PREC, KG=True), V, ("h", "v_new", "ht"), tune=tune)
    o = empty(v.shape, v.dtype, device)
    chunk._launch("output", chunk_state.chunk_output_kernel, chunk_state.OUTPUT_CONFIGS,
                  lambda kwargs: (chunk.cdiv(V, kwargs["BV"]), NT_grid, NB * HV), key,
                  dict(q=q, k=k, v=p, gc=gc, h=h, Aqk=A["Aqa"], qg=qg, A2=A["Aqk"], v2=v, o=o,
                       cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=float(scale), T=T, H=H, HV=HV,
                       K=K, V=V, BT=BT, BK=BK, GATE=2, DOT_PREC=DOT_PREC), V, ("o",), tune=tune)
    return o, ht
