"""Built-in rules: each attention variant is its recurrence, written like the paper.

State S is [K, V]; o_t = S_t^T q_t (the scale is applied by the op). Log-gates
are log-space decays (g <= 0 means S decays by exp(g)). ALGORITHMS.md §1 has
the table these follow.
"""
from unifattn.dsl import Param, Scalar, Vec, diag, exp, l2norm, log, logsigmoid, outer, rule, sigmoid, softplus


@rule(state=("K", "V"))
def linear_attention(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    """Linear attention / Hebbian: S += k v^T (Katharopoulos et al., 2006.16236)."""
    S = S + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def retnet(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], gamma: Param):
    """RetNet: a fixed decay gamma per head, 0 < gamma <= 1 (2307.08621)."""
    S = gamma * S + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def mamba2(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Scalar, A_log: Param, dt_bias: Param):
    """Mamba2 / SSD: scalar decay g = -exp(A_log) * softplus(x + dt_bias), write dt * k v^T (2405.21060)."""
    dt = softplus(x + dt_bias)
    g = -exp(A_log) * dt
    S = exp(g) * S + outer(dt * k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def simple_gla(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
    """Scalar-gated linear attention: S = exp(g) S + k v^T, g <= 0 a per-head log-gate."""
    S = exp(g) * S + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def gla(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"]):
    """Gated linear attention: per-channel decay Diag(exp(g)), g <= 0 (2312.06635)."""
    S = diag(exp(g)) @ S + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def deltanet(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], beta: Scalar):
    """DeltaNet: one step of the delta rule, S += beta k (v - S^T k)^T (2406.06484)."""
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q


@rule(state=("K", "V"))
def gated_deltanet(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar, beta: Scalar):
    """Gated DeltaNet: scalar decay exp(g) then a delta-rule write (2412.06464)."""
    S = exp(g) * S
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q


@rule(state=("K", "V"))
def kda(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar):
    """Kimi Delta Attention: per-channel decay, then a delta-rule write (2510.26692)."""
    S = diag(exp(g)) @ S
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q


@rule(state=("K", "V"))
def dplr(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], a: Vec["K"], b: Vec["K"]):
    """Diagonal plus low rank: S = (Diag(exp(g)) + a b^T) S + k v^T (2503.14456)."""
    S = diag(exp(g)) @ S + outer(a, S.T @ b) + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def rwkv7(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], w: Vec["K"], kk: Vec["K"], a: Vec["K"]):
    """RWKV-7 'Goose': decay exp(-e^-0.5 sigmoid(w)), in-context rate a in (0,1) on the
    normalized removal key kk: A = Diag(decay) - (a*kk) kk^T (2503.14456)."""
    decay = exp(-0.6065306597126334 * sigmoid(w))
    kk = l2norm(kk)
    a = sigmoid(a)
    S = diag(decay) @ S - outer(a * kk, S.T @ kk) + outer(k, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def longhorn(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], beta: Scalar):
    """Longhorn: implicit online regression, eps = beta / (1 + beta |k|^2) (2407.14207)."""
    beta = sigmoid(beta)
    eps = beta / (1 + beta * (k @ k))
    S = S + eps * outer(k, v - S.T @ k)
    return S, S.T @ q


BUILTIN = {r.name: r for r in (linear_attention, retnet, mamba2, simple_gla, gla, deltanet, gated_deltanet,
                               kda, dplr, rwkv7, longhorn)}

__all__ = list(BUILTIN)

# silence "imported but unused" for primitives kept available to readers of this file
_ = (log, logsigmoid)

# selectors (sparse top-k): DeepSeek's lightning indexer and MoBA's block scores
from unifattn.selectors import lightning_indexer, moba  # noqa: E402

SELECTORS = {"lightning_indexer": lightning_indexer, "moba": moba}
__all__ += list(SELECTORS)
