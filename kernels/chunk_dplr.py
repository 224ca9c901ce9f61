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
recurrence on symbolic tokens. The four gated matrices are summed element-wise in fp32, one column
per step, so no exponent is ever formed outside (-inf, 0], for any gate; the chunk is C = 16 rows
(ALGORITHMS.md §2), which bounds the cost of that sum and the conditioning of (I - A_ab)^-1 (no
anchored tensor-core path yet, as _diag_block has for KDA). P = W H + U has the shape of the delta
rule's v~ = u - w H (with w = -W), so the state and output kernels of kernels/chunk_state.py run
it with their DPLR flag, which adds the k v^T terms:

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

from .chunk_intra import _chunk_bounds, _dot, _exp2_masked, _inv_unit_lower
from .utils import empty, interpreting, next_pow2

CHUNK = 16
# launch candidates (the first runs under the interpreter and until tune=True picks); not yet probed on a GPU
INTRA_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=2)]
WU_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=2, num_stages=2),
]


@triton.jit
def _rows(x, o_t, m_t, o_k, m_k, s_x):
    """[BT, BK] rows o_t, columns o_k of x (row stride s_x) as fp32, zeros where masked."""
    return tl.load(x + o_t[:, None] * s_x + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)


@triton.heuristics({"IS_VARLEN": lambda a: a["cu_seqlens"] is not None})
@triton.jit(do_not_specialize=["T"])
def chunk_dplr_intra_kernel(
    q, k, a, b, gc, Aqk, Aqa, Abk, Ai, qg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """A_qk, A_qa (i >= j), A_bk (i > j), Ai = (I - A_ab)^-1 and qg = q 2^G of one chunk. Grid (NT, B * HV)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    i_t, bos, T = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    t0 = i_t * BT
    o_i = tl.arange(0, BT)
    o_t = (t0 + o_i).to(tl.int64)      # rows times strides: 64-bit inside long sequences too
    m_t = o_t < T
    # row 0 of this sequence and head: q, k per key head; a, b, gc, qg per value head
    q += bos * H * K + i_h * K
    k += bos * H * K + i_h * K
    s_qk = H * K
    a += (bos * HV + i_hv) * K
    b += (bos * HV + i_hv) * K
    gc += (bos * HV + i_hv) * K
    qg += (bos * HV + i_hv) * K
    s_x = HV * K

    b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Aqa = tl.zeros([BT, BT], dtype=tl.float32)
    b_Abk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Aab = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        # [BT, BK] fp32
        b_q = _rows(q, o_t, m_t, o_k, m_k, s_qk)
        b_b = _rows(b, o_t, m_t, o_k, m_k, s_x)
        b_g = _rows(gc, o_t, m_t, o_k, m_k, s_x)
        # the exclusive gate Gx_t = G_{t-1}: the previous row's G, 0 at the chunk's first row
        b_gx = _rows(gc, o_t - 1, m_t & (o_i > 0), o_k, m_k, s_x)
        tl.store(qg + o_t[:, None] * s_x + o_k[None, :], (b_q * tl.exp2(b_g)).to(qg.dtype.element_ty), mask=m)
        for j in range(0, BT):
            # column j (clamped into the sequence: a column past T only meets rows past T, masked)
            o_j = tl.minimum(t0 + j, T - 1).to(tl.int64)
            b_kj = tl.load(k + o_j * s_qk + o_k, mask=m_k, other=0.).to(tl.float32)
            b_aj = tl.load(a + o_j * s_x + o_k, mask=m_k, other=0.).to(tl.float32)
            b_gj = tl.load(gc + o_j * s_x + o_k, mask=m_k, other=0.)
            # [BT, BK] 2^(G_i - G_j) for rows i >= j, 2^(Gx_i - G_j) for rows i > j; both <= 1
            b_eq = _exp2_masked(b_g - b_gj[None, :], m & (o_i >= j)[:, None])
            b_eb = _exp2_masked(b_gx - b_gj[None, :], m & (o_i > j)[:, None])
            m_col = o_i[None, :] == j
            b_Aqk += tl.where(m_col, tl.sum(b_q * b_eq * b_kj[None, :], axis=1)[:, None], 0.)
            b_Aqa += tl.where(m_col, tl.sum(b_q * b_eq * b_aj[None, :], axis=1)[:, None], 0.)
            b_Abk += tl.where(m_col, tl.sum(b_b * b_eb * b_kj[None, :], axis=1)[:, None], 0.)
            b_Aab += tl.where(m_col, tl.sum(b_b * b_eb * b_aj[None, :], axis=1)[:, None], 0.)
    # (I - A_ab)^-1 by forward substitution: A_ab is strictly lower triangular
    b_Ai = _inv_unit_lower(-b_Aab, BT)
    p_A = ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
    m_A = m_t[:, None]
    tl.store(Aqk + p_A, b_Aqk.to(Aqk.dtype.element_ty), mask=m_A)
    tl.store(Aqa + p_A, b_Aqa.to(Aqa.dtype.element_ty), mask=m_A)
    tl.store(Abk + p_A, b_Abk.to(Abk.dtype.element_ty), mask=m_A)
    tl.store(Ai + p_A, b_Ai.to(Ai.dtype.element_ty), mask=m_A)


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
    b_Abk = tl.load(Abk + p_A, mask=m_t[:, None] & (o_i[:, None] > o_i[None, :]), other=0.)
    b_M = _dot(b_Ai, b_Abk, DOT_PREC).to(b_Ai.dtype)
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
    a, b = a.contiguous().to(torch.float32), b.contiguous().to(torch.float32)
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
    qg = empty((B, T, HV, K), dt, device)
    chunk._launch("dplr_intra", chunk_dplr_intra_kernel, INTRA_CONFIGS, per_chunk, key,
                  dict(q=q, k=k, a=a, b=b, gc=gc, **A, qg=qg, **common, H=H, HV=HV, K=K, BT=BT, BK=BK), V,
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
