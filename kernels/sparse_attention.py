"""Sparse top-k attention: each query attends to its own list of selected keys.

Math, for query token t, query head i and its KV head h = i // G (G = HQ // HKV):

    S_t   = the keys selected for (t, h): `indices[b, t, h, :]`, -1 entries skipped;
            with `block_size=n` an entry j selects the keys [j*n, (j+1)*n) that are <= t
    o_ti  = sum_{s in S_t} softmax_s(scale * q_ti . k_sh) v_sh
    lse_ti = log sum_{s in S_t} exp(scale * q_ti . k_sh)      (fp32, natural log)

A query with no selected key gives o = 0, lse = -inf and zero gradients.

Shape legend: q [B, T, HQ, K], k [B, T, HKV, K], v [B, T, HKV, V], o [B, T, HQ, V],
lse [B, T, HQ], indices [B, T, HKV, TOPK].

How it runs (sparse_kernels.py has the kernels): one program per (query token,
KV head); its G query heads share the KV head and the index list, so they are
the M rows of every tensor-core dot. It walks the selected keys in tiles: one
vector load of indices, a gather of K and V rows, online softmax in fp32. The
backward recomputes p from the saved lse and owns its dq rows. dk, dv: token
granularity scatters them with fp32 atomic adds (any query may select any key);
block granularity with 16 <= block_size <= 128 instead runs one program per key
block over the queries that selected it (a CSR list built here with a sort),
which moves G * (D + DV) values per (query, block) pair instead of scattering
block_size * (D + DV) fp32 values, and needs no atomics.
"""
from __future__ import annotations

import math

import torch

from unifattn.kernels.sparse_kernels import (SparseConfig, sparse_attn_bwd_kernel, sparse_attn_dkv_kernel,
                                              sparse_attn_fwd_kernel, sparse_config)
from unifattn.kernels.checks import index_scan
from unifattn.kernels.utils import empty, interpreting, next_pow2

__all__ = ["sparse_attention", "check_sparse_indices", "SUPPORTED_HEAD_DIMS"]

# K and V head dims with a tested configuration; any other dim <= 256 runs but
# pads its tiles to the next power of two.
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- validation


def _fmt(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device}"


