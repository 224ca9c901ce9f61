"""sparse_attention against a float64 dense masked reference (output, lse, dq, dk, dv).

The reference builds, for each (batch, KV head), the [T, T] mask of selected keys
from the indices and runs plain softmax attention on it; autograd gives its
gradients. Kernel calls run inside `poisoned()`, so an unwritten element is NaN.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unifattn.kernels.sparse_attention import sparse_attention
from unifattn.kernels.utils import poisoned
from unifattn.testing.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- helpers


def make_indices(B, T, HKV, topk, *, block_size=1, fill=1.0, seqlens=None, seed=0):
    """Random causal int32 lists [B, T, HKV, topk]: distinct entries at random slots, -1 elsewhere.

    fill < 1 leaves some slots -1 even where more keys are available.
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, HKV, topk), -1, dtype=torch.int32)
    starts = [0] if seqlens is None else [sum(seqlens[:i]) for i in range(len(seqlens))]
    ends = [T] if seqlens is None else [s + n for s, n in zip(starts, seqlens)]
    for b in range(B):
        for s0, s1 in zip(starts, ends):
            for t in range(s0, s1):
                avail = (t - s0) // block_size + 1        # causal keys or key blocks
                for h in range(HKV):
                    n = min(avail, topk, max(1, round(fill * topk)))
                    sel = torch.randperm(avail, generator=g)[:n]
                    slots = torch.randperm(topk, generator=g)[:n]
                    idx[b, t, h, slots] = sel.to(torch.int32)
    return idx


