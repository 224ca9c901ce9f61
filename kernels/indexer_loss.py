"""Distillation loss of the DeepSeek lightning indexer (DeepSeek-V3.2, ALGORITHMS.md 5).

Math, for query token t over its key set S_t (all causal keys of its sequence, or
the selected keys when `indices` is given):

    index score   I_ts = sum_j w_tj * relu(qi_tj . ki_s)             j over HI indexer heads
    indexer dist  s_t  = softmax_{s in S_t}(I_ts)
    target        p_t  = (1 / HQ) sum_i softmax_{s in S_t}(scale * q_ti . k_s,h(i))
    loss          = mean over tokens with a non-empty S_t of KL(p_t || s_t)

The target is the main attention's head-summed distribution, L1-normalized (each
head's softmax sums to 1, so the sum over heads is divided by HQ). In sparse mode
every head's softmax runs over S_t, i.e. it is exactly the distribution that sparse
attention over S_t computes; both p and s are thereby renormalized over S_t.
q and k get no gradient (the main attention is the teacher); qi, ki and w do.

How it is computed: a Python loop over tiles of `block_q` queries with torch ops,
fp32 inside. A tile materializes [block_q, HI, |S|] and [block_q, G, |S|] values,
never [T, T]: memory is O(block_q * T) (dense) or O(block_q * topk) (sparse).
The backward recomputes each tile (nothing is saved but the inputs) and uses the
closed form d loss / d I_ts = (s_ts - p_ts) / rows.

Shape legend: q [B, T, HQ, D], k [B, T, HKV, D], qi [B, T, HI, DI], ki [B, T, DI],
w [B, T, HI], indices [B, T, 1, topk] int32.
"""
from __future__ import annotations

import math

import torch

from unifattn.kernels.sparse_attention import _fmt, _seq_starts, check_sparse_indices

__all__ = ["lightning_indexer_loss"]


class _KeySet:
    """The keys of one query tile: a contiguous causal range (dense) or gathered lists (sparse).

    `valid` [B, tq, S] marks the keys a query may use; gathered tensors put the key
    axis after the query axis: dense [B, S, ...] (shared by the tile), sparse
    [B, tq, S, ...] (one list per query).
    """

    def __init__(self, t0, t1, bos, indices, T, device):
        self.t0, self.t1, self.sparse = t0, t1, indices is not None
        t = torch.arange(t0, t1, device=device)                              # [tq] absolute positions
        start = t * 0 if bos is None else bos[t0:t1].long()                    # [tq] start of each sequence
        if self.sparse:
            rel = indices[:, t0:t1, 0, :].long()                               # [B, tq, topk]
            self.valid = rel >= 0
            self.pos = torch.where(self.valid, start[None, :, None] + rel, 0)  # absolute, safe to gather
        else:
            self.lo = int(start.min()) if t1 > t0 else 0
            s = torch.arange(self.lo, t1, device=device)                       # [S]
            self.valid = ((s[None, :] <= t[:, None]) & (s[None, :] >= start[:, None]))[None]  # [1, tq, S]

    def gather(self, x):
        """x [B, T, ...] -> the tile's keys: dense [B, S, ...], sparse [B, tq, S, ...]."""
        if not self.sparse:
            return x[:, self.lo:self.t1]
        B, tq, S = self.pos.shape
        flat = x.reshape(B * x.shape[1], *x.shape[2:])
        rows = self.pos + torch.arange(B, device=x.device)[:, None, None] * x.shape[1]
        return flat[rows.reshape(-1)].reshape(B, tq, S, *x.shape[2:])

    def scatter_add_(self, dst, src):
        """dst [B, T, ...] += src shaped like gather's output."""
        if not self.sparse:
            dst[:, self.lo:self.t1] += src
            return
        B, T = dst.shape[:2]
        rows = self.pos + torch.arange(B, device=dst.device)[:, None, None] * T
        src = src * self.valid.reshape(*self.valid.shape, *([1] * (src.dim() - 3)))
        dst.view(B * T, *dst.shape[2:]).index_add_(0, rows.reshape(-1), src.reshape(-1, *src.shape[3:]))

    def key_eq(self, spec):
        """einsum operand spec of gathered keys: 'bs...' (dense) or 'bqs...' (sparse)."""
        return ("bq" if self.sparse else "b") + spec


