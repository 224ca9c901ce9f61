"""The rule DSL: typed inputs, primitives, and the @rule decorator that traces.

    @rule(state=("K", "V"))
    def kda(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar):
        S = diag(exp(g)) @ S
        S = S + beta * outer(k, v - S.T @ k)
        return S, S.T @ q

Tracing calls the function once with symbolic values (`Sym`); every operation
builds an IR node stamped with the rule line that made it, and a line tracer
records each assignment as a `Statement` (target name, node, line). Shape
errors, misspelled names, unused inputs and missing returns raise RuleError
at decoration time, pointing at the line.

Input kinds: `Vec["K"]` / `Scalar` are per token ([B, T, H, K] / [B, T, H]);
`Param` / `Param["K"]` are learned per-head constants ([H] / [H, K]).
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import sys
import textwrap
from dataclasses import dataclass

import networkx as nx

from . import ir
from .errors import RuleError


# ------------------------------------------------------------------ input types
@dataclass(frozen=True)
class InputType:
    kind: str                   # "token" or "param"
    shape: tuple[str, ...]

    def __repr__(self) -> str:
        base = "Vec" if self.kind == "token" else "Param"
        if self.kind == "token" and not self.shape:
            return "Scalar"
        return f"{base}[{', '.join(map(repr, self.shape))}]" if self.shape else base

    def __getitem__(self, dim):
        raise TypeError(f"{self!r} takes no further dimension; got {self!r}[{dim!r}]. "
                        f"Fix: Vec[{dim!r}] for a per-token vector, Param[{dim!r}] for a per-head one")


class _VecMeta(type):
    def __getitem__(cls, dim):
        dims = dim if isinstance(dim, tuple) else (dim,)
        if len(dims) != 1 or not isinstance(dims[0], str):
            raise TypeError(f"Vec takes one dimension name, e.g. Vec['K']; got Vec[{dim!r}]")
        return InputType("token", dims)


class Vec(metaclass=_VecMeta):
    """A per-token vector input, e.g. `k: Vec["K"]` ([B, T, H, K])."""


Scalar = InputType("token", ())


class _ParamMeta(type):
    def __getitem__(cls, dim):
        dims = dim if isinstance(dim, tuple) else (dim,)
        if len(dims) != 1 or not isinstance(dims[0], str):
            raise TypeError(f"Param takes one dimension name, e.g. Param['K']; got Param[{dim!r}]")
        return InputType("param", dims)


class Param(metaclass=_ParamMeta):
    """A learned per-head constant: `Param` is [H], `Param["K"]` is [H, K]."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: str                   # "token" | "param"
    shape: tuple[str, ...]

    def __repr__(self) -> str:
        return f"{self.name}: {InputType(self.kind, self.shape)!r}"


# ------------------------------------------------------------------ tracing
class _Tracing:
    """State of the rule being traced: used to stamp nodes with lines and raise errors."""
    rule: str = "?"
    code = None
    file: str = "?"
    first_line: int = 0


_T = _Tracing()


def _line() -> int:
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is _T.code:
            return f.f_lineno
        f = f.f_back
    return 0


def _fail(expected: str, got: str, fix: str, line: int | None = None):
    line = _line() if line is None else line
    raise RuleError(_T.rule, f"{_T.file}:{line}", expected, got, fix)


def _fmt(shape) -> str:
    return "scalar" if not shape else ("vector[" + shape[0] + "]" if len(shape) == 1 else f"matrix[{shape[0]}, {shape[1]}]")


def _number(x) -> float:
    """A Python / numpy number as a finite float (the kernels compute in float32 / float64)."""
    try:
        value = float(x)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        text = repr(x)
        _fail("a finite number", text if len(text) < 30 else text[:24] + "...", "use a finite constant; pass a value "
              "that can be huge as an input")
    return value


def _lift(x) -> "Sym":
    if isinstance(x, Sym):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return Sym(ir.const(_number(x), _line()))
    _fail("a rule value, an input or a number", f"{type(x).__name__} {x!r}",
          "use only the rule's inputs, the state, numbers and unifattn.dsl primitives")


