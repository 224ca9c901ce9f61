"""Which forms a rule's decay admits (dsl/checker.py, _bounds): the chunk kernels take logs of the
decays, so a decay computed inside the rule must be proved to lie in (0, 1] (sign assumptions, or
interval arithmetic over the whole real line); otherwise form='chunk' is refused with a RuleError and
the recurrent form, exact for any decay, still runs. A decay that is identically 0 has no log-gate:
recurrent form only."""
import pytest
import torch

from unifattn.dsl import Scalar, Vec, check, diag, exp, outer, relu, rule, sigmoid, softplus
from unifattn.dsl.errors import RuleError
from unifattn.testing import assert_matches_reference, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@rule(state=("K", "V"))
def negated_sigmoid(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Scalar):
    S = -sigmoid(x) * S + outer(k, v)                  # a decay in (-1, 0)
    return S, S.T @ q


@rule(state=("K", "V"))
def shifted_sigmoid(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Vec["K"]):
    S = diag(sigmoid(x) - 1) @ S + outer(k, v)         # per channel in (-1, 0)
    return S, S.T @ q


@rule(state=("K", "V"))
def relu_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Scalar):
    S = relu(x) * S + outer(k, v)                      # >= 0 but unbounded above
    return S, S.T @ q


@rule(state=("K", "V"))
def forgets(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = 0 * S + outer(k, v)                            # no memory at all
    return S, S.T @ q


@rule(state=("K", "V"))
def sigmoid_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Scalar, y: Scalar):
    S = sigmoid(x) * sigmoid(y) * S + outer(k, v)      # in (0, 1): proved by interval arithmetic
    return S, S.T @ q


@rule(state=("K", "V"))
def softplus_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], x: Vec["K"]):
    S = diag(exp(-softplus(x))) @ S + outer(k, v)
    return S, S.T @ q


def _case(r, T=40):
    g = torch.Generator().manual_seed(3)
    x = make_inputs(r, B=1, T=T, H=1, K=8, V=8, seed=1)
    for s in r.inputs:                                  # the gate inputs: any real value, both signs
        if s.name in ("x", "y"):
            x[s.name] = 2 * torch.randn(x[s.name].shape, generator=g, dtype=x[s.name].dtype)
    return {n: (t.to(DEVICE) if torch.is_tensor(t) else t) for n, t in x.items()}


@pytest.mark.parametrize("r", [negated_sigmoid, shifted_sigmoid, relu_decay, forgets], ids=lambda r: r.name)
def test_unproved_or_zero_decays_refuse_the_chunk_form_and_run_recurrent(r):
    f = check(r)
    assert f.forms == ("recurrent",), f.forms
    case = _case(r)
    with pytest.raises(RuleError, match=r"form='chunk'.*(not proved to lie in \(0, 1\]|identically 0)"):
        assert_matches_reference(r, form="chunk", **case)
    assert_matches_reference(r, form="recurrent", **case)


@pytest.mark.parametrize("r", [sigmoid_decay, softplus_decay], ids=lambda r: r.name)
def test_decays_proved_in_unit_interval_keep_the_chunk_form(r):
    f = check(r)
    assert f.forms == ("chunk", "recurrent") and f.bounds["log_gate <= 0"] == "proved from the parameterization"
    case = _case(r, T=70)
    assert_matches_reference(r, form="chunk", **case)
    assert_matches_reference(r, form="recurrent", **case)
