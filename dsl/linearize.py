"""Structural linear algebra on the IR: write the update as S' = A S + B.

A is kept in the canonical form A = D + sum_i u_i w_i^T with D one of
{0, I, c I, Diag(d)} and the u, w, c, d ordinary (state-free) IR nodes. This
gives the checker the candidates (gate, key, beta, low-rank vectors) that it
then proves against the recurrence with sympy.

Value kinds while walking the update:
  Free(node)            no state inside
  LinMat(A, B)          A S + B                       [K, V]
  LinMatT(A, B)         (A S + B)^T                   [V, K]
  LinVec(r, b)          S^T r + b                     [V]
Anything else (S S^T, exp(S), S * M, S Diag_V, ...) raises NotLinear with the
line of the node that broke affinity in the K-side form.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ir


class NotLinear(Exception):
    def __init__(self, node: ir.Node, why: str):
        self.node, self.why = node, why
        super().__init__(why)


@dataclass(frozen=True)
class KOp:
    """D + sum u_i w_i^T; kind of D: 'zero' | 'one' | 'scalar' | 'diag'."""
    kind: str
    d: ir.Node | None = None
    lowrank: tuple[tuple[ir.Node, ir.Node], ...] = ()


ONE = KOp("one")
ZERO = KOp("zero")


def _mul(a, b):
    return ir.binary("mul", a, b)


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return ir.binary("add", a, b)


def d_apply(op: KOp, x: ir.Node) -> ir.Node | None:
    """D x for a K-vector x (None if D is zero)."""
    if op.kind == "zero":
        return None
    if op.kind == "one":
        return x
    return _mul(op.d, x)


def scale(op: KOp, c: ir.Node) -> KOp:
    lr = tuple((_mul(c, u), w) for u, w in op.lowrank)
    if op.kind == "zero":
        return KOp("zero", None, lr)
    if op.kind == "one":
        return KOp("scalar", c, lr)
    return KOp(op.kind, _mul(op.d, c), lr)


def add(a: KOp, b: KOp) -> KOp:
    lr = a.lowrank + b.lowrank
    if a.kind == "zero":
        return KOp(b.kind, b.d, lr)
    if b.kind == "zero":
        return KOp(a.kind, a.d, lr)
    da = ir.const(1.0) if a.kind == "one" else a.d
    db = ir.const(1.0) if b.kind == "one" else b.d
    kind = "diag" if "diag" in (a.kind, b.kind) else "scalar"
    return KOp(kind, ir.binary("add", da, db), lr)


def compose(a: KOp, b: KOp) -> KOp:
    """a @ b."""
    if a.kind == "zero" or b.kind == "zero":
        kind, d = "zero", None
    elif a.kind == "one":
        kind, d = b.kind, b.d
    elif b.kind == "one":
        kind, d = a.kind, a.d
    else:
        kind = "diag" if "diag" in (a.kind, b.kind) else "scalar"
        d = _mul(a.d, b.d)
    lr = []
    for u, w in b.lowrank:                          # D_a (u w^T)
        du = d_apply(KOp(a.kind, a.d), u)
        if du is not None:
            lr.append((du, w))
    for u, w in a.lowrank:                          # (u w^T) D_b = u (D_b w)^T
        dw = d_apply(KOp(b.kind, b.d), w)
        if dw is not None:
            lr.append((u, dw))
        for u2, w2 in b.lowrank:                    # (u w^T)(u2 w2^T) = (w . u2) u w2^T
            lr.append((_mul(ir.dot(w, u2), u), w2))
    return KOp(kind, d, tuple(lr))


def apply_t(op: KOp, x: ir.Node) -> ir.Node | None:
    """A^T x = D x + sum w_i (u_i . x)."""
    out = d_apply(op, x)
    for u, w in op.lowrank:
        out = _add(out, _mul(ir.dot(u, x), w))
    return out


def as_kop(n: ir.Node) -> KOp:
    """A state-free K x K matrix expression as a KOp."""
    if n.op == "diag":
        return KOp("diag", n.args[0])
    if n.op == "outer":
        return KOp("zero", None, ((n.args[0], n.args[1]),))
    if n.op in ("add", "sub"):
        a, b = as_kop(n.args[0]), as_kop(n.args[1])
        return add(a, scale(b, ir.const(-1.0)) if n.op == "sub" else b)
    if n.op == "neg":
        return scale(as_kop(n.args[0]), ir.const(-1.0))
    if n.op == "mul":
        a, b = n.args
        if a.shape == ():
            return scale(as_kop(b), a)
        if b.shape == ():
            return scale(as_kop(a), b)
    if n.op == "div" and n.args[1].shape == ():
        return scale(as_kop(n.args[0]), ir.binary("div", ir.const(1.0), n.args[1]))
    if n.op == "matmul":
        return compose(as_kop(n.args[0]), as_kop(n.args[1]))
    if n.op == "transpose":
        k = as_kop(n.args[0])
        return KOp(k.kind, k.d, tuple((w, u) for u, w in k.lowrank))
    raise NotLinear(n, f"cannot read {ir.to_text(n)} as diagonal-plus-low-rank K x K matrix")


@dataclass(frozen=True)
class Free:
    node: ir.Node


@dataclass(frozen=True)
class LinMat:
    A: KOp
    B: ir.Node | None


@dataclass(frozen=True)
class LinMatT:
    A: KOp
    B: ir.Node | None


@dataclass(frozen=True)
class LinVec:
    r: ir.Node | None
    b: ir.Node | None


def linearize(node: ir.Node, base: ir.Node, memo: dict | None = None):
    """Linear form of node in the matrix `base` (the state leaf, or the new state for the read-out)."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    out = _lin(node, base, memo)
    memo[id(node)] = out
    return out


