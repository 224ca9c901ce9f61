"""lightning_indexer_loss against a float64 reference that materializes [T, T]."""
import pytest
import torch

from unifattn.kernels.indexer_loss import lightning_indexer_loss
from unifattn.kernels.utils import poisoned
from unifattn.testing.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, qi, ki, w, indices=None, scale=None, cu_seqlens=None):
    """float64, everything materialized: mean_t KL(p_t || s_t) over non-empty key sets."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    seq = torch.zeros(T, dtype=torch.long)
    bos = torch.zeros(T, dtype=torch.long)
    if cu_seqlens is not None:
        for n, (s0, s1) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            seq[s0:s1], bos[s0:s1] = n, s0
    t = torch.arange(T)
    mask = ((t[None, :] <= t[:, None]) & (seq[None, :] == seq[:, None]))[None].expand(B, T, T).clone()
    if indices is not None:                                   # [B, T, T] selected keys
        mask = torch.zeros(B, T, T, dtype=torch.bool)
        for b, i, _, j in (indices >= 0).nonzero().tolist():
            mask[b, i, bos[i] + int(indices[b, i, 0, j])] = True
    x = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(G, 2)) * scale
    x = x.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(x, -1).nan_to_num(0.).sum(1) / HQ                   # [B, T, T]
    score = (w[..., None] * torch.relu(torch.einsum("bthd,bsd->bths", qi, ki))).sum(2)   # [B, T, T]
    logs = torch.log_softmax(score.masked_fill(~mask, float("-inf")), -1)
    kl = torch.where(mask & (p > 0), p * (torch.log(p) - logs), 0.).sum(-1)
    rows = mask.any(-1)
    return kl[rows].sum() / rows.sum().clamp(min=1)


def make_inputs(B, T, HQ, HKV, D, HI, DI, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, generator=g, dtype=torch.float64)
    qi = torch.randn(B, T, HI, DI, generator=g, dtype=torch.float64)
    ki = torch.randn(B, T, DI, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, HI, generator=g, dtype=torch.float64) * 0.5
    return q, k, qi, ki, w


def random_lists(B, T, topk, seed=0, seqlens=None, fill=0.8):
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, 1, topk), -1, dtype=torch.int32)
    starts = [0] if seqlens is None else [sum(seqlens[:i]) for i in range(len(seqlens))]
    ends = [T] if seqlens is None else [s + n for s, n in zip(starts, seqlens)]
    for b in range(B):
        for s0, s1 in zip(starts, ends):
            for t in range(s0, s1):
                n = min(t - s0 + 1, max(1, round(fill * topk)))
                idx[b, t, 0, torch.randperm(topk, generator=g)[:n]] = \
                    torch.randperm(t - s0 + 1, generator=g)[:n].to(torch.int32)
    return idx


def check(B, T, HQ, HKV, D, HI, DI, *, dtype=torch.float32, indices=None, cu=None, block_q=16, seed=0):
    q, k, qi, ki, w = make_inputs(B, T, HQ, HKV, D, HI, DI, seed)
    ins = [x.to(dtype).double() for x in (q, k, qi, ki, w)]
    for x in ins[2:]:
        x.requires_grad_()
    ref = reference(*ins, indices=indices, cu_seqlens=cu)
    ref.backward()
    xs = [x.to(dtype).to(DEVICE) for x in (q, k, qi, ki, w)]
    for x in xs:
        x.requires_grad_()
    with poisoned():
        loss = lightning_indexer_loss(*xs, indices=None if indices is None else indices.to(DEVICE),
                                      cu_seqlens=None if cu is None else cu.to(DEVICE), block_q=block_q)
        loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, ref, dtype, "loss")
    for name, x, r in zip(("dqi", "dki", "dw"), xs[2:], ins[2:]):
        assert x.grad.dtype == dtype
        assert_close(x.grad, r.grad, dtype, name)
    assert xs[0].grad is None and xs[1].grad is None        # the teacher gets no gradient
    return loss


@pytest.mark.parametrize("block_q", [7, 16, 64])
def test_dense(block_q):
    # T = 37: block_q = 7 and 16 leave a partial last tile; 64 is one tile
    check(2, 37, 8, 2, 16, 4, 8, block_q=block_q)


@pytest.mark.parametrize("block_q", [5, 64])
def test_sparse(block_q):
    idx = random_lists(2, 33, 9, seed=1)
    check(2, 33, 4, 4, 16, 3, 8, indices=idx, block_q=block_q)


def test_sparse_empty_rows_are_left_out_of_the_mean():
    idx = random_lists(1, 20, 6, seed=2)
    idx[0, 3:6] = -1
    check(1, 20, 4, 1, 8, 2, 8, indices=idx, block_q=8)


@pytest.mark.parametrize("sparse", [False, True])
def test_varlen(sparse):
    seqlens = [11, 6, 15]
    cu = torch.tensor([0, 11, 17, 32], dtype=torch.int32)
    idx = random_lists(1, 32, 5, seed=3, seqlens=seqlens) if sparse else None
    check(1, 32, 4, 2, 16, 4, 8, indices=idx, cu=cu, block_q=8)


def test_bf16_inputs():
    check(1, 30, 4, 2, 16, 4, 16, dtype=torch.bfloat16, block_q=16)


@pytest.mark.parametrize("sparse", [False, True])
def test_autocast_changes_nothing(sparse):
    # the loss is fp32 by design: under autocast einsum ran in bf16 (a less precise loss) and the
    # backward's index_add_ of a bf16 source into the fp32 dki raised
    q, k, qi, ki, w = (x.float() for x in make_inputs(1, 20, 4, 2, 16, 4, 8, seed=5))
    idx = random_lists(1, 20, 6, seed=5) if sparse else None
    got = []
    for on in (False, True):
        xs = [x.clone().requires_grad_() for x in (qi, ki, w)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            loss = lightning_indexer_loss(q, k, *xs, indices=idx)
            loss.backward()
        got.append([loss.detach()] + [x.grad for x in xs])
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_loss_is_zero_when_indexer_matches_and_positive_otherwise():
    # a single key per row makes both distributions one-hot: KL = 0
    q, k, qi, ki, w = (x.float() for x in make_inputs(1, 12, 2, 1, 8, 2, 4))
    idx = torch.arange(12, dtype=torch.int32).view(1, 12, 1, 1)
    assert float(lightning_indexer_loss(q, k, qi, ki, w, indices=idx)) == pytest.approx(0., abs=1e-6)
    assert float(lightning_indexer_loss(q, k, qi, ki, w)) > 0


def test_errors():
    q, k, qi, ki, w = (x.float() for x in make_inputs(1, 8, 4, 2, 8, 2, 4))
    with pytest.raises(ValueError, match=r"indexer: expected qi \[B, T, HI, DI\], ki \[B, T, DI\]"):
        lightning_indexer_loss(q, k, qi, ki[..., :3], w)
    with pytest.raises(ValueError, match=r"k: expected \[B, T, HKV, D\].*divisible by HKV"):
        lightning_indexer_loss(q[:, :, :3], k, qi, ki, w)
    idx = torch.zeros(1, 8, 1, 2, dtype=torch.int32)
    idx[0, :, 0, 1] = torch.arange(8)
    with pytest.raises(TypeError, match=r"indices: expected int32 of shape \[B, T, 1, topk\] = \[1, 8, 1, \*\]"):
        lightning_indexer_loss(q, k, qi, ki, w, indices=idx.long())
    with pytest.raises(ValueError, match=r"indices: expected int32 of shape .*fix: one token list per query"):
        lightning_indexer_loss(q, k, qi, ki, w, indices=idx[:, :, :, :0])
    with pytest.raises(ValueError, match=r"k: expected \[B, T, HKV, D\].*HKV >= 1.*fix: "):
        lightning_indexer_loss(q, k[:, :, :0], qi, ki, w)
    with pytest.raises(TypeError, match=r"q: expected a 4-D float tensor, got int32.*fix: "):
        lightning_indexer_loss(q.int(), k, qi, ki, w)
    idx[0, 2, 0, 1] = 5
    with pytest.raises(ValueError, match=r"indices\[0, 2, 0, 1\] = 5: expected -1 or a key position in \[0, 2\]"):
        lightning_indexer_loss(q, k, qi, ki, w, indices=idx)
