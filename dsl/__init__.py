"""The rule / selector DSL, its IR and the sympy checker (no triton here)."""