def _lin(n: ir.Node, base: ir.Node, memo):
    if n is base:
        return LinMat(ONE, None)
    if n.op == "state":
        raise NotLinear(n, "the read-out uses the state from before the update")
    if not _has(n, base):
        return Free(n)
    args = [linearize(a, base, memo) for a in n.args]
    op = n.op
    if op in ("add", "sub"):
        a, b = args
        sign = ir.const(-1.0) if op == "sub" else ir.const(1.0)
        if isinstance(a, LinMat) and isinstance(b, LinMat):
            return LinMat(add(a.A, scale(b.A, sign)), _add(a.B, _neg(b.B, op)))
        if isinstance(a, LinMat) and isinstance(b, Free) and b.node.shape == n.shape:
            return LinMat(a.A, _add(a.B, _neg(b.node, op)))
        if isinstance(a, Free) and isinstance(b, LinMat) and a.node.shape == n.shape:
            return LinMat(scale(b.A, sign), _add(a.node, _neg(b.B, op)))
        if isinstance(a, LinVec) and isinstance(b, LinVec):
            return LinVec(_add(a.r, _neg(b.r, op)), _add(a.b, _neg(b.b, op)))
        if isinstance(a, LinVec) and isinstance(b, Free) and b.node.shape == n.shape:
            return LinVec(a.r, _add(a.b, _neg(b.node, op)))
        if isinstance(a, Free) and isinstance(b, LinVec) and a.node.shape == n.shape:
            return LinVec(_neg(b.r, op), _add(a.node, _neg(b.b, op)))
    elif op == "neg":
        (a,) = args
        if isinstance(a, LinMat):
            return LinMat(scale(a.A, ir.const(-1.0)), _neg(a.B, "sub"))
        if isinstance(a, LinVec):
            return LinVec(_neg(a.r, "sub"), _neg(a.b, "sub"))
    elif op in ("mul", "div"):
        a, b = args
        if op == "div":
            if isinstance(b, Free) and b.node.shape == ():
                b = Free(ir.binary("div", ir.const(1.0), b.node))
            else:
                raise NotLinear(n, f"division by a state-dependent value: {ir.to_text(n)}")
        if isinstance(a, Free) and a.node.shape == ():
            a, b = b, a
        if isinstance(b, Free) and b.node.shape == ():
            c = b.node
            if isinstance(a, LinMat):
                return LinMat(scale(a.A, c), _opt_mul(c, a.B))
            if isinstance(a, LinVec):
                return LinVec(_opt_mul(c, a.r), _opt_mul(c, a.b))
    elif op == "transpose":
        (a,) = args
        if isinstance(a, LinMat):
            return LinMatT(a.A, a.B)
        if isinstance(a, LinMatT):
            return LinMat(a.A, a.B)
    elif op == "matmul":
        a, b = args
        if isinstance(a, Free) and isinstance(b, LinMat) and len(a.node.shape) == 2:
            M = as_kop(a.node)
            return LinMat(compose(M, b.A), None if b.B is None else ir.matmul(a.node, b.B))
        if isinstance(a, LinMatT) and isinstance(b, Free) and len(b.node.shape) == 1:
            return LinVec(apply_t(a.A, b.node), None if a.B is None else ir.matmul(ir.transpose(a.B), b.node))
        if isinstance(a, Free) and isinstance(b, LinMat) and len(a.node.shape) == 1:
            return LinVec(apply_t(b.A, a.node), None if b.B is None else ir.matmul(a.node, b.B))
    elif op == "outer":
        a, b = args
        if isinstance(a, Free) and isinstance(b, LinVec):
            lr = () if b.r is None else ((a.node, b.r),)
            return LinMat(KOp("zero", None, lr), None if b.b is None else ir.outer(a.node, b.b))
    raise NotLinear(n, f"'{ir.to_text(n)}' is not affine in the state with a transition on the key side")


def _has(n: ir.Node, base: ir.Node) -> bool:
    return any(x is base or x.op == "state" for x in ir.walk([n]))


def _neg(x, op):
    if x is None or op != "sub":
        return x
    return ir.unary("neg", x)


def _opt_mul(c, x):
    return None if x is None else ir.binary("mul", c, x)


def as_outer(B: ir.Node | None):
    """B = c * outer(kb, vb) -> (c, kb, vb), or None when B is not visibly rank one."""
    if B is None:
        return None
    if B.op == "outer":
        return ir.const(1.0), B.args[0], B.args[1]
    if B.op == "mul":
        a, b = B.args
        c, X = (a, b) if a.shape == () else (b, a) if b.shape == () else (None, None)
        if c is not None:
            inner = as_outer(X)
            if inner:
                return ir.binary("mul", c, inner[0]), inner[1], inner[2]
    if B.op == "neg":
        inner = as_outer(B.args[0])
        if inner:
            return ir.unary("neg", inner[0]), inner[1], inner[2]
    if B.op == "matmul" and B.args[0].op == "diag":
        inner = as_outer(B.args[1])
        if inner:
            return inner[0], ir.binary("mul", B.args[0].args[0], inner[1]), inner[2]
    if B.op == "add":
        x, y = as_outer(B.args[0]), as_outer(B.args[1])
        if x and y and x[1] == y[1]:                 # c1 k v1^T + c2 k v2^T = k (c1 v1 + c2 v2)^T
            return ir.const(1.0), x[1], ir.binary("add", ir.binary("mul", x[0], x[2]), ir.binary("mul", y[0], y[2]))
    return None
