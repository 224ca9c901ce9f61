"""Sparse top-k attention: each query attends to its own list of selected keys.

Math, for query token t, query head i and its KV head h = i // G (G = HQ // HKV):

    S_t   = the keys selected for (t, h): `indices[b, t, h, :]`, -1 entries skipped;
            with `block_size=n` an entry j selects the keys [j*n, (j+1)*n) that are <= t
    o_ti  = sum_{s in S_t} softmax_s(scale * q_ti . k_sh) v_sh
    lse_ti = log sum_{s in S_t} exp(scale * q_ti . k_sh)      (fp32, natural log)

A query with no selected key gives o = 0, lse = -inf and zero gradients.

Shape legend: q [B, T, HQ, K], k [B, T, HKV, K], v [B, T, HKV, V], o [B, T, HQ, V],
lse [B, T, HQ], indices [B, T, HKV, TOPK].

How the kernels are parallelized: one program per (query token, KV head). Its G
query heads share the KV head and the index list, so they are the M rows of every
tensor-core dot ([BG, K] with G padded to BG >= 16). The program walks the
selected keys in tiles of BS: one vector load of BS indices, a gather of BS rows
of K and V, online softmax in fp32 (base 2). The backward program recomputes the
probabilities from the saved lse, keeps dq in registers (it owns those rows) and
scatters dk, dv into fp32 buffers with atomic adds (a key may be selected by any
query, so no program owns it); the buffers are cast to the input dtype at the end.

The grid is (T, B*HKV) with the token fastest, so programs that run together
read the same KV head and its keys stay in L2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unifattn.kernels.utils import empty, interpreting, next_pow2

__all__ = ["sparse_attention", "check_sparse_indices", "SUPPORTED_HEAD_DIMS"]

# K and V head dims with a tested configuration; any other dim <= 256 runs but
# pads its tiles to the next power of two.
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
_LOG2E = 1.4426950408889634


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
        b_pos = b_j * BLOCK + o_n % BLOCK
    # causal mask also guards the memory accesses when checks are skipped
    m_n = (b_j >= 0) & (b_pos <= t_local)
    return b_pos, m_n


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
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    # start of this token's sequence: indices are relative to it
    if IS_VARLEN:
        i_s = tl.load(bos + i_t).to(tl.int64)
    else:
        i_s = 0
    t_local = i_t - i_s
    i_row = i_b * T + i_t                      # flat token row of this query

    o_g, o_k, o_v = tl.arange(0, BG), tl.arange(0, BK), tl.arange(0, BV)
    m_g, m_k, m_v = o_g < G, o_k < K, o_v < V
    # [BG, BK] the G query heads of KV head i_h, padded to BG rows of zeros
    p_q = q + (i_row * HQ + i_h * G + o_g[:, None]) * K + o_k[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_k[None, :], other=0.)
    p_idx = indices + (i_row * HKV + i_h) * TOPK

    # -1e30, not -inf: a tile with no valid key then gives exp2(-inf - m) = 0, never NaN
    b_m = tl.full([BG], -1e30, dtype=tl.float32)
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
        b_r = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_r + tl.sum(b_p, 1)
        # [BS, BV]
        b_v = tl.load(v + o_kv[:, None] * V + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.)
        b_acc = b_acc * b_r[:, None] + _dot(b_p.to(b_v.dtype), b_v, PREC, UPCAST)
        b_m = b_m_new

    # empty rows (l = 0): o = 0 and lse = -inf
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
    q, k, v, o, do, lse, dlse, indices, bos, dq, dk, dv,
    scale,              # softmax scale (natural); scores are formed with scale * log2(e)
    T, NK, TOPK,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    if IS_VARLEN:
        i_s = tl.load(bos + i_t).to(tl.int64)
    else:
        i_s = 0
    t_local = i_t - i_s
    i_row = i_b * T + i_t

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
        # [BS, BG] for dk, dv
        b_sT = _dot(b_k, tl.trans(b_q), PREC, UPCAST) * qk_scale
        b_pT = tl.where(m_n[:, None], tl.exp2(b_sT - b_lse[None, :]), 0.)
        b_dpT = _dot(b_v, tl.trans(b_do), PREC, UPCAST)
        b_dsT = b_pT * (b_dpT - b_delta[None, :])
        # [BS, BV], [BS, BK]: the G heads are summed inside the dot
        b_dv = _dot(b_pT.to(b_do.dtype), b_do, PREC, UPCAST)
        b_dk = _dot(b_dsT.to(b_q.dtype), b_q, PREC, UPCAST) * scale
        tl.atomic_add(dv + o_kv[:, None] * V + o_v[None, :], b_dv, mask=m_n[:, None] & m_v[None, :], sem="relaxed")
        tl.atomic_add(dk + o_kv[:, None] * K + o_k[None, :], b_dk, mask=m_n[:, None] & m_k[None, :], sem="relaxed")

    tl.store(dq + o_qh[:, None] * K + o_k[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_g[:, None] & m_k[None, :])


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SparseConfig:
    """Launch configuration of one pass: keys per tile, warps, pipeline stages."""
    BS: int
    num_warps: int
    num_stages: int


def sparse_config(pass_: str, BK: int, BV: int, BG: int) -> SparseConfig:
    """The launch configuration of one pass ('fwd' or 'bwd') for padded dims BK, BV, BG.

    Under the interpreter the tile is fixed at 32 keys: its cost is per tile, and
    32 keeps test lists short while still crossing tile boundaries.
    """
    if interpreting():
        return SparseConfig(32, 1, 1)
    wide = max(BK, BV) > 128 or BG > 32
    if pass_ == "fwd":
        return SparseConfig(32 if wide else 64, 4, 2 if wide else 3)
    return SparseConfig(16 if wide else 32, 4, 1 if wide else 2)


# --------------------------------------------------------------------------- validation


def _fmt(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"


def _seq_starts(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """[T] int32 start of each token's sequence, or None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"cu_seqlens: expected B == 1 (sequences packed along T), got B = {B}; "
                         "fix: reshape q, k, v to [1, B*T, H, D] before passing cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D int32/int64 tensor [N+1], got {_fmt(cu_seqlens)}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens < 0).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, "
                         f"got {cu_seqlens.tolist() if cu.numel() <= 16 else cu_seqlens}")
    return torch.repeat_interleave(cu[:-1], lens, output_size=T).to(torch.int32)


