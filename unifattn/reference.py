"""The reference interpreter: any rule, token by token, in torch, any dtype.

It reads only the IR, so every rule has a reference for free. Everything that
does not depend on the state (gate parameterizations, normalizations, ...) is
evaluated once for all tokens; only the state-dependent statements run in the
time loop. Differentiable with autograd.

Shapes inside: token values are [B, T, HV, *shape], per-step values
[B, HV, *shape], state [B, HV, K, V], params broadcast as [1, (1,) HV, *shape].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unifattn.dsl import ir
from unifattn.dsl.rule import Rule

_UNARY = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "logsigmoid": F.logsigmoid,
    "relu": torch.relu,
}


def _align(x: torch.Tensor, have: int, want: int) -> torch.Tensor:
    """Add trailing singleton dims so a value of rank `have` broadcasts to rank `want`."""
    for _ in range(want - have):
        x = x.unsqueeze(-1)
    return x


def evaluate(node: ir.Node, env: dict, memo: dict) -> torch.Tensor:
    """Value of node; env maps input/param names (and 'S') to tensors."""
    key = id(node)
    if key in memo:
        return memo[key]
    op = node.op
    if op in ("input", "param"):
        out = env[node.name]
    elif op == "state":
        out = env["S"]
    elif op == "const":
        out = torch.tensor(node.value, dtype=env["__dtype__"], device=env["__device__"])
    elif op in ir.BINARY:
        a, b = node.args
        x, y = evaluate(a, env, memo), evaluate(b, env, memo)
        r = len(node.shape)
        x, y = _align(x, len(a.shape), r), _align(y, len(b.shape), r)
        out = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op](x, y)
    elif op in _UNARY:
        out = _UNARY[op](evaluate(node.args[0], env, memo))
    elif op == "pow":
        out = evaluate(node.args[0], env, memo) ** node.value
    elif op == "l2norm":
        x = evaluate(node.args[0], env, memo)
        out = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + ir.L2NORM_EPS)
    elif op == "sum":
        out = evaluate(node.args[0], env, memo).sum(-1)
    elif op == "diag":
        out = torch.diag_embed(evaluate(node.args[0], env, memo))
    elif op == "outer":
        a, b = (evaluate(x, env, memo) for x in node.args)
        out = a.unsqueeze(-1) * b.unsqueeze(-2)
    elif op == "transpose":
        out = evaluate(node.args[0], env, memo).transpose(-1, -2)
    elif op == "matmul":
        out = _matmul(node, env, memo)
    else:  # pragma: no cover - the tracer only builds the ops above
        raise AssertionError(f"unknown op {op}")
    memo[key] = out
    return out


def _matmul(node: ir.Node, env: dict, memo: dict) -> torch.Tensor:
    a, b = node.args
    if a.op == "diag":                       # Diag(d) @ X: scale rows, no K x K matrix
        d = evaluate(a.args[0], env, memo)
        x = evaluate(b, env, memo)
        return d.unsqueeze(-1) * x if len(b.shape) == 2 else d * x
    x, y = evaluate(a, env, memo), evaluate(b, env, memo)
    ra, rb = len(a.shape), len(b.shape)
    if ra == 2 and rb == 2:
        return x @ y
    if ra == 2 and rb == 1:
        return (x * y.unsqueeze(-2)).sum(-1)
    if ra == 1 and rb == 2:
        return (x.unsqueeze(-1) * y).sum(-2)
    return (x * y).sum(-1)


def run_reference(r: Rule, inputs: dict, S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run rule r over one batch of sequences.

    inputs: name -> token tensor [B, T, HV, *shape] or param tensor [HV, *shape],
    all in the compute dtype. S0: [B, HV, K, V]. Returns o [B, T, HV, V], S_T.
    """
    dtype, device = S0.dtype, S0.device
    T = inputs["q"].shape[1]
    kinds = {s.name: s.kind for s in r.inputs}
    roots = [r.new_state, r.output]
    nodes = ir.walk(roots)
    dep = _state_dependence(nodes)

    # hoisted evaluation of state-free nodes over all tokens: [B, T, HV, *shape]
    env_all = {"__dtype__": dtype, "__device__": device}
    for name, x in inputs.items():
        if kinds[name] == "param":
            env_all[name] = x.reshape((1, 1) + tuple(x.shape))
        else:
            env_all[name] = x
    hoist: dict = {}
    for n in nodes:
        if not dep[id(n)] and n.op != "const":
            evaluate(n, env_all, hoist)

    S = S0
    outs = []
    env_t = {"__dtype__": dtype, "__device__": device}
    for t in range(T):
        memo = {k: (v if v.dim() < 2 else v[:, t] if v.shape[1] == T else v[:, 0]) for k, v in hoist.items()}
        env_t["S"] = S
        S_new = evaluate(r.new_state, env_t, memo)
        o = evaluate(r.output, env_t, memo)
        outs.append(o)
        S = S_new
    if outs:
        o = torch.stack(outs, 1)
    else:
        o = S0.new_zeros((S0.shape[0], 0, S0.shape[1], S0.shape[3]))
    return o, S


def _state_dependence(nodes: list[ir.Node]) -> dict[int, bool]:
    dep: dict[int, bool] = {}
    for n in nodes:                      # children first
        dep[id(n)] = n.op == "state" or any(dep[id(a)] for a in n.args)
    return dep

