"""dsl.bounds: interval bounds on selector scores, and select()'s NaN-score flag, kept only where
the bound cannot rule NaN out."""
from __future__ import annotations

import math

import pytest
import torch

from unifattn.dsl.bounds import FP32_MAX, MARGIN, score_bound
from unifattn.dsl.selector import Heads, Scalar, Vec, exp, l2norm, log, relu, selector, sigmoid, sqrt, sum_heads
from unifattn.kernels.utils import poisoned
from unifattn import select as select_mod
from unifattn.select import SelectConfig, scores_finite, select, select_reference
from unifattn.selectors import lightning_indexer, moba

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@selector(topk=2)
def _div_const(q: Vec["D"], k: Vec["D"]):
    return (q @ k) / 4.0 - 1.0


@selector(topk=2)
def _div_input(q: Vec["D"], k: Vec["D"], a: Scalar):
    return (q @ k) / a


@selector(topk=2)
def _logs(q: Vec["D"], k: Vec["D"]):
    return log(relu(q @ k) + 1.0)


@selector(topk=2)
def _root(q: Vec["D"], k: Vec["D"]):
    return sqrt(relu(q @ k))


@selector(topk=2)
def _gate(q: Vec["D"], k: Vec["D"], a: Scalar):
    return sigmoid(a) * exp(q @ k)


@selector(topk=2)
def _normed(q: Vec["D"], k: Vec["D"]):
    return l2norm(q) @ l2norm(k) - (q @ q) ** 2


@selector(topk=2)
def _heads(qi: Heads["H", "D"], ki: Vec["D"], w: Heads["H"]):
    return sum_heads(w * relu(qi @ ki)) - sum_heads(relu(-(qi @ ki)))


def test_bounds_of_the_built_in_selectors_are_exact_worst_cases():
    # lightning: H heads x |w| x relu(D |q| |k|): the worst case is reached by constant inputs
    assert score_bound(lightning_indexer, {"qi": 3.0, "ki": 0.5, "w": 2.0}, {"HI": 16, "DI": 64}) == 16 * 2.0 * 64 * 1.5
    assert score_bound(moba, {"q": 3.0, "kmean": 2.0}, {"D": 128}) == 768.0
    # l2norm's components within [-1, 1], so its dot within [-D, D] (sound, not tight: Cauchy-Schwarz gives 1)
    assert score_bound(_normed, {"q": 2.0, "k": 9.0}, {"D": 4}) == (4 * 4.0) ** 2 + 4.0
    assert score_bound(_div_const, {"q": 1.0, "k": 1.0}, {"D": 8}) == 8.0     # the dot, before the division
    assert score_bound(_heads, {"qi": 1.0, "ki": 1.0, "w": 1.0}, {"H": 2, "D": 3}) == 12.0
    assert score_bound(_gate, {"q": 1.0, "k": 1.0, "a": 5.0}, {"D": 8}) == pytest.approx(math.exp(8.0))


@pytest.mark.parametrize("sel, amax, dims", [
    (_div_input, {"q": 1.0, "k": 1.0, "a": 1.0}, {"D": 8}),       # a can be 0
    (_logs, {"q": 1.0, "k": 1.0}, {"D": 8}),                       # no proof through log
    (_root, {"q": 1.0, "k": 1.0}, {"D": 8}),                       # nor sqrt
    (_gate, {"q": 3.0, "k": 3.0, "a": 1.0}, {"D": 16}),            # exp's argument can reach 144
    (lightning_indexer, {"qi": 1e18, "ki": 1e18, "w": 1.0}, {"HI": 16, "DI": 64}),   # past the margin
    (moba, {"q": float("inf"), "kmean": 1.0}, {"D": 128}),
    (moba, {"q": float("nan"), "kmean": 1.0}, {"D": 128}),
    (_normed, {"q": 1e200, "k": 1.0}, {"D": 4}),                    # a power past float64's range
])
def test_no_bound_where_nan_or_overflow_is_possible(sel, amax, dims):
    assert score_bound(sel, amax, dims) is None


