"""The rule / selector DSL, its IR and the sympy checker (no triton here).

    from unifattn.dsl import rule, Vec, Scalar, Param, diag, exp, outer
"""
from .errors import RuleError
from .rule import (Param, Rule, Scalar, Sym, Vec, diag, exp, l2norm, log, logsigmoid, outer, relu, rule, sigmoid,
                   softplus, sqrt, trace, vsum)


def check(r):
    """Check a rule symbolically and return its Facts (cached on the rule)."""
    from .checker import check as _check
    return _check(r)


__all__ = ["RuleError", "Rule", "Sym", "Vec", "Scalar", "Param", "rule", "trace", "check", "diag", "exp", "log",
           "sqrt", "sigmoid", "softplus", "logsigmoid", "relu", "l2norm", "outer", "vsum"]
