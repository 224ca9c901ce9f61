"""Selectors: DSL tracing and checking, generated scoring kernel, top-k selection.

Kernel scores are compared with the float64 reference (the selector's IR evaluated
by torch for every (query, column) pair); selections are checked for their
properties (causal, forced keys, padding, order, no duplicates, optimal within
the fp32 tolerance) and, on inputs whose scores are exact in fp32 (small
integers), for equality with select_reference, ties included. Kernel calls run
inside `poisoned()`, so an element the pipeline forgets to write shows up.
"""
import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unifattn.dsl.errors import RuleError
from unifattn.dsl.selector import (Heads, Scalar, Vec, block, exp, l2norm, local, log, relu, selector, sink, sum_heads,
                                   vsum)
from unifattn.kernels.utils import poisoned
from unifattn.select import _topk_rows, reference_scores, select, select_reference, select_scores
from unifattn.testing.tolerance import TOLERANCE, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFATTN_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- selectors under test
@selector(topk=2048, granularity="token")   # optional: always=(sink(4), local(64))
def lightning_indexer(qi: Heads["HI", "DI"], ki: Vec["DI"], w: Heads["HI"]):
    return sum_heads(w * relu(qi @ ki))          # DeepSeek Sparse Attention indexer


@selector(topk=16, granularity=block(64), always=(local(1),))
def moba(q: Vec["D"], kmean: Vec["D"]):          # block score vs mean-pooled keys
    return q @ kmean


@selector(topk=6, always=(sink(2), local(3)))
def dot_forced(q: Vec["D"], k: Vec["D"]):
    return q @ k


@selector(topk=5, granularity=block(8), keys=("key", "b"))
def exotic(q: Vec["D"], key: Vec["D"], a: Scalar, b: Scalar, u: Heads["H", "D"], c: Heads["H"]):
    qn = l2norm(q)
    g = c @ relu(u @ key)                        # '@' contracting the head dimension
    return 2.0 * (qn @ key) + a * b - vsum(key * key) / 8 + g + 0.5 * exp(b)


def li_inputs(B, T, HI=4, DI=16, dtype=torch.float32, seed=0, ints=False):
    g = torch.Generator().manual_seed(seed)
    if ints:   # small integers: every score is exact in fp32, ties are real ties
        r = lambda *s: torch.randint(-2, 3, s, generator=g).to(dtype)  # noqa: E731
    else:
        r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(qi=r(B, T, HI, DI).to(DEVICE), ki=r(B, T, DI).to(DEVICE), w=r(B, T, HI).abs().to(DEVICE))


# --------------------------------------------------------------------------- helpers
def check_selection(idx, ref, topk, *, tol=None):
    """idx [B, T, H, topk] vs reference scores [B, T, H, C] (-inf: no candidate, +inf: forced)."""
    assert idx.dtype == torch.int32 and idx.shape[-1] == topk
    idx, ref = idx.cpu().long(), ref.cpu()
    fin = ref[torch.isfinite(ref)]
    tol = TOLERANCE[torch.float32] * max(1.0, float(fin.abs().max()) if fin.numel() else 1.0) if tol is None else tol
    rows_i, rows_s = idx.reshape(-1, topk), ref.reshape(-1, ref.shape[-1])
    for r, (sel, s) in enumerate(zip(rows_i, rows_s)):
        k = int((sel >= 0).sum())
        assert (sel[:k] >= 0).all() and (sel[k:] == -1).all(), f"row {r}: -1 padding not at the end: {sel}"
        assert k < 2 or (sel[1:k] > sel[:k - 1]).all(), f"row {r}: not strictly ascending (or duplicated): {sel}"
        avail = int((s > -INF).sum())
        assert k == min(topk, avail), f"row {r}: kept {k}, expected min(topk={topk}, candidates={avail})"
        kept = s[sel[:k]]
        assert (kept > -INF).all(), f"row {r}: kept a non-causal column: {sel[:k][kept == -INF]}"
        forced = (s == INF).nonzero().flatten()
        assert set(forced.tolist()) <= set(sel[:k].tolist()), f"row {r}: forced {forced} missing from {sel}"
        mask = torch.ones_like(s, dtype=torch.bool)
        mask[sel[:k]] = False
        left = s[mask & (s > -INF)]
        if left.numel() and k:
            assert float(left.max()) <= float(kept.min()) + tol, f"row {r}: a better column was left out"


