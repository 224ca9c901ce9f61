"""unifattn: linear and sparse attention from short rules.

    import unifattn as ua
    o, S = ua.ops.linear_attention(ua.rules.kda, q, k, v, g=g, beta=beta, form="chunk")
"""
from unifattn import codegen, dsl, hybrid, layers, ops, rules  # noqa: F401

__version__ = "0.1.0"
