"""sympy side of the checker: evaluate IR on a small symbolic instance, decide
equalities, take derivatives, and convert sympy back to the project's IR.

The DSL's activations are sympy Functions with their derivatives and signs
(sigmoid > 0, softplus > 0, logsigmoid < 0), so sign questions such as
"is -exp(A_log) * softplus(x + dt_bias) <= 0" are answered by sympy's
assumptions and derivatives stay compact (d softplus = sigmoid).
"""
from __future__ import annotations

import random

import mpmath
import sympy as sp

from . import ir


class sigmoid(sp.Function):
    @classmethod
    def eval(cls, x):
        if x.is_Float:          # numeric points (checker._numeric_affine) stay numbers, not nested calls
            return 1 / (1 + sp.exp(-x))

    def _eval_rewrite_as_exp(self, x, **kw):
        return 1 / (1 + sp.exp(-x))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


class softplus(sp.Function):
    @classmethod
    def eval(cls, x):
        if x.is_Float:
            return sp.log(1 + sp.exp(x))

    def _eval_rewrite_as_exp(self, x, **kw):
        return sp.log(1 + sp.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


class logsigmoid(sp.Function):
    @classmethod
    def eval(cls, x):
        if x.is_Float:
            return -sp.log(1 + sp.exp(-x))

    def _eval_rewrite_as_exp(self, x, **kw):
        return -sp.log(1 + sp.exp(-x))

    def fdiff(self, argindex=1):
        return 1 - sigmoid(self.args[0])

    def _eval_is_negative(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


class relu(sp.Function):
    @classmethod
    def eval(cls, x):
        if x.is_Float:
            return x if x > 0 else sp.Float(0)

    def fdiff(self, argindex=1):
        return sp.Heaviside(self.args[0])

    def _eval_is_nonnegative(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


_MP = {
    "sigmoid": lambda x: 1 / (1 + mpmath.exp(-x)),
    "softplus": lambda x: mpmath.log(1 + mpmath.exp(x)),
    "logsigmoid": lambda x: -mpmath.log(1 + mpmath.exp(-x)),
    "relu": lambda x: mpmath.re(x) if mpmath.re(x) > 0 else mpmath.mpf(0),
    "Heaviside": lambda x, *a: 1 if mpmath.re(x) > 0 else 0,
}
_FUN = {"exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "sigmoid": sigmoid, "softplus": softplus,
        "logsigmoid": logsigmoid, "relu": relu}
EPS = sp.Rational(1, 10 ** 6)          # ir.L2NORM_EPS, exactly
MAX_TREE = 400                          # element-wise expressions larger than this (as trees) stay numeric
MAX_DEPTH = 60                          # ... and deeper ones (sympy recurses on an expression's depth)


class Undefined(Exception):
    """A value undefined for every input (x / 0, log(0)) met while evaluating node."""

    def __init__(self, node: ir.Node, why: str):
        self.node, self.why = node, why
        super().__init__(why)


def _zero_somewhere(x) -> bool:
    """Is x (or an entry of x) identically 0 as sympy built it (e.g. g - g)?"""
    return any(e == 0 for e in x) if isinstance(x, sp.MatrixBase) else x == 0


def instance_env(inputs, dims: dict[str, int]) -> dict:
    """Symbolic values for a rule's inputs: scalars, or column vectors of real symbols."""
    env = {}
    for s in inputs:
        if not s.shape:
            env[s.name] = sp.Symbol(s.name, real=True)
        else:
            n = dims[s.shape[0]]
            env[s.name] = sp.Matrix([sp.Symbol(f"{s.name}{i}", real=True) for i in range(n)])
    return env


def evaluate(node: ir.Node, env: dict, memo: dict | None = None):
    """sympy value of node: Expr for scalars, Matrix (n x 1) for vectors, Matrix for matrices."""
    memo = dict(env.get("__opaque__", {})) if memo is None else memo
    for n in ir.walk([node], skip=memo):       # children first, no recursion: deep rules stay in Python's limit
        memo[id(n)] = _value(n, env, memo)
    return memo[id(node)]


def _value(node: ir.Node, env: dict, memo: dict):
    """sympy value of one node whose arguments have values in memo."""
    op = node.op
    if op in ("input", "param"):
        out = env[node.name]
    elif op == "state":
        out = env["S"]
    elif op == "const":
        out = sp.nsimplify(node.value, rational=True) if node.value == int(node.value) else sp.Float(node.value, 30)
    elif op in ir.BINARY:
        x, y = (memo[id(a)] for a in node.args)
        if op == "add":
            out = _ew(x, y, lambda a, b: a + b)
        elif op == "sub":
            out = _ew(x, y, lambda a, b: a - b)
        elif op == "mul":
            out = _ew(x, y, lambda a, b: a * b)
        else:
            if _zero_somewhere(y):
                raise Undefined(node, f"a division by {ir.to_text(node.args[1])}, which is 0 for every input")
            out = _ew(x, y, lambda a, b: a / b)
    elif op == "neg":
        out = -memo[id(node.args[0])]
    elif op in _FUN:
        x = memo[id(node.args[0])]
        if op == "log" and _zero_somewhere(x):
            raise Undefined(node, f"log of {ir.to_text(node.args[0])}, which is 0 for every input")
        f = _FUN[op]
        out = x.applyfunc(f) if isinstance(x, sp.MatrixBase) else f(x)
    elif op == "pow":
        x = memo[id(node.args[0])]
        e = sp.nsimplify(node.value, rational=True)
        if e < 0 and _zero_somewhere(x):
            raise Undefined(node, f"a negative power of {ir.to_text(node.args[0])}, which is 0 for every input")
        out = x.applyfunc(lambda a: a ** e) if isinstance(x, sp.MatrixBase) else x ** e
    elif op == "l2norm":
        x = memo[id(node.args[0])]
        out = x / sp.sqrt(sum(a * a for a in x) + EPS)
    elif op == "sum":
        out = sum(memo[id(node.args[0])])
    elif op == "diag":
        out = sp.diag(*memo[id(node.args[0])])
    elif op == "outer":
        a, b = (memo[id(x)] for x in node.args)
        out = a * b.T
    elif op == "transpose":
        out = memo[id(node.args[0])].T
    elif op == "matmul":
        a, b = (memo[id(x)] for x in node.args)
        ra, rb = len(node.args[0].shape), len(node.args[1].shape)
        if ra == 1 and rb == 1:
            out = (a.T * b)[0, 0]
        elif ra == 1:
            out = (a.T * b).T
        else:
            out = a * b
    else:  # pragma: no cover
        raise AssertionError(op)
    return out


def tree_size(node: ir.Node, limit: int = 10 ** 6) -> int:
    """Size of the expression as a tree (shared sub-DAGs counted each time they are used), capped."""
    memo: dict[int, int] = {}
    for n in ir.walk([node]):
        memo[id(n)] = min(limit, 1 + sum(memo[id(a)] for a in n.args))
    return memo[id(node)]


def depth(node: ir.Node) -> int:
    memo: dict[int, int] = {}
    for n in ir.walk([node]):
        memo[id(n)] = 1 + max((memo[id(a)] for a in n.args), default=0)
    return memo[id(node)]


def opaque_values(roots, statements, dims: dict[str, int], limit: int = 10 ** 6) -> dict:
    """Fresh real symbols for the large state-free scalar / vector values of a rule.

    A value whose sympy form exceeds MAX_TREE nodes as a tree (nested reuse grows it exponentially;
    an entry of l2norm / sum / '@' reads every entry of its argument) or MAX_DEPTH levels (sympy
    recurses on depth) becomes a symbol, the first such value on every path: proofs made with it
    hold for every value it can take, and sympy's work stays the size of the rule.
    """
    names = {id(st.node): st.target for st in statements}
    size: dict[int, int] = {}
    deep: dict[int, int] = {}
    stateful: set[int] = set()
    out: dict = {}
    for n in ir.walk(roots):                     # children first
        if n.op == "state" or any(id(a) in stateful for a in n.args):
            stateful.add(id(n))
        fan = dims[n.args[0].shape[-1]] + (n.op == "l2norm") if n.op in ("l2norm", "sum", "matmul") else 1
        size[id(n)] = min(limit, 1 + fan * sum(size[id(a)] for a in n.args))
        deep[id(n)] = 1 + max((deep[id(a)] for a in n.args), default=0)
        if (size[id(n)] > MAX_TREE or deep[id(n)] > MAX_DEPTH) and id(n) not in stateful \
                and n.op not in ir.LEAVES and len(n.shape) <= 1:
            name = f"_{names.get(id(n), 'x')}{len(out)}"
            out[id(n)] = sp.Symbol(name, real=True) if not n.shape else \
                sp.Matrix([sp.Symbol(f"{name}_{j}", real=True) for j in range(dims[n.shape[0]])])
            size[id(n)] = deep[id(n)] = 1
    return out


def _ew(x, y, f):
    mx, my = isinstance(x, sp.MatrixBase), isinstance(y, sp.MatrixBase)
    if mx and my:
        return sp.Matrix(x.shape[0], x.shape[1], lambda i, j: f(x[i, j], y[i, j]))
    if mx:
        return x.applyfunc(lambda a: f(a, y))
    if my:
        return y.applyfunc(lambda b: f(x, b))
    return f(x, y)


# ------------------------------------------------------------------ deciding zero
def is_zero(expr, symbols, rng: random.Random) -> str | None:
    """'proved' if expr simplifies to 0, 'numeric' if 0 at random points to 40 digits, None if not zero."""
    if expr == 0:
        return "proved"
    e = sp.expand(expr)
    if e == 0:
        return "proved"
    syms = sorted(e.free_symbols, key=lambda s: s.name)
    f = sp.lambdify(syms, e, modules=[_MP, "mpmath"])
    with mpmath.workdps(40):
        for _ in range(3):
            vals = [mpmath.mpf(rng.uniform(-1.5, 1.5)) for _ in syms]
            try:
                val = f(*vals)
            except (ZeroDivisionError, ValueError):
                continue
            if abs(val) > mpmath.mpf(10) ** -25:
                return None
    return "numeric"


def all_zero(exprs, rng) -> str | None:
    """Combined verdict over many expressions: None if any is nonzero."""
    verdict = "proved"
    for e in exprs:
        v = is_zero(e, None, rng)
        if v is None:
            return None
        if v == "numeric":
            verdict = "numeric"
    return verdict


# ------------------------------------------------------------------ elementwise view + derivatives
def elementwise(node: ir.Node):
    """sympy expression of an element-wise expression with one real symbol per input.

    None if the expression is not element-wise, or too large as a tree for symbolic work.
    """
    if tree_size(node) > MAX_TREE or depth(node) > MAX_DEPTH:
        return None
    memo: dict = {}

    def go(n):
        if id(n) in memo:
            return memo[id(n)]
        op = n.op
        if op in ("input", "param"):
            out = sp.Symbol(n.name, real=True)
        elif op == "const":
            out = sp.nsimplify(n.value, rational=True) if n.value == int(n.value) else sp.Float(n.value, 30)
        elif op in ir.BINARY:
            a, b = go(n.args[0]), go(n.args[1])
            out = {"add": a + b, "sub": a - b, "mul": a * b}.get(op) if op != "div" else a / b
        elif op == "neg":
            out = -go(n.args[0])
        elif op in _FUN:
            out = _FUN[op](go(n.args[0]))
        elif op == "pow":
            out = go(n.args[0]) ** sp.nsimplify(n.value, rational=True)
        else:
            raise _NotElementwise
        memo[id(n)] = out
        return out
    try:
        return go(node)
    except _NotElementwise:
        return None


class _NotElementwise(Exception):
    pass


def to_ir(expr, shapes: dict[str, tuple]) -> ir.Node:
    """Convert a sympy expression (of element-wise symbols) back to IR; shapes names each symbol's IR shape."""
    def go(e):
        if isinstance(e, sp.Symbol):
            kind = "param" if shapes[e.name][0] == "param" else "input"
            return ir.Node(kind, shape=shapes[e.name][1], name=e.name)
        if e.is_Number:
            return ir.const(float(e))
        if isinstance(e, sp.Add):
            out = go(e.args[0])
            for a in e.args[1:]:
                out = ir.binary("add", out, go(a))
            return out
        if isinstance(e, sp.Mul):
            out = go(e.args[0])
            for a in e.args[1:]:
                out = ir.binary("mul", out, go(a))
            return out
        if isinstance(e, sp.Pow):
            base, ex = e.args
            if ex == -1:
                return ir.binary("div", ir.const(1.0), go(base))
            if ex == sp.Rational(1, 2):
                return ir.unary("sqrt", go(base))
            return ir.power(go(base), float(ex))
        for name, f in _FUN.items():
            if e.func is f:
                return ir.unary(name, go(e.args[0]))
        if isinstance(e, sp.Heaviside):
            x = go(e.args[0])
            return ir.Node("heaviside", (x,), x.shape)
        raise ValueError(f"cannot convert {e} to IR")
    return go(expr)
