"""The rule DSL: tracing, the IR it records, and the RuleErrors a user meets.

Rules that must fail are written to small module files, so each error can be
matched against the exact file:line of the offending statement (marked
`# <-` in the source below).
"""
import functools
import importlib.util
import inspect
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import unifattn as ua
from unifattn.dsl import Param, RuleError, Scalar, Vec, diag, exp, outer, rule, trace
from unifattn.dsl.rule import RESERVED

_COUNTER = itertools.count()
_KEEP = []

HEADER = "from unifattn.dsl import rule, trace, Vec, Scalar, Param, diag, exp, outer, sigmoid, l2norm\n\n"


def _write(tmp_path, src):
    name = f"_unifattn_dsl_mod_{next(_COUNTER)}"
    path = tmp_path / f"{name}.py"
    text = textwrap.dedent(src)
    path.write_text(text)
    marks = [i + 1 for i, ln in enumerate(text.splitlines()) if ln.rstrip().endswith("# <-")]
    return name, path, marks


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    _KEEP.append(mod)
    spec.loader.exec_module(mod)
    return mod


def load(tmp_path, src):
    """Write src to a module file and import it; returns (module, path, marked lines)."""
    name, path, marks = _write(tmp_path, src)
    return _import(name, path), path, marks


def rule_error(tmp_path, src, header=True) -> tuple[RuleError, str, list]:
    """Import a module whose rule must fail; returns the RuleError, the file and the lines marked `# <-`."""
    name, path, marks = _write(tmp_path, (HEADER if header else "") + textwrap.dedent(src))
    assert marks, "mark the offending line(s) with '# <-'"
    with pytest.raises(RuleError) as e:
        _import(name, path)
    return e.value, str(path), marks


def assert_well_formed(err: RuleError, name: str, path: str, lines: list):
    msg = str(err)
    assert f"rule '{name}'" in msg, msg
    assert any(f"{path}:{ln}" in msg for ln in lines), (msg, lines)
    assert "expected" in msg and "got" in msg and "Fix:" in msg, msg
    assert err.rule == name and err.expected and err.got and err.fix
    assert any(err.where == f"{path}:{ln}" for ln in lines), (err.where, lines)


# --------------------------------------------------------------------------- the DESIGN.md example
@rule(state=("K", "V"))
def kda(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar):
    """Kimi Delta Attention: per-channel decay, then a delta-rule write."""
    S = diag(exp(g)) @ S
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q


DESIGN_KDA = '''\
from unifattn.dsl import rule, Vec, Scalar, diag, exp, outer

@rule(state=("K", "V"))
def kda(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar):
    """Kimi Delta Attention: per-channel decay, then a delta-rule write."""
    S = diag(exp(g)) @ S
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q
'''


def _body(text):
    return text.split("\n", 1)[1]                 # ir_text without its "rule NAME ..." header line


def test_design_example_traces():
    assert isinstance(kda, ua.dsl.Rule)
    assert kda.name == "kda"
    assert kda.state_dims == ("K", "V")
    assert [(i.name, i.kind, i.shape) for i in kda.inputs] == [
        ("q", "token", ("K",)), ("k", "token", ("K",)), ("v", "token", ("V",)), ("g", "token", ("K",)),
        ("beta", "token", ())]
    assert kda.doc == "Kimi Delta Attention: per-channel decay, then a delta-rule write."
    assert kda.new_state.shape == ("K", "V") and kda.output.shape == ("V",)
    assert _body(kda.ir_text()) == _body(ua.rules.kda.ir_text())
    assert ua.dsl.check(kda).transition == "diagonal_delta"


def test_design_example_statements_and_lines(tmp_path):
    mod, path, _ = load(tmp_path, DESIGN_KDA)
    r = mod.kda
    assert r.file == str(path)
    assert r.line == 3                            # the decorator line opens the rule's source
    assert [(s.target, s.line, s.source) for s in r.statements] == [
        ("S", 6, "S = diag(exp(g)) @ S"),
        ("S", 7, "S = S + beta * outer(k, v - S.T @ k)"),
    ]
    # the statements' nodes: decay first, and the write reads the decayed state
    decay, write = (s.node for s in r.statements)
    assert decay.op == "matmul" and decay.args[0].op == "diag"
    assert write is r.new_state
    assert any(n is decay for n in ua.dsl.ir.walk([write]))
    assert r.output.op == "matmul" and r.output.args[0].op == "transpose"
    # every node made by a statement carries that statement's line
    assert decay.line == 6 and write.line == 7 and r.output.line == 8
    assert "def kda" in r.source and r.source.startswith("@rule")