def _seq_starts(cu_seqlens: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    """[T] int32 start of each token's sequence, or None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32/int64 torch.Tensor [N+1], got {type(cu_seqlens).__name__}; "
                        "fix: torch.tensor(offsets, dtype=torch.int32)")
    if B != 1:
        raise ValueError(f"cu_seqlens: expected B == 1 (sequences packed along T), got B = {B}; "
                         "fix: reshape q, k, v to [1, B*T, H, D] before passing cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D int32/int64 tensor [N+1], got {_fmt(cu_seqlens)}; "
                         "fix: torch.tensor([0, len0, len0 + len1, ...], dtype=torch.int32)")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens < 0).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, "
                         f"got {cu_seqlens.tolist() if cu.numel() <= 16 else cu_seqlens}; "
                         "fix: cumulative sequence lengths, first 0, last the packed length T")
    return torch.repeat_interleave(cu[:-1], lens, output_size=T).to(torch.int32)


def check_sparse_indices(indices: torch.Tensor, block_size: int, bos: torch.Tensor | None,
                         name: str = "indices") -> None:
    """Raise ValueError unless every entry of indices [B, T, H, topk] is -1 or a causal
    key (token) / key block (block_size > 1) with no duplicates in a list.

    Positions are relative to the start of the query's sequence (bos, from cu_seqlens).
    Costs one read of indices (a Triton scan, kernels.checks.index_scan; torch passes on a CPU
    without the interpreter) and one host sync. Lists in the order select() writes (valid entries
    strictly ascending, -1 only after them) are duplicate-free by that order; any other list is
    sorted along topk to look for duplicates.
    """
    B, T = indices.shape[:2]

    def causal_limit():
        """[1, T, 1, 1] int32: entry j is causal when its first key j * block_size <= t, i.e.
        j <= t // block_size (no product: a huge entry must not wrap around)."""
        t = torch.arange(T, device=indices.device, dtype=torch.int64)
        if bos is not None:
            t = t - bos.to(torch.int64)
        t = t.to(torch.int32).view(1, T, 1, 1)
        return t, (t if block_size == 1 else torch.div(t, block_size, rounding_mode="floor"))

    if (indices.is_cuda or interpreting()) and indices.dtype == torch.int32 and indices.dim() == 4:
        # one fused read (kernels.checks.index_scan); the passes below run only to name a bad entry
        bits = index_scan(indices, block_size, None if bos is None else bos.to(torch.int32).contiguous())
        flags = [bits & 1, bits & 2]
    else:
        t, last = causal_limit()
        flags = [((indices < -1) | (indices > last)).any()]
        if indices.shape[-1] > 1:
            x0, x1 = indices[..., :-1], indices[..., 1:]
            flags.append((~(((x1 > x0) & (x0 >= 0)) | (x1 == -1))).any())
        flags = torch.stack(flags).tolist()
    if flags[0]:
        t, last = causal_limit()
        bad = (indices < -1) | (indices > last)
        b, i, h, j = (int(x) for x in bad.nonzero()[0])
        val, lim = int(indices[b, i, h, j]), int(t.view(-1)[i])
        what = "key position" if block_size == 1 else f"key block (of {block_size} keys)"
        limit = lim if block_size == 1 else lim // block_size
        raise ValueError(
            f"{name}[{b}, {i}, {h}, {j}] = {val}: expected -1 or a {what} in [0, {limit}] "
            f"(causal: at or before query position {lim} of its sequence), got {val}; "
            "fix: clamp or mask future and out-of-range entries to -1")
    if len(flags) > 1 and flags[1]:                   # some list is not in select()'s order: sort
        srt = indices.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, i, h, j = (int(x) for x in dup.nonzero()[0])
            raise ValueError(
                f"{name}[{b}, {i}, {h}, :] lists {int(srt[b, i, h, j])} more than once: expected distinct "
                "entries per list (a duplicate would count its key twice); "
                "fix: deduplicate, e.g. replace repeats by -1")


def _check_inputs(q, k, v, indices, block_size, scale):
    for name, x in (("q", q), ("k", k), ("v", v), ("indices", indices)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}; fix: torch.as_tensor(...)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, T, H, D], got {_fmt(x)}; "
                             "fix: add the missing batch / head axis (e.g. x[None] or x.unsqueeze(2))")
    B, T, HQ, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != K:
        raise ValueError(f"k, v: expected k [B, T, HKV, D] = [{B}, {T}, HKV, {K}] and v [{B}, {T}, HKV, DV] "
                         f"matching q {list(q.shape)}, got k {list(k.shape)}, v {list(v.shape)}; "
                         "fix: k and v for the same tokens as q, with one head count and k's head dim = q's")
    HKV, V = k.shape[2], v.shape[3]
    if HKV < 1:
        raise ValueError(f"k, v: expected at least one KV head, got k {list(k.shape)}, v {list(v.shape)}; "
                         "fix: k, v [B, T, HKV, D] with HKV >= 1 dividing q's head count")
    if not q.dtype.is_floating_point or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: expected float16, bfloat16 or float32, got {_fmt(q)}; "
                        "fix: cast q, k, v with .to(torch.bfloat16) (or .float())")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}; "
                        "fix: cast all three to one dtype")
    if HQ % HKV != 0:
        raise ValueError(f"heads: expected HQ % HKV == 0 (G query heads per KV head), got HQ = {HQ}, "
                         f"HKV = {HKV}; fix: repeat KV heads or use a head count that divides HQ")
    if max(K, V) > 256 or min(K, V) < 1:
        raise ValueError(f"head dims: expected D and DV in 1..256 (tested: {SUPPORTED_HEAD_DIMS}), "
                         f"got D = {K}, DV = {V}; fix: split larger heads, or project them to <= 256")
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
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: expected None or a positive int, got {block_size!r}; "
                         "fix: None for token indices, the selector's block length for block indices")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float, got {scale!r}; fix: pass None for D ** -0.5")


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


def _uses_block_csr(block_size: int) -> bool:
    """Key-centric dk, dv for blocks that fill a tensor-core tile and fit in registers."""
    return 16 <= block_size <= 128