class Sym:
    """A symbolic value while a rule is traced; arithmetic builds IR nodes."""
    __slots__ = ("node",)
    __array_priority__ = 100

    def __init__(self, node: ir.Node):
        self.node = node

    def _bin(self, op, other, swap=False):
        a, b = (_lift(other), self) if swap else (self, _lift(other))
        if ir.broadcast(a.node, b.node) is None:
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
            _fail(f"operands of '{sym}' with equal shapes (or one scalar)",
                  f"{_fmt(a.node.shape)} {sym} {_fmt(b.node.shape)}",
                  "check the dimensions; use outer(a, b) for a matrix from two vectors, "
                  "'@' for a product, diag(x) for a diagonal matrix")
        if op == "div" and ir.is_const(b.node, 0.0):
            _fail("a divisor other than the constant 0", f"{_fmt(a.node.shape)} / 0",
                  "remove the division, or divide by an expression that is not 0")
        return Sym(ir.binary(op, a.node, b.node, _line()))

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("div", o)
    def __rtruediv__(self, o): return self._bin("div", o, True)
    def __neg__(self): return Sym(ir.unary("neg", self.node, _line()))
    def __pos__(self): return self

    def __pow__(self, e):
        if not isinstance(e, numbers.Real) or isinstance(e, bool):
            _fail("a number as exponent", f"{type(e).__name__}", "write x ** 2 or sqrt(x); use exp/log for a symbolic power")
        return Sym(ir.power(self.node, _number(e), _line()))

    def __rpow__(self, base):
        _fail("a number as exponent (x ** 2)", f"{type(base).__name__} ** a traced value",
              "write c ** x as exp(x * log(c))")

    def __matmul__(self, o):
        o = _lift(o)
        if ir.matmul_shape(self.node.shape, o.node.shape) is None:
            _fail("'@' operands whose inner dimensions agree",
                  f"{_fmt(self.node.shape)} @ {_fmt(o.node.shape)}",
                  "check the dimensions, or transpose one side with .T (a rule reads its [K, V] state as S.T @ k)")
        return Sym(ir.matmul(self.node, o.node, _line()))

    def __rmatmul__(self, o):
        return _lift(o).__matmul__(self)

    @property
    def T(self):
        return Sym(ir.transpose(self.node, _line()))

    def __bool__(self):
        _fail("straight-line code (no if/while on traced values)", "a traced value used as a condition",
              "express choices with arithmetic (e.g. relu, sigmoid) instead of Python control flow")

    def _compare(self, other):
        # a rule is traced once for all values: `if g == 0:` would pick one branch for every token
        _fail("arithmetic on traced values (no comparisons: the rule is traced once, for every value)",
              "a traced value compared with ==, !=, <, <=, > or >=",
              "express choices with arithmetic (e.g. relu, sigmoid) instead of comparisons")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _compare
    __hash__ = object.__hash__

    def __repr__(self):
        return f"Sym({ir.to_text(self.node)}: {_fmt(self.node.shape)})"


# ------------------------------------------------------------------ primitives
def _unary(op):
    def f(x):
        x = _lift(x)
        return Sym(ir.unary(op, x.node, _line()))
    f.__name__ = op
    f.__doc__ = f"Element-wise {op}."
    return f


exp, log, sqrt, sigmoid, softplus, logsigmoid, relu = (
    _unary(op) for op in ("exp", "log", "sqrt", "sigmoid", "softplus", "logsigmoid", "relu"))


def _need_vec(x, what):
    x = _lift(x)
    if len(x.node.shape) != 1:
        _fail(f"a vector for {what}", _fmt(x.node.shape), f"pass a Vec input or a vector expression to {what}")
    return x


def diag(x):
    """Diagonal matrix from a vector: diag(exp(g)) @ S decays each key channel."""
    x = _need_vec(x, "diag")
    return Sym(ir.diag(x.node, _line()))


