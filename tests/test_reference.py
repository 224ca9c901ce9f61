"""The reference interpreter (form="reference") against hand-written float64 token loops.

Every loop below is written from the paper's recurrence (ALGORITHMS.md §1), one
token, one batch row and one value head at a time; none of them touches the
library's evaluator. State S is [K, V]; o_t = scale * S_t^T q_t, scale K**-0.5
by default; value head i reads q/k (and H-headed extra inputs) of head
i // (HV // H); per-head params are [HV, ...].
"""
import math

import pytest
import torch
import torch.nn.functional as F

import unifattn as ua
from unifattn.dsl import (Param, Scalar, Vec, diag, exp, l2norm, log, logsigmoid, outer, relu, rule, sigmoid,
                          softplus, sqrt, vsum)
from unifattn.ops import linear_attention

DT = torch.float64
K, V = 4, 3


# --------------------------------------------------------------------------- hand-written steps
# step(S, x) -> new S; x holds this token's (and head's) inputs; S is [K, V].

def _outer(a, b):
    return a[:, None] * b[None, :]


def _delta(S, k, v, beta):
    return S + beta * _outer(k, v - S.T @ k)


def _l2norm(x):
    return x / torch.sqrt((x * x).sum() + 1e-6)


STEPS = {
    "linear_attention": lambda S, x: S + _outer(x["k"], x["v"]),
    "retnet": lambda S, x: x["gamma"] * S + _outer(x["k"], x["v"]),
    "mamba2": lambda S, x: (torch.exp(-torch.exp(x["A_log"]) * F.softplus(x["x"] + x["dt_bias"])) * S
                            + F.softplus(x["x"] + x["dt_bias"]) * _outer(x["k"], x["v"])),
    "simple_gla": lambda S, x: torch.exp(x["g"]) * S + _outer(x["k"], x["v"]),
    "gla": lambda S, x: torch.exp(x["g"])[:, None] * S + _outer(x["k"], x["v"]),
    "deltanet": lambda S, x: _delta(S, x["k"], x["v"], x["beta"]),
    "gated_deltanet": lambda S, x: _delta(torch.exp(x["g"]) * S, x["k"], x["v"], x["beta"]),
    "kda": lambda S, x: _delta(torch.exp(x["g"])[:, None] * S, x["k"], x["v"], x["beta"]),
    "dplr": lambda S, x: torch.exp(x["g"])[:, None] * S + _outer(x["a"], S.T @ x["b"]) + _outer(x["k"], x["v"]),
    "rwkv7": lambda S, x: (torch.exp(-math.exp(-0.5) * torch.sigmoid(x["w"]))[:, None] * S
                           - _outer(torch.sigmoid(x["a"]) * _l2norm(x["kk"]), S.T @ _l2norm(x["kk"]))
                           + _outer(x["k"], x["v"])),
    "longhorn": lambda S, x: S + (torch.sigmoid(x["beta"]) / (1 + torch.sigmoid(x["beta"]) * (x["k"] @ x["k"])))
                             * _outer(x["k"], x["v"] - S.T @ x["k"]),
}

# name -> (kind, trailing shape, sampler); kind "token" is [B, T, heads, *tail], "param" is [HV, *tail]
EXTRAS = {
    "retnet": {"gamma": ("param", (), "decay")},
    "mamba2": {"x": ("token", (), "normal"), "A_log": ("param", (), "normal"), "dt_bias": ("param", (), "normal")},
    "simple_gla": {"g": ("token", (), "loggate")},
    "gla": {"g": ("token", (K,), "loggate")},
    "deltanet": {"beta": ("token", (), "unit")},
    "gated_deltanet": {"g": ("token", (), "loggate"), "beta": ("token", (), "unit")},
    "kda": {"g": ("token", (K,), "loggate"), "beta": ("token", (), "unit")},
    "dplr": {"g": ("token", (K,), "loggate"), "a": ("token", (K,), "small"), "b": ("token", (K,), "small")},
    "rwkv7": {"w": ("token", (K,), "normal"), "kk": ("token", (K,), "normal"), "a": ("token", (K,), "normal")},
    "longhorn": {"beta": ("token", (), "normal")},
    "linear_attention": {},
}
ALL = list(STEPS)