def reference(q, k, v, indices, *, block_size=1, scale=None, cu_seqlens=None):
    """float64 dense masked attention: returns o, lse (natural log, -inf for empty rows)."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    scale = D ** -0.5 if scale is None else scale
    bos = torch.zeros(T, dtype=torch.long)
    if cu_seqlens is not None:
        for s0, s1 in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            bos[s0:s1] = s0
    mask = torch.zeros(B, HKV, T, T, dtype=torch.bool)
    for b, t, h, j in (indices >= 0).nonzero().tolist():
        e = int(indices[b, t, h, j])
        for pos in range(e * block_size, (e + 1) * block_size):
            if pos <= t - bos[t]:
                mask[b, h, t, bos[t] + pos] = True
    mask = mask.repeat_interleave(G, 1).to(q.device)              # [B, HQ, T, T]
    s = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(G, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)                                  # [B, HQ, T]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0., lse)[..., None])   # empty rows: p = 0
    o = torch.einsum("bhts,bshd->bthd", p, v.repeat_interleave(G, 2))
    return o, lse.transpose(1, 2)


def assert_lse(lse, ref, dtype):
    lse, ref = lse.cpu(), ref.cpu()
    empty = torch.isinf(ref)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf pattern differs from the reference"
    assert_close(lse.masked_fill(empty, 0), ref.masked_fill(empty, 0), dtype, "lse")


def check(B, T, HQ, HKV, D, topk, *, DV=None, dtype=torch.float32, block_size=1, fill=0.8,
          seqlens=None, lse_grad=False, seed=0, indices=None):
    torch.manual_seed(seed)
    DV = DV or D
    q = torch.randn(B, T, HQ, D, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, dtype=torch.float64)
    v = torch.randn(B, T, HKV, DV, dtype=torch.float64)
    do = torch.randn(B, T, HQ, DV, dtype=torch.float64)
    dlse = torch.randn(B, T, HQ, dtype=torch.float64)
    if indices is None:
        indices = make_indices(B, T, HKV, topk, block_size=block_size, fill=fill, seqlens=seqlens, seed=seed)
    cu = None if seqlens is None else torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32)

    # reference on the dtype-rounded inputs, in float64
    ins = [x.to(dtype).to(torch.float64).requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = reference(*ins, indices, block_size=block_size, cu_seqlens=cu)
    loss = (o_ref * do).sum() + ((lse_ref.masked_fill(torch.isinf(lse_ref), 0) * dlse).sum() if lse_grad else 0)
    loss.backward()

    xs = [x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v)]
    with poisoned():
        o, lse = sparse_attention(*xs, indices.to(DEVICE), block_size=block_size if block_size > 1 else None,
                                  cu_seqlens=None if cu is None else cu.to(DEVICE), return_lse=True)
        loss = (o.double() * do.to(DEVICE)).sum()
        if lse_grad:
            loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * dlse.to(DEVICE)).sum()
        loss.backward()
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, o_ref, dtype, "o")
    assert_lse(lse, lse_ref, dtype)
    for name, x, r in zip(("dq", "dk", "dv"), xs, ins):
        assert x.grad.dtype == dtype
        assert_close(x.grad, r.grad, dtype, name)
    return o, lse, xs


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("G", [1, 4])
def test_token_fp32(G):
    # topk = 40 spans two 32-key tiles, the second partial; fill < 1 leaves -1 padding
    check(2 if G == 1 else 1, 44, 2 * G, 2, 64, 40, fill=0.8)


def test_token_bf16_gqa():
    check(1, 40, 8, 2, 64, 36, dtype=torch.bfloat16)


def test_token_g16_single_kv_head():
    check(1, 24, 16, 1, 32, 12)


def test_token_d128_distinct_dv():
    check(1, 32, 4, 2, 128, 16, DV=64)


def test_token_head_dim_not_power_of_two():
    check(1, 24, 2, 1, 48, 10, DV=40)


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_granularity(block_size):
    # T is not a multiple of the block: the last block is partial; own block causal.
    # 8: four blocks per 32-key tile, dk/dv by atomics; 32: one block per tile, dk/dv per key block
    check(1, 70 if block_size == 8 else 50, 4, 2, 64, 3 if block_size == 8 else 2, block_size=block_size, fill=1.0)


def test_block_bf16():
    check(1, 40, 8, 2, 64, 3, block_size=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("block_size", [1, 16])
def test_varlen(block_size):
    # three packed sequences; positions in indices are relative to each sequence's start.
    # 16: key-centric dk, dv with blocks cut short at sequence ends (17 = 16 + 1, 9 < 16)
    check(1, 50, 4, 2, 64, 10 if block_size == 1 else 2, block_size=block_size, seqlens=[17, 9, 24], seed=3)


@pytest.mark.parametrize("block_size", [1, 16])
def test_lse_gradient(block_size):
    # d lse enters through delta, in both backward paths
    check(1, 32, 4, 2, 64, 12 if block_size == 1 else 2, block_size=block_size, lse_grad=True, seed=5)


def test_empty_rows_give_zeros_and_no_nan():
    B, T, HKV, topk = 1, 24, 2, 8
    idx = make_indices(B, T, HKV, topk, seed=1)
    idx[0, 5] = -1                  # every head of token 5: no key at all
    idx[0, 9, 1] = -1               # token 9, KV head 1 only
    o, lse, (q, k, v) = check(B, T, 4, HKV, 64, topk, indices=idx)
    assert not torch.isnan(o).any()
    assert torch.equal(o[0, 5].cpu(), torch.zeros_like(o[0, 5].cpu()))
    assert torch.isneginf(lse[0, 5]).all() and torch.isneginf(lse[0, 9, 2:]).all()
    assert (q.grad[0, 5] == 0).all() and (q.grad[0, 9, 2:] == 0).all()


def test_all_rows_empty():
    idx = torch.full((1, 16, 1, 4), -1, dtype=torch.int32)
    q, k, v = (torch.randn(1, 16, h, 32, device=DEVICE, requires_grad=True) for h in (2, 1, 1))
    with poisoned():
        o, lse = sparse_attention(q, k, v, idx.to(DEVICE), return_lse=True)
        o.sum().backward()
    assert (o == 0).all() and torch.isneginf(lse).all()
    assert all((x.grad == 0).all() for x in (q, k, v))


@pytest.mark.parametrize("scale", [1e30, -1e30])
def test_huge_scale_rows_are_not_read_as_empty(scale):
    # |scale| = 1e30 puts many rows' every score (base 2) below -1e30: a running max started at
    # -1e30 instead of -inf gave them p = 0 and o = 0, lse = -inf although they have keys. The
    # float64 softmax is one-hot here, so o is v of each row's best key. The backward recomputes p
    # from the fp32 lse, whose rounding (~1e24 at |lse| ~ 1e31) overflows exp2: it raises instead
    # (test_huge_scores_backward_raises).
    B, T, HQ, HKV, D, topk = 1, 40, 4, 2, 32, 36       # 36 keys: two 32-key tiles
    torch.manual_seed(7)
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, HKV, HKV))
    idx = make_indices(B, T, HKV, topk, fill=0.8, seed=7)
    idx[0, 11] = -1                 # every head of token 11: no key at all
    idx[0, 20, 1] = -1              # token 20, KV head 1 only
    o_ref, lse_ref = reference(q.double(), k.double(), v.double(), idx, scale=scale)
    empty = torch.isinf(lse_ref)
    # the data exercise the bug: rows with keys whose scores are all below -1e30 in base 2
    assert ((lse_ref * 1.4426950408889634 < -1e30) & ~empty).any()
    # and each row's best key wins by a margin fp32 rounding cannot flip
    sel = idx.repeat_interleave(HQ // HKV, 2).long()                   # [B, T, HQ, topk]
    s = torch.einsum("bthd,bshd->bths", q.double(), k.double().repeat_interleave(HQ // HKV, 2)) * scale
    top2 = s.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf")).topk(2, -1).values
    has2 = torch.isfinite(top2[..., 1])
    assert ((top2[..., 0] - top2[..., 1])[has2] > 1e-3 * abs(scale)).all()

    with poisoned():
        o, lse = sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), idx.to(DEVICE), scale=scale,
                                  return_lse=True)
    assert_close(o, o_ref, torch.float32, "o")
    assert_lse(lse, lse_ref, torch.float32)
    o, lse = o.cpu(), lse.cpu()
    assert (o[~empty] != 0).any(-1).all(), "a row with keys read as empty"
    assert (o[empty] == 0).all() and torch.isneginf(lse[0, 11]).all() and torch.isneginf(lse[0, 20, 2:]).all()


def test_default_scale_and_explicit_scale_agree():
    q, k, v = (torch.randn(1, 16, h, 32, device=DEVICE) for h in (2, 1, 1))
    idx = make_indices(1, 16, 1, 8).to(DEVICE)
    assert torch.equal(sparse_attention(q, k, v, idx), sparse_attention(q, k, v, idx, scale=32 ** -0.5))


@settings(max_examples=6, deadline=None)
@given(G=st.sampled_from([1, 2, 4]), T=st.integers(1, 24), topk=st.integers(1, 20),
       block=st.sampled_from([1, 1, 4]), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes(G, T, topk, block, seed):
    check(1, T, 2 * G, 2, 32, topk, block_size=block, fill=0.7, seed=seed)


# --------------------------------------------------------------------------- bad input


def _inputs(T=16, HQ=4, HKV=2, D=32, topk=4):
    q = torch.randn(1, T, HQ, D, device=DEVICE)
    k = torch.randn(1, T, HKV, D, device=DEVICE)
    v = torch.randn(1, T, HKV, D, device=DEVICE)
    return q, k, v, make_indices(1, T, HKV, topk).to(DEVICE)


def test_error_messages_carry_a_fix():
    q, k, v, idx = _inputs()
    with pytest.raises(ValueError, match=r"k, v: expected at least one KV head.*fix: "):
        sparse_attention(q, k[:, :, :0], v[:, :, :0], idx[:, :, :0])
    with pytest.raises(TypeError, match=r"q: expected float16, bfloat16 or float32, got float64.*fix: "):
        sparse_attention(q.double(), k.double(), v.double(), idx)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor.*fix: "):
        sparse_attention(q[0], k, v, idx)
    with pytest.raises(ValueError, match=r"k, v: expected k \[B, T, HKV, D\].*fix: "):
        sparse_attention(q, k[:, :3], v, idx)
    with pytest.raises(ValueError, match=r"head dims: expected D and DV in 1\.\.256.*fix: "):
        sparse_attention(q.new_zeros(1, 16, 4, 300), k.new_zeros(1, 16, 2, 300), v, idx)
    with pytest.raises(ValueError, match=r"block_size: expected None or a positive int, got 0; fix: "):
        sparse_attention(q, k, v, idx, block_size=0)
    with pytest.raises(ValueError, match=r"scale: expected a finite float, got nan; fix: "):
        sparse_attention(q, k, v, idx, scale=float("nan"))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets from 0 to T = 16.*fix: "):
        sparse_attention(q, k, v, idx, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32, device=DEVICE))
    meta = [x.to("meta") for x in (q, k, v, idx)]
    with pytest.raises(ValueError, match=r"q, k, v: expected CUDA tensors .* got tensors on meta; fix: "):
        sparse_attention(*meta)


def test_error_future_index():
    q, k, v, idx = _inputs()
    idx[0, 3, 1, 0] = 7
    with pytest.raises(ValueError, match=r"indices\[0, 3, 1, 0\] = 7: expected -1 or a key position in \[0, 3\]"):
        sparse_attention(q, k, v, idx)


def test_error_out_of_range_and_below_minus_one():
    q, k, v, idx = _inputs()
    idx[0, 15, 0, 2] = 16
    with pytest.raises(ValueError, match=r"in \[0, 15\].*fix: clamp or mask"):
        sparse_attention(q, k, v, idx)
    idx[0, 15, 0, 2] = -2
    with pytest.raises(ValueError, match=r"= -2: expected -1"):
        sparse_attention(q, k, v, idx)


def test_error_future_block():
    q, k, v, _ = _inputs()
    idx = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE).expand(1, 16, 2, 2).contiguous()
    with pytest.raises(ValueError, match=r"key block \(of 8 keys\) in \[0, 0\]"):
        sparse_attention(q, k, v, idx, block_size=8)       # token 0 may not name block 1


def test_error_varlen_relative_positions():
    q, k, v, _ = _inputs()
    idx = torch.full((1, 16, 2, 1), -1, dtype=torch.int32, device=DEVICE)
    idx[0, 10, 0, 0] = 10                                    # fine without cu_seqlens ...
    sparse_attention(q, k, v, idx)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):    # ... token 10 is position 2 of sequence 2
        sparse_attention(q, k, v, idx, cu_seqlens=cu)


def test_error_duplicates():
    q, k, v, idx = _inputs()
    idx[0, 9, 0, :2] = 4
    with pytest.raises(ValueError, match=r"lists 4 more than once.*fix: deduplicate"):
        sparse_attention(q, k, v, idx)


@pytest.mark.parametrize("row, ok", [
    ([1, 3, 4, -1], True),          # select()'s order: checked without a sort
    ([3, 1, -1, 4], True),          # any other order: sorted, no duplicate
    ([1, 3, 3, -1], False),         # ascending with a repeat
    ([4, -1, 2, 4], False),         # unordered with a repeat
    ([-1, -1, -1, -1], True),
])
def test_duplicate_check_in_and_out_of_select_order(row, ok):
    from unifattn.kernels.sparse_attention import check_sparse_indices
    idx = torch.full((1, 8, 1, 4), -1, dtype=torch.int32, device=DEVICE)
    idx[0, 7, 0] = torch.tensor(row, dtype=torch.int32)
    if ok:
        check_sparse_indices(idx, 1, None)
    else:
        with pytest.raises(ValueError, match="more than once"):
            check_sparse_indices(idx, 1, None)


def test_huge_block_entry_is_out_of_range_not_wrapped():
    """j * block_size would wrap in int32 for j near 2^31 / 64: the check compares j with t // 64."""
    from unifattn.kernels.sparse_attention import check_sparse_indices
    idx = torch.full((1, 8, 1, 2), -1, dtype=torch.int32, device=DEVICE)
    idx[0, 7, 0, 0] = 2 ** 26                               # 64 * 2^26 = 2^32 wraps to 0 in int32
    with pytest.raises(ValueError, match=r"in \[0, 0\]"):
        check_sparse_indices(idx, 64, None)


