"""Exact top-k of score rows by radix select: columns ascending, ties to the lower column, -1 padded.

`topk_rows` replaces torch.topk + a sort for the selection of sparse attention. Per row, one
program:

1. keys: the fp32 score as an order-preserving integer (-0.0 read as +0.0), shifted into
   [0, 2^32) and held in int64;
2. four radix passes of 8 bits, most significant first: a 256-bin histogram of the digit
   over the keys that still match the prefix chosen so far, then the largest digit whose
   suffix count still reaches the number of keys left to place. After the last pass the
   prefix is the k-th largest key itself, and k_eq says how many keys equal to it to keep;
3. one in-order pass writes every column whose key is greater, and the first k_eq columns
   whose key equals it (a running count over the row): already ascending, no sort.

-inf marks a non-candidate: a row with at most k candidates keeps them all and pads with -1.
Five passes read the row (the first radix pass also counts the candidates); nothing is sorted.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unifattn.kernels.utils import interpreting

BLOCK = 1024
KEY_NEG_INF = tl.constexpr(8388607)   # _keys of -inf: bits 0xFF800000 -> (-8388608 ^ 0x7FFFFFFF) + 2^31


@triton.jit
def _keys(s_row, o, m):
    """int64 keys in [0, 2^32) ordered like the fp32 scores; out-of-row lanes get -1."""
    b_s = tl.load(s_row + o, mask=m, other=0.) + 0.0          # + 0.0: -0.0 becomes +0.0
    b_i = b_s.to(tl.int32, bitcast=True)
    b_i = tl.where(b_i >= 0, b_i, b_i ^ 0x7FFFFFFF)           # signed order = float order
    return tl.where(m, b_i.to(tl.int64) + 2147483648, -1)


@triton.jit
def _digit_pick(s_row, W, prefix, k_left, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """One radix pass over the bits at SHIFT: (digit, keys above it among the matching ones, and the
    number of candidates in the row, i.e. keys above -inf's, which the first pass needs)."""
    o_b = tl.arange(0, 512)
    b_h = tl.zeros([512], dtype=tl.int32)
    n_valid = 0
    for i0 in range(0, W, BLOCK):
        o = i0 + tl.arange(0, BLOCK)
        b_k = _keys(s_row, o, o < W)
        if SHIFT == 24:
            match = b_k >= 0
        else:
            match = (b_k >= 0) & ((b_k >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        # keys that do not match go to bin 256 (a bin nobody reads): no histogram mask needed
        b_d = tl.where(match, (b_k >> SHIFT) & 255, 256).to(tl.int32)
        b_h += tl.histogram(b_d, 512)
        if SHIFT == 24:                                          # only the first pass counts
            n_valid += tl.sum((b_k > KEY_NEG_INF).to(tl.int32), 0)
    b_h = tl.where(o_b < 256, b_h, 0)
    b_suf = tl.cumsum(b_h, 0, reverse=True)                     # keys with digit >= d
    d = tl.max(tl.where(b_suf >= k_left, o_b, -1), 0)
    above = tl.sum(tl.where(o_b == d, b_suf - b_h, 0), 0)      # keys with digit > d
    return d, above, n_valid


@triton.jit
def topk_rows_kernel(s, out, bblk, c0, W, nq, HKV, TOPK, BLOCK: tl.constexpr):
    """Row r = h * nq + i of s [HKV, nq, W] -> out[i, h, :TOPK], columns + (c0 - bblk[i])."""
    r = tl.program_id(0)
    i_h, i_q = r // nq, r % nq
    s_row = s + r.to(tl.int64) * W
    o_row = out + (i_q.to(tl.int64) * HKV + i_h) * TOPK
    shift_col = c0 - tl.load(bblk + i_q)

    # the first radix pass also counts the candidates (keys above -inf's)
    d, above, n_valid = _digit_pick(s_row, W, 0, TOPK, 24, BLOCK)
    # at most TOPK candidates: keep all (every key above -inf's, none rationed)
    kth = n_valid.to(tl.int64) * 0 + KEY_NEG_INF
    k_eq = n_valid * 0
    if n_valid > TOPK:
        prefix = d.to(tl.int64) << 24
        k_left = TOPK - above
        d, above, _ = _digit_pick(s_row, W, prefix, k_left, 16, BLOCK)
        prefix += d.to(tl.int64) << 16
        k_left -= above
        d, above, _ = _digit_pick(s_row, W, prefix, k_left, 8, BLOCK)
        prefix += d.to(tl.int64) << 8
        k_left -= above
        d, above, _ = _digit_pick(s_row, W, prefix, k_left, 0, BLOCK)
        prefix += d.to(tl.int64)
        k_left -= above
        # prefix is the TOPK-th largest key: keep every greater one and the k_left first equal to it
        kth = prefix
        k_eq = k_left

    # in column order, so the kept columns come out ascending
    n_sel = n_valid * 0
    n_eq = n_valid * 0
    for i0 in range(0, W, BLOCK):
        o = i0 + tl.arange(0, BLOCK)
        b_k = _keys(s_row, o, o < W)
        eq = b_k == kth
        rank = tl.cumsum(eq.to(tl.int32), 0) - 1 + n_eq
        sel = (b_k > kth) | (eq & (rank < k_eq))
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1 + n_sel
        tl.store(o_row + pos, (o + shift_col).to(tl.int32), mask=sel & (pos < TOPK))    # never past the row
        n_eq += tl.sum(eq.to(tl.int32), 0)
        n_sel += tl.sum(sel.to(tl.int32), 0)
    for j0 in range(0, TOPK, BLOCK):
        o = j0 + tl.arange(0, BLOCK)
        tl.store(o_row + o, tl.full([BLOCK], -1, tl.int32), mask=(o >= n_sel) & (o < TOPK))


def topk_rows(s: torch.Tensor, out: torch.Tensor, bblk: torch.Tensor, c0: int, topk: int) -> None:
    """s fp32 [HKV, nq, W] (contiguous; -inf = not a candidate) -> out int32 [nq, HKV, topk]: per row the
    columns of its topk best scores + (c0 - bblk[i]), ascending, ties to the lower column, -1 padded."""
    HKV, nq, W = s.shape
    if not (s.is_cuda or interpreting()):
        raise RuntimeError("topk_rows: expected CUDA tensors (or TRITON_INTERPRET=1); got " + str(s.device))
    if HKV * nq == 0:
        return
    from unifattn.kernels.checks import _on
    with _on(s.device):                      # Triton launches on the current device, not the tensor's
        topk_rows_kernel[(HKV * nq,)](s, out, bblk, c0, W, nq, HKV, topk, BLOCK=BLOCK, num_warps=4)