def check_sparse_indices(indices: torch.Tensor, block_size: int, bos: torch.Tensor | None,
                         name: str = "indices") -> None:
    """Raise ValueError unless every entry of indices [B, T, H, topk] is -1 or a causal
    key (token) / key block (block_size > 1) with no duplicates in a list.

    Positions are relative to the start of the query's sequence (bos, from cu_seqlens).
    Costs one elementwise pass and one sort along topk (skipped when topk == 1).
    """
    B, T = indices.shape[:2]
    t = torch.arange(T, device=indices.device, dtype=torch.int64)
    if bos is not None:
        t = t - bos.to(torch.int64)
    t = t.view(1, T, 1, 1)
    first = indices.to(torch.int64) * block_size          # first key of each entry
    bad = (indices < -1) | (first > t)
    if bool(bad.any()):
        b, i, h, j = (int(x) for x in bad.nonzero()[0])
        val, lim = int(indices[b, i, h, j]), int(t.view(-1)[i])
        what = "key position" if block_size == 1 else f"key block (of {block_size} keys)"
        limit = lim if block_size == 1 else lim // block_size
        raise ValueError(
            f"{name}[{b}, {i}, {h}, {j}] = {val}: expected -1 or a {what} in [0, {limit}] "
            f"(causal: at or before query position {lim} of its sequence), got {val}; "
            "fix: clamp or mask future and out-of-range entries to -1")
    if indices.shape[-1] > 1:
        srt = indices.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, i, h, j = (int(x) for x in dup.nonzero()[0])
            raise ValueError(
                f"{name}[{b}, {i}, {h}, :] lists {int(srt[b, i, h, j])} more than once: expected distinct "
                "entries per list (a duplicate would count its key twice); "
                "fix: deduplicate, e.g. replace repeats by -1")