# --------------------------------------------------------------------------- DSL
def test_design_examples_trace():
    assert [(i.name, i.side, i.shape, i.heads) for i in lightning_indexer.inputs] == [
        ("qi", "query", ("HI", "DI"), True), ("ki", "key", ("DI",), False), ("w", "query", ("HI",), True)]
    assert lightning_indexer.topk == 2048 and lightning_indexer.granularity == "token"
    assert lightning_indexer.ir_text().splitlines()[-1] == "return sum((w * relu((qi @ ki))))"
    assert [(i.name, i.side) for i in moba.inputs] == [("q", "query"), ("kmean", "key")]
    assert moba.block_size == 64 and moba.always == (local(1),) and moba.n_local == 1 and moba.n_sink == 0
    assert moba.ir_text().splitlines()[-1] == "return (q @ kmean)"


def test_builtins_match_design():
    from unifattn import selectors
    assert selectors.lightning_indexer.ir_text().splitlines()[1:] == lightning_indexer.ir_text().splitlines()[1:]
    assert selectors.moba.ir_text().splitlines()[1:] == moba.ir_text().splitlines()[1:]
    assert selectors.moba.topk == 16 and selectors.moba.block_size == 64 and selectors.moba.n_local == 1


def _line_of(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    hits = [i + 1 for i, ln in enumerate(lines) if ln.rstrip().endswith(marker)]
    assert len(hits) == 1, marker
    return hits[0]


def _bad_mix():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"]):
        x = q * k                                # ERR:mix
        return vsum(x)


def _bad_dims():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["E"]):
        return q @ k                             # ERR:dims


def _bad_vector_score():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"]):
        s = q @ k
        return q * s                             # ERR:vector


def _bad_unused():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"], z: Scalar):
        return q @ k                             # ERR:unused


def _bad_sum_heads():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"]):
        return sum_heads(q) * vsum(k)            # ERR:sumheads


def _bad_if():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"]):
        if q @ k:                                # ERR:if
            return q @ k
        return q @ k


def _bad_name():
    @selector(topk=4)
    def bad(q: Vec["D"], k: Vec["D"]):
        return q @ kk                            # ERR:name  # noqa: F821


@pytest.mark.parametrize("make, marker", [
    (_bad_mix, "# ERR:mix"), (_bad_dims, "# ERR:dims"), (_bad_vector_score, "# ERR:vector"),
    (_bad_unused, "# ERR:unused"), (_bad_sum_heads, "# ERR:sumheads"), (_bad_if, "# ERR:if"),
    (_bad_name, "# ERR:name  # noqa: F821"),
])
def test_malformed_selector_raises_with_line(make, marker):
    with pytest.raises(RuleError) as e:
        make()
    assert e.value.where == f"{__file__}:{_line_of(marker)}", str(e.value)
    assert "expected" in str(e.value) and "Fix:" in str(e.value)


def test_score_must_combine_query_and_key():
    with pytest.raises(RuleError, match="'k' is never used"):      # 0 * vsum(k) folds away
        @selector(topk=4)
        def bad(q: Vec["D"], k: Vec["D"]):
            return q @ q + 0 * vsum(k)
    with pytest.raises(RuleError, match="query-side inputs and key-side inputs"):
        @selector(topk=4)
        def nokeys(q: Vec["D"], v: Vec["D"]):
            return q @ v


@pytest.mark.parametrize("src, match", [
    ("def f(q: Vec['D'], k):\n    return q @ k", "type annotation|per-token type"),
    ("def f(q: Vec['D'], k: Vec['D'], topk: Scalar):\n    return q @ k * topk", "keywords of unifattn.select"),
    ("def f(q: Vec['D'], k: Vec['D']):\n    return vsum(outer(q, k) @ k)", "dot products"),
    ("def f(q: Vec['D'], k: Vec['D']):\n    return q", "scalar score"),
    ("def f(qi: Heads['H', 'D'], k: Vec['D']):\n    return vsum(qi @ k) * 0 + l2norm(qi @ k) @ (qi @ k)",
     "l2norm over"),
])
def test_malformed_selector_messages(tmp_path, src, match):
    import importlib.util
    p = tmp_path / "sel_bad.py"
    p.write_text("from unifattn.dsl.selector import *\nfrom unifattn.dsl.rule import outer\n\n"
                 "@selector(topk=4)\n" + src + "\n")
    spec = importlib.util.spec_from_file_location("sel_bad", p)
    with pytest.raises(RuleError, match=match) as e:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert str(p) in e.value.where


def test_decorator_options():
    with pytest.raises(ValueError, match="positive int"):
        selector(topk=0)
    with pytest.raises(TypeError, match="granularity"):
        selector(topk=4, granularity="blocks")
    with pytest.raises(ValueError, match="forced keys"):
        selector(topk=2, always=(local(3),))
    with pytest.raises(ValueError, match="positive int"):
        block(0)
    with pytest.raises(RuleError, match="keys=..."):
        @selector(topk=4, keys=("nope",))
        def f(q: Vec["D"], x: Vec["D"]):
            return q @ x

    @selector(topk=4, keys="x")
    def g(q: Vec["D"], x: Vec["D"]):
        return q @ x
    assert [i.side for i in g.inputs] == ["query", "key"]


