"""Input scans for the op layer: NaN/inf and value ranges, read once, no temporaries.

`scan(checks)` reads every tensor once in one launch per 8 tensors (a program scans one
BLOCK of one tensor, picked from the block offsets of all of them); each program ORs its
finding into one int32 word (bit i for check i), so a whole call costs one read of its
inputs, one launch and one device-to-host sync. `scan_async(checks, amax=True)` also takes
each tensor's largest |x| in the same read (an atomic max of its fp32 bits per program: for
|x| the bits order like the values, and NaN's above inf's), which select() turns into a
bound on its scores (dsl.bounds). torch's `isfinite(x).all()` writes a bool
tensor as large as x and reduces it in a second kernel: on a B=8, T=4096 linear-attention
call that was most of the op's overhead. A launch per tensor cost ~20 us of host time each,
most of a checked decode step's overhead (5-6 tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unifattn.kernels.utils import interpreting

RANGES = {None: 0, "<= 0": 1, "in (0, 1]": 2}
BLOCK = 4096
SLOTS = 8          # tensors per launch


@triton.jit
def _scan_block(x, n, blk, bit_value, flags, slot, RANGE: tl.constexpr, AMAX: tl.constexpr, BLOCK: tl.constexpr):
    o = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_x = tl.load(x + o, mask=m, other=0.).to(tl.float32)
    if AMAX:                                  # |x| as int32 bits: ordered like |x|, NaN above inf
        b_a = tl.max(tl.where(m, b_x.to(tl.int32, bitcast=True) & 2147483647, 0), 0)
        # one address per tensor: atomics from every block (131072 for MoBA's 537 MB q at T=32768) serialize
        # there; a block below the max seen so far skips its atomic (a stale read only costs one more)
        if b_a > tl.load(flags + 1 + slot):
            tl.atomic_max(flags + 1 + slot, b_a, sem="relaxed")
    bad = (b_x != b_x) | (tl.abs(b_x) == float("inf"))
    if RANGE == 1:
        bad = bad | (b_x > 0)
    if RANGE == 2:
        bad = bad | (b_x <= 0) | (b_x > 1)
    n_bad = tl.sum((bad & m).to(tl.int32), axis=0)
    if n_bad > 0:
        tl.atomic_or(flags, bit_value)


@triton.jit(do_not_specialize=[f"{p}{i}" for p in "nea" for i in range(8) if (p, i) != ("e", 7)])
def _scan_kernel(flags, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7,
                 e0, e1, e2, e3, e4, e5, e6, v0, v1, v2, v3, v4, v5, v6, v7, a0, a1, a2, a3, a4, a5, a6, a7,
                 R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                 R5: tl.constexpr, R6: tl.constexpr, R7: tl.constexpr, NT: tl.constexpr, AMAX: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Program pid scans block pid - e[i-1] of tensor i, where e[i-1] <= pid < e[i] (e: cumulative block
    counts; slots past NT are unused). v_i: the bit ORed into flags[0] for tensor i; with AMAX, a_i: the
    slot of flags[1:] that takes tensor i's largest |x| bits."""
    pid = tl.program_id(0)
    if pid < e0:
        _scan_block(x0, n0, pid, v0, flags, a0, R0, AMAX, BLOCK)
    if NT > 1:
        if (pid >= e0) & (pid < e1):
            _scan_block(x1, n1, pid - e0, v1, flags, a1, R1, AMAX, BLOCK)
    if NT > 2:
        if (pid >= e1) & (pid < e2):
            _scan_block(x2, n2, pid - e1, v2, flags, a2, R2, AMAX, BLOCK)
    if NT > 3:
        if (pid >= e2) & (pid < e3):
            _scan_block(x3, n3, pid - e2, v3, flags, a3, R3, AMAX, BLOCK)
    if NT > 4:
        if (pid >= e3) & (pid < e4):
            _scan_block(x4, n4, pid - e3, v4, flags, a4, R4, AMAX, BLOCK)
    if NT > 5:
        if (pid >= e4) & (pid < e5):
            _scan_block(x5, n5, pid - e4, v5, flags, a5, R5, AMAX, BLOCK)
    if NT > 6:
        if (pid >= e5) & (pid < e6):
            _scan_block(x6, n6, pid - e5, v6, flags, a6, R6, AMAX, BLOCK)
    if NT > 7:
        if pid >= e6:
            _scan_block(x7, n7, pid - e6, v7, flags, a7, R7, AMAX, BLOCK)


def _launch(flags, group, amax: bool):
    """group: up to SLOTS (tensor, range, bit, slot) -> one launch."""
    nt = len(group)
    xs = [x for x, _, _, _ in group] + [None] * (SLOTS - nt)
    ns = [x.numel() for x, _, _, _ in group] + [0] * (SLOTS - nt)
    ends, total = [], 0
    for n in ns[:SLOTS - 1]:
        total += triton.cdiv(n, BLOCK)
        ends.append(total)
    total += triton.cdiv(ns[SLOTS - 1], BLOCK)
    bits = [1 << b for _, _, b, _ in group] + [0] * (SLOTS - nt)
    slots = [a for _, _, _, a in group] + [0] * (SLOTS - nt)
    rs = {f"R{i}": RANGES[group[i][1]] if i < nt else 0 for i in range(SLOTS)}
    with _on(flags.device):                     # Triton launches on the current device, not the tensor's
        _scan_kernel[(total,)](flags, *xs, *ns, *ends, *bits, *slots, **rs, NT=nt, AMAX=amax, BLOCK=BLOCK,
                               num_warps=4)