def _sample(how, shape, gen):
    u = torch.rand(*shape, generator=gen, dtype=DT)
    n = torch.randn(*shape, generator=gen, dtype=DT)
    return {"decay": 0.5 + 0.5 * u, "loggate": -1.5 * u, "unit": u, "normal": 0.5 * n, "small": 0.3 * n}[how]


def make_case(name, *, B=2, T=5, H=2, HV=None, extra_heads="HV", seed=0):
    """q, k [B, T, H, K]; v [B, T, HV, V]; extra inputs with H or HV heads; float64."""
    HV = HV or H
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=DT), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=DT)
    extras = {}
    for n, (kind, tail, how) in EXTRAS[name].items():
        heads = H if extra_heads == "H" else HV
        shape = ((HV,) if kind == "param" else (B, T, heads)) + tail
        extras[n] = _sample(how, shape, gen)
    return q, k, v, extras


def loop(name, q, k, v, extras, *, scale=None, S0=None):
    """Token loop: o [B, T, HV, V], S_T [B, HV, K, V]."""
    B, T, H, Kd = q.shape
    HV, Vd = v.shape[2], v.shape[3]
    G = HV // H
    scale = Kd ** -0.5 if scale is None else scale
    step = STEPS[name]
    kinds = EXTRAS[name]
    o = torch.zeros(B, T, HV, Vd, dtype=DT)
    S_T = torch.zeros(B, HV, Kd, Vd, dtype=DT)
    for b in range(B):
        for hv in range(HV):
            h = hv // G
            S = torch.zeros(Kd, Vd, dtype=DT) if S0 is None else S0[b, hv].clone()
            for t in range(T):
                x = {"q": q[b, t, h], "k": k[b, t, h], "v": v[b, t, hv]}
                for n, val in extras.items():
                    if kinds[n][0] == "param":
                        x[n] = val[hv]
                    else:
                        x[n] = val[b, t, hv if val.shape[2] == HV else hv // (HV // val.shape[2])]
                S = step(S, x)
                o[b, t, hv] = scale * (S.T @ x["q"])
            S_T[b, hv] = S
    return o, S_T


def assert_close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= 1e-10 * max(1.0, b.abs().max().item() if b.numel() else 1.0), f"{what}: max error {err:.3e}"


def run(name, q, k, v, extras, **kw):
    return linear_attention(ua.rules.BUILTIN[name], q, k, v, **extras, **kw)


# --------------------------------------------------------------------------- outputs and final states
@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("name", ALL)
def test_matches_token_loop(name, scale):
    q, k, v, ex = make_case(name, seed=1)
    S0 = 0.5 * torch.randn(2, 2, K, V, dtype=DT, generator=torch.Generator().manual_seed(9))
    o, S = run(name, q, k, v, ex, scale=scale, initial_state=S0, output_final_state=True)
    o_ref, S_ref = loop(name, q, k, v, ex, scale=scale, S0=S0)
    assert o.dtype == DT and S.dtype == DT
    assert_close(o, o_ref, f"{name} output")
    assert_close(S, S_ref, f"{name} final state")


@pytest.mark.parametrize("name", ALL)
def test_zero_initial_state_and_no_final_state(name):
    q, k, v, ex = make_case(name, B=1, T=4, H=1, seed=2)
    o, S = run(name, q, k, v, ex)
    assert S is None
    assert_close(o, loop(name, q, k, v, ex)[0], f"{name} output")


def test_default_scale_is_k_to_the_minus_half():
    q, k, v, ex = make_case("linear_attention", seed=3)
    o_default, _ = run("linear_attention", q, k, v, ex)
    o_explicit, _ = run("linear_attention", q, k, v, ex, scale=K ** -0.5)
    o_one, _ = run("linear_attention", q, k, v, ex, scale=1.0)
    assert_close(o_default, o_explicit, "default scale")
    assert_close(o_default, o_one * K ** -0.5, "scale is a plain factor on the output")


# --------------------------------------------------------------------------- grouped value heads
@pytest.mark.parametrize("extra_heads", ["HV", "H"])
@pytest.mark.parametrize("name", ALL)
def test_grouped_value_heads(name, extra_heads):
    """HV = 2H: value head i reads q/k head i // 2; extra inputs with H heads broadcast the same way."""
    q, k, v, ex = make_case(name, B=1, T=4, H=2, HV=4, extra_heads=extra_heads, seed=4)
    S0 = 0.5 * torch.randn(1, 4, K, V, dtype=DT, generator=torch.Generator().manual_seed(5))
    o, S = run(name, q, k, v, ex, initial_state=S0, output_final_state=True)
    assert o.shape == (1, 4, 4, V) and S.shape == (1, 4, K, V)
    o_ref, S_ref = loop(name, q, k, v, ex, S0=S0)
    assert_close(o, o_ref, f"{name} grouped output")
    assert_close(S, S_ref, f"{name} grouped final state")


def test_h_headed_extra_input_equals_repeated_input():
    q, k, v, ex = make_case("kda", B=1, T=4, H=2, HV=4, extra_heads="H", seed=6)
    rep = {n: x.repeat_interleave(2, dim=2) for n, x in ex.items()}
    o1, S1 = run("kda", q, k, v, ex, output_final_state=True)
    o2, S2 = run("kda", q, k, v, rep, output_final_state=True)
    assert_close(o1, o2, "H vs HV headed gates")
    assert_close(S1, S2, "H vs HV headed gates, state")
    # and value heads 2i, 2i+1 read q/k head i
    o3, _ = run("kda", q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2), v, rep)
    assert_close(o1, o3, "grouped q/k heads vs repeated q/k heads")