# --------------------------------------------------------------------------- scores
def _compare_scores(sel, dtype=torch.float32, cu_seqlens=None, **inputs):
    with poisoned():
        got = select_scores(sel, cu_seqlens=cu_seqlens, **inputs)
    ref = reference_scores(sel, cu_seqlens=cu_seqlens, **inputs)
    assert got.shape == ref.shape
    assert torch.equal(torch.isinf(got).cpu() & (got > 0).cpu(), torch.isinf(ref).cpu() & (ref > 0).cpu()), "forced"
    assert torch.equal((got == -INF).cpu(), (ref == -INF).cpu()), "candidates"
    fin = torch.isfinite(ref)
    assert_close(got[fin], ref[fin], dtype, "scores")


def test_scores_lightning_indexer():
    _compare_scores(lightning_indexer, **li_inputs(2, 70))


def test_scores_bf16():
    x = li_inputs(1, 40, dtype=torch.bfloat16, seed=3)
    _compare_scores(lightning_indexer, torch.bfloat16, **x)


def test_scores_moba_gqa_varlen():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 150, 4, 24, generator=g).to(DEVICE)
    k = torch.randn(1, 150, 2, 24, generator=g).to(DEVICE)
    _compare_scores(_small_moba, q=q, kmean=k, cu_seqlens=torch.tensor([0, 40, 40, 150]).to(DEVICE))


@selector(topk=3, granularity=block(16), always=(local(1),))
def _small_moba(q: Vec["D"], kmean: Vec["D"]):
    return q @ kmean


def test_scores_exotic():
    g = torch.Generator().manual_seed(2)
    B, T, D, H = 1, 50, 12, 3
    x = dict(q=torch.randn(B, T, 2, D, generator=g), key=torch.randn(B, T, D, generator=g),
             a=torch.randn(B, T, 2, generator=g), b=torch.randn(B, T, generator=g),
             u=torch.randn(B, T, H, D, generator=g), c=torch.randn(B, T, H, generator=g))
    _compare_scores(exotic, **{k: v.to(DEVICE) for k, v in x.items()})


@selector(topk=4, granularity="token", keys=("ki", "kw"))
def _mixed_heads(qi: Heads["H", "D"], sq: Scalar, w: Heads["H"], ki: Vec["D"], kw: Heads["H"]):
    # a per-query scalar inside a head sum; a key-side input with the head axis
    return sum_heads(w * sq * relu(qi @ ki)) + sum_heads(kw * relu(qi @ ki))


@pytest.mark.parametrize("H", [1, 3, 16])
def test_scores_query_and_key_side_heads(H):
    g = torch.Generator().manual_seed(H)
    B, T, D = 2, 45, 16
    x = dict(qi=torch.randn(B, T, H, D, generator=g), sq=torch.randn(B, T, generator=g),
             w=torch.randn(B, T, H, generator=g), ki=torch.randn(B, T, D, generator=g),
             kw=torch.randn(B, T, H, generator=g))
    _compare_scores(_mixed_heads, **{k: v.to(DEVICE) for k, v in x.items()})


def test_head_sum_at_the_root_accumulates_into_acc_with_query_head_groups():
    # a score that is itself a head sum adds each head's term straight into the program's acc (no
    # separate head-sum tile); with G = 2 query heads per KV head the acc also sums over the group
    from unifattn.codegen import selector as cgs
    src = cgs.source(lightning_indexer)
    assert "acc += b_mul" in src and "b_sum = tl.zeros" not in src
    mixed = cgs.source(_mixed_heads)          # two head sums added: each has its own tile
    assert mixed.count("= tl.zeros([BT, BS], dtype=tl.float32)") == 3 and "            acc += " in mixed
    g = torch.Generator().manual_seed(11)
    B, T, HQ, HKV, HI, DI = 1, 40, 4, 2, 3, 8
    x = dict(qi=torch.randn(B, T, HQ, HI, DI, generator=g), ki=torch.randn(B, T, HKV, DI, generator=g),
             w=torch.randn(B, T, HQ, HI, generator=g))
    _compare_scores(lightning_indexer, **{k: v.to(DEVICE) for k, v in x.items()})


@selector(topk=2)
def _log_dot(q: Vec["D"], k: Vec["D"]):
    return log(q @ k)                           # NaN where the dot is negative