def _torch_ok(x: torch.Tensor, rng) -> torch.Tensor:
    ok = torch.isfinite(x).all()
    if rng == "<= 0":
        ok &= (x <= 0).all()
    if rng == "in (0, 1]":
        ok &= ((x > 0) & (x <= 1)).all()
    return ok


def _on(dev: torch.device):
    """The tensor's CUDA device as the current one for a launch (a no-op context elsewhere)."""
    import contextlib
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def scan(checks: list) -> int:
    """checks: [(tensor, range)], range None, "<= 0" or "in (0, 1]". Returns a bit mask, bit
    min(i, 30) set when checks[i] holds a NaN/inf or a value outside its range (one host sync)."""
    flags = scan_async(checks)
    return 0 if flags is None else int(flags.item())


def scan_async(checks: list, amax: bool = False) -> torch.Tensor | None:
    """scan without the sync: the int32 [1] bit mask on the device (None for no checks), to be
    read once the caller has queued its own work. amax: int32 [1 + len(checks)], entry 1 + i the
    largest |x| of checks[i] as fp32 bits (view it as float32: NaN when x holds one; 0 when empty)."""
    if not checks:
        return None
    dev = checks[0][0].device
    use_triton = dev.type == "cuda" or interpreting()
    flags = torch.zeros(1 + len(checks) if amax else 1, dtype=torch.int32, device=dev)
    group = []
    for i, (x, rng) in enumerate(checks):
        if not x.numel():
            continue
        bit = min(i, 30)
        if use_triton and x.is_contiguous() and x.device == dev and x.dtype in (torch.float32, torch.bfloat16,
                                                                               torch.float16):
            group.append((x, rng, bit, i))
            if len(group) == SLOTS:
                _launch(flags, group, amax)
                group = []
        else:
            flags[:1] |= (~_torch_ok(x, rng)).to(dev, torch.int32) << bit
            if amax:                       # fp64 too: as fp32 (what the kernels compute in), inf past its range
                flags[1 + i] = x.detach().abs().amax().to(dev, torch.float32).view(torch.int32)
    if group:
        _launch(flags, group, amax)
    return flags


# --------------------------------------------------------------------------- sparse index lists
@triton.jit
def _index_scan_kernel(idx, bos, flags, T, H, TOPK, s_b, s_t, s_h, s_k,
                       NBLK: tl.constexpr, HAS_BOS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per list (b, t, h) of idx [B, T, H, TOPK] (any strides). ORs into flags: 1 when an
    entry is neither -1 nor a causal key block j <= t_local // NBLK; 2 when the list is not in select()'s
    order (valid entries strictly ascending, -1 only after them)."""
    r = tl.program_id(0)
    i_h, i_t, i_b = r % H, (r // H) % T, r // (H * T)
    t_local = i_t
    if HAS_BOS:
        t_local = i_t - tl.load(bos + i_t)
    last = t_local // NBLK
    base = idx + i_b.to(tl.int64) * s_b + i_t.to(tl.int64) * s_t + i_h.to(tl.int64) * s_h
    n_range = 0
    n_order = 0
    for j0 in range(0, TOPK, BLOCK):
        o = j0 + tl.arange(0, BLOCK)
        m = o < TOPK
        x1 = tl.load(base + o.to(tl.int64) * s_k, mask=m, other=-1)
        n_range += tl.sum((m & ((x1 < -1) | (x1 > last))).to(tl.int32), 0)
        mp = m & (o > 0)
        x0 = tl.load(base + (o - 1).to(tl.int64) * s_k, mask=mp, other=-1)   # the entry before (cached)
        in_order = ((x1 > x0) & (x0 >= 0)) | (x1 == -1)
        n_order += tl.sum((mp & ~in_order).to(tl.int32), 0)
    bits = (n_range > 0).to(tl.int32) + 2 * (n_order > 0).to(tl.int32)
    if bits > 0:
        tl.atomic_or(flags, bits)


def index_scan(indices: torch.Tensor, block_size: int, bos: torch.Tensor | None) -> int:
    """indices int32 [B, T, H, topk] (CUDA, or any device under the interpreter); bos [T] int32 or None.
    One read, one sync: bit 0 set when an entry is out of range (not -1, not causal), bit 1 when
    some list is not in select()'s order."""
    B, T, H, topk = indices.shape
    flags = torch.zeros(1, dtype=torch.int32, device=indices.device)
    if indices.numel():
        with _on(indices.device):
            _index_scan_kernel[(B * T * H,)](indices, bos, flags, T, H, topk, *indices.stride(),
                                             NBLK=block_size, HAS_BOS=bos is not None,
                                             BLOCK=min(1024, triton.next_power_of_2(topk)), num_warps=4)
    return int(flags.item())