# --------------------------------------------------------------------------- varlen
@pytest.mark.parametrize("name", ALL)
def test_varlen_equals_loop_over_sequences(name):
    lens = [3, 0, 1, 4]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T = cu[-1]
    q, k, v, ex = make_case(name, B=1, T=T, H=1, HV=2, seed=7)
    S0 = 0.5 * torch.randn(len(lens), 2, K, V, dtype=DT, generator=torch.Generator().manual_seed(8))
    o, S = run(name, q, k, v, ex, initial_state=S0, output_final_state=True,
               cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert o.shape == (1, T, 2, V) and S.shape == (len(lens), 2, K, V)
    kinds = EXTRAS[name]
    for i in range(len(lens)):
        a, b = cu[i], cu[i + 1]
        sl = {n: (x if kinds[n][0] == "param" else x[:, a:b]) for n, x in ex.items()}
        # one call per sequence, and the hand loop, each with the sequence's own initial state
        o_i, S_i = run(name, q[:, a:b], k[:, a:b], v[:, a:b], sl, initial_state=S0[i:i + 1], output_final_state=True)
        o_l, S_l = loop(name, q[:, a:b], k[:, a:b], v[:, a:b], sl, S0=S0[i:i + 1])
        assert_close(o[:, a:b], o_i, f"{name} seq {i} output vs separate call")
        assert_close(S[i:i + 1], S_i, f"{name} seq {i} state vs separate call")
        assert_close(o[:, a:b], o_l, f"{name} seq {i} output vs token loop")
        assert_close(S[i:i + 1], S_l, f"{name} seq {i} state vs token loop")
    # the empty sequence hands its initial state through unchanged
    assert torch.equal(S[1], S0[1])


def test_varlen_int64_offsets_and_no_initial_state():
    q, k, v, ex = make_case("gla", B=1, T=5, H=1, seed=10)
    cu = torch.tensor([0, 2, 5], dtype=torch.int64)
    o, S = run("gla", q, k, v, ex, cu_seqlens=cu, output_final_state=True)
    for i, (a, b) in enumerate([(0, 2), (2, 5)]):
        o_l, S_l = loop("gla", q[:, a:b], k[:, a:b], v[:, a:b], {"g": ex["g"][:, a:b]})
        assert_close(o[:, a:b], o_l, f"seq {i} output")
        assert_close(S[i:i + 1], S_l, f"seq {i} state")


# --------------------------------------------------------------------------- state carry, T = 0
@pytest.mark.parametrize("name", ALL)
def test_state_carry_equals_one_pass(name):
    q, k, v, ex = make_case(name, B=2, T=6, H=1, HV=2, seed=11)
    kinds = EXTRAS[name]
    S0 = 0.5 * torch.randn(2, 2, K, V, dtype=DT, generator=torch.Generator().manual_seed(12))

    def part(a, b):
        return {n: (x if kinds[n][0] == "param" else x[:, a:b]) for n, x in ex.items()}
    o, S = run(name, q, k, v, ex, initial_state=S0, output_final_state=True)
    o1, S1 = run(name, q[:, :2], k[:, :2], v[:, :2], part(0, 2), initial_state=S0, output_final_state=True)
    o2, S2 = run(name, q[:, 2:], k[:, 2:], v[:, 2:], part(2, 6), initial_state=S1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o, f"{name} carried output")
    assert_close(S2, S, f"{name} carried state")


@pytest.mark.parametrize("name", ["linear_attention", "mamba2", "kda", "dplr"])
def test_empty_sequence(name):
    q, k, v, ex = make_case(name, B=2, T=0, H=1, HV=2, seed=13)
    S0 = torch.randn(2, 2, K, V, dtype=DT)
    o, S = run(name, q, k, v, ex, initial_state=S0, output_final_state=True)
    assert o.shape == (2, 0, 2, V) and o.dtype == DT
    assert torch.equal(S, S0)
    assert S.data_ptr() != S0.data_ptr()          # a new tensor: an in-place step on S must not touch S0
    o, S = run(name, q, k, v, ex, output_final_state=True)
    assert o.shape == (2, 0, 2, V)
    assert torch.equal(S, torch.zeros(2, 2, K, V, dtype=DT))


def test_output_dtype_follows_v_and_state_is_float32():
    q, k, v, ex = make_case("gla", B=1, T=3, H=1, seed=14)
    q32, k32, v32 = q.float(), k.float(), v.float()
    o, S = run("gla", q32, k32, v32, {"g": ex["g"].float()}, output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    o_ref, S_ref = loop("gla", q, k, v, ex)
    assert (o.double() - o_ref).abs().max() < 1e-5
    assert (S.double() - S_ref).abs().max() < 1e-5


# --------------------------------------------------------------------------- gradients
def test_gradcheck_kda():
    gen = torch.Generator().manual_seed(15)
    B, T, H, Kd, Vd = 1, 3, 1, 3, 2
    q = torch.randn(B, T, H, Kd, generator=gen, dtype=DT, requires_grad=True)
    k = (0.5 * torch.randn(B, T, H, Kd, generator=gen, dtype=DT)).requires_grad_()
    v = torch.randn(B, T, H, Vd, generator=gen, dtype=DT, requires_grad=True)
    g = (-torch.rand(B, T, H, Kd, generator=gen, dtype=DT)).requires_grad_()
    beta = torch.rand(B, T, H, generator=gen, dtype=DT, requires_grad=True)
    S0 = torch.randn(B, H, Kd, Vd, generator=gen, dtype=DT, requires_grad=True)

    def f(q, k, v, g, beta, S0):
        return linear_attention(ua.rules.kda, q, k, v, g=g, beta=beta, initial_state=S0, output_final_state=True)
    assert torch.autograd.gradcheck(f, (q, k, v, g, beta, S0), eps=1e-6, atol=1e-7)

    # and the gradient is the hand loop's gradient
    o, S = f(q, k, v, g, beta, S0)
    w_o, w_S = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad((o * w_o).sum() + (S * w_S).sum(), (q, k, v, g, beta, S0))
    o_l, S_l = loop("kda", q, k, v, {"g": g, "beta": beta}, S0=S0)
    grads_l = torch.autograd.grad((o_l * w_o).sum() + (S_l * w_S).sum(), (q, k, v, g, beta, S0))
    for n, a, b in zip(["q", "k", "v", "g", "beta", "S0"], grads, grads_l):
        assert_close(a, b, f"d/d{n}")


def test_gradcheck_mamba2_params():
    q, k, v, ex = make_case("mamba2", B=1, T=3, H=1, seed=16)
    A_log = ex["A_log"].clone().requires_grad_()
    dt_bias = ex["dt_bias"].clone().requires_grad_()
    x = ex["x"].clone().requires_grad_()

    def f(x, A_log, dt_bias):
        return run("mamba2", q, k, v, {"x": x, "A_log": A_log, "dt_bias": dt_bias})[0]
    assert torch.autograd.gradcheck(f, (x, A_log, dt_bias), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad calls
def _good(name="kda", **kw):
    q, k, v, ex = make_case(name, B=1, T=4, H=1, **kw)
    return q, k, v, ex


def test_wrong_ndim():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        run("kda", q[0], k, v, ex)
    with pytest.raises(ValueError, match=r"v: expected a 4-D tensor"):
        run("kda", q, k, v[..., None], ex)


def test_q_k_shape_mismatch():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"k: expected the shape of q"):
        run("kda", q, k[..., :2], v, ex)


def test_v_batch_time_mismatch():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"v: expected \[B, T, HV, V\]"):
        run("kda", q, k, v[:, :2], ex)


def test_hv_not_multiple_of_h():
    q, k, v, ex = make_case("linear_attention", B=1, T=3, H=2, HV=3)
    with pytest.raises(ValueError, match=r"multiple of q's H=2.*HV=3"):
        run("linear_attention", q, k, v, ex)


def test_zero_heads_is_a_clear_error():
    # validate.linear_inputs computes HV % H before its own `H == 0` check
    q = torch.zeros(1, 3, 0, K, dtype=DT)
    v = torch.zeros(1, 3, 0, V, dtype=DT)
    with pytest.raises(ValueError, match=r"non-empty head"):
        run("linear_attention", q, q, v, {})


def test_missing_extra_input():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"rule 'kda': expected input beta: Scalar.*pass beta=\.\.\."):
        run("kda", q, k, v, {"g": ex["g"]})
    with pytest.raises(TypeError, match=r"pass beta="):
        run("kda", q, k, v, {"g": ex["g"], "beta": None})


