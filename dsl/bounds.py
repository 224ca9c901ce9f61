"""Interval bounds on a selector's score: when finite inputs cannot give a NaN score.

    score_bound(lightning_indexer, {"qi": 3.1, "ki": 4.0, "w": 0.9}, {"HI": 16, "DI": 64})   # 11427.84

Given |x| <= amax[x] for every input (the largest magnitudes, read by select()'s input
scan), interval arithmetic over the score's IR bounds every value the score computes,
in exact arithmetic. When every bound is far below fp32's largest value (a margin of
2^16 covers the rounding of fp32 sums and products, which stays within a relative n*eps
of the exact value), no intermediate overflows, so a NaN score cannot come from
inf - inf or 0 * inf; with no op that is undefined somewhere in its operand's interval,
the score is then finite for these inputs, and select() skips its NaN-score flag and the
sync that reads it.

The proof is refused (None) for: log, sqrt, a division by anything but a nonzero
constant, a power with a negative or fractional exponent (each can be NaN or inf
inside an interval, and rounding can move an operand across 0), exp-family ops whose
argument can pass +-80 (exp overflows in fp32 near 88.7), and magnitudes past the
margin. select() then keeps the flag, as before. Sound, not tight: a refusal only costs
the flag.
"""
from __future__ import annotations

import math

from . import ir

FP32_MAX = 3.4028234663852886e38
MARGIN = 2.0 ** 16
EXP_ARG = 80.0               # exp, sigmoid, softplus, logsigmoid arguments stay within +-EXP_ARG


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _monotone(f, lo: float, hi: float):
    if max(abs(lo), abs(hi)) > EXP_ARG:
        return None
    return f(lo), f(hi)


def _mul(a, b):
    p = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    return min(p), max(p)


def _pow(a, e: float):
    lo, hi = a
    if e < 0 or e != int(e):
        return None
    e = int(e)
    ends = (lo ** e, hi ** e)
    if e % 2 == 0 and lo < 0 < hi:
        return 0.0, max(ends)
    return min(ends), max(ends)


def _node(n: ir.Node, args: list, amax: dict, dims: dict):
    """The interval of node n from its operands' intervals; None when unbounded or maybe undefined."""
    op = n.op
    if op == "input":
        m = amax[n.name]
        return -m, m
    if op == "const":
        return n.value, n.value
    if op in ("param", "state"):
        return None
    if op == "add":
        return args[0][0] + args[1][0], args[0][1] + args[1][1]
    if op == "sub":
        return args[0][0] - args[1][1], args[0][1] - args[1][0]
    if op == "mul":
        return _mul(args[0], args[1])
    if op == "div":
        b = n.args[1]
        if not (ir.is_const(b) and b.value != 0):
            return None
        return _mul(args[0], (1.0 / b.value, 1.0 / b.value))
    if op == "neg":
        return -args[0][1], -args[0][0]
    if op == "relu":
        return max(args[0][0], 0.0), max(args[0][1], 0.0)
    if op == "exp":
        return _monotone(math.exp, *args[0])
    if op == "sigmoid":
        return _monotone(_sigmoid, *args[0])
    if op == "softplus":
        return _monotone(_softplus, *args[0])
    if op == "logsigmoid":
        return _monotone(lambda x: -_softplus(-x), *args[0])
    if op == "pow":
        return _pow(args[0], n.value)
    if op == "l2norm":                   # x / sqrt(sum(x^2) + eps): every component within [-1, 1]
        return -1.0, 1.0
    if op == "sum":
        d = dims[n.args[0].shape[-1]]
        return d * args[0][0], d * args[0][1]
    if op == "matmul":                   # products of entries, summed over the contracted dimension
        lo, hi = _mul(args[0], args[1])
        d = dims[n.args[0].shape[-1]]
        return d * lo, d * hi
    if op == "outer":
        return _mul(args[0], args[1])
    if op == "transpose":
        return args[0]
    if op == "diag":
        return min(args[0][0], 0.0), max(args[0][1], 0.0)
    return None                          # log, sqrt, and anything new: no proof


def score_bound(sel, amax: dict, dims: dict) -> float | None:
    """The largest |value| that any node of sel's score can take when |input| <= amax[input]
    (exact arithmetic), or None when the score may be NaN or inf for such inputs (see the
    module docstring). dims: dimension name -> size."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
           for v in amax.values()):
        return None
    cap = FP32_MAX / MARGIN
    seen: dict[int, tuple] = {}
    worst = 0.0
    for n in ir.walk([sel.score]):
        args = [seen[id(a)] for a in n.args]
        try:
            got = _node(n, args, amax, dims)
        except OverflowError:            # a power past float64's range
            return None
        if got is None or not all(math.isfinite(v) for v in got):
            return None
        big = max(abs(got[0]), abs(got[1]))
        if big > cap:
            return None
        worst = max(worst, big)
        seen[id(n)] = got
    return worst
