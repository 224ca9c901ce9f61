"""`python -m unifattn show RULE | list`, run as a user runs it (a subprocess)."""
import os
import subprocess
import sys

import pytest

import unifattn as ua

VERDICTS = {
    "linear_attention": "identity", "retnet": "scalar", "mamba2": "scalar", "simple_gla": "scalar",
    "gla": "diagonal", "deltanet": "delta", "gated_deltanet": "scalar_delta", "kda": "diagonal_delta",
    "dplr": "dplr", "rwkv7": "dplr", "longhorn": "delta",
}


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "UNIFATTN_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "unifattn", *args], capture_output=True, text=True,
                              env=env, timeout=120)
    return run


def _field(out: str, key: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(key)]
    assert len(lines) == 1, (key, out)
    return lines[0].split(":", 1)[1].strip()


def test_show_kda(cli):
    p = cli("show", "kda")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("rule kda  (")
    assert _field(out, "transition class") == "diagonal_delta"
    assert _field(out, "forms") == "reference, chunk, recurrent"
    assert "S = diag(exp(g)) @ S" in out and "S = S + beta * outer(k, v - S.T @ k)" in out
    assert "q: Vec['K'], k: Vec['K'], v: Vec['V'], g: Vec['K'], beta: Scalar" in out
    assert "proved" in out


def test_show_dplr_names_its_chunk_form_and_low_rank_pair(cli):
    p = cli("show", "dplr")
    assert p.returncode == 0, p.stderr
    assert _field(p.stdout, "transition class") == "dplr"
    assert "chunk" in _field(p.stdout, "forms")
    assert "low rank a, b" in p.stdout
    assert "chunk form of 'dplr' == recurrence on 3 symbolic tokens: proved" in p.stdout


def test_show_mamba2_bound(cli):
    p = cli("show", "mamba2")
    assert p.returncode == 0, p.stderr
    assert _field(p.stdout, "transition class") == "scalar"
    assert "log_gate <= 0: proved" in p.stdout


def test_unknown_rule_lists_the_builtin_rules(cli):
    p = cli("show", "kdaa")
    assert p.returncode != 0
    assert "unknown rule 'kdaa'" in p.stderr
    for name in ua.rules.BUILTIN:
        assert name in p.stderr
    assert p.stdout == ""


def test_list(cli):
    p = cli("list")
    assert p.returncode == 0, p.stderr
    lines = [ln.split() for ln in p.stdout.strip().splitlines()]
    got = {ln[0]: ln[1] for ln in lines if ln[1] != "selector,"}
    assert got == VERDICTS
    assert {ln[0] for ln in lines if ln[1] == "selector,"} == {"lightning_indexer", "moba"}


def test_no_command_is_a_usage_error(cli):
    p = cli()
    assert p.returncode != 0
    assert "usage" in p.stderr


def test_show_selector_prints_topk_granularity_and_generated_kernel(tmp_path):
    env = dict(os.environ, UNIFATTN_CACHE_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "unifattn", "show", "lightning_indexer"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "top-k            : 2048 per query, granularity token" in p.stdout
    assert "(query)" in p.stdout and "(key)" in p.stdout
    path = p.stdout.split("generated scoring: ")[1].strip()
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