def test_unknown_extra_input():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"input 'gamma': expected one of the inputs of rule 'kda'.*'beta', 'g'"):
        run("kda", q, k, v, {**ex, "gamma": ex["beta"]})


def test_wrong_param_shape():
    q, k, v, ex = _good("mamba2")
    with pytest.raises(ValueError, match=r"A_log: expected a per-head parameter of shape \[1\]"):
        run("mamba2", q, k, v, {**ex, "A_log": torch.zeros(2, dtype=DT)})
    with pytest.raises(ValueError, match=r"A_log: expected a per-head parameter"):
        run("mamba2", q, k, v, {**ex, "A_log": torch.zeros(1, 1, dtype=DT)})


def test_wrong_token_input_shape():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"g: expected \[B, T, H or HV, K\]"):
        run("kda", q, k, v, {**ex, "g": ex["g"][..., :2]})
    with pytest.raises(ValueError, match=r"beta: expected \[B, T, H or HV\]"):
        run("kda", q, k, v, {**ex, "beta": ex["beta"][..., None]})


def test_dtype_mix():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"q, k, v: expected one dtype"):
        run("kda", q.float(), k, v, ex)
    with pytest.raises(TypeError, match=r"q: expected a floating dtype"):
        run("kda", q.long(), k.long(), v.long(), ex)