def test_nan_scores_of_finite_inputs_raise_unless_unchecked():
    g = torch.Generator().manual_seed(0)
    x = dict(q=torch.randn(1, 12, 8, generator=g).to(DEVICE), k=torch.randn(1, 12, 8, generator=g).to(DEVICE))
    with pytest.raises(ValueError, match=r"selector '_log_dot': expected finite scores for finite inputs; "
                                         r"got NaN scores\. Fix: .*check_inputs=False"):
        select(_log_dot, **x)
    with poisoned():
        idx = select(_log_dot, check_inputs=False, **x)       # NaN ranks lowest, as in the reference
    assert torch.equal(idx.cpu(), select_reference(_log_dot, **x).cpu())
    y = dict(q=x["q"].abs(), k=x["k"].abs())                   # every dot positive: no NaN, no error
    assert torch.equal(select(_log_dot, **y).cpu(), select_reference(_log_dot, **y).cpu())


# --------------------------------------------------------------------------- selection
def test_select_matches_reference_random():
    x = li_inputs(2, 90, seed=5)
    with poisoned():
        idx = select(lightning_indexer, topk=16, **x)
    assert idx.shape == (2, 90, 1, 16)
    check_selection(idx, reference_scores(lightning_indexer, **x), 16)


@pytest.mark.parametrize("topk", [1, 7, 40])
def test_select_exact_ties_equal_reference(topk):
    x = li_inputs(2, 64, HI=2, DI=4, seed=7, ints=True)     # scores in a handful of integers: many ties
    with poisoned():
        idx = select(lightning_indexer, topk=topk, **x)
    ref = select_reference(lightning_indexer, topk=topk, **x)
    assert torch.equal(idx.cpu(), ref.cpu())
    check_selection(idx, reference_scores(lightning_indexer, **x), topk, tol=0.0)


def test_all_tied_keeps_lowest_indices():
    x = li_inputs(1, 40, seed=1)
    x["ki"] = torch.ones_like(x["ki"])                       # every key scores the same
    with poisoned():
        idx = select(lightning_indexer, topk=8, **x)[0, :, 0]
    for t in range(40):
        want = list(range(min(t + 1, 8))) + [-1] * (8 - min(t + 1, 8))
        assert idx[t].tolist() == want


def test_exact_topk_ties_and_signed_zero():
    s = torch.tensor([[[0.0, -0.0, 1.0, 1.0, -INF, 1.0, -0.0, 0.0]]])
    col, valid = _topk_rows(s, 4)
    got = sorted(c for c, v in zip(col.flatten().tolist(), valid.flatten().tolist()) if v)
    assert got == [0, 2, 3, 5]


def test_forced_keys_always_kept():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 60, 8, generator=g).to(DEVICE)
    k = torch.randn(1, 60, 8, generator=g).to(DEVICE)
    k[:, :2] = -100 * q.mean(1, keepdim=True).sign()        # sinks score badly: kept only by sink(2)
    with poisoned():
        idx = select(dot_forced, q=q, k=k)
    ref = reference_scores(dot_forced, q=q, k=k)
    check_selection(idx, ref, 6)
    for t in range(60):
        row = set(idx[0, t, 0].tolist())
        assert {s for s in (0, 1) if s <= t} <= row and {s for s in range(t - 2, t + 1) if s >= 0} <= row


def test_fewer_candidates_than_topk_padded():
    x = li_inputs(1, 20, seed=2)
    with poisoned():
        idx = select(lightning_indexer, **x)                 # topk 2048 > T
    assert idx.shape == (1, 20, 1, 2048)
    for t in range(20):
        assert idx[0, t, 0, :t + 1].tolist() == list(range(t + 1))
        assert (idx[0, t, 0, t + 1:] == -1).all()


def test_moba_block_selection():
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-2, 3, (2, 100, 4, 8), generator=g).float().to(DEVICE)
    k = torch.randint(-2, 3, (2, 100, 2, 8), generator=g).float().to(DEVICE)
    with poisoned():
        idx = select(_small_moba, q=q, kmean=k)
    assert idx.shape == (2, 100, 2, 3)
    assert torch.equal(idx.cpu(), select_reference(_small_moba, q=q, kmean=k).cpu())
    check_selection(idx, reference_scores(_small_moba, q=q, kmean=k), 3)
    own = torch.arange(100) // 16
    assert (idx.cpu() == own[None, :, None, None]).any(-1).all(), "own block missing"
    assert (idx.cpu() <= own[None, :, None, None]).all(), "a block after the query's own"


