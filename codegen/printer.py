"""Print IR expressions as Triton code: the printer only prints, it never decides.

Values live in registers with these layouts:
  scalar          a 0-d value
  vector over K   [BK] (lanes >= K masked to 0 after each statement)
  vector over V   [BV]
  matrix [K, V]   [BK, BV]     (other 2-D shapes follow their dims)

Semantic differences from Python/torch that the printer owns:
  - float literals are printed with a decimal point or exponent (Triton would
    make `2` an int32 and `1/2` an integer division);
  - softplus follows torch: x for x > 20, else log(1 + exp(x)); logsigmoid is
    min(x, 0) - log(1 + exp(-|x|)) (no overflow); sigmoid is 1 / (1 + exp(-x));
  - l2norm(x) = x / sqrt(sum(x^2) + 1e-6), the IR's definition;
  - x ** c: c = 2 -> x * x, 0.5 -> sqrt, -1 -> 1 / x, else exp(c * log(x)) (x > 0 only).
"""
from __future__ import annotations

from unifattn.dsl import ir


def literal(x: float) -> str:
    s = repr(float(x))
    if s in ("inf", "-inf", "nan"):
        return {"inf": "float('inf')", "-inf": "float('-inf')", "nan": "float('nan')"}[s]
    return s


# element-wise ops of one argument: Triton text with {x} for the operand. Where Python and Triton differ:
# softplus keeps torch's threshold (x > 20 is x), logsigmoid is written in its stable form.
UNARY = {
    "neg": "(-{x})",
    "exp": "tl.exp({x})",
    "log": "tl.log({x})",
    "sqrt": "tl.sqrt({x})",
    "sigmoid": "(1.0 / (1.0 + tl.exp(-({x}))))",
    "softplus": "tl.where({x} > 20.0, {x}, tl.log(1.0 + tl.exp(tl.minimum({x}, 20.0))))",
    "logsigmoid": "(tl.minimum({x}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({x}))))",
    "relu": "tl.maximum({x}, 0.0)",
    "heaviside": "tl.where({x} > 0.0, 1.0, 0.0)",
    "sum": "tl.sum({x}, axis=0)",
    "transpose": "tl.trans({x})",
}


class Printer:
    """names: id(node) -> Triton variable holding that node's value (inputs, params, statements)."""

    def __init__(self, names: dict[int, str]):
        self.names = names

    def __call__(self, n: ir.Node) -> str:
        if id(n) in self.names:
            return self.names[id(n)]
        op = n.op
        if op == "const":
            return literal(n.value)
        if op in ("input", "param", "state"):  # pragma: no cover - all leaves are named by the emitter
            raise KeyError(f"unnamed leaf {n}")
        if op in ("add", "sub", "mul", "div"):
            a, b = (self._arg(x, n) for x in n.args)
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
            return f"({a} {sym} {b})"
        if op == "matmul":
            return self._matmul(n)
        if op == "diag":
            raise NotImplementedError("diag(x) is printed only as a factor of '@'")
        x = self(n.args[0]) if n.args else ""
        if op in UNARY:
            return UNARY[op].format(x=x)
        if op == "pow":
            c = n.value
            if c == 2:
                return f"({x} * {x})"
            if c == 0.5:
                return f"tl.sqrt({x})"
            if c == -1:
                return f"(1.0 / {x})"
            return f"tl.exp({literal(c)} * tl.log({x}))"
        if op == "l2norm":
            return f"({x} / tl.sqrt(tl.sum({x} * {x}, axis=0) + {literal(ir.L2NORM_EPS)}))"
        if op == "outer":
            a, b = self(n.args[0]), self(n.args[1])
            return f"({a}[:, None] * {b}[None, :])"
        raise AssertionError(f"no Triton form for op {op}")  # pragma: no cover

    def _arg(self, x: ir.Node, parent: ir.Node) -> str:
        """Operand of an element-wise op; a vector meeting a matrix never happens (the tracer forbids it)."""
        return self(x)

    def _matmul(self, n: ir.Node) -> str:
        a, b = n.args
        ra, rb = len(a.shape), len(b.shape)
        if a.op == "diag":                                   # Diag(d) @ X: scale the rows
            d = self(a.args[0])
            return f"({d}[:, None] * {self(b)})" if rb == 2 else f"({d} * {self(b)})"
        if b.op == "diag":                                   # X @ Diag(d): scale the columns
            d = self(b.args[0])
            return f"({self(a)} * {d}[None, :])" if ra == 2 else f"({self(a)} * {d})"
        if a.op == "transpose" and ra == 2 and rb == 1:      # M^T x = sum over M's rows
            return f"tl.sum({self(a.args[0])} * {self(b)}[:, None], axis=0)"
        if ra == 2 and rb == 1:
            return f"tl.sum({self(a)} * {self(b)}[None, :], axis=1)"
        if ra == 1 and rb == 2:
            return f"tl.sum({self(a)}[:, None] * {self(b)}, axis=0)"
        if ra == 1 and rb == 1:
            return f"tl.sum({self(a)} * {self(b)}, axis=0)"
        # matrix @ matrix: broadcast-multiply and reduce the shared dimension
        return f"tl.sum({self(a)}[:, :, None] * {self(b)}[None, :, :], axis=1)"
