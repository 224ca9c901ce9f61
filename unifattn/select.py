"""Top-k selection from a selector: which keys (or key blocks) each query keeps.

    idx = select(selectors.lightning_indexer, qi=qi, ki=ki, w=w)   # [B, T, 1, 2048] key indices
    idx = select(selectors.moba, q=q, kmean=k)                      # [B, T, HKV, 16] block indices

Math. For a query at position t of its sequence, KV head h and column j (a key,
or with granularity=block(n) the block of keys [j*n, (j+1)*n)):

    score(t, j, h) = sum_{g < G} f(query inputs at (t, head h*G + g), key inputs at (j, h))

where f is the selector's function and, for blocks, each key-side input is the
mean of its per-token values over the block. Candidates are causal: j <= t for
tokens, complete blocks ((j+1)*n <= t+1) for blocks (a block summary must not
see keys after t; the query's own partial block comes in through local(1)).
`always` keys are kept whatever their score and count in topk: sink(m) the
columns j < m, local(m) the columns t//n - m < j <= t//n. Each row keeps the
topk best columns; ties go to the lower index. Rows with fewer candidates keep
them all and pad with -1. Rows are sorted ascending, -1 last, no duplicates.

Shapes. Every input is [B, T, (heads,) *its type's dims]:
    Vec["D"] -> [B, T, D]       Scalar -> [B, T]     Heads["H", "D"] -> [B, T, H, D]   Heads["H"] -> [B, T, H]
with an optional attention-head axis after T: HQ query heads on the query side,
HKV KV heads on the key side (HQ a multiple of HKV, G = HQ // HKV; an input
without the axis is shared by all heads). The G query heads of a KV head share
one index list: their scores are summed (MoBA under GQA: sum over the group,
which ranks like the mean). The output is int32 [B, T, HKV, topk], HKV = 1 when
no key-side input has a head axis (the lightning indexer: one list for all heads).
    lightning_indexer: qi [B, T, HI, DI], ki [B, T, DI], w [B, T, HI] -> [B, T, 1, topk]
    moba: q [B, T, HQ, D], kmean=k [B, T, HKV, D] (the keys, pooled by the op) -> [B, T, HKV, topk]
With cu_seqlens (B == 1, FlashAttention convention) sequences are packed along
T and indices are relative to each sequence's start.

How: queries in tiles of `query_tile`; the generated Triton kernel scores a tile
against its causal columns into an fp32 [HKV, tile, W] buffer (never T x T at
once); kernels.topk keeps the best of each row in one Triton program (the k-th
score found in registers by regula falsi and bits, the kept columns written in
order; ties to the lower index; rows over 32768 scores in rounds of per-segment
candidates). On a GPU each tile's top-k runs on a second stream while the next
tile is scored (two score buffers; SelectConfig(streams=1) for one).
With rows over 32768 scores and topk > 16384 it goes to torch.topk, whose rows
with a tied k-th score are redone with exact (score, -index) int64 keys, then a
sort: the same result.
Scores are computed in fp32 (fp64 inputs are cast), with bf16/fp16 inputs as
tensor-core operands.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unifattn import validate
from unifattn.dsl.selector import RESERVED, Selector

__all__ = ["select", "select_scores", "select_reference", "reference_scores", "SelectConfig"]

_FLOATS = validate.FLOATS


def __getattr__(name):
    if name == "SelectConfig":            # lives with the kernel; imported lazily (pulls in triton)
        from unifattn.codegen.selector import SelectConfig
        return SelectConfig
    raise AttributeError(name)


# --------------------------------------------------------------------------- validation
@dataclass
class _Prep:
    B: int
    T: int
    HKV: int
    G: int
    dims: dict
    query: dict              # name -> [rows, HQ or 1, *dims]
    key: dict                # name -> [rows, HKV or 1, *dims] (per token, not yet pooled)
    seqs: list               # (first row, length)
    q_pos: torch.Tensor      # [rows] int64 CPU: position inside the sequence
    q_bblk: torch.Tensor     # [rows] int64 CPU: global column of the sequence's first column
    dev_pos: torch.Tensor    # q_pos, int32 on the inputs' device
    dev_bblk: torch.Tensor   # q_bblk, int32 on the inputs' device
    n_cols: int
    dtype: torch.dtype
    device: torch.device
    check: object            # () -> {input: largest |x|}: raises on NaN/inf inputs (reads the queued scan)


def _desc(x) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"


def _legend(sel: Selector, s) -> str:
    head = "HQ" if s.side == "query" else "HKV"
    return f"[{', '.join(('B', 'T') + s.shape)}] or [{', '.join(('B', 'T', head) + s.shape)}]"


def _prepare(sel: Selector, inputs: dict, cu_seqlens, topk, check_inputs: bool = True) -> tuple[_Prep, int]:
    if not isinstance(sel, Selector):
        validate.fail("sel", "a selector declared with @unifattn.dsl.selector.selector "
                      "(e.g. unifattn.selectors.lightning_indexer)", type(sel).__name__,
                      "pass the selector object first", TypeError)
    topk = sel.topk if topk is None else topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        validate.fail("topk", "a positive int", repr(topk), "e.g. topk=2048", TypeError)
    if topk < 1:
        validate.fail("topk", "a positive int", repr(topk), "e.g. topk=2048")
    if topk < sel.n_forced:
        validate.fail("topk", f"at least the {sel.n_forced} keys forced by always={sel.always!r}", str(topk),
                      f"pass topk >= {sel.n_forced}")
    names = [s.name for s in sel.inputs]
    for name in inputs:
        if name not in names:
            validate.fail(f"input '{name}'", f"one of the inputs of selector '{sel.name}': {names}", f"'{name}'",
                          f"drop it (select's own keywords are {RESERVED[1:]})", TypeError)
    B = T = None
    dims: dict = {}
    dims_from: dict = {}           # dimension name -> the input that set its size
    heads = {"query": None, "key": None}
    dtype = device = None
    for s in sel.inputs:
        x = inputs.get(s.name)
        if x is None:
            validate.fail(f"selector '{sel.name}'", f"input {s!r}", "nothing", f"pass {s.name}=... to the call",
                          TypeError)
        validate.check_tensor(s.name, x)
        if x.dtype not in _FLOATS:
            validate.fail(s.name, "a floating dtype (bf16, fp16, fp32, fp64)", _desc(x), f"cast with {s.name}.float()",
                          TypeError)
        if dtype is None:
            dtype, device, first = x.dtype, x.device, s.name
        elif x.dtype != dtype:
            validate.fail(s.name, f"the dtype of {first} ({dtype})", _desc(x), "cast every input to one dtype",
                          TypeError)
        elif x.device != device:
            validate.fail(s.name, f"the device of {first} ({device})", _desc(x), f"move it with .to('{device}')")
        n = len(s.shape)
        if x.dim() not in (2 + n, 3 + n):
            validate.fail(s.name, _legend(sel, s), _desc(x), f"reshape {s.name} to one of those layouts")
        if B is None:
            B, T = x.shape[0], x.shape[1]
        elif tuple(x.shape[:2]) != (B, T):
            validate.fail(s.name, f"batch and time [B, T] = [{B}, {T}] like {first}", _desc(x),
                          "pass every input for the same tokens")
        for d, size in zip(s.shape, x.shape[x.dim() - n:]):
            if dims.setdefault(d, size) != size:
                validate.fail(s.name, f"dimension {d} = {dims[d]} as in {dims_from[d]} {_desc(inputs[dims_from[d]])}",
                              _desc(x), f"every input typed with {d!r} must have the same size there: one of "
                              f"{dims_from[d]} and {s.name} is wrong")
            dims_from.setdefault(d, s.name)
        if x.dim() == 3 + n:
            h = x.shape[2]
            if heads[s.side] not in (None, h):
                validate.fail(s.name, f"{heads[s.side]} heads like the other {s.side}-side inputs", _desc(x),
                              "give every input of one side the same head count (or no head axis)")
            heads[s.side] = h
    for d, size in dims.items():
        if size < 1:
            validate.fail(f"dimension {d}", "a size >= 1", str(size), "check the input shapes")
    HQ, HKV = heads["query"], heads["key"] or 1
    if HQ is not None and HQ % HKV != 0:
        validate.fail("heads", f"query heads HQ a multiple of the KV heads HKV={HKV}", f"HQ={HQ}",
                      "use grouped query heads (HQ = HKV * G)")
    G = 1 if HQ is None else HQ // HKV
    # NaN/inf inputs: the scan is queued here, its verdict read by the caller (_Prep.check)
    pending = validate.finite_later({s.name: inputs[s.name] for s in sel.inputs}, amax=True) if check_inputs \
        else (lambda: None)

    # sequences: rows of the flattened [B * T] token axis
    if cu_seqlens is None:
        seqs = [(b * T, T) for b in range(B)]
    else:
        validate.check_tensor("cu_seqlens", cu_seqlens)
        if B != 1:
            validate.fail("inputs", "batch size 1 when cu_seqlens packs sequences", f"B={B}",
                          "concatenate the sequences along T")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            validate.fail("cu_seqlens", "a 1-D int32/int64 tensor [N + 1] of sequence starts", _desc(cu_seqlens),
                          "build it as torch.tensor([0, len0, len0 + len1, ...], dtype=torch.int32)")
        c = cu_seqlens.detach().cpu().tolist()
        if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
            validate.fail("cu_seqlens", f"non-decreasing offsets from 0 to T={T}",
                          str(c[:8]) + ("..." if len(c) > 8 else ""), "offsets are cumulative lengths from 0")
        seqs = [(a, b - a) for a, b in zip(c, c[1:])]
    n = sel.block_size
    lens = torch.tensor([L for _, L in seqs], dtype=torch.int64)
    ncols = (lens + n - 1) // n
    boff = torch.cumsum(ncols, 0) - ncols
    starts = torch.tensor([a for a, _ in seqs], dtype=torch.int64)
    q_pos = torch.arange(B * T, dtype=torch.int64) - torch.repeat_interleave(starts, lens)   # not a gather:
    q_bblk = torch.repeat_interleave(boff, lens)                                              # 1 ms at T=32768

    query, key = {}, {}
    for s in sel.inputs:
        x = inputs[s.name]
        hx = x.shape[2] if x.dim() == 3 + len(s.shape) else 1
        flat = x.reshape((B * T, hx) + tuple(x.shape[x.dim() - len(s.shape):]))
        (query if s.side == "query" else key)[s.name] = flat
    if cu_seqlens is None:     # built on the device: a pageable copy would stall the queue behind earlier work
        r = torch.arange(B * T, dtype=torch.int32, device=device)
        dev_pos, dev_bblk = r % max(T, 1), r // max(T, 1) * ((T + n - 1) // n)
    else:
        dev_pos, dev_bblk = q_pos.to(torch.int32).to(device), q_bblk.to(torch.int32).to(device)
    prep = _Prep(B, T, HKV, G, dims, query, key, seqs, q_pos, q_bblk, dev_pos, dev_bblk, int(ncols.sum()), dtype,
                 device, pending)
    return prep, topk


def _pool(p: _Prep, n: int, acc_dtype: torch.dtype) -> dict:
    """Key-side inputs per column: the tokens themselves (n == 1) or block means."""
    if n == 1:
        return {k: v.to(acc_dtype) for k, v in p.key.items()}
    col = (p.dev_bblk + p.dev_pos // n).long()
    cnt = torch.zeros(p.n_cols, dtype=acc_dtype, device=p.device).index_add_(
        0, col, torch.ones(col.numel(), dtype=acc_dtype, device=p.device))
    out = {}
    for name, x in p.key.items():
        s = torch.zeros((p.n_cols,) + tuple(x.shape[1:]), dtype=acc_dtype, device=p.device)
        s.index_add_(0, col, x.to(acc_dtype))
        out[name] = s / cnt.clamp(min=1).reshape((-1,) + (1,) * (x.dim() - 1))
    return out


# --------------------------------------------------------------------------- top-k of a tile
_BIG = 2 ** 31 - 1


def _exact_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k best scores of each row, ties to the lower column: top-k of int64 keys
    (order-preserving int32 image of the fp32 score) * 2^32 + (2^31 - 1 - column)."""
    bits = (s + 0.0).contiguous().view(torch.int32)             # + 0.0: -0.0 ties +0.0
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    col = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return torch.topk(mono * (1 << 32) + (_BIG - col), k, dim=-1, sorted=False).indices


