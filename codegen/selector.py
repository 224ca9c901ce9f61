"""Selector IR -> a Triton scoring kernel: scores of a tile of queries x key columns.

    module(sel)      -> the imported generated module (kernel + `launch`)
    source(sel)      -> its text (deterministic: same IR -> same bytes)
    source_path(sel) -> where it lives in the cache (written atomically if missing)

The score function of one (query, key) pair is printed over a [BT, BS] tile.
Values live in registers with these layouts (kinds):

    c    a constant                     literal or [1, 1]
    q    a per-query number             [BT, 1]
    k    a per-key number               [1, BS]
    p    a per-(query, key) number      [BT, BS]
    qv   a query vector over D          [BT, BD]   (lanes >= D hold 0)
    kv   a key vector over D            [BD, BS]   (loaded transposed: q @ k is tl.dot(qv, kv))

Indexer heads (Heads[...] inputs) are a loop `for i_h_H in range(NH_H)` opened by
the sum / '@' that reduces them; values that do not depend on the head are
computed before the loop, key-only values once per program (outside the loop
over the G query heads of a KV head). The printer owns no decisions: the
checker (dsl.selector.analyze) already rejected what has no tile form.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template

from unifattn.dsl import ir
from unifattn.dsl.selector import Selector, analyze

from . import cache
from .printer import Printer, literal

__all__ = ["SelectConfig", "source", "source_path", "module", "TEMPLATE_VERSION"]

TEMPLATE_VERSION = "score-4"
_FLT_MAX = "3.4028234663852886e+38"


@dataclass(frozen=True)
class SelectConfig:
    """Launch configuration of the scoring + top-k pipeline.

    block_t / block_s: queries / key columns per scoring program (>= 16, powers of 2). A program
        loads a [block_t, heads x dims] query block for block_s key columns, so its arithmetic
        intensity grows with block_s; 64 x 128 on 4 warps, 3 stages, was the fastest of eight
        shapes on the H200 (benchmarks/bench_select.py's docstring: scoring 3.04 ms against 3.52
        for 64 x 64 at T=32768).
    query_tile: queries scored before each top-k (None: as many as fit max_tile_elems).
    max_tile_elems: bound on HKV * query_tile * columns of each fp32 score buffer (two with streams=2).
    streams: 2 (on CUDA, with more than one query tile): each tile's top-k runs on a second stream while
        the next tile is scored (unifattn.select._Pipe; two score buffers of max_tile_elems at most); 1: one
        stream, one buffer.
    topk_impl: "kernel" (kernels.topk: one Triton program per row finds the k-th key bit by bit in
        registers and writes the kept columns in order), "torch" (torch.topk, tie repair, sort), or
        "auto" (the kernel where its rows fit, kernels.topk.fits; torch beyond). Same result: ties
        to the lower column.
    """
    block_t: int = 64
    block_s: int = 128
    num_warps: int = 4
    num_stages: int = 3
    query_tile: int | None = None
    max_tile_elems: int = 1 << 27
    topk_impl: str = "auto"
    streams: int = 2

    def __post_init__(self):
        for name in ("block_t", "block_s"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
                raise ValueError(f"SelectConfig.{name}: expected a power of two >= 16; got {v!r}. Fix: use 64")
        if self.topk_impl not in ("auto", "kernel", "torch"):
            raise ValueError(f"SelectConfig.topk_impl: expected 'auto', 'kernel' or 'torch'; got "
                             f"{self.topk_impl!r}. Fix: topk_impl='auto'")
        if self.streams not in (1, 2):
            raise ValueError(f"SelectConfig.streams: expected 1 or 2; got {self.streams!r}. Fix: streams=2")
        if self.query_tile is not None and not (isinstance(self.query_tile, int) and self.query_tile >= 1):
            raise ValueError(f"SelectConfig.query_tile: expected a positive int or None; got {self.query_tile!r}. "
                             "Fix: e.g. query_tile=256")


TEMPLATE = Template('''\
"""Scores of selector $name for one tile of queries x key columns (keys or key blocks).

