"""The rule IR: a DAG of frozen nodes with symbolic shapes.

Shapes are tuples of dimension names: () a scalar, ("K",) a vector,
("K", "V") a matrix. Every node remembers the rule source line that made it
(`line`, not part of equality), so errors and generated code point back at
the rule. The same IR drives the reference interpreter (torch), the checker
(sympy) and the Triton printer (codegen).

Ops
    input(name) param(name) state const(value)
    add sub mul div neg pow(const exponent)          element-wise, scalars broadcast
    exp log sqrt sigmoid softplus logsigmoid relu    element-wise
    l2norm(x) = x / sqrt(sum(x^2) + 1e-6)            vector
    sum(x)                                           vector -> scalar
    diag(x)   outer(a, b)   matmul(a, b)   transpose(a)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

L2NORM_EPS = 1e-6

UNARY = ("neg", "exp", "log", "sqrt", "sigmoid", "softplus", "logsigmoid", "relu")
BINARY = ("add", "sub", "mul", "div")
LEAVES = ("input", "param", "state", "const")


@dataclass(frozen=True)
class Node:
    op: str
    args: tuple["Node", ...] = ()
    shape: tuple[str, ...] = ()
    name: str | None = None          # input / param name
    value: float | None = None       # const value, pow exponent
    line: int = field(default=0, compare=False, hash=False)

    def __repr__(self) -> str:
        return to_text(self)

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()


@dataclass(frozen=True)
class Statement:
    """One assignment of the rule body: `target = <expr>` at `line`."""
    target: str
    node: Node
    line: int
    source: str


def walk(roots, skip=()) -> list[Node]:
    """Nodes reachable from roots, children before parents, each once; the nodes whose id is in skip
    are left out, with what is reachable only through them."""
    seen: dict[int, Node] = {}
    order: list[Node] = []
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            if id(n) not in seen:
                seen[id(n)] = n
                order.append(n)
            continue
        if id(n) in seen or id(n) in skip:
            continue
        stack.append((n, True))
        for a in reversed(n.args):
            if id(a) not in seen:
                stack.append((a, False))
    return order


def leaves(node: Node, op: str) -> set[str]:
    """Names of the leaves of kind op ('input' or 'param') under node."""
    return {n.name for n in walk([node]) if n.op == op}


def depends_on_state(node: Node) -> bool:
    return any(n.op == "state" for n in walk([node]))


def to_text(node: Node, names: dict[int, str] | None = None, limit: int | None = 1000) -> str:
    """Canonical one-line text of an expression (used for hashing and messages).

    names maps id(node) -> a name to print instead of the node's expression (earlier statements),
    which keeps the text linear in the rule's size even when values are reused many times.
    limit cuts every (sub)expression's text to that many characters and '...' (messages; None for
    the canonical text, which names the reused values instead, see shared()).
    """
    names = names or {}
    text = dict(names)
    sym = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@"}
    for n in walk([node], skip=names):           # children first, no recursion: deep rules print too
        args = [text[id(a)] for a in n.args]
        if n.op in ("input", "param"):
            out = n.name
        elif n.op == "state":
            out = "S"
        elif n.op == "const":
            out = repr(float(n.value))
        elif n.op == "pow":
            out = f"pow({args[0]}, {float(n.value)!r})"
        elif n.op in sym:
            out = f"({args[0]} {sym[n.op]} {args[1]})"
        elif n.op == "transpose":
            out = f"{args[0]}.T"
        else:
            out = f"{n.op}({', '.join(args)})"
        text[id(n)] = out if limit is None or len(out) <= limit else out[:limit] + "..."
    return text[id(node)]


def shared(roots) -> set[int]:
    """ids of the non-leaf nodes under roots that more than one node reads: printing each once, by a
    name, keeps a rule's text linear in its size (a helper that reuses a value n times nested would
    print 2^n copies)."""
    readers: dict[int, int] = {}
    for n in walk(roots):
        for a in {id(a): a for a in n.args}.values():
            readers[id(a)] = readers.get(id(a), 0) + (a.op not in LEAVES)
    return {i for i, c in readers.items() if c > 1}


# ---------------------------------------------------------------- constructors
# Small algebraic simplifications keep derived expressions (facts, derivatives)
# readable: x*1 -> x, x+0 -> x, 0*x -> 0, --x -> x, log(exp(x)) -> x.

def const(value: float, line: int = 0) -> Node:
    return Node("const", value=float(value), line=line)


def is_const(n: Node, value: float | None = None) -> bool:
    return n.op == "const" and (value is None or n.value == value)


def broadcast(a: Node, b: Node) -> tuple[str, ...] | None:
    if a.shape == b.shape or b.shape == ():
        return a.shape
    if a.shape == ():
        return b.shape
    return None


def _fold(op: str, x: float, y: float) -> float | None:
    """x op y where float arithmetic is exact, else None: 0.9 * 0.9 stays a product, so the checker's
    exact arithmetic sees the rule's own numbers on both sides of every proof."""
    if op == "div" and y == 0:
        return None
    fx, fy = Fraction(x), Fraction(y)
    exact = fx + fy if op == "add" else fx - fy if op == "sub" else fx * fy if op == "mul" else fx / fy
    try:
        out = float(exact)
    except OverflowError:
        return None
    return out if Fraction(out) == exact else None