def _check_inputs(q, k, v, indices, block_size, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, T, H, D], got {_fmt(x)}")
    B, T, HQ, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != K:
        raise ValueError(f"k, v: expected k [B, T, HKV, D] = [{B}, {T}, HKV, {K}] and v [{B}, {T}, HKV, DV] "
                         f"matching q {list(q.shape)}, got k {list(k.shape)}, v {list(v.shape)}")
    HKV, V = k.shape[2], v.shape[3]
    if not q.dtype.is_floating_point or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: expected float16, bfloat16 or float32, got {_fmt(q)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}; "
                        "fix: cast all three to one dtype")
    if HQ % HKV != 0:
        raise ValueError(f"heads: expected HQ % HKV == 0 (G query heads per KV head), got HQ = {HQ}, "
                         f"HKV = {HKV}; fix: repeat KV heads or use a head count that divides HQ")
    if max(K, V) > 256 or min(K, V) < 1:
        raise ValueError(f"head dims: expected D and DV in 1..256 (tested: {SUPPORTED_HEAD_DIMS}), "
                         f"got D = {K}, DV = {V}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32:
        got = _fmt(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices: expected int32 of shape [B, T, HKV, topk] = [{B}, {T}, {HKV}, *], "
                        f"got {got}; fix: indices.to(torch.int32) (top-k returns int64)")
    if indices.dim() != 4 or indices.shape[:3] != (B, T, HKV) or indices.shape[3] < 1:
        raise ValueError(f"indices: expected int32 of shape [B, T, HKV, topk] = [{B}, {T}, {HKV}, *] "
                         f"with topk >= 1, got {_fmt(indices)}; fix: one list per (batch, token, KV head)")
    devs = {x.device for x in (q, k, v, indices)}
    if len(devs) != 1:
        raise ValueError(f"devices: expected q, k, v, indices on one device, got q {q.device}, "
                         f"k {k.device}, v {v.device}, indices {indices.device}; fix: move them with .to()")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: expected None or a positive int, got {block_size!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")


# --------------------------------------------------------------------------- launch


def _launch_args(q, k, v, indices, block_size):
    B, T, HQ, K = q.shape
    HKV, V, TOPK = k.shape[2], v.shape[3], indices.shape[3]
    G = HQ // HKV
    BG, BK, BV = max(16, next_pow2(G)), max(16, next_pow2(K)), max(16, next_pow2(V))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"   # fp32 inputs get fp32 dots
    meta = dict(T=T, NK=TOPK * block_size, TOPK=TOPK, HQ=HQ, HKV=HKV, G=G, K=K, V=V,
                BLOCK=block_size, BG=BG, BK=BK, BV=BV, PREC=prec,
                UPCAST=interpreting() and q.dtype == torch.bfloat16)
    return (B, T, HQ, HKV, K, V), meta


def _sparse_fwd(q, k, v, indices, bos, block_size, scale, cfg: SparseConfig | None = None):
    (B, T, HQ, HKV, K, V), meta = _launch_args(q, k, v, indices, block_size)
    o = empty((B, T, HQ, V), q.dtype, q.device)
    lse = empty((B, T, HQ), torch.float32, q.device)
    cfg = cfg or sparse_config("fwd", meta["BK"], meta["BV"], meta["BG"])
    sparse_attn_fwd_kernel[(T, B * HKV)](
        q, k, v, indices, bos, o, lse, scale * _LOG2E, **meta,
        BS=cfg.BS, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def _sparse_bwd(q, k, v, o, lse, do, dlse, indices, bos, block_size, scale, cfg: SparseConfig | None = None):
    (B, T, HQ, HKV, K, V), meta = _launch_args(q, k, v, indices, block_size)
    dq = empty(q.shape, q.dtype, q.device)
    # fp32 accumulators for the scattered key gradients; zero is their meaning
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    cfg = cfg or sparse_config("bwd", meta["BK"], meta["BV"], meta["BG"])
    sparse_attn_bwd_kernel[(T, B * HKV)](
        q, k, v, o, do, lse, dlse, indices, bos, dq, dk32, dv32, scale, **meta,
        BS=cfg.BS, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    return dq, dk.copy_(dk32), dv.copy_(dv32)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: gradients to q, k, v (and through lse); none to indices."""

    @staticmethod
    def forward(ctx, q, k, v, indices, bos, block_size, scale):
        o, lse = _sparse_fwd(q, k, v, indices, bos, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, indices, bos)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.set_materialize_grads(False)   # an unused lse brings dlse = None: no extra work
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, indices, bos = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq, dk, dv = _sparse_bwd(q, k, v, o, lse, do, dlse, indices, bos,
                                 ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
                     block_size: int | None = None, scale: float | None = None,
                     cu_seqlens: torch.Tensor | None = None, return_lse: bool = False,
                     check_indices: bool = True):
    """Attention of each query over its selected keys only.

    Args:
        q: [B, T, HQ, D]; k: [B, T, HKV, D]; v: [B, T, HKV, DV]; one float dtype
            (float16, bfloat16 or float32), HQ % HKV == 0. The G = HQ // HKV query
            heads of a KV head share its index list.
        indices: int32 [B, T, HKV, topk] (int64 is refused: convert with
            `.to(torch.int32)`, a copy we do not make behind your back). Each entry
            is a key position s <= t (block_size None or 1), or a key block j with
            j * block_size <= t covering keys [j*n, (j+1)*n), of which those after
            the query are masked. -1 entries are skipped, in any slot and any
            order. Duplicates in one list are an error (ValueError): a duplicate
            would count its key twice in the softmax.
        block_size: None/1 for token granularity, n for blocks of n keys.
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: int [N+1] FlashAttention-style offsets of sequences packed
            along T (B must be 1). Positions in indices are then relative to the
            start of the query's own sequence, and attention is causal within it.
        return_lse: also return lse [B, T, HQ] fp32 (natural log; -inf for a
            query with no valid key). Gradients flow through it too.
        check_indices: validate indices (range, causality, duplicates) before the
            launch. This sorts each list once, which costs about as much as the
            attention itself at large topk; pass False only for indices that are
            valid by construction (e.g. from torch.topk over causal scores). Even
            unchecked, negative and non-causal entries are skipped, never read,
            but duplicates are then counted twice.

    Returns:
        o [B, T, HQ, DV] in q's dtype, and lse when return_lse. A query with no
        valid key gets o = 0, lse = -inf and zero gradients.
    """
    _check_inputs(q, k, v, indices, block_size, scale)
    B, T, _, D = q.shape
    block_size = 1 if block_size is None else block_size
    scale = D ** -0.5 if scale is None else float(scale)
    bos = _seq_starts(cu_seqlens, B, T, q.device)
    if check_indices:
        check_sparse_indices(indices, block_size, bos)
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    o, lse = SparseAttentionFunction.apply(q, k, v, indices, bos, block_size, scale)
    return (o, lse) if return_lse else o
