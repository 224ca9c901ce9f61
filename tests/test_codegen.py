"""Generated kernels (chunk and recurrent) against the float64 reference, on the CPU interpreter."""
import os
import subprocess
import sys

import pytest
import torch

import unifattn as ua
from unifattn import codegen
from unifattn.dsl import RuleError, Vec, check, diag, exp, outer, rule
from unifattn.testing import assert_matches_reference, make_inputs

RULES = list(ua.rules.BUILTIN.values())
CHUNK = [r for r in RULES if "chunk" in check(r).forms]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UNIFATTN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("r", RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("T", [1, 63, 65])
def test_recurrent_every_rule(r, T):
    case = make_inputs(r, B=2, T=T, H=1, HV=2, K=8, V=8, initial_state=T != 63, seed=T)
    assert_matches_reference(r, form="recurrent", **case)


@pytest.mark.parametrize("r", CHUNK, ids=lambda r: r.name)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_chunk_every_rule(r, T):
    case = make_inputs(r, B=1, T=T, H=1, HV=2 if T == 65 else 1, K=16, V=16, initial_state=T in (64, 200), seed=T)
    assert_matches_reference(r, form="chunk", **case)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("name", ["gla", "kda", "mamba2", "dplr"])
def test_varlen_and_gate_extremes(form, name):
    r = ua.rules.BUILTIN[name]
    for low in (-8.0, -1e-4):
        case = make_inputs(r, T=81, H=2, HV=4, K=16, V=16, initial_state=True, cu_seqlens=[0, 0, 1, 66, 81],
                           gate_low=low, seed=3)
        assert_matches_reference(r, form=form, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    for r in (ua.rules.gated_deltanet, ua.rules.gla, ua.rules.rwkv7):
        case = make_inputs(r, T=70, H=1, K=16, V=16, dtype=dtype, initial_state=True)
        assert_matches_reference(r, form="chunk", **case)
        assert_matches_reference(r, form="recurrent", **case)


def test_decode_step_updates_state_in_place():
    r = ua.rules.kda
    case = make_inputs(r, B=3, T=1, H=2, K=8, V=8, initial_state=True)
    S = case.pop("initial_state").clone()
    S_ref = S.double().clone()
    o_ref, S_ref = ua.ops.linear_attention(r, **{n: x.double() for n, x in case.items()}, initial_state=S_ref,
                                           output_final_state=True)
    o, S_out = ua.ops.linear_attention(r, **case, initial_state=S, form="recurrent", inplace_state=True)
    assert S_out is S
    ua.testing.assert_close(S, S_ref, torch.float32, "in-place state")
    ua.testing.assert_close(o, o_ref, torch.float32, "decode output")


def test_inplace_state_needs_the_recurrent_form_and_a_float32_state():
    case = make_inputs(ua.rules.kda, T=1, K=4, V=4, initial_state=True)
    with pytest.raises(ValueError, match="inplace_state: expected form='recurrent'"):
        ua.ops.linear_attention(ua.rules.kda, form="chunk", inplace_state=True, **case)
    case.pop("initial_state")
    with pytest.raises(ValueError, match="inplace_state: expected a contiguous float32 initial_state"):
        ua.ops.linear_attention(ua.rules.kda, form="recurrent", inplace_state=True, **case)


@rule(state=("K", "V"))
def cubic(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
    S = S @ S.T @ S * 0.1
    S = S + outer(k, v)
    return S, S.T @ q


def test_recurrent_only_rule_runs_recurrent_and_refuses_chunk():
    case = make_inputs(cubic, B=1, T=5, K=4, V=4, initial_state=True)
    assert_matches_reference(cubic, form="recurrent", **case)
    with pytest.raises(RuleError, match=r"test_codegen.py:\d+.*recurrent_only.*form='recurrent'"):
        ua.ops.linear_attention(cubic, form="chunk", **case)


def test_inputs_requiring_grad_are_refused():
    case = make_inputs(ua.rules.gla, T=4, K=4, V=4)
    case["q"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="backward"):
        ua.ops.linear_attention(ua.rules.gla, form="chunk", **case)


def test_positive_log_gate_is_refused():
    case = make_inputs(ua.rules.gla, T=4, K=4, V=4)
    case["g"] = case["g"].abs() + 0.1
    with pytest.raises(ValueError, match="g: expected values <= 0"):
        ua.ops.linear_attention(ua.rules.gla, form="chunk", **case)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # the interpreter's numpy computes on the NaNs first
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("which", ["q", "v", "g", "beta", "initial_state"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_compiled_forms_reject_nan_and_inf(form, which, bad):
    """The input scan (kernels.checks, Triton under the interpreter) names the tensor. It runs after
    the kernels (their fresh outputs are dropped), or before them for an in-place state update."""
    case = make_inputs(ua.rules.kda, B=1, T=70, K=8, V=8, initial_state=True)
    x = case[which].clone()
    x.view(-1)[x.numel() - 1] = bad                      # the last element: the scan's tail block
    case[which] = x
    if which == "g" and bad == -float("inf"):
        match = "g: expected finite values"
    else:
        match = rf"{which}: expected finite values; got 1 NaN/inf"
    with pytest.raises(ValueError, match=match):
        ua.ops.linear_attention(ua.rules.kda, form=form, **case)


def test_inplace_decode_with_bad_input_leaves_the_state_untouched():
    case = make_inputs(ua.rules.kda, B=1, T=1, K=8, V=8, initial_state=True)
    S = case.pop("initial_state").clone()
    before = S.clone()
    case["k"] = case["k"].clone()
    case["k"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="k: expected finite values"):
        ua.ops.linear_attention(ua.rules.kda, form="recurrent", initial_state=S, inplace_state=True, **case)
    assert torch.equal(S, before), "the scan must run before an in-place update"


def test_check_inputs_false_skips_the_scan_only():
    case = make_inputs(ua.rules.gla, T=4, K=4, V=4)
    case["g"] = case["g"].abs() + 0.1
    o, _ = ua.ops.linear_attention(ua.rules.gla, form="recurrent", check_inputs=False, **case)
    assert o.shape == case["v"].shape
    with pytest.raises(ValueError, match="v: expected"):       # shapes are still checked
        ua.ops.linear_attention(ua.rules.gla, form="recurrent", check_inputs=False,
                                **{**case, "v": case["v"][:, :2]})


@pytest.mark.parametrize("rng", [None, "<= 0", "in (0, 1]"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_kernel_flags_each_tensor(rng, dtype):
    from unifattn.kernels.checks import BLOCK, scan
    good = {None: 0.5, "<= 0": -0.5, "in (0, 1]": 1.0}[rng]
    xs = [torch.full((BLOCK + 3,), good, dtype=dtype) for _ in range(3)]
    assert scan([(x, rng) for x in xs]) == 0
    xs[1][BLOCK + 2] = float("nan")
    outside = {None: float("inf"), "<= 0": 0.25, "in (0, 1]": 0.0}[rng]
    xs[2][5] = outside
    assert scan([(x, rng) for x in xs]) == 0b110
    assert scan([(xs[0][::2], rng), (xs[1][::2], rng)]) == 0b10      # strided: torch fallback
    assert scan([(torch.empty(0, dtype=dtype), rng)]) == 0


def test_scan_one_launch_many_tensors():
    """Ten tensors of mixed dtypes, sizes and ranges (two launches of up to 8): each bad element is
    found in its own tensor, at a block's first and last element and in a tensor shorter than a block."""
    from unifattn.kernels.checks import BLOCK, scan
    dts = [torch.float32, torch.bfloat16, torch.float16]
    sizes = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 7, 2 * BLOCK + 5, 1, BLOCK, 5]
    rngs = [None, "<= 0", "in (0, 1]"]
    good = {None: 0.5, "<= 0": -0.5, "in (0, 1]": 1.0}
    xs = [(torch.full((n,), good[rngs[i % 3]], dtype=dts[i % 3]), rngs[i % 3]) for i, n in enumerate(sizes)]
    assert scan(xs) == 0
    for i in range(len(xs)):
        for where in (0, sizes[i] - 1, sizes[i] // 2):
            x, rng = xs[i]
            keep = float(x[where])
            x[where] = float("nan") if where % 2 else {None: float("-inf"), "<= 0": 1.0, "in (0, 1]": 1.5}[rng]
            assert scan(xs) == 1 << i, (i, where)
            x[where] = keep
    xs[2][0][0] = float("nan")
    xs[9][0][4] = float("inf")
    assert scan(xs) == (1 << 2) | (1 << 9)


def test_scan_amax_is_each_tensors_largest_magnitude():
    """scan_async(amax=True): entry 1 + i is max |checks[i]| as fp32 bits, in kernel launches (fp32, bf16, fp16,
    more than 8 tensors) and on torch's path (strided, fp64; fp64 past fp32's range reads inf), NaN where a
    tensor holds one, 0 for an empty one; the flag word is unchanged."""
    from unifattn.kernels.checks import BLOCK, scan_async
    g = torch.Generator().manual_seed(3)
    dts = [torch.float32, torch.bfloat16, torch.float16]
    xs = [(torch.randn(n, generator=g) * 10 ** (i % 5 - 2)).to(dts[i % 3])
          for i, n in enumerate([1, BLOCK - 1, BLOCK + 1, 3 * BLOCK, 7, 2 * BLOCK + 5, 1, BLOCK, 5])]
    xs[3][BLOCK + 7] = -60000.0                               # the largest magnitude is negative
    xs.append(torch.randn(2 * BLOCK, generator=g)[::2])       # strided: torch's path
    xs.append(torch.tensor([1e300, -2.0], dtype=torch.float64))
    xs.append(torch.empty(0))
    xs.append(torch.tensor([1.0, float("nan"), 3.0]))
    got = scan_async([(x, None) for x in xs], amax=True)
    assert got.shape == (1 + len(xs),) and got.dtype == torch.int32
    assert int(got[0]) == 1 << (len(xs) - 1)                  # only the NaN tensor is flagged
    amax = got[1:].view(torch.float32)
    for i, x in enumerate(xs[:-4]):
        assert float(amax[i]) == float(x.float().abs().max()), i
    assert float(amax[-4]) == float(xs[-4].abs().max())
    assert amax[-3] == float("inf") and amax[-2] == 0.0 and torch.isnan(amax[-1])


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_generated_source_is_deterministic_and_names_the_rule(form):
    r = ua.rules.kda
    a = codegen.source(r, form)
    # a second process, a fresh trace of the same rule: byte-identical text
    code = f"import unifattn as ua; print(ua.codegen.source(ua.rules.kda, {form!r}), end='')"
    b = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert a == b
    assert a.startswith("# generated by unifattn")
    assert "from rule kda" in a and "edit the rule, not this file" in a
    assert f"form: {form}" in a and "transition class: diagonal_delta" in a
    p = codegen.source_path(r, form)
    assert p.read_text() == a and p.name.startswith(f"kda_{form}_fwd_")


def test_golden_recurrent_body():
    """The statement-by-statement body keeps the rule's names and lines."""
    src = codegen.source(ua.rules.gated_deltanet, "recurrent")
    assert "# line 57: S = exp(g) * S" in src
    assert "b_S1 = tl.where((m_k[:, None] & m_v[None, :]), (tl.exp(b_g) * b_S), 0.0)" in src
    assert "b_S2 = tl.where((m_k[:, None] & m_v[None, :]), (b_S1 + (b_beta * (b_k[:, None] * " in src


def test_concurrent_writers_do_not_corrupt(tmp_path):
    env = dict(os.environ, UNIFATTN_CACHE_DIR=str(tmp_path))
    code = "import unifattn as ua; print(ua.codegen.source_path(ua.rules.gla, 'recurrent'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate()[0].strip() for p in procs}
    assert len(paths) == 1
    text = open(paths.pop()).read()
    assert text == codegen.source(ua.rules.gla, "recurrent")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_chunk_plan_is_the_launch_order():
    """The plan DAG comes from the pipeline's declared stages; its topological order is what runs."""
    from unifattn.codegen.chunk import launch_order, plan
    from unifattn.kernels.chunk import chunk_fwd
    f = check(ua.rules.kda)
    g = plan(f, [])
    assert launch_order(g) == ["inputs", "cumsum", "intra", "wu", "state", "output"]
    assert g.edges["intra", "wu"]["tensors"] == "Ai"
    assert launch_order(plan(check(ua.rules.linear_attention), [])) == ["inputs", "state", "output"]
    assert "PLAN = ('cumsum', 'intra', 'wu', 'state', 'output')" in codegen.source(ua.rules.kda, "chunk")
    case = make_inputs(ua.rules.kda, T=8, K=4, V=4)
    with pytest.raises(ValueError, match="every stage after the ones it reads"):
        chunk_fwd(case["q"], case["k"], case["v"], case["g"], case["beta"], gate="diagonal", delta=True,
                  stages=("cumsum", "wu", "intra", "state", "output"))


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_float64_inputs_point_to_the_reference_form(form):
    case = make_inputs(ua.rules.kda, T=3, K=4, V=4, dtype=torch.float64)
    with pytest.raises(TypeError, match="use form='reference' for float64"):
        ua.ops.linear_attention(ua.rules.kda, form=form, **case)


def test_checker_classes_map_to_the_pipeline_flags():
    """dsl (which cannot import kernels) and the chunk pipeline name the same (gate, delta) per class;
    dplr has its own pipeline (kernels/chunk_dplr.py)."""
    from unifattn.dsl.checker import CHUNK_CLASSES, GATE_OF
    from unifattn.kernels.chunk import CLASS_FLAGS
    assert set(CHUNK_CLASSES) == set(CLASS_FLAGS) | {"dplr"}
    for cls, (gate, delta) in CLASS_FLAGS.items():
        assert GATE_OF[cls] == gate and cls.endswith("delta") == delta


@rule(state=("K", "V"))
def _value_side_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["V"]):
    S = S @ diag(exp(g)) + outer(k, v)           # Diag on the right: the value columns decay
    return S, S.T @ q


def test_right_diag_factor_recurrent_matches_reference():
    """S @ diag(x) scales the state's columns: the recurrent printer handles it (it used to raise a bare
    NotImplementedError); the chunk form is refused with a RuleError (the transition is value-side)."""
    case = make_inputs(_value_side_decay, B=2, T=20, H=1, HV=2, K=8, V=8, initial_state=True)
    case["g"] = -case["g"].abs()
    assert_matches_reference(_value_side_decay, form="recurrent", **case)
    with pytest.raises(RuleError, match="form='recurrent'"):
        ua.ops.linear_attention(_value_side_decay, form="chunk", **case)