def test_error_indices_dtype_and_shape():
    q, k, v, idx = _inputs()
    with pytest.raises(TypeError, match=r"indices: expected int32 of shape \[B, T, HKV, topk\] = \[1, 16, 2, \*\], "
                                        r"got int64 .*fix: indices.to\(torch.int32\)"):
        sparse_attention(q, k, v, idx.long())
    with pytest.raises(ValueError, match=r"expected int32 of shape \[B, T, HKV, topk\] = \[1, 16, 2, \*\].*got int32 \[1, 16, 1, 4\]"):
        sparse_attention(q, k, v, idx[:, :, :1])
    with pytest.raises(ValueError, match=r"topk >= 1"):
        sparse_attention(q, k, v, idx[..., :0])


def test_error_heads_and_dtypes():
    q, k, v, idx = _inputs()
    with pytest.raises(ValueError, match=r"HQ % HKV == 0.*got HQ = 3, HKV = 2"):
        sparse_attention(q[:, :, :3], k, v, idx)
    with pytest.raises(TypeError, match=r"k, v: expected q's dtype torch.float32, got k torch.bfloat16"):
        sparse_attention(q, k.bfloat16(), v, idx)
    with pytest.raises(TypeError, match=r"q: expected float16, bfloat16 or float32, got float64"):
        sparse_attention(q.double(), k.double(), v.double(), idx)
    with pytest.raises(ValueError, match=r"k, v: expected k \[B, T, HKV, D\]"):
        sparse_attention(q, k[:, :8], v, idx)
    with pytest.raises(ValueError, match=r"head dims: expected D and DV in 1..256"):
        z = torch.zeros(1, 16, 2, 320, device=DEVICE)
        sparse_attention(z, z, z, idx)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected B == 1"):
        sparse_attention(*(x.expand(2, *x.shape[1:]) for x in (q, k, v, idx)),
                         cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_error_device_mismatch():
    q, k, v, idx = _inputs()
    with pytest.raises(ValueError, match=r"devices: expected q, k, v, indices on one device"):
        sparse_attention(q, k, v, idx.cpu())


def test_unchecked_indices_skip_invalid_entries():
    # with check_indices=False, future entries are masked in the kernel, never read
    q, k, v, idx = _inputs()
    bad = idx.clone()
    bad[0, 2, 0, 0] = 9
    bad[0, 2, 0, 1:] = torch.tensor([0, 1, 2], dtype=torch.int32)
    good = bad.clone()
    good[0, 2, 0, 0] = -1
    with poisoned():
        o1 = sparse_attention(q, k, v, bad, check_indices=False)
        o2 = sparse_attention(q, k, v, good)
    assert torch.equal(o1, o2)
    assert math.isfinite(float(o1.abs().max()))


@pytest.mark.parametrize("huge", [2 ** 25, 2 ** 26, 2 ** 31 - 1])
def test_unchecked_huge_block_entries_are_skipped_forward_and_backward(huge):
    # j * block_size of a huge unchecked entry wraps in int32: 2^26 * 64 would read block 0 and
    # 2^25 * 64 a row before k; the kernels compare the block before scaling it
    T, n = 8, 64
    q, k, v = (torch.randn(1, T, 1, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    idx = torch.full((1, T, 1, 2), -1, dtype=torch.int32, device=DEVICE)
    idx[0, :, 0, 0] = 0
    idx[0, 7, 0, 1] = huge
    good = idx.clone()
    good[0, 7, 0, 1] = -1
    outs = []
    for ix, check in ((idx, False), (good, True)):
        with poisoned():
            o = sparse_attention(q, k, v, ix, block_size=n, check_indices=check)
        dq, dk, dv = torch.autograd.grad(o.square().sum(), (q, k, v))
        outs.append((o, dq, dk, dv))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _torch_index_bits(idx, block_size, bos):
    """The index scan's two findings, by torch passes: bit 0 out of range, bit 1 not in select()'s order."""
    T = idx.shape[1]
    t = torch.arange(T, device=idx.device) - (0 if bos is None else bos.long())
    last = torch.div(t, block_size, rounding_mode="floor").view(1, T, 1, 1)
    bits = int(bool(((idx < -1) | (idx > last)).any()))
    if idx.shape[-1] > 1:
        x0, x1 = idx[..., :-1], idx[..., 1:]
        bits |= 2 * int(bool((~(((x1 > x0) & (x0 >= 0)) | (x1 == -1))).any()))
    return bits


@pytest.mark.parametrize("seed", range(6))
def test_index_scan_matches_torch_passes(seed):
    """The fused index scan flags exactly what the torch passes flag: lists longer than its 1024-entry
    block (the pair across a block boundary), expanded (stride-0) heads, varlen starts, key blocks."""
    from unifattn.kernels.checks import index_scan
    g = torch.Generator().manual_seed(seed)
    T, topk = 24, [3, 1, 1100, 5, 1030, 2][seed]
    block_size = [1, 1, 1, 4, 1, 8][seed]
    bos = None if seed % 2 == 0 else torch.tensor([0] * 9 + [9] * 15, dtype=torch.int32)
    t = torch.arange(T) - (0 if bos is None else bos)
    last = (t // block_size).view(1, T, 1, 1)
    for trial in range(8):
        # a valid select()-ordered list per (t, h): ascending causal entries, -1 after them
        r = torch.rand(2, T, 1, topk, generator=g)
        cand = torch.arange(topk).view(1, 1, 1, topk)
        idx = torch.where(cand <= last, cand, -1).expand(2, T, 3, topk)       # stride 0 over heads
        if trial % 4:
            idx = idx.clone()
            b, i, h, j = (int(torch.randint(0, n, (1,), generator=g)) for n in (2, T, 3, topk))
            kind = trial % 4
            if kind == 1:
                idx[b, i, h, j] = int(last.view(-1)[i]) + 1 + int(r[0, 0, 0, 0] * 5)   # future key
            elif kind == 2:
                idx[b, i, h, j] = -2 - trial                                     # below -1
            elif kind == 3 and topk > 1:
                j = max(j, 1)
                idx[b, i, h, j], idx[b, i, h, j - 1] = idx[b, i, h, j - 1].clone(), idx[b, i, h, j].clone()
        want = _torch_index_bits(idx, block_size, bos)
        got = index_scan(idx.to(DEVICE), block_size, None if bos is None else bos.to(DEVICE))
        assert got == want, (seed, trial, got, want)


@pytest.mark.parametrize("row, bits", [
    (list(range(1100)), 0),
    (list(range(1023)) + [1024, 1023] + list(range(1025, 1100)), 2),    # swapped across the 1024 block edge
    (list(range(1023)) + [-1, 1024] + [-1] * 75, 2),                    # -1 then a key, at the edge
    (list(range(1024)) + [2001] + [-1] * 75, 1),                        # a future key right after the edge
])
def test_index_scan_across_its_block_edge(row, bits):
    from unifattn.kernels.checks import index_scan
    # four queries at positions 1997..2000 of one sequence that starts 1997 tokens before this slice
    idx = torch.full((1, 4, 1, 1100), -1, dtype=torch.int32)
    idx[0, 3, 0] = torch.tensor(row, dtype=torch.int32)
    bos = torch.full((4,), -1997, dtype=torch.int32)
    assert _torch_index_bits(idx, 1, bos) == bits
    assert index_scan(idx.to(DEVICE), 1, bos.to(DEVICE)) == bits


@pytest.mark.parametrize("scale", [1e30, -1e30, 1e6])
def test_huge_scores_backward_raises(scale):
    """The backward recomputes p = exp2(s - lse) in fp32: from |lse| = 2^22 (base 2) its spacing is 0.5 and
    p is off by up to 2^0.5 (and at |scale| = 1e30 exp2 overflows: inf / NaN gradients). Such a backward
    raises; the forward still runs (its p is taken against its own running max)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 24, h, 32, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
    idx = make_indices(1, 24, 2, 8, seed=3).to(DEVICE)
    with poisoned():
        o = sparse_attention(q, k, v, idx, scale=scale)
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=r"sparse_attention backward: expected softmax scores \(base 2\) below "
                                         r"2\^22 .* got \|lse\| up to .*Fix: lower the softmax scale"):
        o.sum().backward()


def test_large_bound_small_scores_backward_runs():
    """An outlier in q (1e6 in a channel where every k is 0) lifts the inputs' bound past 2^22, so the
    backward reads lse (one reduction and sync) and finds the scores themselves small: it runs and matches
    the float64 reference."""
    B, T, HQ, HKV, D, topk = 1, 24, 4, 2, 32, 8
    torch.manual_seed(5)
    q, k, v, do = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ))
    q[0, 3, 1, 0] = 1e6
    k[..., 0] = 0.0
    idx = make_indices(B, T, HKV, topk, seed=5)
    from unifattn.kernels.sparse_attention import HUGE_SCORE, _huge_bound
    amax = {"q": float(q.abs().max()), "k": float(k.abs().max())}
    assert _huge_bound(amax, D, D ** -0.5)                          # the check runs
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = reference(*ins, idx)
    (o_ref * do).sum().backward()
    got = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v)]
    with poisoned():
        o, lse = sparse_attention(*got, idx.to(DEVICE), return_lse=True)
        (o * do.float().to(DEVICE)).sum().backward()
    assert float(lse.abs().max()) * 1.4426950408889634 < HUGE_SCORE
    assert_close(o, o_ref, torch.float32, "o")
    for name, a, r in zip(("dq", "dk", "dv"), got, ins):
        assert_close(a.grad, r.grad, torch.float32, name)
