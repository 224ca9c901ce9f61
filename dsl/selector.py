"""The selector DSL: how a query scores keys (or key blocks) and how many it keeps.

    @selector(topk=2048, granularity="token")   # optional: always=(sink(4), local(64))
    def lightning_indexer(qi: Heads["HI", "DI"], ki: Vec["DI"], w: Heads["HI"]):
        return sum_heads(w * relu(qi @ ki))          # I_ts = sum_j w_tj relu(q_tj . k_s)

    @selector(topk=16, granularity=block(64), always=(local(1),))
    def moba(q: Vec["D"], kmean: Vec["D"]):          # block score vs mean-pooled keys
        return q @ kmean

A selector is a pure function of ONE query position and ONE key (or key block)
that returns a scalar score; selection keeps, for every query t, the `topk`
causal keys with the highest scores (plus the `always` ones).

Query side vs key side. Every input belongs to one side:
  - `keys=("ki",)` on @selector names the key-side inputs explicitly;
  - without it, the inputs whose name starts with "k" (k, ki, kmean, k_idx) are
    key-side and all the others query-side.
There must be at least one of each, and the score must combine them.

Input types:
  Vec["D"]          a per-token vector           tensor [B, T, (H,) D]
  Scalar            a per-token number           tensor [B, T, (H,)]
  Heads["H", "D"]   one D-vector per indexer head tensor [B, T, (H,) H_, D]
  Heads["H"]        one number per indexer head  tensor [B, T, (H,) H_]
The optional (H,) axis is the attention head axis (query heads on the query
side, KV heads on the key side; see unifattn.select). An indexer head dimension
(the first name in Heads[...]) is reduced inside the score, by `sum_heads(x)` or
by an `@` that contracts it (`w @ relu(qi @ ki)`).

With granularity=block(n) the key side describes a block of n keys: each
key-side input is passed per token and the op mean-pools it over each block
(MoBA: `kmean` is passed as the keys k and becomes mean(K_block)).

Tracing reuses the rule DSL (dsl/rule.py): the same symbolic values, primitives
and line stamping; `analyze` then checks what a Triton tile can compute:
vector-valued expressions stay on one side, query and key meet only through
'@' (a dot product) or as scalars. Errors are RuleError with the source line.
"""
from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass

from . import ir
from .errors import RuleError
from .rule import (InputType, Scalar, Sym, Vec, _describe, _fail, _lift, _line, _T, check_params, exp, ir_lines,
                   l2norm, log, logsigmoid, relu, require_def, run_traced, sigmoid, softplus, source_of, sqrt,
                   statements_of, vsum)

__all__ = ["selector", "Selector", "SelectorInput", "Heads", "Vec", "Scalar", "sum_heads", "relu", "exp", "log",
           "sqrt", "sigmoid", "softplus", "logsigmoid", "l2norm", "vsum", "block", "sink", "local", "Block",
           "Sink", "Local", "analyze", "RESERVED"]

# keyword arguments of unifattn.select: no selector input may take these names
RESERVED = ("sel", "topk", "cu_seqlens", "config", "check_inputs")


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class Block:
    """granularity=block(n): keys are selected n at a time (block j = keys [j*n, (j+1)*n))."""
    size: int

    def __post_init__(self):
        _positive("block(n)", self.size)

    def __repr__(self) -> str:
        return f"block({self.size})"


@dataclass(frozen=True)
class Sink:
    """always=(sink(n),): the first n keys (or blocks) of the sequence are always kept."""
    n: int

    def __post_init__(self):
        _positive("sink(n)", self.n)

    def __repr__(self) -> str:
        return f"sink({self.n})"


@dataclass(frozen=True)
class Local:
    """always=(local(n),): the n most recent keys (or blocks), the query's own included, are always kept."""
    n: int

    def __post_init__(self):
        _positive("local(n)", self.n)

    def __repr__(self) -> str:
        return f"local({self.n})"


