"""Generated kernels of user-declared rules (not the built-ins) against the float64 reference.

Two corners the built-in rules never reach:
  - K, V not powers of two with a reduction (l2norm, vsum, @) over a value that is not 0 in the
    padding lanes of its [BK] / [BV] block (exp(k) is 1 there): the printer masks its argument;
  - a decay or beta that is a constant: the chunk form's prep kernel reads no input at all.
Runs on the CPU through the Triton interpreter; assert_matches_reference runs the kernels inside
`poisoned()` (an output element no kernel writes is NaN and fails).
"""
import pytest
import torch

import unifattn as ua
from unifattn import codegen
from unifattn.dsl import Param, Vec, check, exp, l2norm, outer, rule, sigmoid, vsum
from unifattn.testing import assert_matches_reference, make_inputs

K, V = 20, 12             # BK = 32, BV = 16: 12 and 4 padding lanes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UNIFATTN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@rule(state=("K", "V"))
def norm_of_exp(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S + outer(l2norm(exp(k)), v)             # exp(k) is 1 in the padding lanes
    return S, S.T @ q


@rule(state=("K", "V"))
def norm_of_exp_statement(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    ke = exp(k)                                  # a statement: the chunk form's prep kernel does not mask it
    kn = l2norm(ke)
    S = S + outer(kn, v)
    return S, S.T @ q


@rule(state=("K", "V"))
def shifted_dot(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], w: Param["K"]):
    S = S + outer(k, v)
    return S, S.T @ (q * ((k + 1) @ (w + 1)))   # a dot product of two vectors that are 1 in the padding


@rule(state=("K", "V"))
def value_norm(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S + outer(k, l2norm(v + 1))              # a reduction over V
    return S, S.T @ q


@rule(state=("K", "V"))
def summed_beta(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S + sigmoid(0.1 * vsum(sigmoid(k)) - 1) * outer(k, v - S.T @ k)   # a scalar fact from a vsum
    return S, S.T @ q


def _ones_outer(k, v):
    """outer(k + 1, v + 1), inline (a statement would be masked): not 0 in any padding lane."""
    return outer(k + 1, v + 1)


@rule(state=("K", "V"))
def shifted_matrices(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S + outer(k, v)
    P = _ones_outer(k, v)                        # a statement: masked, 0 in the padding lanes
    x = q + 1
    mt_x = _ones_outer(k, v).T @ x               # M^T x, over K
    x_m = x @ _ones_outer(k, v)                  # x M, over K
    m_y = S.T @ (_ones_outer(k, v) @ (v + 1))    # M y, over V
    mm_x = P.T @ (_ones_outer(k, v) @ _ones_outer(k, v).T @ x)    # M M^T, over V
    return S, S.T @ q + 0.01 * (mt_x + x_m + m_y + 0.01 * mm_x)


def _both_forms_match(r, seed):
    """r has the chunk form, and both kernel forms match the float64 reference (T=70, HV=2, K=20, V=12)."""
    assert check(r).forms == ("chunk", "recurrent")
    case = make_inputs(r, B=1, T=70, H=1, HV=2, K=K, V=V, initial_state=True, seed=seed, device=DEVICE)
    for form in ("chunk", "recurrent"):
        assert_matches_reference(r, form=form, **case)


@pytest.mark.parametrize("r", [norm_of_exp, norm_of_exp_statement, shifted_dot, value_norm, summed_beta],
                         ids=lambda r: r.name)
def test_reductions_skip_the_padding_lanes(r):
    _both_forms_match(r, seed=1)


def test_matrix_reductions_skip_the_padding_lanes():
    """M^T x, M y, x M and M M^T over padded [BK, BV] tiles (the output is not S^T q: recurrent only)."""
    assert check(shifted_matrices).forms == ("recurrent",)
    case = make_inputs(shifted_matrices, B=1, T=9, H=1, K=K, V=V, initial_state=True, seed=2, device=DEVICE)
    for x in ("q", "k", "v"):
        case[x] = 0.3 * case[x]
    assert_matches_reference(shifted_matrices, form="recurrent", **case)


def test_masks_only_where_the_padding_is_not_provably_zero():
    """exp(k) is masked before its sum; the built-in rules' reductions (of masked loads and the
    state) print as they did, with no mask."""
    src = codegen.source(norm_of_exp, "recurrent")
    assert "tl.sum(tl.where(m_k, tl.exp(b_k) * tl.exp(b_k), 0.0), axis=0)" in src
    src = codegen.source(value_norm, "chunk")
    assert "tl.sum(tl.where(m_v, (b_v + 1.0) * (b_v + 1.0), 0.0), axis=0)" in src
    for r in ua.rules.BUILTIN.values():
        for form in check(r).forms:
            assert "tl.sum(tl.where(" not in codegen.source(r, form), (r.name, form)


@rule(state=("K", "V"))
def constant_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = 0.5 * S + outer(k, v)                    # log_gate = log(0.5): a fact with no input
    return S, S.T @ q


@rule(state=("K", "V"))
def constant_sigmoid_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = sigmoid(2.0) * S + outer(k, v)           # log(sigmoid(2.0)): a math function of a constant
    return S, S.T @ q


@rule(state=("K", "V"))
def constant_beta(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S + 0.5 * outer(k, v - S.T @ k)          # beta = 0.5
    return S, S.T @ q


@rule(state=("K", "V"))
def constant_gate_and_beta(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = 0.9 * S
    S = S + 0.5 * outer(k, v - S.T @ k)
    return S, S.T @ q


@pytest.mark.parametrize("r", [constant_decay, constant_sigmoid_decay, constant_beta, constant_gate_and_beta],
                         ids=lambda r: r.name)
def test_constant_gate_and_beta(r):
    """The chunk form's prep kernel reads no input (it used to be printed with an empty argument)."""
    _both_forms_match(r, seed=3)


def _gated(name: str):
    """simple_gla with its log-gate input called `name`."""
    from unifattn.dsl import Scalar, softplus
    src = (f"def gated_{name}(S, q: Vec['K'], k: Vec['K'], v: Vec['V'], {name}: Scalar):\n"
           f"    S = exp(-softplus({name})) * S + outer(k, v)\n"
           f"    return S, S.T @ q\n")
    env = dict(Vec=Vec, Scalar=Scalar, exp=exp, softplus=softplus, outer=outer)
    exec(compile(src, f"<gated_{name}>", "exec"), env)
    return rule(state=("K", "V"))(env[f"gated_{name}"])


@pytest.mark.parametrize("name, forms", [("o", ("recurrent",)), ("T", ("recurrent",)), ("K", ("chunk", "recurrent")),
                                         ("tl", ("chunk", "recurrent")), ("i_t", ("chunk", "recurrent")),
                                         ("bos", ("recurrent",)), ("BV", ("chunk", "recurrent")),
                                         ("i_hv", ("chunk", "recurrent"))])
def test_input_names_that_the_generated_code_uses_raise(name, forms):
    """An input named like a parameter or a local of a generated kernel (a duplicate argument, or a name the
    kernel assigns or uses as a module) gets a RuleError that names it, in the forms whose kernel has the name;
    the reference form still runs it."""
    from unifattn.dsl.errors import RuleError
    r = _gated(name)
    case = make_inputs(r, B=1, T=9, H=1, K=8, V=8, seed=3, device=DEVICE)
    for form in forms:
        with pytest.raises(RuleError, match=rf"got {name}: the kernel would declare or assign them twice.*"
                                            rf"Fix: rename the input\(s\), e\.g\. {name} -> {name}_in"):
            codegen.source(r, form)
    ua.ops.linear_attention(r, form="reference", **case)


@pytest.mark.parametrize("name", ["h", "b_h", "stride", "B", "NT", "chunk", "o_gate", "x"])
def test_input_names_near_the_generated_ones_run(name):
    """Names close to the generated code's own (b_h, stride, ...), or a host function's (x), are not refused:
    both forms match the float64 reference; `o` is refused by the recurrent kernel only, so its chunk form
    runs."""
    _both_forms_match(_gated(name), seed=4)
    r = _gated("o")
    assert_matches_reference(r, form="chunk", **make_inputs(r, B=1, T=9, H=1, K=8, V=8, seed=5, device=DEVICE))