def outer(a, b):
    """a b^T: outer(k, v) is the [K, V] write of linear attention."""
    a, b = _need_vec(a, "outer"), _need_vec(b, "outer")
    return Sym(ir.outer(a.node, b.node, _line()))


def l2norm(x):
    """x / sqrt(sum(x^2) + 1e-6)."""
    x = _need_vec(x, "l2norm")
    return Sym(ir.l2norm(x.node, _line()))


def vsum(x):
    """Sum of a vector's entries."""
    x = _need_vec(x, "vsum")
    return Sym(ir.vsum(x.node, _line()))


PRIMITIVES = ("exp", "log", "sqrt", "sigmoid", "softplus", "logsigmoid", "relu", "diag", "outer", "l2norm", "vsum")


# ------------------------------------------------------------------ the Rule
@dataclass(frozen=True, eq=False)
class Rule:
    """A traced rule: its inputs, statements, new state and output (all IR)."""
    name: str
    doc: str
    state_dims: tuple[str, str]
    inputs: tuple[InputSpec, ...]
    statements: tuple[ir.Statement, ...]
    new_state: ir.Node
    output: ir.Node
    file: str
    line: int
    source: str

    def __repr__(self) -> str:
        return f"<rule {self.name} ({self.file}:{self.line})>"

    def input(self, name: str) -> InputSpec:
        return next(i for i in self.inputs if i.name == name)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def ir_text(self) -> str:
        """Canonical text of the IR: same rule -> same text (cache keys, golden tests)."""
        lines = [f"rule {self.name} state={self.state_dims}"]
        lines += [f"input {i!r}" for i in self.inputs]
        lines += ir_lines(self.statements, (self.new_state, self.output))
        return "\n".join(lines)


def ir_lines(statements, results) -> list[str]:
    """Canonical text of statements and results: `%i target = expression` lines, then `return a, b`.

    Every value is printed once: earlier statements by their %i, values read more than once (a helper
    that reuses a value) by `%tN = expression` lines before their first use; a rule whose reused
    values are all statements has no %t lines.
    """
    reused = ir.shared([s.node for s in statements] + list(results))
    names: dict[int, str] = {}
    lines: list[str] = []

    def name_reused(root):
        for n in ir.walk([root], skip=names):
            if id(n) in reused and n is not root:
                name = f"%t{len(lines)}"
                lines.append(f"{name} = {ir.to_text(n, names, None)}")
                names[id(n)] = name
    for i, s in enumerate(statements):
        if id(s.node) in names:                            # `x = y`: an alias, no new value
            lines.append(f"%{i} {s.target} = {names[id(s.node)]}")
            continue
        name_reused(s.node)
        lines.append(f"%{i} {s.target} = {ir.to_text(s.node, names, None)}")
        names[id(s.node)] = f"%{i}"
    for r in results:
        name_reused(r)
    lines.append("return " + ", ".join(ir.to_text(r, names, None) for r in results))
    return lines


def _annotation(fn, name, ann):
    if isinstance(ann, str):
        try:
            ann = eval(ann, fn.__globals__, {"Vec": Vec, "Scalar": Scalar, "Param": Param})
        except Exception as e:  # noqa: BLE001 - reported as a RuleError
            raise RuleError(fn.__name__, _where(fn), f"a type for input '{name}'", f"{ann!r} ({e})",
                            "annotate with Vec['K'], Vec['V'], Scalar, Param or Param['K']") from None
    if ann is Param:
        ann = InputType("param", ())
    if not isinstance(ann, InputType):
        raise RuleError(fn.__name__, _where(fn), f"a type annotation on input '{name}'",
                        "none" if ann is inspect.Parameter.empty else repr(ann),
                        f"write e.g. `{name}: Vec['K']`, `{name}: Scalar` or `{name}: Param`")
    return ann


def _where(fn) -> str:
    return f"{inspect.getsourcefile(fn) or '?'}:{fn.__code__.co_firstlineno}"


