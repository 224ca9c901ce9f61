"""The rule DSL: tracing, the IR it records, and the RuleErrors a user meets.

Rules that must fail are written to small module files, so each error can be
matched against the exact file:line of the offending statement (marked
`# <-` in the source below).
"""
import importlib.util
import itertools
import subprocess
import sys
import textwrap

import pytest

import unifattn as ua
from unifattn.dsl import Param, RuleError, Scalar, Vec, diag, exp, outer, rule, trace

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