def test_varlen_equals_loop_over_sequences():
    lens = [30, 0, 1, 57, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x = li_inputs(1, sum(lens), seed=9, ints=True)
    with poisoned():
        packed = select(lightning_indexer, topk=10, cu_seqlens=cu.to(DEVICE), **x)
    for a, L in zip(cu[:-1].tolist(), lens):
        one = select(lightning_indexer, topk=10, **{n: v[:, a:a + L] for n, v in x.items()})
        assert torch.equal(packed[:, a:a + L].cpu(), one.cpu())
    ref = select_reference(lightning_indexer, topk=10, cu_seqlens=cu, **x)
    assert torch.equal(packed.cpu(), ref.cpu())


def test_batch_equals_loop_and_tile_size_irrelevant():
    from unifattn.select import SelectConfig
    x = li_inputs(3, 50, seed=10, ints=True)
    with poisoned():
        full = select(lightning_indexer, topk=12, **x)
        tiny = select(lightning_indexer, topk=12, config=SelectConfig(query_tile=7, block_t=16, block_s=32), **x)
    assert torch.equal(full, tiny)
    for b in range(3):
        one = select(lightning_indexer, topk=12, **{n: v[b:b + 1] for n, v in x.items()})
        assert torch.equal(full[b:b + 1], one)


def test_empty_sequence():
    x = li_inputs(2, 0)
    assert select(lightning_indexer, topk=4, **x).shape == (2, 0, 1, 4)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), topk=st.integers(1, 24), n=st.sampled_from([1, 4, 16]),
       ns=st.integers(0, 3), nl=st.integers(0, 3), seed=st.integers(0, 2 ** 16),
       impl=st.sampled_from(["torch", "kernel"]))
def test_property_select_equals_reference(T, topk, n, ns, nl, seed, impl):
    always = tuple(a for a in ((sink(ns) if ns else None), (local(nl) if nl else None)) if a)
    if sum(a.n for a in always) > topk:
        topk = sum(a.n for a in always)
    sel = selector(topk=topk, granularity="token" if n == 1 else block(n), always=always)(_plain_dot)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, T, 2, 4), generator=g).float().to(DEVICE)
    k = torch.randint(-2, 3, (1, T, 1, 4), generator=g).float().to(DEVICE)
    from unifattn.select import SelectConfig
    with poisoned():
        idx = select(sel, q=q, k=k, config=SelectConfig(topk_impl=impl))
    assert torch.equal(idx.cpu(), select_reference(sel, q=q, k=k).cpu())
    check_selection(idx, reference_scores(sel, q=q, k=k), topk, tol=0.0)


# --------------------------------------------------------------------------- top-k kernel (kernels.topk)
def _radix():
    from unifattn.select import SelectConfig
    return SelectConfig(topk_impl="kernel", query_tile=23)     # several tiles, ragged last one


@pytest.mark.parametrize("topk", [1, 7, 40, 64])
def test_radix_select_equals_reference_with_ties(topk):
    x = li_inputs(2, 64, HI=2, DI=4, seed=7, ints=True)     # a handful of integer scores: many ties
    with poisoned():
        idx = select(lightning_indexer, topk=topk, config=_radix(), **x)
    assert torch.equal(idx.cpu(), select_reference(lightning_indexer, topk=topk, **x).cpu())