def test_cu_seqlens_with_batch_above_one():
    q, k, v, ex = make_case("kda", B=2, T=4, H=1)
    with pytest.raises(ValueError, match=r"batch size 1 when cu_seqlens"):
        run("kda", q, k, v, ex, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("cu", [[1, 4], [0, 3, 2, 4], [0, 3], [0, 5], [4]])
def test_bad_cu_seqlens(cu):
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"cu_seqlens: expected"):
        run("kda", q, k, v, ex, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_cu_seqlens_float_dtype():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"cu_seqlens: expected a 1-D int32/int64 tensor"):
        run("kda", q, k, v, ex, cu_seqlens=torch.tensor([0.0, 4.0]))


def test_wrong_initial_state_shape():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"initial_state: expected \[N, HV, K, V\] = \[1, 1, 4, 3\]"):
        run("kda", q, k, v, ex, initial_state=torch.zeros(1, 1, V, K, dtype=DT))
    with pytest.raises(ValueError, match=r"initial_state: expected \[N, HV, K, V\] = \[2, 1, 4, 3\]"):
        run("kda", q, k, v, ex, initial_state=torch.zeros(1, 1, K, V, dtype=DT),
            cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32))


def test_initial_state_dtype():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"initial_state: expected float32"):
        run("kda", q, k, v, ex, initial_state=torch.zeros(1, 1, K, V, dtype=torch.float16))