def _topk_rows(s: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s [..., W] fp32 (-inf: not a candidate) -> (column [..., topk] int64, valid [..., topk])."""
    W = s.shape[-1]
    k = min(topk, W)
    vals, idx = torch.topk(s, k, dim=-1, sorted=False)
    # the k-th value decides alone unless it is tied with a score left out (+inf included: scores
    # that overflow tie there too; -inf is never kept, so ties there do not matter)
    thr = vals.min(-1, keepdim=True).values
    amb = ((thr > float("-inf")) & ((s >= thr).sum(-1, keepdim=True) > k)).squeeze(-1)
    if bool(amb.any()):
        where = amb.nonzero(as_tuple=True)
        sub = s[where]
        idx2 = _exact_topk(sub, k)
        idx[where] = idx2
        vals[where] = sub.gather(-1, idx2)
    valid = vals > float("-inf")
    if k < topk:
        pad = topk - k
        idx = torch.cat([idx, idx.new_zeros(idx.shape[:-1] + (pad,))], -1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[:-1] + (pad,))], -1)
    return idx, valid


def _finish(col: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sort kept columns ascending, invalid ones last as -1; int32."""
    col = torch.where(valid, col, torch.full_like(col, _BIG))
    col = torch.sort(col, dim=-1).values
    return torch.where(col == _BIG, torch.full_like(col, -1), col).to(torch.int32)


# --------------------------------------------------------------------------- kernel path
def _plan(sel: Selector, p: _Prep, config):
    """What the tile launches need, queued before select's sync: the module, the cast (and, for blocks,
    pooled) inputs, and the query tiles [(q0, q1, c0, W)]."""
    from unifattn.codegen import selector as cgs
    from unifattn.kernels.utils import interpreting
    cfg = config or cgs.SelectConfig()
    if not isinstance(cfg, cgs.SelectConfig):
        validate.fail("config", "a unifattn.select.SelectConfig", type(cfg).__name__, "pass SelectConfig(...)",
                      TypeError)
    if p.device.type != "cuda" and not interpreting():
        validate.fail("inputs", "CUDA tensors (the Triton kernels need a GPU)", f"tensors on {p.device}",
                      "move the inputs to cuda, or set TRITON_INTERPRET=1 to run on the CPU (slow); "
                      "select_reference runs anywhere")
    mod = cgs.module(sel)
    ct = torch.float32 if interpreting() or p.dtype == torch.float64 else p.dtype
    n, rows = sel.block_size, p.B * p.T
    keys = _pool(p, n, torch.float32 if n > 1 else ct)
    x = {}
    for name, t in list(p.query.items()) + list(keys.items()):
        t = t.to(ct).contiguous()
        inner = math.prod(t.shape[2:])
        x[name] = (t, t.shape[1] * inner, inner if t.shape[1] > 1 else 0)
    wmax = max(((L + n - 1) // n for _, L in p.seqs), default=1)
    qt = cfg.query_tile or max(cfg.block_t, (cfg.max_tile_elems // (p.HKV * max(wmax, 1))) // cfg.block_t
                               * cfg.block_t)
    tiles = []
    for q0 in range(0, rows, qt):
        q1 = min(rows, q0 + qt)
        c0 = int(p.q_bblk[q0])
        W = int(p.q_bblk[q1 - 1]) + int(p.q_pos[q1 - 1]) // n + 1 - c0     # through the last row's last column
        tiles.append((q0, q1, c0, W))
    prec = "ieee" if ct == torch.float32 else "tf32"
    return mod, x, tiles, prec, cfg


def _run_tiles(sel: Selector, p: _Prep, plan, on_tile, nan_flag=None, tiles=slice(None), pipe=None,
               finite: bool = False):
    """Score the plan's query tiles (those in the slice `tiles`) with the generated kernel; on_tile(q0, q1, c0,
    scores [HKV, nq, W]). nan_flag (int32 [1] or None): the kernel sets it when a candidate's score is NaN.
    pipe (a _Pipe or None): score into its buffers and run on_tile on its second stream. finite: the
    inputs' bound keeps every score finite (scores_finite), so the kernel leaves out its clamp."""
    from unifattn.kernels.utils import empty
    if plan is None:
        return
    mod, x, all_tiles, prec, cfg = plan
    for q0, q1, c0, W in all_tiles[tiles]:
        shape = (p.HKV, q1 - q0, W)
        o = empty(shape, torch.float32, p.device) if pipe is None else pipe.buffer(shape)
        mod.launch(x, o, p.dev_pos, p.dev_bblk, q0, c0, q1 - q0, W, p.HKV, p.G, p.dims, sel.block_size, sel.n_sink,
                   sel.n_local, prec, cfg, nan_flag, finite)
        if pipe is None:
            on_tile(q0, q1, c0, o)
        else:
            pipe.after(lambda q0=q0, q1=q1, c0=c0, o=o: on_tile(q0, q1, c0, o))


_SIDE_STREAMS: dict = {}
SIDE_PRIORITY = 0                 # the top-k stream's priority (benchmarks/bench_topk.py --select tries -1)


class _Pipe:
    """Tile i's top-k on a second CUDA stream while tile i + 1 is scored on the caller's.

    The scoring kernel (tensor cores, two programs an SM) and the top-k kernel (latency-bound, one to four
    programs an SM) then fill each other's idle SMs and ragged ends. Two fp32 score buffers, each the size
    of the plan's largest tile: tile i scores into buffer i % 2 after waiting, on the GPU (an event; the
    host does not wait), for the top-k of tile i - 2 that read it. join() (always called, also when the
    call raises half way) puts the caller's stream behind the second one, so that whatever comes after
    select() on the caller's stream, freeing these buffers and `out` included, waits for the top-k."""

    def __init__(self, device, tiles, HKV: int):
        key = (device, SIDE_PRIORITY)
        if key not in _SIDE_STREAMS:
            _SIDE_STREAMS[key] = torch.cuda.Stream(device, priority=SIDE_PRIORITY)
        self.main, self.side = torch.cuda.current_stream(device), _SIDE_STREAMS[key]
        self.side.wait_stream(self.main)                    # the top-k reads what the caller's stream wrote
        n = max(HKV * (q1 - q0) * W for q0, q1, _, W in tiles)
        self.bufs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(min(2, len(tiles)))]
        self.read = [None] * len(self.bufs)                 # the event after the last top-k that read each
        self.i = 0

    def buffer(self, shape) -> torch.Tensor:
        from unifattn.kernels.utils import poison_
        j = self.i % len(self.bufs)
        if self.read[j] is not None:
            self.main.wait_event(self.read[j])
        return poison_(self.bufs[j][:math.prod(shape)].view(shape))

    def after(self, fn) -> None:
        """fn() (the top-k of the tile just scored) on the second stream, behind that scoring."""
        scored = torch.cuda.Event()
        scored.record(self.main)
        self.side.wait_event(scored)
        with torch.cuda.stream(self.side):
            fn()
        done = torch.cuda.Event()
        done.record(self.side)
        self.read[self.i % len(self.bufs)] = done
        self.i += 1

    def join(self) -> None:
        self.main.wait_stream(self.side)


def _ahead(plan, share: float = 0.1) -> int:
    """How many of the plan's first tiles to queue before select's sync: those within `share` of all the
    tiles' scores (causal tiles grow), at least one, and never all (the host would wait for none)."""
    if plan is None or len(plan[2]) < 2:
        return 0
    work = [(q1 - q0) * W for q0, q1, _, W in plan[2]]
    n, acc = 1, work[0]
    while n < len(work) - 1 and acc + work[n] <= share * sum(work):
        acc += work[n]
        n += 1
    return n


def scores_finite(sel: Selector, amax: dict, dims: dict, G: int) -> bool:
    """Whether sel's fp32 scores are finite (so never NaN) for inputs with |x| <= amax: the bound of
    dsl.bounds on one (query head, key) score, times the G heads of a group summed."""
    from unifattn.dsl.bounds import FP32_MAX, MARGIN, score_bound
    b = score_bound(sel, amax, dims)
    return b is not None and b * G <= FP32_MAX / MARGIN


def select(sel: Selector, *, topk: int | None = None, cu_seqlens=None, config=None, check_inputs: bool = True,
           **inputs) -> torch.Tensor:
    """int32 [B, T, HKV, topk]: per query the kept keys (or key blocks), ascending, -1 padded.

    topk overrides the selector's; config is a SelectConfig (tile sizes); inputs by name.
    check_inputs: scan the inputs for NaN/inf (one read, in the launch that also takes each input's
    largest |x|) and make sure no score is NaN. One host sync reads the scan after the first of several
    query tiles is queued (with a NaN-score flag) and before the others: when the inputs' magnitudes bound the score
    far from fp32's overflow (dsl.bounds: scores of polynomials, relu, l2norm, bounded exps; the built-in
    selectors), no score can be NaN and the call returns with its kernels queued. Otherwise every tile
    flags NaN scores and a second sync reads the flag after them. False skips both, and a NaN score then ranks lowest (as in
    select_reference).
    Not differentiable (top-k has no gradient: train the scorer with a distillation loss).
    """
    p, topk = _prepare(sel, inputs, cu_seqlens, topk, check_inputs)
    from unifattn.kernels.utils import empty
    rows = p.B * p.T
    out = empty((rows, p.HKV, topk), torch.int32, p.device)
    bblk = p.dev_bblk
    impl = getattr(config, "topk_impl", "auto") if config is not None else "auto"
    if impl != "torch":
        from unifattn.kernels.topk import fits, topk_rows

    def on_tile(q0, q1, c0, s):
        if impl == "kernel" or (impl == "auto" and fits(s.shape[-1], topk)):
            topk_rows(s, out[q0:q1], bblk[q0:q1], c0, topk)               # ascending, -1 padded, in place
            return
        col, valid = _topk_rows(s, topk)                                     # [HKV, nq, topk]
        rel = col + (c0 - bblk[q0:q1])[None, :, None]                        # relative to the sequence start
        out[q0:q1] = _finish(rel, valid).permute(1, 0, 2)

    def new_flag():
        return torch.zeros(1, dtype=torch.int32, device=p.device)

    with torch.no_grad():
        plan = _plan(sel, p, config) if rows else None
        first = _ahead(plan) if check_inputs else 0
        pipe = None
        if plan is not None and p.device.type == "cuda" and plan[4].streams > 1 and len(plan[2]) > 1:
            pipe = _Pipe(p.device, plan[2], p.HKV)
        try:
            # the first (smallest) tiles go before the sync, flagged: the GPU works on them while the host
            # reads the scan (the sync waits for the scan only) and queues the rest
            nan_flag = new_flag() if first else None
            _run_tiles(sel, p, plan, on_tile, nan_flag, tiles=slice(0, first), pipe=pipe)
            finite = False
            if check_inputs:
                amax = p.check()                # the sync: NaN/inf inputs raise here, before their results leave
                finite = bool(rows) and scores_finite(sel, amax, p.dims, p.G)
                if rows and not finite:
                    nan_flag = new_flag() if nan_flag is None else nan_flag
                else:
                    nan_flag = None             # no score can be NaN: no flag, no clamp, and no second sync
            if rows:
                _run_tiles(sel, p, plan, on_tile, nan_flag, tiles=slice(first, None), pipe=pipe, finite=finite)
        finally:
            if pipe is not None:
                pipe.join()
    if nan_flag is not None and int(nan_flag.item()):   # the queue has drained: a 4-byte read
        validate.fail(f"selector '{sel.name}'", "finite scores for finite inputs", "NaN scores",
                      "make the score function finite everywhere (e.g. guard a log or a division: "
                      "log(relu(x) + eps)), or pass check_inputs=False to rank NaN scores lowest")
    return out.reshape(p.B, p.T, p.HKV, topk)


def select_scores(sel: Selector, *, cu_seqlens=None, config=None, **inputs) -> torch.Tensor:
    """The kernel's fp32 scores, dense: [B, T, HKV, C] with C the most columns of a sequence;
    -inf where a column is no candidate, +inf where `always` keeps it. O(T^2): for tests and inspection."""
    p, _ = _prepare(sel, inputs, cu_seqlens, None)
    p.check()
    n = sel.block_size
    C = max(((L + n - 1) // n for _, L in p.seqs), default=0)
    dense = torch.full((p.B * p.T, p.HKV, C), float("-inf"), dtype=torch.float32, device=p.device)
    bblk = p.q_bblk.tolist()

    def on_tile(q0, q1, c0, s):
        for r in range(q0, q1):                 # copy each row's own sequence columns
            a = bblk[r] - c0
            w = min(C, s.shape[-1] - a)
            dense[r, :, :w] = s[:, r - q0, a:a + w]

    with torch.no_grad():
        if p.B * p.T:
            _run_tiles(sel, p, _plan(sel, p, config), on_tile)
    return dense.reshape(p.B, p.T, p.HKV, C)


# --------------------------------------------------------------------------- reference
def _masks(L: int, C: int, sel: Selector, device):
    n = sel.block_size
    t = torch.arange(L, device=device)[:, None]
    j = torch.arange(C, device=device)[None, :]
    own = t // n
    cand = (j + 1) * n <= t + 1
    force = (j <= own) & ((j < sel.n_sink) | (own - j < sel.n_local))
    return cand, force


def reference_scores(sel: Selector, *, cu_seqlens=None, **inputs) -> torch.Tensor:
    """float64 dense scores [B, T, HKV, C], same layout and masks as select_scores; evaluates the
    selector's IR with torch for every (query, column) pair at once (small shapes only)."""
    from unifattn.reference import evaluate
    p, _ = _prepare(sel, inputs, cu_seqlens, None)
    p.check()
    f64, n = torch.float64, sel.block_size
    keys = _pool(p, n, f64)
    C = max(((L + n - 1) // n for _, L in p.seqs), default=0)
    dense = torch.full((p.B * p.T, p.HKV, C), float("-inf"), dtype=f64, device=p.device)
    fmax = torch.finfo(torch.float32).max
    for a, L in p.seqs:
        if L == 0:
            continue
        c0 = int(p.q_bblk[a])
        nc = (L + n - 1) // n
        env = {"__dtype__": f64, "__device__": p.device}
        for name, x in p.query.items():         # [L, HQ or 1, *d] -> [HKV or 1, G or 1, L, 1, *d]
            x = x[a:a + L].to(f64)
            h = x.shape[1]
            x = x.reshape((L, p.HKV, p.G) + tuple(x.shape[2:])) if h > 1 else x.reshape((L, 1, 1) + x.shape[2:])
            env[name] = x.movedim(0, 2).unsqueeze(3)
        for name, x in keys.items():            # [nc, HKV or 1, *d] -> [HKV or 1, 1, 1, nc, *d]
            env[name] = x[c0:c0 + nc].movedim(0, 1).unsqueeze(1).unsqueeze(1)
        s = evaluate(sel.score, env, {})
        s = s.expand(p.HKV, p.G, L, nc) if s.dim() == 4 else s.reshape(1, 1, 1, 1).expand(p.HKV, p.G, L, nc)
        s = s.sum(1)                                                          # [HKV, L, nc]
        s = torch.nan_to_num(s, nan=-fmax).clamp(-fmax, fmax)                 # as the kernel: finite, NaN lowest
        cand, force = _masks(L, nc, sel, p.device)
        s = torch.where(cand, s, float("-inf"))
        s = torch.where(force, float("inf"), s)
        dense[a:a + L, :, :nc] = s.permute(1, 0, 2)
    return dense.reshape(p.B, p.T, p.HKV, C)


def select_reference(sel: Selector, *, topk: int | None = None, cu_seqlens=None, **inputs) -> torch.Tensor:
    """The definition of select, in float64 and dense: stable descending sort of reference_scores,
    first topk that are candidates, ascending, -1 padded. For tests (O(T^2 * heads * dims) memory)."""
    p, topk = _prepare(sel, inputs, cu_seqlens, topk)
    p.check()
    s = reference_scores(sel, cu_seqlens=cu_seqlens, **inputs)               # [B, T, HKV, C]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :topk]
    valid = s.gather(-1, order) > float("-inf")
    if order.shape[-1] < topk:
        pad = topk - order.shape[-1]
        order = torch.cat([order, order.new_zeros(order.shape[:-1] + (pad,))], -1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[:-1] + (pad,))], -1)
    return _finish(order, valid)
