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
    def _eval_rewrite_as_exp(self, x, **kw):
        return sp.log(1 + sp.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


class logsigmoid(sp.Function):
    def _eval_rewrite_as_exp(self, x, **kw):
        return -sp.log(1 + sp.exp(-x))

    def fdiff(self, argindex=1):
        return 1 - sigmoid(self.args[0])

    def _eval_is_negative(self):
        return True if self.args[0].is_extended_real else None

    def _eval_is_real(self):
        return self.args[0].is_real


class relu(sp.Function):
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
    key = id(node)
    if key in memo:
        return memo[key]
    op = node.op
    if op in ("input", "param"):
        out = env[node.name]
    elif op == "state":
        out = env["S"]
    elif op == "const":
        out = sp.nsimplify(node.value, rational=True) if node.value == int(node.value) else sp.Float(node.value, 30)
    elif op in ir.BINARY:
        x, y = (evaluate(a, env, memo) for a in node.args)
        if op == "add":
            out = _ew(x, y, lambda a, b: a + b)
        elif op == "sub":
            out = _ew(x, y, lambda a, b: a - b)
        elif op == "mul":
            out = _ew(x, y, lambda a, b: a * b)
        else:
            out = _ew(x, y, lambda a, b: a / b)
    elif op == "neg":
        out = -evaluate(node.args[0], env, memo)
    elif op in _FUN:
        x = evaluate(node.args[0], env, memo)
        f = _FUN[op]
        out = x.applyfunc(f) if isinstance(x, sp.MatrixBase) else f(x)
    elif op == "pow":
        x = evaluate(node.args[0], env, memo)
        e = sp.nsimplify(node.value, rational=True)
        out = x.applyfunc(lambda a: a ** e) if isinstance(x, sp.MatrixBase) else x ** e
    elif op == "l2norm":
        x = evaluate(node.args[0], env, memo)
        out = x / sp.sqrt(sum(a * a for a in x) + EPS)
    elif op == "sum":
        out = sum(evaluate(node.args[0], env, memo))
    elif op == "diag":
        out = sp.diag(*evaluate(node.args[0], env, memo))
    elif op == "outer":
        a, b = (evaluate(x, env, memo) for x in node.args)
        out = a * b.T
    elif op == "transpose":
        out = evaluate(node.args[0], env, memo).T
    elif op == "matmul":
        a, b = (evaluate(x, env, memo) for x in node.args)
        ra, rb = len(node.args[0].shape), len(node.args[1].shape)
        if ra == 1 and rb == 1:
            out = (a.T * b)[0, 0]
        elif ra == 1:
            out = (a.T * b).T
        else:
            out = a * b
    else:  # pragma: no cover
        raise AssertionError(op)
    memo[key] = out
    return out


def tree_size(node: ir.Node, limit: int = 10 ** 6) -> int:
    """Size of the expression as a tree (shared sub-DAGs counted each time they are used), capped."""
    memo: dict[int, int] = {}
    for n in ir.walk([node]):
        memo[id(n)] = min(limit, 1 + sum(memo[id(a)] for a in n.args))
    return memo[id(node)]


def opaque_statements(statements, dims: dict[str, int], depends_on_state) -> dict:
    """Fresh real symbols for the values of large state-free scalar / vector statements.

    A statement whose expression, as a tree, exceeds MAX_TREE (nested reuse grows it
    exponentially) becomes a symbol: proofs made with it hold for every value it can take, and
    sympy's work stays the size of the rule.
    """
    out = {}
    for i, st in enumerate(statements):
        n = st.node
        if n.op in ("input", "param", "const") or len(n.shape) > 1 or depends_on_state(n) or id(n) in out \
                or tree_size(n) <= MAX_TREE:
            continue
        if not n.shape:
            out[id(n)] = sp.Symbol(f"_{st.target}{i}", real=True)
        else:
            out[id(n)] = sp.Matrix([sp.Symbol(f"_{st.target}{i}_{j}", real=True) for j in range(dims[n.shape[0]])])
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
    if tree_size(node) > MAX_TREE:
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