# keyword arguments of unifattn.ops.linear_attention, and "S" (the state's name inside the reference and the
# checker when the rule calls its state otherwise): no input may take these names (nor a __dunder__ name)
RESERVED = ("S", "r", "scale", "initial_state", "output_final_state", "cu_seqlens", "form", "inplace_state", "tune",
            "check_inputs")


def rule(state=("K", "V")):
    """Declare an attention rule. The function is traced once, now."""
    if callable(state):
        raise TypeError(f"rule: expected @rule(state=('K', 'V')), a decorator with arguments; got @rule on "
                        f"{getattr(state, '__name__', state)!r}. Fix: write @rule(state=('K', 'V'))")
    if not (isinstance(state, (tuple, list)) and len(state) == 2
            and all(isinstance(d, str) and d.isidentifier() for d in state) and state[0] != state[1]):
        raise TypeError(f"rule(state=...) takes two dimension names (two different identifiers) like ('K', 'V'); "
                        f"got {state!r}. Fix: state=('K', 'V') names the key and the value dimension")

    def deco(fn):
        return trace(fn, tuple(state))
    return deco


def source_of(fn) -> tuple[str, list[str], int]:
    """(file, source lines, first line) of a function being traced."""
    file = inspect.getsourcefile(fn) or "?"
    try:
        src_lines, first = inspect.getsourcelines(fn)
    except OSError:
        src_lines, first = [], fn.__code__.co_firstlineno
    return file, src_lines, first