def _positive(what: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: expected a positive int; got {n!r}. Fix: e.g. {what.split('(')[0]}(64)")
    return n


def block(n: int) -> Block:
    return Block(n)


def sink(n: int = 1) -> Sink:
    return Sink(n)


def local(n: int = 1) -> Local:
    return Local(n)


# ------------------------------------------------------------------ input types
@dataclass(frozen=True)
class HeadsType:
    shape: tuple[str, ...]          # (H,) or (H, D); H is an indexer head dimension

    def __repr__(self) -> str:
        return f"Heads[{', '.join(map(repr, self.shape))}]"


class _HeadsMeta(type):
    def __getitem__(cls, dims):
        dims = dims if isinstance(dims, tuple) else (dims,)
        if len(dims) not in (1, 2) or not all(isinstance(d, str) for d in dims) or len(set(dims)) != len(dims):
            raise TypeError(f"Heads takes a head dimension and optionally a feature dimension, "
                            f"e.g. Heads['HI', 'DI'] or Heads['HI']; got Heads[{dims!r}]")
        return HeadsType(tuple(dims))


class Heads(metaclass=_HeadsMeta):
    """Per-token values, one per indexer head: `qi: Heads["HI", "DI"]`, `w: Heads["HI"]`."""


@dataclass(frozen=True)
class SelectorInput:
    name: str
    side: str                       # "query" | "key"
    shape: tuple[str, ...]          # () scalar, (D,), (H,), (H, D)
    heads: bool                     # declared with Heads[...]

    def __repr__(self) -> str:
        t = repr(HeadsType(self.shape)) if self.heads else repr(InputType("token", self.shape))
        return f"{self.name}: {t} ({self.side})"


# ------------------------------------------------------------------ the Selector
@dataclass(frozen=True, eq=False)
class Selector:
    """A traced selector: inputs (with their side), statements and the score (IR)."""
    name: str
    doc: str
    topk: int
    block_size: int                 # 1 for granularity="token"
    always: tuple                   # of Sink / Local
    inputs: tuple[SelectorInput, ...]
    head_dims: tuple[str, ...]
    statements: tuple[ir.Statement, ...]
    score: ir.Node
    file: str
    line: int
    source: str

    def __repr__(self) -> str:
        return f"<selector {self.name} ({self.file}:{self.line})>"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def granularity(self):
        return "token" if self.block_size == 1 else Block(self.block_size)

    @property
    def n_sink(self) -> int:
        return max((a.n for a in self.always if isinstance(a, Sink)), default=0)

    @property
    def n_local(self) -> int:
        return max((a.n for a in self.always if isinstance(a, Local)), default=0)

    @property
    def n_forced(self) -> int:
        """Most keys (blocks) `always` can force for one query."""
        return self.n_sink + self.n_local

    def side(self, name: str) -> str:
        return next(i.side for i in self.inputs if i.name == name)

    def ir_text(self) -> str:
        """Canonical text of the IR: same selector -> same text (cache keys, golden tests)."""
        lines = [f"selector {self.name} topk={self.topk} granularity={self.granularity!r} always={self.always!r}"]
        lines += [f"input {i!r}" for i in self.inputs]
        lines += ir_lines(self.statements, (self.score,))
        return "\n".join(lines)


# ------------------------------------------------------------------ primitives
class _Active:
    head_dims: tuple[str, ...] | None = None     # set while a selector is traced


_S = _Active()


def sum_heads(x):
    """Sum over the indexer heads: sum_heads(w * relu(qi @ ki)) = sum_j w_j relu(qi_j . ki)."""
    x = _lift(x)
    if len(x.node.shape) != 1 or (_S.head_dims is not None and x.node.shape[0] not in _S.head_dims):
        got = "a scalar" if not x.node.shape else f"a value of shape {list(x.node.shape)}"
        _fail("a per-head vector (its dimension the first name of a Heads[...] input)", got,
              "sum_heads reduces an indexer-head dimension; use vsum(x) for a feature vector")
    return Sym(ir.vsum(x.node, _line()))


# ------------------------------------------------------------------ decorator
def selector(topk: int, granularity="token", always=(), keys=None):
    """Declare a selector. The function is traced once, now.

    topk: keys (or blocks) kept per query; granularity: "token" or block(n);
    always: sink(n) / local(n) keys kept regardless of score (counted in topk);
    keys: names of the key-side inputs (default: the inputs whose name starts with "k").
    """
    topk = _positive("selector(topk)", topk)
    if granularity == "token":
        bs = 1
    elif isinstance(granularity, Block):
        bs = granularity.size
    else:
        raise TypeError(f"selector(granularity=...): expected \"token\" or block(n); got {granularity!r}. "
                        "Fix: granularity=block(64) selects blocks of 64 keys")
    always = tuple(always) if isinstance(always, (tuple, list)) else (always,)
    for a in always:
        if not isinstance(a, (Sink, Local)):
            raise TypeError(f"selector(always=...): expected sink(n) / local(n) entries; got {a!r}. "
                            "Fix: always=(sink(4), local(64))")
    kinds = [type(a) for a in always]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"selector(always=...): expected at most one sink and one local; got {always!r}. "
                         "Fix: merge them, e.g. local(64) instead of (local(1), local(64))")
    forced = sum(a.n for a in always)
    if forced > topk:
        raise ValueError(f"selector(always=...): expected at most topk={topk} forced keys; got {forced}. "
                         "Fix: raise topk or shrink sink/local")
    if keys is not None:
        keys = (keys,) if isinstance(keys, str) else keys
        if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"selector(keys=...): expected the names of the key-side inputs; got {keys!r}. "
                            "Fix: keys=('ki',) or keys='ki'")
        keys = tuple(dict.fromkeys(keys))

    def deco(fn):
        return trace(fn, topk, bs, always, keys)
    return deco