def test_group_sum_counts_in_the_bound():
    big = math.sqrt(FP32_MAX / MARGIN / 128) * 0.99        # one head's score just under the cap
    amax = {"q": big, "kmean": big}
    assert scores_finite(moba, amax, {"D": 128}, G=1)
    assert not scores_finite(moba, amax, {"D": 128}, G=2)


def _flags_seen(monkeypatch):
    """[(flagged, number of query tiles)] per _run_tiles call that scores something."""
    seen = []
    real = select_mod._run_tiles

    def spy(sel, p, plan, on_tile, nan_flag=None, tiles=slice(None), pipe=None, finite=False):
        if plan is not None and len(plan[2][tiles]):
            seen.append((nan_flag is not None, len(plan[2][tiles])))
        return real(sel, p, plan, on_tile, nan_flag, tiles, pipe, finite)
    monkeypatch.setattr(select_mod, "_run_tiles", spy)
    return seen


def test_select_drops_the_nan_flag_only_with_a_bound(monkeypatch):
    """Three query tiles. The first is queued before the sync, flagged. Bounded inputs: the other two go
    unflagged (the call returns with its kernels queued); inputs large enough to overflow fp32 in the dot:
    they are flagged too, and the NaN scores caught (inf - inf across heads) raise. Unchecked: no flag."""
    seen = _flags_seen(monkeypatch)
    g = torch.Generator().manual_seed(0)
    B, T, HI, DI = 1, 24, 2, 8
    x = dict(qi=torch.randn(B, T, HI, DI, generator=g), ki=torch.randn(B, T, DI, generator=g),
             w=torch.tensor([1.0, -1.0]).expand(B, T, HI).contiguous())
    x = {k: v.to(DEVICE) for k, v in x.items()}
    cfg = SelectConfig(query_tile=8)
    with poisoned():
        idx = select(lightning_indexer, topk=4, config=cfg, **x)
    assert torch.equal(idx.cpu(), select_reference(lightning_indexer, topk=4, **x).cpu())
    assert seen == [(True, 1), (False, 2)]
    y = {**x, "qi": torch.full_like(x["qi"], 1e30), "ki": torch.full_like(x["ki"], 1e30)}   # every dot is inf
    with pytest.raises(ValueError, match="expected finite scores for finite inputs; got NaN scores"):
        select(lightning_indexer, topk=4, config=cfg, **y)
    assert seen[2:] == [(True, 1), (True, 2)]
    with poisoned():
        idx = select(lightning_indexer, topk=4, config=cfg, check_inputs=False, **x)
    assert seen[4:] == [(False, 3)]
    assert torch.equal(idx.cpu(), select_reference(lightning_indexer, topk=4, **x).cpu())
    select(lightning_indexer, topk=4, **x)                  # one tile: nothing before the sync, no flag
    assert seen[5:] == [(False, 1)]


def test_nan_inputs_raise_at_the_sync(monkeypatch):
    """NaN inputs raise at the sync, after the first tile and before the others are queued."""
    seen = _flags_seen(monkeypatch)
    x = dict(q=torch.randn(1, 80, 4), kmean=torch.randn(1, 80, 4))
    x["q"][0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="q: expected finite values"):
        select(moba, config=SelectConfig(query_tile=16), **{k: v.to(DEVICE) for k, v in x.items()})
    assert seen == [(True, 1)]


def test_tiles_queued_before_the_sync():
    """select() queues the first tiles within a tenth of the scores before its sync, at least one, never all."""
    from unifattn.select import _ahead
    causal = (None, None, [(4096 * j, 4096 * (j + 1), 0, 4096 * (j + 1)) for j in range(8)], None, None)
    assert _ahead(causal) == 2                          # 1 + 2 of 36 parts, the third would pass 3.6
    assert _ahead((None, None, [(0, 8, 0, 8)], None, None)) == 0
    assert _ahead((None, None, [(0, 8, 0, 8), (8, 9, 0, 9)], None, None)) == 1
    assert _ahead(None) == 0