@pytest.mark.parametrize("which", ["q", "v", "g", "beta", "initial_state"])
def test_nan_input(which):
    q, k, v, ex = _good()
    S0 = torch.zeros(1, 1, K, V, dtype=DT)
    tensors = {"q": q, "v": v, "initial_state": S0, **ex}
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"{which}: expected finite values; got 1 NaN/inf"):
        linear_attention(ua.rules.kda, tensors["q"], k, tensors["v"], g=tensors["g"], beta=tensors["beta"],
                         initial_state=tensors["initial_state"])


def test_inf_input():
    q, k, v, ex = _good()
    k = k.clone()
    k[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"k: expected finite values"):
        run("kda", q, k, v, ex)


def test_unknown_form():
    q, k, v, ex = _good()
    with pytest.raises(ValueError, match=r"form: expected one of \('reference', 'chunk', 'recurrent'\)"):
        run("kda", q, k, v, ex, form="chunked")


def test_non_rule():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"rule: expected a rule declared with @unifattn.dsl.rule"):
        linear_attention("kda", q, k, v, **ex)
    with pytest.raises(TypeError, match=r"got function"):
        linear_attention(lambda S: S, q, k, v, **ex)


def test_non_tensor_input():
    q, k, v, ex = _good()
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor"):
        run("kda", q.tolist(), k, v, ex)
    with pytest.raises(TypeError, match=r"g: expected a torch.Tensor"):
        run("kda", q, k, v, {**ex, "g": 0.5})


# --------------------------------------------------------------------------- every primitive, params, broadcasting


@rule(state=("K", "V"))
def kitchen_sink(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], w: Param["K"], c: Param, x: Scalar, u: Vec["V"]):
    """Exercises every primitive and the param / scalar / vector broadcasts of the interpreter."""
    kn = l2norm(relu(k) + 0.1)
    decay = exp(logsigmoid(w + x))
    s = sqrt(vsum(kn * kn) + 1.0)
    S = diag(decay) @ S + outer(kn / s, v * sigmoid(u) ** 2) * log(1 + softplus(c)) - 0.1 * outer(kn, S.T @ kn)
    return S, S.T @ (q - 0.5 * k)