def run_traced(fn, args: tuple, kwargs: dict, known: list[str], importable_from: str):
    """Call fn on symbolic values under the line recorder; Python errors become RuleErrors with the line.

    Returns (result, recorder). The caller sets up _T (rule name, code, file) beforehand.
    """
    name, file = _T.rule, _T.file
    recorder = _Recorder(fn.__code__)
    old = sys.gettrace()
    sys.settrace(recorder.global_trace)
    try:
        result = fn(*args, **kwargs)
    except RuleError:
        raise
    except NameError as e:
        line = _tb_line(e, fn.__code__)
        missing = getattr(e, "name", None) or str(e)
        close = difflib.get_close_matches(str(missing), known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"define it as an input or import it from {importable_from}"
        raise RuleError(name, f"{file}:{line}", "names that are inputs or DSL primitives",
                        f"undefined name '{missing}'", fix) from None
    except (TypeError, AttributeError, ValueError) as e:
        line = _tb_line(e, fn.__code__)
        raise RuleError(name, f"{file}:{line}", "DSL operations on traced values", f"{type(e).__name__}: {e}",
                        "use +, -, *, /, @, .T and the primitives of " + importable_from) from None
    except Exception as e:  # noqa: BLE001 - the user's own code failed (1 / 0, a KeyError in a helper...)
        line = _tb_line(e, fn.__code__)
        raise RuleError(name, f"{file}:{line}", "the body to run once on traced values", f"{type(e).__name__}: {e}",
                        "fix the Python error at this line (the traceback above shows where it began)") from e
    finally:
        sys.settrace(old)
        _T.code = None
    return result, recorder


def statements_of(recorder: "_Recorder", src_lines: list[str], first: int) -> tuple[ir.Statement, ...]:
    return tuple(ir.Statement(t, n, ln, src_lines[ln - first].strip() if 0 <= ln - first < len(src_lines) else "")
                 for t, n, ln in recorder.statements)


def require_def(fn, what: str):
    """A rule or selector is a plain `def` function: its annotations type the inputs, its source gives lines."""
    if not inspect.isfunction(fn) or fn.__name__ == "<lambda>":
        raise TypeError(f"{what}: expected a function defined with `def`, its inputs annotated; got {fn!r}. "
                        "Fix: decorate a `def` (a lambda cannot annotate its inputs)")


def check_params(fn, params, reserved: tuple, op: str, where: str):
    """No *args / **kwargs, and no input named like a keyword of the op or an internal name."""
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind == p.VAR_POSITIONAL else "**"
            raise RuleError(fn.__name__, where, "named inputs", f"{star}{p.name}", "list every input by name")
        if p.name in reserved or (p.name.startswith("__") and p.name.endswith("__")):
            raise RuleError(fn.__name__, where, f"input names other than {reserved} and __dunder__ names "
                            f"(keywords of {op}, and names used inside it)", f"an input named '{p.name}'",
                            f"rename '{p.name}'")


def _first_is_input(fn, p) -> bool:
    """Does the first argument (the state) carry an input type, i.e. was the state left out?"""
    ann = p.annotation
    if isinstance(ann, str):
        try:
            ann = eval(ann, fn.__globals__, {"Vec": Vec, "Scalar": Scalar, "Param": Param})
        except Exception:  # noqa: BLE001 - any other annotation on the state is left alone
            return False
    return isinstance(ann, InputType) or ann in (Vec, Param)


def trace(fn, state_dims=("K", "V")) -> Rule:
    require_def(fn, "rule")
    name = fn.__name__
    file, src_lines, first = source_of(fn)
    where = f"{file}:{first}"
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD) \
            or _first_is_input(fn, params[0]):
        got = "no arguments" if not params else f"'{params[0]}' first"
        raise RuleError(name, where, "the state as first argument (no annotation), then typed inputs", got,
                        "write `def my_rule(S, q: Vec['K'], k: Vec['K'], v: Vec['V']):`")
    check_params(fn, params[1:], RESERVED, "unifattn.ops.linear_attention", where)
    specs = []
    for p in params[1:]:
        t = _annotation(fn, p.name, p.annotation)
        for d in t.shape:
            if d not in state_dims:
                raise RuleError(name, where, f"dimensions from the state {state_dims}",
                                f"input '{p.name}' with dimension {d!r}", f"use one of {state_dims}")
        specs.append(InputSpec(p.name, t.kind, t.shape))
    names = {s.name for s in specs}
    K, V = state_dims
    for req, shape in (("q", (K,)), ("k", (K,)), ("v", (V,))):
        if req not in names:
            raise RuleError(name, where, f"an input '{req}: Vec[{shape[0]!r}]' (every rule reads q, k, v)",
                            f"inputs {sorted(names)}", f"add `{req}: Vec[{shape[0]!r}]` to the signature")
        spec = next(s for s in specs if s.name == req)
        if spec.kind != "token" or spec.shape != shape:
            raise RuleError(name, where, f"'{req}' typed Vec[{shape[0]!r}]", repr(spec),
                            f"annotate `{req}: Vec[{shape[0]!r}]`")

    S = Sym(ir.Node("state", shape=tuple(state_dims)))
    args = {s.name: Sym(ir.Node("input" if s.kind == "token" else "param", shape=s.shape, name=s.name)) for s in specs}

    positional = tuple(args.pop(p.name) for p in params[1:] if p.kind == p.POSITIONAL_ONLY)
    _T.rule, _T.code, _T.file, _T.first_line = name, fn.__code__, file, first
    result, recorder = run_traced(fn, (S,) + positional, args, list(names) + list(PRIMITIVES) + ["S"], "unifattn.dsl")

    last = first + len(src_lines) - 1
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Sym) for r in result)):
        got = "nothing (no return)" if result is None else _describe(result)
        raise RuleError(name, f"{file}:{recorder.return_line or last}", "`return S, o` (new state, output)", got,
                        "end the rule with `return S, S.T @ q`")
    new_state, output = result[0].node, result[1].node
    if new_state.shape != tuple(state_dims):
        raise RuleError(name, f"{file}:{recorder.return_line}", f"a new state of shape {_fmt(state_dims)}",
                        _fmt(new_state.shape), "return the updated state first: `return S, S.T @ q`")
    if output.shape != (V,):
        raise RuleError(name, f"{file}:{recorder.return_line}", f"an output of shape vector[{V}]",
                        _fmt(output.shape), "return the read-out second, e.g. `S.T @ q`")

    src = textwrap.dedent("".join(src_lines))
    stmts = statements_of(recorder, src_lines, first)
    r = Rule(name, inspect.getdoc(fn) or "", tuple(state_dims), tuple(specs), stmts, new_state, output,
             file, first, src)
    _check_dataflow(r)
    return r