def test_statements_record_temporaries(tmp_path):
    mod, path, _ = load(tmp_path, HEADER + textwrap.dedent('''
        @rule(state=("K", "V"))
        def tmp_rule(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], b: Scalar):
            beta = sigmoid(b)
            kn = l2norm(k)
            S = S + beta * outer(kn, v - S.T @ kn)
            o = S.T @ q
            return S, o
    '''))
    r = mod.tmp_rule
    assert [(s.target, s.line) for s in r.statements] == [("beta", 6), ("kn", 7), ("S", 8), ("o", 9)]
    assert [s.source for s in r.statements][-1] == "o = S.T @ q"
    assert r.statements[0].node.op == "sigmoid" and r.statements[1].node.op == "l2norm"
    assert r.output is r.statements[3].node


def test_ir_text_is_deterministic():
    def fn(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar):
        S = diag(exp(g)) @ S
        S = S + beta * outer(k, v - S.T @ k)
        return S, S.T @ q
    a, b = trace(fn), trace(fn)
    assert a is not b
    assert a.ir_text() == b.ir_text()
    assert a.ir_text() == a.ir_text()
    text = a.ir_text()
    assert text.splitlines()[0] == "rule fn state=('K', 'V')"
    assert "input beta: Scalar" in text and "input g: Vec['K']" in text
    assert text.splitlines()[-1].startswith("return ")


def test_ir_text_is_the_same_in_a_fresh_process():
    code = "import unifattn.rules as r; print(r.kda.ir_text() + '\\n---\\n' + r.mamba2.ir_text())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip("\n") == ua.rules.kda.ir_text() + "\n---\n" + ua.rules.mamba2.ir_text()


def test_ir_text_differs_between_rules():
    texts = {r.ir_text() for r in ua.rules.BUILTIN.values()}
    assert len(texts) == len(ua.rules.BUILTIN)


def test_params_and_scalars():
    @rule(state=("K", "V"))
    def with_params(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], A_log: Param, w: Param["K"], x: Scalar):
        S = diag(exp(-exp(A_log) * x + w)) @ S + outer(k, v)
        return S, S.T @ q
    assert [(i.name, i.kind, i.shape) for i in with_params.inputs][3:] == [
        ("A_log", "param", ()), ("w", "param", ("K",)), ("x", "token", ())]
    assert repr(with_params.input("w")) == "w: Param['K']"
    assert repr(with_params.input("A_log")) == "A_log: Param"


def test_string_annotations_from_future_import(tmp_path):
    mod, path, _ = load(tmp_path, '''\
        from __future__ import annotations

        from unifattn.dsl import rule, Vec, Scalar, Param, diag, exp, outer


        @rule(state=("K", "V"))
        def lazy(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], beta: Scalar, gamma: Param):
            S = gamma * (diag(exp(g)) @ S)
            S = S + beta * outer(k, v - S.T @ k)
            return S, S.T @ q
    ''')
    r = mod.lazy
    assert isinstance(r, ua.dsl.Rule)
    assert [(i.name, i.kind, i.shape) for i in r.inputs] == [
        ("q", "token", ("K",)), ("k", "token", ("K",)), ("v", "token", ("V",)), ("g", "token", ("K",)),
        ("beta", "token", ()), ("gamma", "param", ())]
    assert [s.line for s in r.statements] == [8, 9]
    assert ua.dsl.check(r).transition == "diagonal_delta"


def test_custom_state_dimension_names():
    @rule(state=("Dk", "Dv"))
    def named(S, q: Vec["Dk"], k: Vec["Dk"], v: Vec["Dv"]):
        S = S + outer(k, v)
        return S, S.T @ q
    assert named.state_dims == ("Dk", "Dv")
    assert ua.dsl.check(named).transition == "identity"