def _sink_step(S, x):
    kn = _l2norm(torch.relu(x["k"]) + 0.1)
    decay = torch.exp(F.logsigmoid(x["w"] + x["x"]))
    s = torch.sqrt((kn * kn).sum() + 1.0)
    return (decay[:, None] * S + _outer(kn / s, x["v"] * torch.sigmoid(x["u"]) ** 2) * torch.log(1 + F.softplus(x["c"]))
            - 0.1 * _outer(kn, S.T @ kn))


def test_every_primitive_against_a_token_loop():
    B, T, H, HV = 2, 4, 1, 2
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    k = torch.randn(B, T, H, K, generator=gen, dtype=DT)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=DT)
    ex = {"w": torch.randn(HV, K, generator=gen, dtype=DT), "c": torch.randn(HV, generator=gen, dtype=DT),
          "x": torch.randn(B, T, HV, generator=gen, dtype=DT), "u": torch.randn(B, T, H, V, generator=gen, dtype=DT)}
    S0 = torch.randn(B, HV, K, V, generator=gen, dtype=DT)
    o, S = linear_attention(kitchen_sink, q, k, v, initial_state=S0, output_final_state=True, **ex)
    o_ref = torch.zeros(B, T, HV, V, dtype=DT)
    S_ref = torch.zeros(B, HV, K, V, dtype=DT)
    for b in range(B):
        for hv in range(HV):
            h = hv // (HV // H)
            St = S0[b, hv].clone()
            for t in range(T):
                xt = {"k": k[b, t, h], "v": v[b, t, hv], "w": ex["w"][hv], "c": ex["c"][hv],
                      "x": ex["x"][b, t, hv], "u": ex["u"][b, t, h]}
                St = _sink_step(St, xt)
                o_ref[b, t, hv] = K ** -0.5 * (St.T @ (q[b, t, h] - 0.5 * k[b, t, h]))
            S_ref[b, hv] = St
    assert_close(o, o_ref, "kitchen sink output")
    assert_close(S, S_ref, "kitchen sink state")


def test_varlen_all_sequences_empty():
    q, k, v, ex = make_case("kda", B=1, T=0, H=1)
    S0 = torch.randn(2, 1, K, V, dtype=DT)
    o, S = run("kda", q, k, v, ex, initial_state=S0, output_final_state=True,
               cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32))
    assert o.shape == (1, 0, 1, V)
    assert torch.equal(S, S0)


# --------------------------------------------------------------------------- the testing strategy's calls
@pytest.mark.parametrize("name", ["mamba2", "gla", "kda", "rwkv7"])
def test_rule_inputs_strategy_calls_match_token_loop(name):
    """unifattn.testing.rule_inputs draws valid calls (varlen, grouped heads, states); the reference matches the loop."""
    from hypothesis import HealthCheck, given, settings

    from unifattn.testing import rule_inputs
    r = ua.rules.BUILTIN[name]

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(rule_inputs(r, dtypes=(DT,), max_T=6, max_K=4))
    def check_case(case):
        case = dict(case)
        q, k, v = case.pop("q"), case.pop("k"), case.pop("v")
        S0 = case.pop("initial_state", None)
        cu = case.pop("cu_seqlens", None)
        o, S = linear_attention(r, q, k, v, initial_state=S0, cu_seqlens=cu, output_final_state=True, **case)
        kinds = {s.name: s.kind for s in r.inputs}
        bounds = [(0, q.shape[1])] if cu is None else list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
        for i, (a, b) in enumerate(bounds):
            rows = slice(None) if cu is None else slice(i, i + 1)
            sl = {n: (x if kinds[n] == "param" else x[:, a:b]) for n, x in case.items()}
            o_l, S_l = loop(name, q[:, a:b], k[:, a:b], v[:, a:b], sl, S0=None if S0 is None else S0[rows])
            assert_close(o[:, a:b], o_l, f"{name} output")
            assert_close(S[rows], S_l, f"{name} state")
    check_case()