def _describe(x) -> str:
    if isinstance(x, Sym):
        return _fmt(x.node.shape)
    if isinstance(x, tuple):
        return f"a tuple of {len(x)} ({', '.join(_describe(e) for e in x)})"
    return type(x).__name__


def _tb_line(e: BaseException, code) -> int:
    tb, line = e.__traceback__, 0
    while tb is not None:
        if tb.tb_frame.f_code is code:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class _Recorder:
    """Line tracer: attributes each changed local to the line that assigned it."""

    def __init__(self, code):
        self.code, self.prev_line, self.prev = code, None, {}
        self.statements: list[tuple[str, ir.Node, int]] = []
        self.return_line = 0

    def global_trace(self, frame, event, arg):
        if event == "call" and frame.f_code is self.code:
            self.prev = dict(frame.f_locals)
            return self.local_trace
        return None

    def _diff(self, frame):
        now = frame.f_locals
        for k, v in now.items():
            if isinstance(v, Sym) and (k not in self.prev or self.prev[k] is not v):
                self.statements.append((k, v.node, self.prev_line))
        self.prev = dict(now)

    def local_trace(self, frame, event, arg):
        if event == "line":
            if self.prev_line is not None:
                self._diff(frame)
            self.prev_line = frame.f_lineno
        elif event == "return":
            self._diff(frame)
            self.return_line = frame.f_lineno
        return self.local_trace


def dataflow(r: Rule) -> nx.DiGraph:
    """Graph of inputs -> statements -> (state, output): which value feeds which."""
    g = nx.DiGraph()
    producers: dict[int, str] = {}

    def link(node: ir.Node, target: str):
        """Edges into target from what node reads: inputs, the state, and earlier statements' values (whose
        own reads are linked to them already, so the walk stops there: linear in the rule's size)."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op in ("input", "param"):
                g.add_edge(n.name, target)
            elif n.op == "state":
                g.add_edge("S", target)
            elif id(n) in producers:
                g.add_edge(producers[id(n)], target)
                continue
            stack.extend(n.args)

    for spec in r.inputs:
        g.add_node(spec.name, kind="input")
    g.add_node("S", kind="state")
    for i, s in enumerate(r.statements):
        sid = f"{s.target}@{s.line}#{i}"
        g.add_node(sid, kind="statement", line=s.line)
        link(s.node, sid)
        producers[id(s.node)] = sid
    for out, node in (("new_state", r.new_state), ("output", r.output)):
        g.add_node(out, kind="result")
        link(node, out)
    return g


def _check_dataflow(r: Rule):
    declared = {s.name for s in r.inputs}
    for n in ir.walk([r.new_state, r.output]):
        if n.op in ("input", "param") and n.name not in declared:   # a value kept from tracing another rule
            raise RuleError(r.name, f"{r.file}:{n.line or r.line}", "values of this rule's own inputs",
                            f"'{n.name}', an input of another rule or selector",
                            f"add '{n.name}' to this rule's signature and use it from there")
    g = dataflow(r)
    live = nx.ancestors(g, "new_state") | nx.ancestors(g, "output")
    for spec in r.inputs:
        if spec.name not in live:
            raise RuleError(r.name, r.where, "every input to reach the state or the output",
                            f"input '{spec.name}' is never used",
                            f"use '{spec.name}' in the update or remove it from the signature")
    if "S" not in nx.ancestors(g, "output") and not ir.depends_on_state(r.output):
        raise RuleError(r.name, r.where, "an output that reads the state", f"output {ir.to_text(r.output)}",
                        "return the read-out of the state, e.g. `S.T @ q`")