def test_bad_state_declaration():
    with pytest.raises(TypeError, match=r"rule\(state=\.\.\.\) takes two dimension names"):
        rule(state=("K",))
    for state in (("K", "K"), 3, None, "KV", ("K", "V-1")):        # ('K', 'K') crashed the checker (IndexError)
        with pytest.raises(TypeError, match=r"rule\(state=\.\.\.\) takes two dimension names.*Fix:"):
            rule(state=state)


def test_bare_decorator_and_non_functions_are_type_errors():
    def fn(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)
        return S, S.T @ q
    with pytest.raises(TypeError, match=r"expected @rule\(state=\('K', 'V'\)\).*Fix:"):
        rule(fn)                                      # `@rule` without parentheses
    for bad in (functools.partial(fn), lambda S, q, k, v: (S, S.T @ q), len):
        with pytest.raises(TypeError, match="expected a function defined with `def`.*Fix:"):
            trace(bad)
    with pytest.raises(TypeError, match=r"Scalar takes no further dimension.*Fix: Vec\['K'\]"):
        Scalar["K"]


def test_positional_only_and_keyword_only_inputs():
    def fn(S, q: Vec["K"], k: Vec["K"], /, v: Vec["V"], *, g: Scalar):
        S = exp(g) * S + outer(k, v)
        return S, S.T @ q
    assert _body(trace(fn).ir_text()) == _body(ua.rules.simple_gla.ir_text())


def test_reserved_names_cover_the_op_keywords():
    keywords = [p.name for p in inspect.signature(ua.ops.linear_attention).parameters.values()
                if p.kind != p.VAR_KEYWORD and p.name not in ("q", "k", "v")]
    assert set(keywords) <= set(RESERVED), keywords