def binary(op: str, a: Node, b: Node, line: int = 0) -> Node:
    shape = broadcast(a, b)
    assert shape is not None, (op, a.shape, b.shape)
    if is_const(a) and is_const(b) and a.shape == b.shape == ():
        folded = _fold(op, a.value, b.value)
        if folded is not None:
            return const(folded, line)
    if op == "add":
        if is_const(a, 0.0) and b.shape == shape:
            return b
        if is_const(b, 0.0) and a.shape == shape:
            return a
    if op == "sub":
        if is_const(b, 0.0) and a.shape == shape:
            return a
        if is_const(a, 0.0) and b.shape == shape:
            return unary("neg", b, line)
    if op == "mul":
        if is_const(a, 1.0) and b.shape == shape:
            return b
        if is_const(b, 1.0) and a.shape == shape:
            return a
        if (is_const(a, 0.0) or is_const(b, 0.0)) and shape == ():
            return const(0.0, line)
        if is_const(a, -1.0) and b.shape == shape:
            return unary("neg", b, line)
    if op == "div" and is_const(b, 1.0):
        return a
    return Node(op, (a, b), shape, line=line)


def unary(op: str, a: Node, line: int = 0) -> Node:
    if op == "neg":
        if a.op == "neg":
            return a.args[0]
        if is_const(a):
            return const(-a.value, line)
    if op == "log" and a.op == "exp":
        return a.args[0]
    if op == "exp" and a.op == "log":
        return a.args[0]
    return Node(op, (a,), a.shape, line=line)


def power(a: Node, exponent: float, line: int = 0) -> Node:
    if exponent == 1:
        return a
    return Node("pow", (a,), a.shape, value=float(exponent), line=line)


def matmul_shape(a: tuple, b: tuple) -> tuple | None:
    if len(a) == 2 and len(b) == 2 and a[1] == b[0]:
        return (a[0], b[1])
    if len(a) == 2 and len(b) == 1 and a[1] == b[0]:
        return (a[0],)
    if len(a) == 1 and len(b) == 2 and a[0] == b[0]:
        return (b[1],)
    if len(a) == 1 and len(b) == 1 and a[0] == b[0]:
        return ()
    return None


def matmul(a: Node, b: Node, line: int = 0) -> Node:
    shape = matmul_shape(a.shape, b.shape)
    assert shape is not None, (a.shape, b.shape)
    return Node("matmul", (a, b), shape, line=line)


def transpose(a: Node, line: int = 0) -> Node:
    if a.op == "transpose":
        return a.args[0]
    if len(a.shape) < 2:
        return a
    return Node("transpose", (a,), tuple(reversed(a.shape)), line=line)


def outer(a: Node, b: Node, line: int = 0) -> Node:
    return Node("outer", (a, b), (a.shape[0], b.shape[0]), line=line)


def diag(a: Node, line: int = 0) -> Node:
    return Node("diag", (a,), (a.shape[0], a.shape[0]), line=line)


def vsum(a: Node, line: int = 0) -> Node:
    return Node("sum", (a,), (), line=line)


def l2norm(a: Node, line: int = 0) -> Node:
    return Node("l2norm", (a,), a.shape, line=line)


def dot(a: Node, b: Node, line: int = 0) -> Node:
    """a . b for two vectors of the same dimension."""
    return matmul(a, b, line)