def _target_logp(q, k, keys, scale):
    """log p [B, tq, S] of the head-summed, L1-normalized main attention (-inf off the key set)."""
    B, tq = q.shape[0], keys.t1 - keys.t0
    HQ, HKV = q.shape[2], k.shape[2]
    G = HQ // HKV
    kk = keys.gather(k).float()                                   # [B, (tq,) S, HKV, D]
    acc = None
    for h in range(HKV):                                          # one KV head's G query heads at a time
        qh = q[:, keys.t0:keys.t1, h * G:(h + 1) * G].float()      # [B, tq, G, D]
        x = torch.einsum(f"bqgd,{keys.key_eq('sd')}->bqgs", qh, kk[..., h, :]) * scale
        x = x.masked_fill(~keys.valid[:, :, None], float("-inf"))
        lse = torch.logsumexp(x, -1, keepdim=True)
        x = torch.where(keys.valid[:, :, None], x - lse.nan_to_num(neginf=0.), float("-inf"))
        part = torch.logsumexp(x, 2)                              # [B, tq, S] log sum over the G heads
        acc = part if acc is None else torch.logaddexp(acc, part)
    return acc - math.log(HQ)


def _index_parts(qi, ki, w, keys):
    """z = qi . ki [B, tq, HI, S], the gathered ki and the tile's qi, w (fp32)."""
    qt = qi[:, keys.t0:keys.t1].float()                           # [B, tq, HI, DI]
    wt = w[:, keys.t0:keys.t1].float()                            # [B, tq, HI]
    kt = keys.gather(ki).float()                                  # [B, (tq,) S, DI]
    z = torch.einsum(f"bqjd,{keys.key_eq('sd')}->bqjs", qt, kt)
    return z, qt, wt, kt


def _tile(q, k, qi, ki, w, keys, scale):
    """Per-tile pieces: log p, log s, and the indexer intermediates."""
    logp = _target_logp(q, k, keys, scale)
    z, qt, wt, kt = _index_parts(qi, ki, w, keys)
    idx = torch.einsum("bqj,bqjs->bqs", wt, torch.relu(z))        # I [B, tq, S]
    logs = torch.log_softmax(idx.masked_fill(~keys.valid, float("-inf")), -1)
    return logp, logs, z, qt, wt, kt


def _tiles(T, block_q):
    return [(t0, min(T, t0 + block_q)) for t0 in range(0, T, block_q)]


def _fp32(device: torch.device):
    """autocast off: the tiles are fp32 by design, and under autocast einsum would run in bf16/fp16 (a less
    precise loss, and a backward whose index_add_ of a half source into fp32 gradients fails)."""
    return torch.autocast(device.type, enabled=False)


class LightningIndexerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qi, ki, w, indices, bos, scale, block_q):
        with _fp32(q.device):
            return LightningIndexerLoss._forward(ctx, q, k, qi, ki, w, indices, bos, scale, block_q)

    @staticmethod
    def _forward(ctx, q, k, qi, ki, w, indices, bos, scale, block_q):
        T = q.shape[1]
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        rows = torch.zeros((), dtype=torch.int64, device=q.device)
        for t0, t1 in _tiles(T, block_q):
            keys = _KeySet(t0, t1, bos, indices, T, q.device)
            logp, logs, *_ = _tile(q, k, qi, ki, w, keys, scale)
            on = keys.valid & torch.isfinite(logp)                  # p = 0 off the set and on underflow
            kl = torch.where(on, logp.exp() * (logp - logs), 0.)
            total += kl.sum(-1).double().sum()
            rows += keys.valid.any(-1).expand(q.shape[0], -1).sum()
        ctx.save_for_backward(q, k, qi, ki, w, indices, bos, rows)
        ctx.scale, ctx.block_q = scale, block_q
        return (total / rows.clamp(min=1)).float()

    @staticmethod
    def backward(ctx, g):
        with _fp32(g.device):
            return LightningIndexerLoss._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        q, k, qi, ki, w, indices, bos, rows = ctx.saved_tensors
        T = q.shape[1]
        dqi = torch.zeros(qi.shape, dtype=torch.float32, device=qi.device)
        dki = torch.zeros(ki.shape, dtype=torch.float32, device=ki.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        coef = g.float() / rows.clamp(min=1).float()
        for t0, t1 in _tiles(T, block_q=ctx.block_q):
            keys = _KeySet(t0, t1, bos, indices, T, q.device)
            logp, logs, z, qt, wt, kt = _tile(q, k, qi, ki, w, keys, ctx.scale)
            # d KL(p || softmax(I)) / d I = softmax(I) - p on the key set (sum p = 1)
            d_idx = torch.where(keys.valid, logs.exp() - logp.exp(), 0.) * coef   # [B, tq, S]
            dw[:, t0:t1] = torch.einsum("bqs,bqjs->bqj", d_idx, torch.relu(z))
            dz = d_idx[:, :, None, :] * wt[..., None] * (z > 0)                   # [B, tq, HI, S]
            dqi[:, t0:t1] = torch.einsum(f"bqjs,{keys.key_eq('sd')}->bqjd", dz, kt)
            keys.scatter_add_(dki, torch.einsum(f"bqjs,bqjd->{keys.key_eq('sd')}", dz, qt))
        return None, None, dqi.to(qi.dtype), dki.to(ki.dtype), dw.to(w.dtype), None, None, None, None


def lightning_indexer_loss(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor,
                           w: torch.Tensor, *, indices: torch.Tensor | None = None,
                           scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                           block_q: int = 128, check_indices: bool = True, check_inputs: bool = True) -> torch.Tensor:
    """Scalar KL distillation loss from the main attention to the lightning indexer.

    Args:
        q: [B, T, HQ, D], k: [B, T, HKV, D]: the main attention's queries and keys
            (HQ % HKV == 0); treated as constants, no gradient reaches them.
        qi: [B, T, HI, DI] indexer queries, ki: [B, T, DI] one indexer key per
            token, w: [B, T, HI] indexer head weights: these get gradients.
        indices: None for the dense warm-up (all causal keys), or int32
            [B, T, 1, topk] selected key positions (-1 = skip, causal, no
            duplicates; relative to the sequence start under cu_seqlens): the
            sparse stage, with p and s both over the selected keys.
        scale: main attention softmax scale, default D ** -0.5.
        cu_seqlens: int [N+1] offsets of sequences packed along T (B must be 1);
            keys are then causal within each query's sequence.
        block_q: queries per tile; memory grows as block_q * T (dense).
        check_indices: validate indices as sparse_attention does.
        check_inputs: scan q, k, qi, ki, w for NaN/inf (one read, one host sync); a NaN would
            otherwise turn into a finite, wrong loss.

    Returns:
        A float32 scalar: the mean of KL(p_t || s_t) over the tokens whose key set
        is not empty (every token in dense mode).
    """
    for name, x, dims in (("q", q, 4), ("k", k, 4), ("qi", qi, 4), ("ki", ki, 3), ("w", w, 3)):
        if not isinstance(x, torch.Tensor) or x.dim() != dims or not x.dtype.is_floating_point:
            got = _fmt(x) if isinstance(x, torch.Tensor) else type(x).__name__
            err = ValueError if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else TypeError
            raise err(f"{name}: expected a {dims}-D float tensor, got {got}; fix: q, k [B, T, H, D], qi "
                      "[B, T, HI, DI], ki [B, T, DI], w [B, T, HI], in one float dtype")
    B, T, HQ, D = q.shape
    HI, DI = qi.shape[2:]
    if k.shape[:2] != (B, T) or k.shape[3] != D or k.shape[2] < 1 or HQ % k.shape[2] != 0:
        raise ValueError(f"k: expected [B, T, HKV, D] = [{B}, {T}, HKV, {D}] with HQ = {HQ} divisible by HKV >= 1, "
                         f"got {list(k.shape)}; fix: the attention's keys for the same tokens as q")
    if qi.shape[:2] != (B, T) or tuple(ki.shape) != (B, T, DI) or tuple(w.shape) != (B, T, HI):
        raise ValueError(f"indexer: expected qi [B, T, HI, DI], ki [B, T, DI], w [B, T, HI] with B = {B}, "
                         f"T = {T}, got qi {list(qi.shape)}, ki {list(ki.shape)}, w {list(w.shape)}; "
                         "fix: the indexer inputs for the same tokens as q, one weight per indexer head")
    if len({x.device for x in (q, k, qi, ki, w)}) != 1:
        raise ValueError("devices: expected q, k, qi, ki, w on one device, got "
                         f"{[str(x.device) for x in (q, k, qi, ki, w)]}; fix: move them with .to()")
    if not isinstance(block_q, int) or block_q < 1:
        raise ValueError(f"block_q: expected a positive int, got {block_q!r}; fix: leave the default")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float, got {scale!r}; fix: pass None for D ** -0.5")
    if check_inputs:
        from unifattn import validate
        validate.finite({"q": q, "k": k, "qi": qi, "ki": ki, "w": w})
    bos = _seq_starts(cu_seqlens, B, T, q.device)
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 4 \
                or tuple(indices.shape[:3]) != (B, T, 1) or indices.shape[3] < 1:
            got = _fmt(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__
            err = ValueError if isinstance(indices, torch.Tensor) and indices.dtype == torch.int32 else TypeError
            raise err(f"indices: expected int32 of shape [B, T, 1, topk] = [{B}, {T}, 1, *], got {got}; "
                             "fix: one token list per query, .to(torch.int32)")
        if indices.device != q.device:
            raise ValueError(f"indices: expected device {q.device}, got {indices.device}; "
                             f"fix: indices.to('{q.device}')")
        if check_indices:
            check_sparse_indices(indices, 1, bos)
    scale = D ** -0.5 if scale is None else float(scale)
    return LightningIndexerLoss.apply(q.detach(), k.detach(), qi, ki, w, indices, bos, scale, block_q)