def test_numpy_numbers_are_constants():
    def fn(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = np.float32(0.5) * S + outer(k, v)       # a number (numbers.Real) like any float
        return S, S.T @ q
    assert trace(fn).new_state.args[0].args[0].value == 0.5


# --------------------------------------------------------------------------- RuleError cases
# Each case: a rule that must fail (offending lines marked `# <-`), its name, and what the message
# must say: (part, text), part one of msg (the whole message), got, fix, expected.
ERROR_CASES = {
    "shape_mismatch_state_plus_transposed_outer": ('''
    @rule(state=("K", "V"))
    def bad_shape(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(v, k)  # <-
        return S, S.T @ q
''', "bad_shape", [('msg', 'matrix[K, V] + matrix[V, K]')]),
    "shape_mismatch_vectors": ('''
    @rule(state=("K", "V"))
    def bad_add(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        x = q + v  # <-
        S = S + outer(k, x)
        return S, S.T @ q
''', "bad_add", [('msg', 'vector[K] + vector[V]')]),
    "matmul_inner_dimensions": ('''
    @rule(state=("K", "V"))
    def bad_matmul(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)
        o = S @ q  # <-
        return S, o
''', "bad_matmul", [('fix', 'S.T @ k')]),
    "unused_input": ('''
    @rule(state=("K", "V"))  # <-
    def unused(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):  # <-
        S = S + outer(k, v)
        return S, S.T @ q
''', "unused", [('msg', "'g' is never used")]),
    "input_only_used_in_dead_code": ('''
    @rule(state=("K", "V"))  # <-
    def dead(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):  # <-
        decay = exp(g)
        S = S + outer(k, v)
        return S, S.T @ q
''', "dead", [('msg', "'g' is never used")]),
    "misspelled_input": ('''
    @rule(state=("K", "V"))
    def typo(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], beta: Scalar):
        S = S + bta * outer(k, v - S.T @ k)  # <-
        return S, S.T @ q
''', "typo", [('got', "'bta'"), ('msg', "did you mean 'beta'?")]),
    "misspelled_primitive": ('''
    @rule(state=("K", "V"))
    def typo2(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outr(k, v)  # <-
        return S, S.T @ q
''', "typo2", [('msg', "did you mean 'outer'?")]),
    "missing_return": ('''
    @rule(state=("K", "V"))
    def no_return(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)  # <-
''', "no_return", [('got', 'no return'), ('fix', 'return S, S.T @ q')]),
    "returning_only_the_state": ('''
    @rule(state=("K", "V"))
    def only_state(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)
        return S  # <-
''', "only_state", [('expected', 'return S, o')]),
    "returning_in_wrong_order": ('''
    @rule(state=("K", "V"))
    def swapped(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)
        return S.T @ q, S  # <-
''', "swapped", []),
    "output_not_reading_state": ('''
    @rule(state=("K", "V"))  # <-
    def no_read(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):  # <-
        S = S + outer(k, v) + outer(q, v)
        return S, v
''', "no_read", []),
    "returning_a_number": ('''
    @rule(state=("K", "V"))
    def number_out(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v)
        return S, 0  # <-
''', "number_out", [('got', 'a tuple of 2 (matrix[K, V], int)')]),
    # constants: the checker and the kernels need finite numbers, and 1/0 is no decay
    "nan_constant": ('''
    @rule(state=("K", "V"))
    def nan_decay(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = float("nan") * S + outer(k, v)  # <-
        return S, S.T @ q
''', "nan_decay", [('expected', 'a finite number')]),
    "huge_integer_constant": ('''
    @rule(state=("K", "V"))
    def huge(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + 10 ** 400 * outer(k, v)  # <-
        return S, S.T @ q
''', "huge", [('expected', 'a finite number')]),
    "infinite_exponent": ('''
    @rule(state=("K", "V"))
    def inf_pow(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
        S = sigmoid(g) ** float("inf") * S + outer(k, v)  # <-
        return S, S.T @ q
''', "inf_pow", [('expected', 'a finite number')]),
    "division_by_constant_zero": ('''
    @rule(state=("K", "V"))
    def div0(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k / 0, v)  # <-
        return S, S.T @ q
''', "div0", [('got', 'vector[K] / 0')]),
    "number_to_a_traced_power": ('''
    @rule(state=("K", "V"))
    def rpow(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
        S = 2 ** g * S + outer(k, v)  # <-
        return S, S.T @ q
''', "rpow", [('fix', 'exp(x * log(c))')]),
    # Python in the body: its own errors and comparisons (which would pick one branch for every token)
    "python_error_in_body": ('''
    @rule(state=("K", "V"))
    def pyerr(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S * (1 / 0.0) + outer(k, v)  # <-
        return S, S.T @ q
''', "pyerr", [('got', 'ZeroDivisionError')]),
    "comparison_on_traced_value": ('''
    @rule(state=("K", "V"))
    def compare(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
        if g == 0:  # <-
            S = S + outer(k, v)
        else:
            S = exp(g) * S + outer(k, v)
        return S, S.T @ q
''', "compare", [('expected', 'no comparisons')]),
    # the signature: the state first, named inputs, and no names the op or its internals use
    "state_left_out": ('''
    @rule(state=("K", "V"))  # <-
    def no_state(q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):  # <-
        return q, k
''', "no_state", [('expected', 'the state as first argument')]),
    "var_positional_inputs": ('''
    @rule(state=("K", "V"))  # <-
    def star(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], *rest: Scalar):  # <-
        S = S + outer(k, v)
        return S, S.T @ q
''', "star", [('got', '*rest')]),
    "input_named_S_with_a_renamed_state": ('''
    @rule(state=("K", "V"))  # <-
    def renamed(M, q: Vec["K"], k: Vec["K"], v: Vec["V"], S: Scalar):  # <-
        M = exp(S) * M + outer(k, v)
        return M, M.T @ q
''', "renamed", [('got', "an input named 'S'")]),
    "input_named_like_an_op_keyword": ('''
    @rule(state=("K", "V"))  # <-
    def kw(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], scale: Scalar):  # <-
        S = exp(scale) * S + outer(k, v)
        return S, S.T @ q
''', "kw", [('got', "an input named 'scale'"), ('expected', 'unifattn.ops.linear_attention')]),
    "dunder_input_name": ('''
    @rule(state=("K", "V"))  # <-
    def dunder(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], __dtype__: Scalar):  # <-
        S = exp(__dtype__) * S + outer(k, v)
        return S, S.T @ q
''', "dunder", [('got', "an input named '__dtype__'")]),
    "value_of_another_rule": ('''
    KEPT = []

    @rule(state=("K", "V"))
    def first(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], w: Vec["V"]):
        KEPT.append(w)
        S = S + outer(k, v + w)
        return S, S.T @ q

    @rule(state=("K", "V"))  # <-
    def second(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
        S = S + outer(k, v + KEPT[0])
        return S, S.T @ q
''', "second", [('got', "'w', an input of another rule")]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_rule_errors(tmp_path, case):
    src, name, says = ERROR_CASES[case]
    err, path, lines = rule_error(tmp_path, src)
    assert_well_formed(err, name, path, lines)
    parts = {"msg": str(err), "got": err.got, "fix": err.fix, "expected": err.expected}
    for part, text in says:
        assert text in parts[part], (part, text, parts[part])


@pytest.mark.parametrize("missing", ["q", "k", "v"])
def test_error_missing_qkv_input(tmp_path, missing):
    sig = ", ".join(f'{n}: Vec["{"V" if n == "v" else "K"}"]' for n in ("q", "k", "v") if n != missing)
    use = {"q": "S = S + outer(k, v)\n    return S, S.T @ k",
           "k": "S = S + outer(q, v)\n    return S, S.T @ q",
           "v": "S = S + outer(k, S.T @ k)\n    return S, S.T @ q"}[missing]
    err, path, lines = rule_error(tmp_path, f'''\
@rule(state=("K", "V"))  # <-
def no_{missing}(S, {sig}):  # <-
    {use}
''')
    assert_well_formed(err, f"no_{missing}", path, lines)
    assert f"'{missing}: Vec[" in err.expected and f"add `{missing}: Vec[" in err.fix


def test_error_qkv_with_wrong_type(tmp_path):
    err, path, lines = rule_error(tmp_path, '''
        @rule(state=("K", "V"))  # <-
        def q_scalar(S, q: Scalar, k: Vec["K"], v: Vec["V"]):  # <-
            S = S + outer(k, v)
            return S, q * (S.T @ k)
    ''')
    assert_well_formed(err, "q_scalar", path, lines)
    assert "'q' typed Vec['K']" in err.expected


@pytest.mark.parametrize("ann", ["int", "'Vec'", "Vec", "Vec['Z']"])
def test_error_bad_annotation(tmp_path, ann):
    err, path, lines = rule_error(tmp_path, f'''\
@rule(state=("K", "V"))  # <-
def bad_ann(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: {ann}):  # <-
    S = exp(g) * S + outer(k, v)
    return S, S.T @ q
''')
    assert_well_formed(err, "bad_ann", path, lines)
    assert "'g'" in str(err)


def test_error_missing_annotation(tmp_path):
    err, path, lines = rule_error(tmp_path, '''
        @rule(state=("K", "V"))  # <-
        def no_ann(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g):  # <-
            S = exp(g) * S + outer(k, v)
            return S, S.T @ q
    ''')
    assert_well_formed(err, "no_ann", path, lines)
    assert "g: Vec['K']" in err.fix


def test_error_bad_string_annotation(tmp_path):
    err, path, lines = rule_error(tmp_path, header=False, src='''
        from __future__ import annotations
        from unifattn.dsl import rule, Vec, Scalar, exp, outer

        @rule(state=("K", "V"))  # <-
        def bad_str(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Sclar):  # <-
            S = exp(g) * S + outer(k, v)
            return S, S.T @ q
    ''')
    assert_well_formed(err, "bad_str", path, lines)
    assert "Sclar" in err.got


def test_error_python_control_flow_on_traced_values(tmp_path):
    err, path, lines = rule_error(tmp_path, '''
        @rule(state=("K", "V"))
        def branchy(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
            if g:  # <-
                S = S + outer(k, v)
            return S, S.T @ q
    ''')
    assert_well_formed(err, "branchy", path, lines)
    assert "straight-line" in err.expected


def test_error_non_vector_to_outer(tmp_path):
    err, path, lines = rule_error(tmp_path, '''
        @rule(state=("K", "V"))
        def outer_scalar(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
            S = S + outer(g, v)  # <-
            return S, S.T @ q + k @ k
    ''')
    assert_well_formed(err, "outer_scalar", path, lines)
    assert "a vector for outer" in err.expected


def test_error_foreign_value(tmp_path):
    err, path, lines = rule_error(tmp_path, '''
        @rule(state=("K", "V"))
        def foreign(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
            S = S + outer(k, v) * "x"  # <-
            return S, S.T @ q
    ''')
    assert_well_formed(err, "foreign", path, lines)


def test_rule_error_is_an_exception_with_fields():
    e = RuleError("r", "f.py:3", "A", "B", "C")
    assert isinstance(e, Exception)
    assert str(e) == "rule 'r' (f.py:3): expected A; got B. Fix: C"


# --------------------------------------------------------------------------- selectors
def test_selector_options_are_checked_however_built():
    from unifattn.dsl.selector import Block, Local, Sink, selector
    for bad in (lambda: Block(0), lambda: Sink(-1), lambda: Local(0)):    # block(0) checked, Block(0) was not
        with pytest.raises(ValueError, match="expected a positive int.*Fix:"):
            bad()
    with pytest.raises(TypeError, match=r"selector\(keys=\.\.\.\): expected the names.*Fix:"):
        selector(topk=4, keys=3)

    @selector(topk=4, keys=("k", "k"))                                    # was: "every input key-side"
    def dup(q: Vec["D"], k: Vec["D"]):
        return q @ k
    assert [i.side for i in dup.inputs] == ["query", "key"]


def test_selector_signature():
    from unifattn.dsl.selector import Heads, selector, sum_heads

    @selector(topk=4)
    def posonly(q: Vec["D"], k: Vec["D"], /):
        return q @ k
    assert posonly.ir_text().endswith("return (q @ k)")
    with pytest.raises(RuleError, match=r"input names other than .*got an input named '__dtype__'"):
        @selector(topk=4)
        def dunder(q: Vec["D"], k: Vec["D"], __dtype__: Scalar):
            return (q @ k) * __dtype__
    with pytest.raises(RuleError, match="expected a divisor other than the constant 0"):
        @selector(topk=4)
        def div0(q: Vec["D"], k: Vec["D"]):
            return (q @ k) / 0
    # a Vec over an indexer-head dimension: the generated kernel read it as per-head values (wrong scores)
    with pytest.raises(RuleError, match="'D' is also a head dimension"):
        @selector(topk=4)
        def clash(qi: Heads["D"], k: Vec["D"]):
            return sum_heads(qi * k)


# --------------------------------------------------------------------------- large rules
def test_long_and_deep_rules_trace_in_linear_time(tmp_path):
    """2000 statements (a Python loop in the rule) and 400-deep expressions built by a helper: the
    dataflow check was quadratic (a minute), the IR printer and the checker recursive (RecursionError)."""
    mod, _, _ = load(tmp_path, HEADER + textwrap.dedent('''
        def squash(x, n):
            for _ in range(n):
                x = sigmoid(x) * 0.5 + x * 0.25
            return x

        @rule(state=("K", "V"))
        def long(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
            x = g
            for _ in range(2000):
                x = x * 0.999 + 0.001
            S = exp(-x * x) * S + outer(k, v)
            return S, S.T @ q

        @rule(state=("K", "V"))
        def deep(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Scalar):
            S = exp(-squash(g, 400) ** 2) * S + outer(squash(k, 400), v)
            return S, S.T @ q

        @rule(state=("K", "V"))
        def deep_state(S, q: Vec["K"], k: Vec["K"], v: Vec["V"]):
            S = squash(S, 300) + outer(k, v)
            return S, S.T @ q
    '''))
    assert len(mod.long.statements) == 2002
    for r in (mod.long, mod.deep):
        assert len(r.ir_text()) > 1000
        f = ua.dsl.check(r)
        assert f.transition == "scalar" and f.forms == ("recurrent",)     # the decay is not proved in (0, 1]
    with pytest.raises(RuleError, match="expected an update of the state at most 250 operations deep.*Fix:"):
        ua.dsl.check(mod.deep_state)