def _block_csr(indices, bos, block_size):
    """For block granularity: the key blocks and, per (batch, KV head, block), the queries that chose it.

    Returns blocks int32 [NB, 2] (first row, end row) of every block of every sequence
    (a block ends early at its sequence's end), offsets int32 [B*HKV*NB + 1] and
    queries int32 [>= offsets[-1]] (token within the batch row), grouped by block.
    """
    B, T, HKV, topk = indices.shape
    dev, n = indices.device, block_size
    t = torch.arange(T, device=dev)
    if bos is None:
        starts, lens, seq = torch.zeros(1, dtype=torch.long, device=dev), torch.full((1,), T, device=dev), t * 0
    else:
        starts, lens = torch.unique_consecutive(bos.long(), return_counts=True)
        seq = torch.repeat_interleave(torch.arange(len(starts), device=dev), lens, output_size=T)
    nb = (lens + n - 1) // n                                       # blocks per sequence
    first = torch.cumsum(nb, 0) - nb                               # id of each sequence's block 0
    NB = int(nb.sum())
    bseq = torch.repeat_interleave(torch.arange(len(starts), device=dev), nb, output_size=NB)
    b0 = starts[bseq] + (torch.arange(NB, device=dev) - first[bseq]) * n
    blocks = torch.stack([b0, torch.minimum(b0 + n, starts[bseq] + lens[bseq])], 1).to(torch.int32)
    # one key per list entry: (batch, KV head, block id); invalid entries to a last, dropped bin
    t_local = (t - starts[seq]).view(1, T, 1, 1)
    valid = (indices >= 0) & (indices.long() * n <= t_local)
    bh = (torch.arange(B, device=dev).view(B, 1, 1, 1) * HKV + torch.arange(HKV, device=dev).view(1, 1, HKV, 1))
    key = torch.where(valid, bh * NB + first[seq].view(1, T, 1, 1) + indices.long(), B * HKV * NB).flatten()
    counts = torch.bincount(key, minlength=B * HKV * NB + 1)[:-1]
    offsets = torch.zeros(B * HKV * NB + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(key, stable=True)
    queries = (order // (HKV * topk) % T).to(torch.int32)
    return blocks, offsets, queries


def _sparse_bwd(q, k, v, o, lse, do, dlse, indices, bos, block_size, scale,
                cfg: SparseConfig | None = None, cfg_dkv: SparseConfig | None = None):
    (B, T, HQ, HKV, K, V), meta = _launch_args(q, k, v, indices, block_size)
    dq = empty(q.shape, q.dtype, q.device)
    cfg = cfg or sparse_config("bwd", meta["BK"], meta["BV"], meta["BG"])
    launch = dict(BS=cfg.BS, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not _uses_block_csr(block_size):
        # fp32 accumulators for the scattered key gradients; zero is their meaning
        dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        sparse_attn_bwd_kernel[(T, B * HKV)](
            q, k, v, o, do, lse, dlse, indices, bos, dq, dk32, dv32, None, scale, **meta, DKV=True, **launch)
        dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
        return dq, dk.copy_(dk32), dv.copy_(dv32)
    # block granularity: dq and delta per query, then dk, dv per key block
    delta = empty((B, T, HQ), torch.float32, q.device)
    sparse_attn_bwd_kernel[(T, B * HKV)](
        q, k, v, o, do, lse, dlse, indices, bos, dq, None, None, delta, scale, **meta, DKV=False, **launch)
    blocks, offsets, queries = _block_csr(indices, bos, block_size)
    dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    G, BG = meta["G"], meta["BG"]
    BR = cfg_dkv or sparse_config("dkv", meta["BK"], meta["BV"], BG)
    BQ = max(1, BR.BS // next_pow2(G))
    sparse_attn_dkv_kernel[(blocks.shape[0], B * HKV)](
        q, k, v, do, lse, delta, blocks, offsets, queries, dk, dv, scale, T, blocks.shape[0],
        HQ=HQ, HKV=HKV, G=G, K=K, V=V, BQ=BQ, BR=max(16, next_pow2(BQ * G)),
        BS=max(16, next_pow2(block_size)), BK=meta["BK"], BV=meta["BV"], PREC=meta["PREC"],
        UPCAST=meta["UPCAST"], num_warps=BR.num_warps, num_stages=BR.num_stages)
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: gradients to q, k, v (and through lse); none to indices."""

    @staticmethod
    def forward(ctx, q, k, v, indices, bos, block_size, scale, scores_may_be_huge=None):
        o, lse = _sparse_fwd(q, k, v, indices, bos, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, indices, bos)
        ctx.block_size, ctx.scale = block_size, scale
        # [bool]: filled by sparse_attention after its input scan (the bound of _huge_bound); read in backward
        ctx.huge = scores_may_be_huge
        ctx.set_materialize_grads(False)   # an unused lse brings dlse = None: no extra work
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, indices, bos = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        if ctx.huge is not None and ctx.huge[0]:
            _check_lse_for_backward(lse, ctx.scale)
        dq, dk, dv = _sparse_bwd(q, k, v, o, lse, do, dlse, indices, bos,
                                 ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


# The backward recomputes each p = exp2(s - lse) (base 2) in fp32. The keys that carry weight have s close
# to lse, whose fp32 spacing is 0.5 from |lse| = 2^22: p would be off by up to a factor 2^0.5 (and the
# rounding of a larger lse overflows exp2: inf / NaN gradients). Such rows are refused, not computed wrong.
HUGE_SCORE = 2.0 ** 22


def _huge_bound(amax: dict, D: int, scale: float) -> bool:
    """Whether some score might reach HUGE_SCORE (base 2): |q . k| * |scale| * log2(e) <= D * max|q| * max|k| *
    |scale| * log2(e). Far below it for any sane input; only then does the backward look at lse."""
    return D * amax["q"] * amax["k"] * abs(scale) * _LOG2E >= HUGE_SCORE


def _check_lse_for_backward(lse: torch.Tensor, scale: float) -> None:
    """Raise when a row's |lse| (base 2) reaches HUGE_SCORE (one reduction and a host sync; only for inputs
    whose bound allows it)."""
    from unifattn import validate
    big = float(lse.masked_fill(torch.isinf(lse), 0.).abs().amax()) * _LOG2E if lse.numel() else 0.0
    if big >= HUGE_SCORE:
        validate.fail("sparse_attention backward",
                      f"softmax scores (base 2) below 2^22 = {HUGE_SCORE:.3g} in magnitude, where fp32 still "
                      "resolves the recomputed probabilities",
                      f"|lse| up to {big:.3g} (scale {scale:.3g})",
                      "lower the softmax scale or normalize q and k (e.g. QK-norm); the forward is fine at this "
                      "scale, only its gradients cannot be formed in fp32")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
                     block_size: int | None = None, scale: float | None = None,
                     cu_seqlens: torch.Tensor | None = None, return_lse: bool = False,
                     check_indices: bool = True, check_inputs: bool = True):
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
            launch: a few int32 elementwise passes and one host sync. Lists in the
            order select() writes (ascending, -1 last) need no more; any other order is
            sorted once to find duplicates (12 ms at T=32768, HKV=4, topk=2048 on an
            H200, 70% of the forward). Pass False only for indices valid by
            construction. Even unchecked, negative and non-causal entries are
            skipped, never read, but duplicates are then counted twice.
        check_inputs: scan q, k, v for NaN/inf (one read; its verdict is read after the
            kernel is queued, one host sync), which would otherwise come out as NaN rows
            with no error. The same read takes max|q| and max|k|: when they allow scores
            of 2^22 or more (base 2), the backward reads lse and raises a ValueError for
            rows that large, whose probabilities fp32 cannot recompute (unchecked, such a
            backward gives inf / NaN gradients).

    Returns:
        o [B, T, HQ, DV] in q's dtype, and lse when return_lse. A query with no
        valid key gets o = 0, lse = -inf and zero gradients.
    """
    _check_inputs(q, k, v, indices, block_size, scale)
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(f"q, k, v: expected CUDA tensors (the sparse attention kernels need a GPU), got tensors "
                         f"on {q.device}; fix: move them with .cuda(), or set TRITON_INTERPRET=1 to run the "
                         "kernels on the CPU (slow)")
    pending = lambda: None     # noqa: E731
    if check_inputs:           # queued now, read after the launch (one host sync, shared with check_indices')
        from unifattn import validate
        pending = validate.finite_later({"q": q, "k": k, "v": v}, amax=True)
    B, T, _, D = q.shape
    block_size = 1 if block_size is None else block_size
    scale = D ** -0.5 if scale is None else float(scale)
    bos = _seq_starts(cu_seqlens, B, T, q.device)
    if check_indices:
        check_sparse_indices(indices, block_size, bos)
    q, k, v, indices = (x.contiguous() for x in (q, k, v, indices))
    huge = [False]             # set below from the inputs' magnitudes; the backward reads it
    o, lse = SparseAttentionFunction.apply(q, k, v, indices, bos, block_size, scale, huge)
    amax = pending()           # NaN/inf in q, k, v raise here, before o leaves the call
    if amax is not None:
        huge[0] = _huge_bound(amax, D, scale)
    return (o, lse) if return_lse else o