def _where(fn) -> str:
    return f"{inspect.getsourcefile(fn) or '?'}:{fn.__code__.co_firstlineno}"


def _annotation(fn, name, ann):
    if isinstance(ann, str):
        try:
            ann = eval(ann, fn.__globals__, {"Vec": Vec, "Scalar": Scalar, "Heads": Heads})
        except Exception as e:  # noqa: BLE001 - reported as a RuleError
            raise RuleError(fn.__name__, _where(fn), f"a type for input '{name}'", f"{ann!r} ({e})",
                            "annotate with Vec['D'], Scalar, Heads['H', 'D'] or Heads['H']") from None
    if isinstance(ann, HeadsType):
        return ann.shape, True
    if isinstance(ann, InputType) and ann.kind == "token":
        return ann.shape, False
    got = "none" if ann is inspect.Parameter.empty else repr(ann)
    raise RuleError(fn.__name__, _where(fn), f"a per-token type on selector input '{name}'", got,
                    f"write e.g. `{name}: Vec['D']`, `{name}: Heads['H', 'D']` or `{name}: Scalar` "
                    "(selectors have no Param inputs)")


def trace(fn, topk: int, block_size: int = 1, always=(), keys=None) -> Selector:
    require_def(fn, "selector")
    name = fn.__name__
    file, src_lines, first = source_of(fn)
    where = f"{file}:{first}"
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    check_params(fn, params, RESERVED, "unifattn.select", where)
    if keys is None:
        keyside = [n for n in names if n.startswith("k")]
        how = "no input name starts with 'k' (the default key-side convention)"
    else:
        unknown = [k for k in keys if k not in names]
        if unknown:
            raise RuleError(name, where, f"keys=... naming inputs of the selector {names}", f"{unknown}",
                            "spell the key-side inputs as in the signature")
        keyside = list(keys)
        how = "keys=() is empty"
    if not keyside or len(keyside) == len(names):
        got = how if not keyside else f"every input key-side ({keyside})"
        raise RuleError(name, where, "query-side inputs and key-side inputs", got,
                        "name key-side inputs with a leading 'k' (ki, kmean) or pass keys=('ki',) to @selector")

    specs = []
    for p in params:
        shape, heads = _annotation(fn, p.name, p.annotation)
        specs.append(SelectorInput(p.name, "key" if p.name in keyside else "query", shape, heads))
    for s in specs:
        for d in s.shape:
            if not d.isidentifier():
                raise RuleError(name, where, "dimension names that are Python identifiers", f"{d!r} in {s!r}",
                                "name dimensions like 'D', 'HI', 'DI'")
    head_dims = tuple(dict.fromkeys(s.shape[0] for s in specs if s.heads))
    for s in specs:
        feature = s.shape[-1] if s.shape and not (s.heads and len(s.shape) == 1) else None
        if feature in head_dims:       # Heads['H', 'D'] or Vec['D'] with D also an indexer-head dimension
            raise RuleError(name, where, f"a feature dimension in '{s.name}' that is not an indexer-head dimension",
                            f"{s!r}: {feature!r} is also a head dimension",
                            "use different names for indexer heads and features, e.g. Heads['HI', 'DI']")

    args = {s.name: Sym(ir.Node("input", shape=s.shape, name=s.name)) for s in specs}
    positional = tuple(args.pop(p.name) for p in params if p.kind == p.POSITIONAL_ONLY)
    _T.rule, _T.code, _T.file, _T.first_line = name, fn.__code__, file, first
    _S.head_dims = head_dims
    try:
        result, recorder = run_traced(fn, positional, args, [], "unifattn.dsl.selector")
    finally:
        _S.head_dims = None

    ret = recorder.return_line or first + len(src_lines) - 1
    if not isinstance(result, Sym) or result.node.shape != ():
        got = ("nothing (no return)" if result is None else _describe(result) if not isinstance(result, Sym)
               else f"a value of shape {list(result.node.shape)}")
        raise RuleError(name, f"{file}:{ret}", "`return score` with a scalar score", got,
                        "reduce to a scalar: q @ k for vectors, sum_heads(...) over Heads dimensions")
    src = textwrap.dedent("".join(src_lines))
    stmts = statements_of(recorder, src_lines, first)
    sel = Selector(name, inspect.getdoc(fn) or "", topk, block_size, tuple(always), tuple(specs), head_dims,
                   stmts, result.node, file, first, src)
    used = ir.leaves(sel.score, "input")
    for s in specs:
        if s.name not in used:
            raise RuleError(name, f"{file}:{ret}", "every input to reach the score", f"input '{s.name}' is never used",
                            f"use '{s.name}' in the score or remove it from the signature")
    info = analyze(sel)
    # every input is used and both sides have one, so the score combines them
    assert info[id(sel.score)].sides == {"query", "key"}
    return sel