def test_radix_select_forced_padded_blocks_varlen():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 60, 8, generator=g).to(DEVICE)
    k = torch.randn(1, 60, 8, generator=g).to(DEVICE)
    k[:, :2] = -100 * q.mean(1, keepdim=True).sign()        # kept only by sink(2): +inf scores
    with poisoned():
        assert torch.equal(select(dot_forced, q=q, k=k, config=_radix()).cpu(),
                           select_reference(dot_forced, q=q, k=k).cpu())
    x = li_inputs(1, 20, seed=2)
    with poisoned():
        idx = select(lightning_indexer, config=_radix(), **x)                 # topk 2048 > T: -1 padding
    assert torch.equal(idx.cpu(), select_reference(lightning_indexer, **x).cpu())
    qm = torch.randint(-2, 3, (2, 100, 4, 8), generator=g).float().to(DEVICE)
    km = torch.randint(-2, 3, (2, 100, 2, 8), generator=g).float().to(DEVICE)
    with poisoned():
        assert torch.equal(select(_small_moba, q=qm, kmean=km, config=_radix()).cpu(),
                           select_reference(_small_moba, q=qm, kmean=km).cpu())
    lens = [30, 0, 1, 57, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x = li_inputs(1, sum(lens), seed=9, ints=True)
    with poisoned():
        packed = select(lightning_indexer, topk=10, cu_seqlens=cu.to(DEVICE), config=_radix(), **x)
    assert torch.equal(packed.cpu(), select_reference(lightning_indexer, topk=10, cu_seqlens=cu, **x).cpu())


@pytest.mark.parametrize("W, topk", [(7, 4), (1500, 200), (3000, 2048), (2100, 2100), (2500, 1)])
def test_radix_rows_equal_torch_topk_over_many_blocks(W, topk):
    """Rows longer than the kernel's block: ties, -0.0 against +0.0, +inf kept, -inf never kept."""
    from unifattn.kernels.topk import topk_rows
    from unifattn.select import _finish
    g = torch.Generator().manual_seed(W)
    s = torch.round(torch.randn(2, 5, W, generator=g) * 2) / 2
    tail = torch.rand(2, 5, W - W // 2, generator=g) < 0.7
    s[:, :, W // 2:] = torch.where(tail, float("-inf"), s[:, :, W // 2:])
    s[0, 0, 0] = float("inf")
    s[1, 1, :3], s[1, 1, 3:6] = -0.0, 0.0
    bblk = torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32)
    out = torch.full((5, 2, topk), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, bblk.to(DEVICE), 11, topk)
    col, valid = _topk_rows(s, topk)
    want = _finish(col + (11 - bblk.long())[None, :, None], valid).permute(1, 0, 2)
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("k", [1, 5, 1100])
def test_radix_kth_on_a_digit_boundary(k):
    """Exactly k scores of 2.0 among 1.0s: the k-th key is the smallest with its top byte, so every
    pass must take the largest digit whose suffix count reaches k (not exceeds it)."""
    from unifattn.kernels.topk import topk_rows
    W = 2300
    g = torch.Generator().manual_seed(k)
    where = torch.randperm(W, generator=g)[:k]
    s = torch.ones(1, 1, W)
    s[0, 0, where] = 2.0
    out = torch.full((1, 1, k), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0, k)
    assert out.flatten().tolist() == sorted(where.tolist())


@pytest.mark.parametrize("low_bits", [2, 6, 8, 12])
def test_radix_keys_differing_in_low_bits(low_bits):
    """Scores one ulp apart (their keys differ only in the lowest bits, where the 6-bit passes and
    the last 2-bit pass decide), with repeats: the kept set is that of a stable sort."""
    from unifattn.kernels.topk import topk_rows
    W, k = 1500, 333
    g = torch.Generator().manual_seed(low_bits)
    steps = torch.randint(0, 2 ** low_bits, (W,), generator=g, dtype=torch.int32)
    s = (torch.tensor(1.5).view(torch.int32) + steps).view(torch.float32)
    s = torch.where(torch.rand(W, generator=g) < 0.5, -s, s).view(1, 1, W)
    out = torch.full((1, 1, k), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0, k)
    order = sorted(range(W), key=lambda c: (-float(s[0, 0, c]), c))   # best first, ties to the lower column
    assert out.flatten().tolist() == sorted(order[:k])


def test_more_inf_scores_than_topk_keep_the_lowest_columns():
    """Scores that overflow to +inf tie: both top-k paths keep the lowest columns (found in review)."""
    from unifattn.kernels.topk import topk_rows
    from unifattn.select import _finish
    s = torch.tensor([[[INF, INF, INF, 0.0, 0.0]]])
    col, valid = _topk_rows(s, 2)
    assert _finish(col, valid).flatten().tolist() == [0, 1]
    out = torch.full((1, 1, 2), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0, 2)
    assert out.flatten().tolist() == [0, 1]


@settings(max_examples=25, deadline=None)
@given(W=st.integers(1, 1300), topk=st.integers(1, 1400), kind=st.sampled_from(["normal", "ties", "bits"]),
       seed=st.integers(0, 2 ** 16))
def test_property_radix_rows_equal_a_sort(W, topk, kind, seed):
    """Brute force: sort by (score descending, column ascending), -0.0 == +0.0, -inf never kept."""
    from unifattn.kernels.topk import topk_rows
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        s = torch.randn(1, 2, W, generator=g)
    elif kind == "ties":
        s = torch.randint(-3, 4, (1, 2, W), generator=g).float() / 2
    else:      # arbitrary finite bit patterns: every exponent and sign, denormals included
        bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, 2, W), generator=g, dtype=torch.int64).to(torch.int32)
        s = bits.view(torch.float32)
        s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    special = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 3.4e38, -3.4e38])
    pick = torch.randint(0, W, (min(W, 8),), generator=g)
    s[0, 0, pick] = special[torch.randint(0, 6, (pick.numel(),), generator=g)]
    out = torch.full((2, 1, topk), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, torch.zeros(2, dtype=torch.int32, device=DEVICE), 0, topk)
    for r in range(2):
        row = [(float(x) + 0.0, c) for c, x in enumerate(s[0, r].tolist()) if x != -float("inf")]
        keep = sorted(c for _, c in sorted(row, key=lambda p: (-p[0], p[1]))[:topk])
        assert out[r, 0].tolist() == keep + [-1] * (topk - len(keep))