Glossary
  rows        query tokens, batch and packed sequences flattened
  q0, NQ      first row and number of queries in this tile
  c0, W       first global key column and number of columns (a column is a key, or a block of BLOCK keys)
  q_pos       [rows] int32 position of a query inside its sequence
  q_bblk      [rows] int32 global column of its sequence's first key (block)
  o           [HKV, NQ, W] float32 scores: -inf not a causal candidate, +inf kept by `always`
  G           query heads per KV head; their scores are summed
  flags       int32 [1]: bit 0 set when CHECK and some candidate's score is NaN (read by select())
  FINITE      the inputs' magnitudes bound every score far below fp32's overflow (select() checked it):
              no clamp of inf / NaN scores
  BT, BS      queries / key columns per program
Inputs are [rows, heads, *dims] (query side) or [columns, heads, *dims] (key side),
contiguous; s_<x>_row / s_<x>_head are their strides (head stride 0: no head axis).

How it is parallelized: one program per (BT queries, BS key columns, KV head).
Key-side values are loaded once per program; the G query heads of the KV head,
and the indexer heads inside the score, are loops accumulating into [BT, BS].
"""
import triton
import triton.language as tl


@triton.jit
def $kernel(
    $ptrs,
    $strides,
    o, q_pos, q_bblk, q0, c0, NQ, W, flags,
    $dims
    G: tl.constexpr, BLOCK: tl.constexpr, NSINK: tl.constexpr, NLOCAL: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, CHECK: tl.constexpr, FINITE: tl.constexpr,
):
    i_t, i_s, i_hkv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_s = i_s * BS + tl.arange(0, BS)
    m_t = o_t < NQ
    m_s = o_s < W
    o_qrow = (q0 + o_t).to(tl.int64)
    o_krow = (c0 + o_s).to(tl.int64)
$features
    # where each query stands: its position in its sequence, its sequence's first column
    t_pos = tl.load(q_pos + q0 + o_t, mask=m_t, other=0)
    t_bblk = tl.load(q_bblk + q0 + o_t, mask=m_t, other=0)
    t_qblk = t_pos // BLOCK                       # the query's own block (its own key when BLOCK == 1)
    acc = tl.zeros([BT, BS], dtype=tl.float32)
    # programs right of every query's last column score nothing
    if c0 + i_s * BS <= tl.max(tl.where(m_t, t_bblk + t_qblk, -1), axis=0):
$pre
        for i_g in range(G):
            i_hq = i_hkv * G + i_g
$body
$accumulate
    # The [BT, BS] masks only now, after the loop, with per-row bounds: the scoring is bound by this
    # epilogue's CUDA-core work (the head loop's relu and add come to 2 of its ~3 instructions per score),
    # and masks built before the loop stayed live through it (H200, T=32768, benchmarks/ab_score_pipeline.py).
    # A candidate column c (relative to the sequence start: c - t_bblk) is a block with no key after t,
    # (c - t_bblk + 1) * BLOCK <= t_pos + 1, so  t_bblk <= c <= t_bblk + (t_pos + 1) // BLOCK - 1;
    # the query's partial block comes in only through `always`.
    c_s = c0 + o_s
    m_cand = (c_s[None, :] >= t_bblk[:, None]) & (c_s[None, :] <= (t_bblk + (t_pos + 1) // BLOCK - 1)[:, None])
    if CHECK:                                     # a NaN score of finite inputs: select() raises
        # a max over each row (within a warp) and one relaxed atomic per row that saw a NaN (none in a
        # program that scores nothing: acc = 0). H200, T=32768 (benchmarks/ab_nan_flag.py): scoring 3.50 ms
        # against 3.62-3.64 for a count over the whole tile in every program, 3.85 for a masked atomic
        # per element, 3.06-3.09 with no flag.
        m_nan = m_cand & (acc != acc) & m_t[:, None] & m_s[None, :]
        n_row = tl.max(m_nan.to(tl.int32), axis=1)
        tl.atomic_or(flags + tl.zeros([BT], dtype=tl.int32), 1, mask=n_row > 0, sem="relaxed")
    if FINITE:                                    # the inputs' bound keeps every score finite (select())
        sc = acc
    else:
        # unchecked, NaN ranks lowest but stays a candidate (tl.maximum is fmax: of NaN and -max it gives
        # -max); +-inf are reserved for the masks below
        sc = tl.minimum(tl.maximum(acc, -$fmax), $fmax)
    sc = tl.where(m_cand, sc, float('-inf'))
    if NSINK + NLOCAL > 0:
        rel = c_s[None, :] - t_bblk[:, None]
        m_force = (rel >= 0) & (rel <= t_qblk[:, None]) & ((rel < NSINK) | (t_qblk[:, None] - rel < NLOCAL))
        sc = tl.where(m_force, float('inf'), sc)
    p_o = o + (i_hkv * NQ + o_t[:, None]).to(tl.int64) * W + o_s[None, :]
    tl.store(p_o, sc, mask=m_t[:, None] & m_s[None, :])


def launch(x, o, q_pos, q_bblk, q0, c0, NQ, W, HKV, G, dims, BLOCK, NSINK, NLOCAL, PREC, cfg, flags=None,
           finite=False):
    """x: input name -> (tensor, row stride, head stride); dims: dimension name -> size; flags: an int32 [1]
    tensor to flag NaN scores in, or None (no check); finite: every score is known finite (the inputs'
    bound, dsl.bounds): no clamp of inf / NaN scores."""
    grid = (triton.cdiv(NQ, cfg.block_t), triton.cdiv(W, cfg.block_s), HKV)
    $kernel[grid](
        $call_ptrs,
        $call_strides,
        o, q_pos, q_bblk, q0, c0, NQ, W, o if flags is None else flags,
        $call_dims
        G=G, BLOCK=BLOCK, NSINK=NSINK, NLOCAL=NLOCAL, BT=cfg.block_t, BS=cfg.block_s, PREC=PREC,
        CHECK=flags is not None, FINITE=finite,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
''')


# --------------------------------------------------------------------------- the tile printer
@dataclass
class _Val:
    expr: str
    kind: str                   # c q k p qv kv
    dim: str | None = None      # feature dimension of qv / kv
    raw: bool = False           # a load in the input dtype (fed to tl.dot as is)
    direct: bool = False        # a head sum accumulated into the program's acc (the score itself)


class _Block:
    _count = 0

    def __init__(self, indent: int, head: str | None = None):
        self.indent, self.head, self.lines, self.last = indent, head, [], None
        self.var = f"i_h_{head}" if head else None
        _Block._count += 1
        self.uid = _Block._count              # memo key: ids of dead loops could be reused


_SHAPE = {"c": "[1, 1]", "q": "[BT, 1]", "k": "[1, BS]", "p": "[BT, BS]"}


def _shape(v: _Val) -> str:
    if v.kind == "qv":
        return f"[BT, BD_{v.dim}]"
    if v.kind == "kv":
        return f"[BD_{v.dim}, BS]"
    return _SHAPE[v.kind]


def _combine(vals) -> tuple[str, str | None]:
    """Kind of an element-wise result (the checker guarantees vectors stay on one side)."""
    for v in vals:
        if v.kind in ("qv", "kv"):
            return v.kind, v.dim
    kinds = {v.kind for v in vals}
    if "p" in kinds or {"q", "k"} <= kinds:
        return "p", None
    return ("q" if "q" in kinds else "k" if "k" in kinds else "c"), None


class _Emitter:
    def __init__(self, sel: Selector):
        self.sel, self.info = sel, analyze(sel)
        self.pre, self.body = _Block(2), _Block(3)
        self.memo: dict = {}
        self.used: set = set()
        self.src = sel.source.splitlines()
        self.stmt_names = {}
        for st in sel.statements:
            self.stmt_names.setdefault(id(st.node), st.target)
        self.specs = {s.name: s for s in sel.inputs}
        self.root = id(sel.score)     # a score that is itself a head sum accumulates straight into acc

    # ---------------------------------------------------------------- helpers
    def _name(self, base: str) -> str:
        i, name = 1, f"b_{base}"
        while name in self.used:
            i += 1
            name = f"b_{base}{i}"
        self.used.add(name)
        return name

    def _emit(self, blk: _Block, n: ir.Node, expr: str, kind: str, dim=None, raw=False, base=None) -> _Val:
        if n.line and n.line != blk.last:
            k = n.line - self.sel.line
            text = self.src[k].strip() if 0 <= k < len(self.src) else ""
            blk.lines.append(f"# line {n.line}: {text}")
            blk.last = n.line
        var = self._name(self.stmt_names.get(id(n)) or base or n.op)
        if kind == "qv" and not raw:
            expr = f"tl.where(m_d_{dim}[None, :], {expr}, 0.0)"
        elif kind == "kv" and not raw:
            expr = f"tl.where(m_d_{dim}[:, None], {expr}, 0.0)"
        blk.lines.append(f"{var} = {expr}" + (f"  # {_shape(_Val('', kind, dim))}" if kind in ("qv", "kv") else ""))
        return _Val(var, kind, dim, raw)

    @staticmethod
    def _f32(v: _Val) -> str:
        return f"{v.expr}.to(tl.float32)" if v.raw else v.expr

    def _block(self, n: ir.Node, loop: _Block | None):
        inf = self.info[id(n)]
        if inf.head is not None:
            assert loop is not None and loop.head == inf.head, (ir.to_text(n), inf)
            return loop, (id(n), loop.uid)
        return (self.body if "query" in inf.sides else self.pre), (id(n), None)

    # ---------------------------------------------------------------- values
    def value(self, n: ir.Node, loop: _Block | None = None) -> _Val:
        blk, key = self._block(n, loop)
        if key not in self.memo:
            self.memo[key] = self._value(n, blk)
        return self.memo[key]

    def _value(self, n: ir.Node, blk: _Block) -> _Val:
        op, inf = n.op, self.info[id(n)]
        if op == "input":
            return self._load(n, blk)
        if op == "const":
            return _Val(literal(n.value), "c")
        if op == "transpose":
            return self.value(n.args[0], blk if blk.head else None)
        if inf.contracts_head:
            return self._head_sum(n, blk)
        args = [self.value(a, blk if blk.head else None) for a in n.args]
        if op in ir.BINARY or op in ir.UNARY or op == "pow":
            names = {}
            for a, v in zip(n.args, args):
                wrap = v.kind == "c" and (op in ir.UNARY or op == "pow")   # tl.exp(2.0) needs a tensor
                names[id(a)] = f"tl.full([1, 1], {v.expr}, tl.float32)" if wrap else self._f32(v)
            kind, dim = _combine(args)
            return self._emit(blk, n, Printer(names)(n), kind, dim)
        if op == "sum":                                       # over a feature dimension
            (x,) = args
            if x.kind == "qv":
                return self._emit(blk, n, f"tl.sum({self._f32(x)}, axis=1)[:, None]", "q")
            return self._emit(blk, n, f"tl.sum({self._f32(x)}, axis=0)[None, :]", "k")
        if op == "l2norm":
            (x,) = args
            xs = self._f32(x)
            if x.kind == "qv":
                norm = f"tl.sqrt(tl.sum({xs} * {xs}, axis=1)[:, None] + {literal(ir.L2NORM_EPS)})"
            else:
                norm = f"tl.sqrt(tl.sum({xs} * {xs}, axis=0)[None, :] + {literal(ir.L2NORM_EPS)})"
            return self._emit(blk, n, f"{xs} / {norm}", x.kind, x.dim)
        if op == "matmul":                                    # a dot product over a feature dimension
            a, b = args
            if {a.kind, b.kind} == {"qv", "kv"}:
                qv, kv = (a, b) if a.kind == "qv" else (b, a)
                ops = (qv.expr, kv.expr) if qv.raw and kv.raw else (self._f32(qv), self._f32(kv))
                return self._emit(blk, n, f"tl.dot({ops[0]}, {ops[1]}, input_precision=PREC)", "p", base="dot")
            axis, kind = (1, "q") if a.kind == "qv" else (0, "k")
            sl = "[:, None]" if kind == "q" else "[None, :]"
            return self._emit(blk, n, f"tl.sum({self._f32(a)} * {self._f32(b)}, axis={axis}){sl}", kind, base="dot")
        raise AssertionError(f"no tile form for {op}")   # pragma: no cover - analyze() rejects the rest

    def _load(self, n: ir.Node, blk: _Block) -> _Val:
        s = self.specs[n.name]
        query = s.side == "query"
        row, hd, m_row = ("o_qrow", "i_hq", "m_t") if query else ("o_krow", "i_hkv", "m_s")
        off = f"{n.name}_ptr + {row}{{r}} * s_{n.name}_row + {hd} * s_{n.name}_head"
        feats = [d for d in s.shape if d not in self.sel.head_dims]
        if s.heads:
            inner = f" * D_{feats[0]}" if feats else ""
            off += f" + {blk.var}{inner}"
        if not feats:                                          # one number per row (and head)
            ptr = off.format(r="")
            expr = f"tl.load({ptr}, mask={m_row}, other=0.0).to(tl.float32)" + ("[:, None]" if query else "[None, :]")
            return self._emit(blk, n, expr, "q" if query else "k", base=n.name)
        d = feats[0]
        if query:
            ptr = off.format(r="[:, None]") + f" + o_d_{d}[None, :]"
            expr = f"tl.load({ptr}, mask={m_row}[:, None] & m_d_{d}[None, :], other=0.0)"
            return self._emit(blk, n, expr, "qv", d, raw=True, base=n.name)
        ptr = off.format(r="[None, :]") + f" + o_d_{d}[:, None]"
        expr = f"tl.load({ptr}, mask=m_d_{d}[:, None] & {m_row}[None, :], other=0.0)"
        return self._emit(blk, n, expr, "kv", d, raw=True, base=n.name)

    def _head_sum(self, n: ir.Node, blk: _Block) -> _Val:
        """sum over an indexer head dimension H: a loop over H accumulating the per-head term."""
        H = n.args[0].shape[0] if n.op == "sum" else n.args[0].shape[-1]
        loop = _Block(blk.indent + 1, H)
        loop.last = n.line                     # the line is commented once, above the loop
        if n.op == "sum":
            term = self.value(n.args[0], loop)
        else:                                                  # '@' contracting H: sum_h a_h * b_h
            a, b = (self.value(x, loop) for x in n.args)
            kind, dim = _combine([a, b])
            prod = ir.Node("mul", n.args, (), line=n.line)
            term = self._emit(loop, prod, f"{self._f32(a)} * {self._f32(b)}", kind, dim, base="term")
        # the whole score: the loop adds into the program's acc (one [BT, BS] fp32 tile fewer in
        # registers, the same additions in the same order for G = 1)
        direct = id(n) == self.root and blk is self.body and term.kind == "p"
        acc = "acc" if direct else self._name(self.stmt_names.get(id(n)) or "sum")
        if n.line and n.line != blk.last:
            k = n.line - self.sel.line
            blk.lines.append(f"# line {n.line}: {self.src[k].strip() if 0 <= k < len(self.src) else ''}")
            blk.last = n.line
        if not direct:
            blk.lines.append(f"{acc} = tl.zeros({_shape(term)}, dtype=tl.float32)")
        blk.lines.append(f"for {loop.var} in range(NH_{H}):")
        blk.lines += ["    " + ln for ln in loop.lines]
        blk.lines.append(f"    {acc} += {self._f32(term)}")
        return _Val(acc, term.kind, term.dim, direct=direct)


# --------------------------------------------------------------------------- emit / cache
def kernel_name(sel: Selector) -> str:
    return f"{sel.name}_score_fwd"


def _dims(sel: Selector) -> tuple[list[str], list[str]]:
    feats, heads = [], []
    for s in sel.inputs:
        for d in s.shape:
            lst = heads if d in sel.head_dims else feats
            if d not in lst:
                lst.append(d)
    return feats, heads


def _header(sel: Selector, digest: str) -> str:
    from unifattn import __version__
    lines = [
        f"# generated by unifattn {__version__} from selector {sel.name} ({sel.file}:{sel.line}) "
        "-- edit the selector, not this file",
        f"# topk {sel.topk}; granularity {sel.granularity!r}; always {sel.always!r}; "
        f"template {TEMPLATE_VERSION}; hash {digest}",
        "#", "# selector source:",
    ] + [f"#   {ln}".rstrip() for ln in sel.source.rstrip().splitlines()]
    return "\n".join(lines) + "\n"


def _digest(sel: Selector) -> str:
    return cache.key(sel.ir_text(), f"{sel.file}:{sel.line}", TEMPLATE.template, TEMPLATE_VERSION)


def source(sel: Selector) -> str:
    """The generated module text; same selector IR -> byte-identical text."""
    em = _Emitter(sel)
    score = em.value(sel.score)
    feats, heads = _dims(sel)
    ind2, ind3 = " " * 8, " " * 12
    pre = [ind2 + "# key side: shared by the G query heads of KV head i_hkv"] + [ind2 + ln for ln in em.pre.lines]
    names = [s.name for s in sel.inputs]
    digest = _digest(sel)
    text = TEMPLATE.substitute(
        name=sel.name, kernel=kernel_name(sel), fmax=_FLT_MAX,
        ptrs=", ".join(f"{x}_ptr" for x in names),
        strides=", ".join(f"s_{x}_row, s_{x}_head" for x in names),
        dims=" ".join([f"D_{d}: tl.constexpr, BD_{d}: tl.constexpr," for d in feats]
                      + [f"NH_{h}: tl.constexpr," for h in heads]),
        features="\n".join(f"    o_d_{d} = tl.arange(0, BD_{d})\n    m_d_{d} = o_d_{d} < D_{d}" for d in feats),
        pre="\n".join(pre), body="\n".join(ind3 + ln for ln in em.body.lines),
        accumulate=ind3 + ("# (the head loop above adds into acc)" if score.direct else f"acc += {score.expr}"),
        call_ptrs=", ".join(f"x[{x!r}][0]" for x in names),
        call_strides=", ".join(f"x[{x!r}][1], x[{x!r}][2]" for x in names),
        call_dims=" ".join([f"D_{d}=dims[{d!r}], BD_{d}=max(16, triton.next_power_of_2(dims[{d!r}]))," for d in feats]
                           + [f"NH_{h}=dims[{h!r}]," for h in heads]),
    )
    return _header(sel, digest) + text


def source_path(sel: Selector) -> Path:
    """The generated file in the cache directory (written atomically when missing or different)."""
    text = source(sel)
    path = cache.path_for(kernel_name(sel), _digest(sel))
    if not path.exists() or path.read_text() != text:
        cache.write(path, text)
    return path


_LOADED: dict = {}


def module(sel: Selector):
    """The imported generated module of sel (generated, written and imported once per process)."""
    if id(sel) not in _LOADED:
        _LOADED[id(sel)] = (sel, cache.load(source_path(sel)))   # keep sel alive: ids are not reused
    return _LOADED[id(sel)][1]