# ------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Info:
    """What a node is per (query, key) pair once indexer heads are looped over."""
    sides: frozenset                # subset of {"query", "key"}
    head: str | None                # free indexer-head dimension (evaluated inside that head loop)
    feature: str | None             # feature dimension of a vector value, None for a scalar
    contracts_head: bool = False    # a sum / '@' that reduces a head dimension (a loop over heads)


def analyze(sel: Selector) -> dict[int, Info]:
    """Per-node Info; raises RuleError where a value cannot live in a [queries, keys] tile."""
    side = {s.name: s.side for s in sel.inputs}
    hd = set(sel.head_dims)
    out: dict[int, Info] = {}

    def bad(n, expected, got, fix):
        raise RuleError(sel.name, f"{sel.file}:{n.line or sel.line}", expected, got, fix)

    for n in ir.walk([sel.score]):
        if n.op in ("outer", "diag", "state", "param"):
            bad(n, "dot products, element-wise maths and sums", f"{n.op}(...)",
                "a score is a scalar per (query, key): use '@' between vectors, sum_heads over heads")
        heads = [d for d in n.shape if d in hd]
        feats = [d for d in n.shape if d not in hd]
        if len(heads) > 1 or len(feats) > 1:
            bad(n, "vectors (optionally one per indexer head)", f"a value of shape {list(n.shape)} ({ir.to_text(n)})",
                "contract matrices with '@' down to vectors; keep one head dimension per expression")
        if n.op == "input":
            sides = frozenset((side[n.name],))
        else:
            sides = frozenset().union(*(out[id(a)].sides for a in n.args))
        contracts = ((n.op == "sum" and n.args[0].shape[0] in hd) or
                     (n.op == "matmul" and n.args[0].shape[-1] in hd))
        if n.op == "l2norm" and n.args[0].shape[0] in hd:
            bad(n, "l2norm over a feature dimension", f"l2norm over the head dimension {n.args[0].shape[0]!r}",
                "normalize feature vectors (Heads['H', 'D'] rows are normalized per head)")
        if feats and len(sides) > 1:
            bad(n, "vectors that belong to the query or to the key, not both",
                f"a vector over {feats[0]!r} mixing both ({ir.to_text(n)})",
                "combine query and key vectors only through '@' (a dot product), e.g. q @ k")
        out[id(n)] = Info(sides, heads[0] if heads else None, feats[0] if feats else None, contracts)
    return out
