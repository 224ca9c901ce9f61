"""Print IR expressions as Triton code: the printer only prints, it never decides.

Values live in registers with these layouts:
  scalar          a 0-d value
  vector over K   [BK]         lanes >= K are padding (BK = next power of two >= K)
  vector over V   [BV]
  matrix [K, V]   [BK, BV]     (other 2-D shapes follow their dims)

Padding lanes hold whatever the expression makes of them (exp(k) is 1 there), so a reduction
over a feature dimension (sum, l2norm, @) masks its argument with tl.where(m_k, ..., 0.0) unless
that argument is provably 0 in every padding lane, for every input, NaN and inf included:
  - names the emitter declares zero: masked loads (other=0.0), the state, statements it masks;
  - neg / relu / sqrt / heaviside / transpose / x ** 2 / x ** 0.5 of a zero value;
  - a + b, a - b, a * b of two zero values; a zero value times, or over (nonzero), a finite constant.
Nothing else counts: 0 * x is NaN where x is inf, so a zero factor times data or a scalar is masked.
The built-in rules' reductions (S^T k, S^T q, k @ k, l2norm of a raw input) are of zero values and
print with no mask. Values are not masked otherwise: the emitter masks what it stores or keeps.

Semantic differences from Python/torch that the printer owns:
  - float literals are printed with a decimal point or exponent (Triton would
    make `2` an int32 and `1/2` an integer division);
  - softplus follows torch: x for x > 20, else log(1 + exp(x)); logsigmoid is
    min(x, 0) - log(1 + exp(-|x|)) (no overflow); sigmoid is 1 / (1 + exp(-x));
  - l2norm(x) = x / sqrt(sum(x^2) + 1e-6), the IR's definition;
  - x ** c: c = 2 -> x * x, 0.5 -> sqrt, -1 -> 1 / x, else exp(c * log(x)) (x > 0 only).
"""
from __future__ import annotations

import math

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
    "transpose": "tl.trans({x})",
}


class Printer:
    """names: id(node) -> Triton variable holding that node's value (inputs, params, statements).
    zero: ids of named nodes that are 0 in every padding lane; masks: dimension -> its lane mask
    (m_k, m_v), needed by a reduction whose argument is not provably 0 there."""

    def __init__(self, names: dict[int, str], zero=(), masks: dict[str, str] | None = None):
        self.names = names
        self.zero = set(zero)
        self.masks = masks
        self._zero: dict[int, bool] = {}

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
        if op == "sum":
            return f"tl.sum({self._lanes(x, n.args, n.args[0].shape[0])}, axis=0)"
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
            sq = self._lanes(f"{x} * {x}", n.args, n.args[0].shape[0])
            return f"({x} / tl.sqrt(tl.sum({sq}, axis=0) + {literal(ir.L2NORM_EPS)}))"
        if op == "outer":
            a, b = self(n.args[0]), self(n.args[1])
            return f"({a}[:, None] * {b}[None, :])"
        raise AssertionError(f"no Triton form for op {op}")  # pragma: no cover

    def _arg(self, x: ir.Node, parent: ir.Node) -> str:
        """Operand of an element-wise op; a vector meeting a matrix never happens (the tracer forbids it)."""
        return self(x)

    def mark_zero(self, n: ir.Node) -> None:
        """n's variable is now masked: 0 in the padding lanes."""
        self.zero.add(id(n))
        self._zero.clear()

    def is_zero(self, n: ir.Node) -> bool:
        """n is 0 in every padding lane for every input (see the module docstring)."""
        hit = self._zero.get(id(n))
        if hit is None:
            hit = self._zero[id(n)] = self._is_zero(n)
        return hit

    def _is_zero(self, n: ir.Node) -> bool:
        op, args = n.op, n.args
        if id(n) in self.zero:
            return True
        if op in ("neg", "relu", "sqrt", "heaviside", "transpose") or (op == "pow" and n.value in (2, 0.5)):
            return self.is_zero(args[0])
        if op in ("add", "sub"):
            return self.is_zero(args[0]) and self.is_zero(args[1])
        if op == "mul":
            a, b = args
            return (self.is_zero(a) and (self.is_zero(b) or _finite_const(b))) or (self.is_zero(b) and _finite_const(a))
        if op == "div":
            a, b = args
            return self.is_zero(a) and _finite_const(b) and b.value != 0
        return False

    def _lanes(self, text: str, factors, dim: str, index: str = "") -> str:
        """text, the product of factors, as the argument of a reduction over dim (the mask broadcast by
        index): as is when every factor is 0 in the padding lanes, else with those lanes set to 0."""
        if all(self.is_zero(f) for f in factors):
            return text
        assert self.masks is not None, "a reduction over a feature dimension needs the lane masks"
        return f"tl.where({self.masks[dim]}{index}, {text}, 0.0)"

    def _matmul(self, n: ir.Node) -> str:
        a, b = n.args
        ra, rb = len(a.shape), len(b.shape)
        if a.op == "diag":                                   # Diag(d) @ X: scale the rows
            d = self(a.args[0])
            return f"({d}[:, None] * {self(b)})" if rb == 2 else f"({d} * {self(b)})"
        if b.op == "diag":                                   # X @ Diag(d): scale the columns
            d = self(b.args[0])
            return f"({self(a)} * {d}[None, :])" if ra == 2 else f"({self(a)} * {d})"
        d = b.shape[0]                                       # the reduced dimension
        if a.op == "transpose" and ra == 2 and rb == 1:      # M^T x = sum over M's rows
            t = f"{self(a.args[0])} * {self(b)}[:, None]"
            return f"tl.sum({self._lanes(t, (a.args[0], b), d, '[:, None]')}, axis=0)"
        if ra == 2 and rb == 1:
            t = f"{self(a)} * {self(b)}[None, :]"
            return f"tl.sum({self._lanes(t, n.args, d, '[None, :]')}, axis=1)"
        if ra == 1 and rb == 2:
            t = f"{self(a)}[:, None] * {self(b)}"
            return f"tl.sum({self._lanes(t, n.args, d, '[:, None]')}, axis=0)"
        if ra == 1 and rb == 1:
            return f"tl.sum({self._lanes(f'{self(a)} * {self(b)}', n.args, d)}, axis=0)"
        # matrix @ matrix: broadcast-multiply and reduce the shared dimension
        t = f"{self(a)}[:, :, None] * {self(b)}[None, :, :]"
        return f"tl.sum({self._lanes(t, n.args, d, '[None, :, None]')}, axis=1)"


def _finite_const(n: ir.Node) -> bool:
    return n.op == "const" and math.isfinite(n.value)