def test_radix_config_is_checked():
    from unifattn.select import SelectConfig
    with pytest.raises(ValueError, match="topk_impl: expected 'auto', 'kernel' or 'torch'"):
        SelectConfig(topk_impl="bitonic")


@settings(max_examples=20, deadline=None)
@given(W=st.integers(1, 700), topk=st.integers(1, 80), max_row=st.sampled_from([32, 64, 128]),
       kind=st.sampled_from(["normal", "ties", "bits"]), seed=st.integers(0, 2 ** 16))
def test_property_two_launch_rows_equal_a_sort(W, topk, max_row, kind, seed):
    """Rows longer than one program's registers (max_row lowered from 32768 to reach it at small W):
    rounds of per-segment candidates (up to four here), then one selection over them; or a
    ValueError when topk exceeds half a segment."""
    from unifattn.kernels.topk import fits, topk_rows
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        s = torch.randn(1, 3, W, generator=g)
    elif kind == "ties":
        s = torch.randint(-3, 4, (1, 3, W), generator=g).float() / 2
    else:
        bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1, 3, W), generator=g, dtype=torch.int64).to(torch.int32)
        s = bits.view(torch.float32)
        s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    s[0, 1, W // 3:] = -INF                                          # a causal-like row, -inf past its end
    s[0, 2, torch.randint(0, W, (min(W, 5),), generator=g)] = INF    # forced keys
    out = torch.full((3, 1, topk), -7, dtype=torch.int32, device=DEVICE)
    bblk = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    if not fits(W, topk, max_row):
        with pytest.raises(ValueError, match=r"Fix: SelectConfig\(topk_impl='auto'\)"):
            topk_rows(s.to(DEVICE), out, bblk, 4, topk, max_row=max_row)
        return
    topk_rows(s.to(DEVICE), out, bblk, 4, topk, max_row=max_row)
    for r in range(3):
        row = [(float(x) + 0.0, c) for c, x in enumerate(s[0, r].tolist()) if x != -INF]
        keep = sorted(c + 4 - int(bblk[r]) for _, c in sorted(row, key=lambda p: (-p[0], p[1]))[:topk])
        assert out[r, 0].tolist() == keep + [-1] * (topk - len(keep))


@pytest.mark.parametrize("gap", ["early", "last bit", "tied"])
def test_kth_search_stops_only_when_the_set_is_known(gap):
    """k-th and (k+1)-th keys parted in a high bit (the search stops early), in the last bit only,
    or equal (no early stop; the k_eq lowest columns of the tie are kept)."""
    from unifattn.kernels.topk import topk_rows
    W, k = 300, 37
    g = torch.Generator().manual_seed(1)
    s = torch.rand(1, 1, W, generator=g) + 1.0                      # in [1, 2): one exponent
    order = torch.randperm(W, generator=g)
    top, nxt = order[:k], order[k]
    s[0, 0, top] += 4.0                                              # the k best in [5, 6)
    kth = s[0, 0, top].min()
    if gap == "last bit":
        s[0, 0, nxt] = (kth.view(torch.int32) - 1).view(torch.float32)
    elif gap == "tied":
        s[0, 0, order[k:k + 3]] = kth
    out = torch.full((1, 1, k), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0, k)
    want = sorted(range(W), key=lambda c: (-float(s[0, 0, c]), c))[:k]
    assert out.flatten().tolist() == sorted(want)


def _plain_dot(q: Vec["D"], k: Vec["D"]):
    return q @ k


# --------------------------------------------------------------------------- generated source
def test_generated_source_header_and_determinism(tmp_path):
    from unifattn.codegen import selector as cgs
    path = cgs.source_path(lightning_indexer)
    assert path.exists() and path.parent == tmp_path / "cache"
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# generated by unifattn ") and "from selector lightning_indexer (" in first
    assert first.endswith("-- edit the selector, not this file") and f"{__file__}:" in first
    assert cgs.source(lightning_indexer) == text                       # same object, same bytes
    a, b = (selector(topk=2048, granularity="token")(lightning_indexer_fn) for _ in range(2))
    assert cgs.source(a) == cgs.source(b)                              # traced twice, same bytes
    assert cgs.source_path(a) == cgs.source_path(b)
    path.unlink()
    assert cgs.source_path(lightning_indexer).read_bytes() == text.encode()


def lightning_indexer_fn(qi: Heads["HI", "DI"], ki: Vec["DI"], w: Heads["HI"]):
    return sum_heads(w * relu(qi @ ki))


# Process replay: the kernel text below the header is pinned. A deliberate template or
# printer change updates this digest (print it from the failing assertion) in the same commit.
GOLDEN_LI_BODY = "2d449a807a66a57d"


def test_golden_kernel_text():
    from unifattn import selectors
    from unifattn.codegen import selector as cgs
    body = cgs.source(selectors.lightning_indexer).split('"""', 1)[1]
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    assert digest == GOLDEN_LI_BODY, f"generated kernel text changed: new digest {digest}"


# --------------------------------------------------------------------------- bad inputs
def _bad_call(exc, match, **over):
    x = li_inputs(1, 10)
    x.update({k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in over.items()})
    with pytest.raises(exc, match=match):
        select(lightning_indexer, **{k: v for k, v in x.items() if v is not None})


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's numpy, on inf
def test_bad_inputs():
    _bad_call(ValueError, r"qi: expected \[B, T, HI, DI\] or \[B, T, HQ, HI, DI\]", qi=torch.randn(1, 10, 16))
    _bad_call(ValueError, r"ki: expected dimension DI = 16 as in qi \(1, 10, 4, 16\)", ki=torch.randn(1, 10, 8))
    _bad_call(ValueError, r"one of qi and ki is wrong", qi=torch.randn(1, 10, 2, 4, 8))    # 5-D qi sets DI first
    _bad_call(TypeError, "floating dtype", w=torch.ones(1, 10, 4, dtype=torch.int64))
    _bad_call(TypeError, "the dtype of qi", w=torch.ones(1, 10, 4, dtype=torch.float64))
    _bad_call(ValueError, "finite", w=torch.full((1, 10, 4), float("nan")))
    x = li_inputs(1, 10)
    x["qi"] = x["qi"].clone()
    x["qi"][0, 7, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="qi: expected finite values"):      # read after the kernels ran
        select(lightning_indexer, topk=4, **{k: v.to(DEVICE) for k, v in x.items()})
    select(lightning_indexer, topk=4, check_inputs=False, **{k: v.to(DEVICE) for k, v in x.items()})
    _bad_call(ValueError, "batch and time", w=torch.ones(1, 11, 4))
    _bad_call(TypeError, "input 'v'", v=torch.ones(1))
    _bad_call(TypeError, "pass w=", w=None)
    _bad_call(TypeError, "torch.Tensor", w=[1.0])
    x = li_inputs(1, 10)
    with pytest.raises(TypeError, match="selector declared"):
        select(lambda q: q, **x)
    with pytest.raises(ValueError, match="topk: expected a positive int"):
        select(lightning_indexer, topk=0, **x)
    with pytest.raises(TypeError, match="topk: expected a positive int"):
        select(lightning_indexer, topk=2.0, **x)
    with pytest.raises(ValueError, match="forced by always"):
        select(dot_forced, topk=4, q=torch.randn(1, 5, 4), k=torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        y = li_inputs(2, 10)
        select(lightning_indexer, cu_seqlens=torch.tensor([0, 10]), **y)
    with pytest.raises(ValueError, match="non-decreasing"):
        select(lightning_indexer, cu_seqlens=torch.tensor([0, 6, 4, 10]), **x)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        select(_small_moba, q=torch.randn(1, 5, 3, 4), kmean=torch.randn(1, 5, 2, 4))
    with pytest.raises(ValueError, match="heads like the other"):
        select(exotic, q=torch.randn(1, 5, 2, 4), key=torch.randn(1, 5, 4), a=torch.randn(1, 5, 3),
               b=torch.randn(1, 5), u=torch.randn(1, 5, 2, 4), c=torch.randn(1, 5, 2))


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        select(lightning_indexer, **li_inputs(1, 4))
    select_reference(lightning_indexer, **li_inputs(1, 4))          # the reference runs anywhere


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_second_stream_agrees_with_one(impl):
    """SelectConfig(streams=2) (on CUDA: each tile's top-k on a second stream, two reused score buffers,
    poisoned before each tile) returns what streams=1 does, over nine ragged tiles."""
    from unifattn.select import SelectConfig
    x = li_inputs(2, 40, seed=21)
    with poisoned():
        one = select(lightning_indexer, topk=9, config=SelectConfig(query_tile=9, streams=1, topk_impl=impl), **x)
        two = select(lightning_indexer, topk=9, config=SelectConfig(query_tile=9, streams=2, topk_impl=impl), **x)
    assert torch.equal(one, two)
    assert torch.equal(two.cpu(), select_reference(lightning_indexer, topk=9, **x).cpu())
    with pytest.raises(ValueError, match=r"SelectConfig.streams: expected 1 or 2; got 3"):
        SelectConfig(streams=3)
