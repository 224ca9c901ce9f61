"""Adversarial tests of the top-k kernel (kernels/topk.py) and of how select() uses it.

Every result is compared with an independent brute force: per row, the candidate columns (score
above -inf, -0.0 counted as +0.0) sorted by (score descending, column ascending), the first topk
kept, written ascending, shifted by c0 - bblk[i], -1 padded; out[i, h] holds row h * nq + i.
select() is compared the same way against reference_scores (float64; integer inputs make every
score exact in fp32, so ties are real ties), and against select_reference and the torch path.
Outputs are poisoned (-7) before the kernels run, so an element left unwritten shows up.

Three defects found this way are fixed: topk_rows read a non-contiguous score buffer and wrote a
non-contiguous out with the wrong strides, silently (now a ValueError), and fits() / topk_rows()
bound MAX_ROW at import.
"""
import random

import pytest
import torch

from unifattn.dsl.selector import Vec, block, local, selector, sink
from unifattn.kernels.utils import empty, poisoned
from unifattn.select import reference_scores, select, select_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")
FMAX = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFATTN_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- brute force
def brute_row(scores, topk):
    """Columns kept from one row of python floats: sort by (-score, column), drop -inf, ascending."""
    cand = [(x + 0.0, c) for c, x in enumerate(scores) if x != -INF]
    return sorted(c for _, c in sorted(cand, key=lambda p: (-p[0], p[1]))[:topk])


def brute(s, topk, c0, bblk):
    """s [HKV, nq, W] -> int32 [nq, HKV, topk], the documented contract of topk_rows."""
    HKV, nq, _ = s.shape
    out = torch.full((nq, HKV, topk), -1, dtype=torch.int32)
    rows = s.cpu().tolist()
    bb = [int(b) for b in bblk.cpu().tolist()]
    for h in range(HKV):
        for i in range(nq):
            keep = [c + c0 - bb[i] for c in brute_row(rows[h][i], topk)]
            out[i, h, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
    return out


def run_kernel(s, topk, c0=0, bblk=None, **kw):
    from unifattn.kernels.topk import topk_rows
    HKV, nq, _ = s.shape
    bblk = torch.arange(nq, dtype=torch.int32) * 3 % 7 if bblk is None else bblk   # distinct shifts per query
    with poisoned():
        out = empty((nq, HKV, topk), torch.int32, DEVICE)
    assert (out == -7).all()
    topk_rows(s.to(DEVICE), out, bblk.to(DEVICE), c0, topk, **kw)
    return out.cpu(), brute(s, topk, c0, bblk)


def adversarial_rows(W, topk, seed, HKV=2, nq=3):
    """[HKV, nq, W] fp32; each row a different trap (HKV * nq = 6 rows, one per pattern):
    0 a few integer values (ties everywhere), 1 all -inf, 2 exactly min(topk, W) candidates
    (the rest -inf), 3 more +inf than topk among ties, 4 only -0.0 / +0.0 / -inf,
    5 arbitrary finite bit patterns (denormals, +-FLT_MAX)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    rows.append(torch.randint(-1, 2, (W,), generator=g).float())
    rows.append(torch.full((W,), -INF))
    r = torch.full((W,), -INF)
    r[torch.randperm(W, generator=g)[:min(topk, W)]] = torch.randint(-1, 2, (min(topk, W),), generator=g).float()
    rows.append(r)
    r = torch.randint(-1, 2, (W,), generator=g).float()
    r[torch.randperm(W, generator=g)[:min(W, topk + 2)]] = INF
    rows.append(r)
    r = torch.where(torch.rand(W, generator=g) < 0.5, -0.0, 0.0)
    r[torch.rand(W, generator=g) < 0.3] = -INF
    rows.append(r)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (W,), generator=g, dtype=torch.int64).to(torch.int32)
    r = bits.view(torch.float32).clone()
    r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
    r[torch.randint(0, W, (min(W, 4),), generator=g)] = torch.tensor([FMAX, -FMAX, 1e-45, -1e-45])[:min(W, 4)]
    rows.append(r)
    s = torch.stack(rows)
    while s.shape[0] < HKV * nq:
        s = torch.cat([s, s[torch.randperm(s.shape[0], generator=g)]])
    return s[:HKV * nq].reshape(HKV, nq, W).contiguous()


# --------------------------------------------------------------------------- topk_rows: one launch
@pytest.mark.parametrize("W, topk", [(1, 1), (1, 4), (5, 5), (7, 1), (31, 30), (32, 32), (33, 1), (33, 33),
                                     (33, 40), (40, 64), (100, 17)])
def test_single_launch_rows_equal_brute_force(W, topk):
    """W < 32 (row padded to 32 lanes), W a power of two and one past it, topk 1, == W, > W."""
    s = adversarial_rows(W, topk, seed=W * 131 + topk)
    got, want = run_kernel(s, topk, c0=11)
    assert torch.equal(got, want)


def test_layout_hkv_by_nq_not_square():
    """HKV=3, nq=2: out[i, h] must be row h * nq + i of s (a transposed write would show here)."""
    HKV, nq, W, topk = 3, 2, 12, 2
    s = torch.full((HKV, nq, W), -INF)
    for h in range(HKV):
        for i in range(nq):
            s[h, i, 2 * h + 5 * i] = 1.0                 # a unique pair of columns per (h, i)
            s[h, i, 2 * h + 5 * i + 1] = 0.5
    bblk = torch.tensor([0, 4], dtype=torch.int32)
    got, want = run_kernel(s, topk, c0=6, bblk=bblk)
    assert torch.equal(got, want)
    assert got[1, 2].tolist() == [2 * 2 + 5 + 6 - 4, 2 * 2 + 5 + 1 + 6 - 4]


def test_multi_step_output_pass_ties_across_steps():
    """The in-order output pass in several BLOCK steps (num_warps=1: BLOCK 512; W=5000 at the
    default warps: ROW 8192, BLOCK 4096) with the rationed k-th key tied across step boundaries."""
    W, k = 1500, 600
    s = torch.zeros(2, 1, W)
    s[0, 0, ::3] = 1.0                                   # 500 ones above 1000 zeros: 100 zeros rationed
    s[1, 0] = torch.randint(0, 2, (W,), generator=torch.Generator().manual_seed(3)).float()
    got, want = run_kernel(s, k, num_warps=1)
    assert torch.equal(got, want)
    W, k = 5000, 4200
    s = torch.zeros(1, 1, W)
    s[0, 0, 4000:] = 2.0                                 # 1000 twos; the 3200 zeros kept straddle 4096
    s[0, 0, 100:150] = -INF
    got, want = run_kernel(s, k)
    assert torch.equal(got, want)


def search_rows(W, seed):
    """[1, 10, W]: rows that lead the k-th-key search (kernels.topk._kth_key) down each of its paths:
    smooth scores (regula falsi converges), two clusters far apart and +inf among finite scores (its
    guesses fall in the gap: bisection), heavy tails, all tied (the bracket closes at once), a few
    distinct values (bits after the bracket), scores spread over every exponent, and causal -inf tails."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(W, generator=g),
            torch.where(torch.rand(W, generator=g) < 0.1, 1e30, torch.randn(W, generator=g)),
            torch.where(torch.rand(W, generator=g) < 0.05, INF, torch.randn(W, generator=g)),
            torch.randn(W, generator=g) / torch.randn(W, generator=g),                      # Cauchy
            torch.full((W,), 2.5),
            torch.randint(0, 5, (W,), generator=g).float() * 0.25,
            torch.exp(torch.randn(W, generator=g) * 30).clamp(max=FMAX),
            -torch.exp(torch.randn(W, generator=g) * 30).clamp(max=FMAX),
            torch.rand(W, generator=g) * 1e-40,                                             # denormals
            torch.randn(W, generator=g)]
    s = torch.stack(rows)
    s[9, W // 3:] = -INF
    s[1, : W // 2] = torch.where(torch.rand(W // 2, generator=g) < 0.5, -INF, s[1, : W // 2])
    return s[None].contiguous()


@pytest.mark.parametrize("interp", [0, 1, 3, 24])
@pytest.mark.parametrize("W, topk", [(300, 17), (1000, 200)])
def test_search_paths_equal_brute_force(interp, W, topk):
    """The same rows with the plain bit search (0), with 1 or 3 regula falsi steps before it (bits then
    start from a partly closed bracket) and with the default: one answer, the brute force's."""
    s = search_rows(W, seed=W + topk)
    got, want = run_kernel(s, topk, c0=3, interp=interp)
    assert torch.equal(got, want)


@pytest.mark.parametrize("group", [0, 4, 16, 32])
def test_output_pass_runs_equal_brute_force(group):
    """The output pass's prefix counts over runs of `group` neighbouring columns (kernels.topk._prefix; 0:
    one vector), with ties rationed across several BLOCK steps and runs (W = 5000: BLOCK 4096 on 8 warps),
    and the adversarial rows."""
    W, k = 5000, 1500
    s = torch.randint(0, 3, (2, 3, W), generator=torch.Generator().manual_seed(5)).float()
    got, want = run_kernel(s, k, c0=2, group=group)
    assert torch.equal(got, want)
    s = adversarial_rows(700, 90, seed=group)
    got, want = run_kernel(s, 90, group=group, num_warps=1)
    assert torch.equal(got, want)


def test_split_rows_into_two_register_tensors():
    from unifattn.kernels.topk import split
    assert [split(W) for W in (1, 32, 33, 80, 100, 300, 4096, 5000, 12288, 20480, 24576, 28672, 32768)] == [
        (32, 0), (32, 0), (64, 0), (64, 32), (128, 0), (256, 64), (4096, 0), (4096, 1024), (8192, 4096),
        (16384, 4096), (16384, 8192), (32768, 0), (32768, 0)]


@pytest.mark.parametrize("W, topk", [(80, 7), (300, 40), (1500, 600)])
def test_tail_split_equals_one_tensor(W, topk):
    """A row held as ROW + TAIL keys (kernels.topk.split) and as one power-of-two tensor: both the brute
    force's, with ties rationed (integer scores), +-inf and causal -inf tails in the TAIL part."""
    s = adversarial_rows(W, topk, seed=W)
    s[0, 0, W - 20:] = -INF
    s[1, 2, W - 5:] = INF
    for tail in (True, False):
        got, want = run_kernel(s, topk, c0=1, tail=tail)
        assert torch.equal(got, want), tail


# --------------------------------------------------------------------------- topk_rows: two launches
@pytest.mark.parametrize("W, topk, max_row", [
    (33, 1, 32),       # max_row + 1: a last segment of one key
    (64, 16, 32),      # exactly two segments, candidates fill the second launch
    (96, 10, 32),      # three segments, 30 candidates
    (65, 10, 32),      # three segments, the last one of one key
    (128, 8, 32),      # four segments, exact multiple
    (200, 16, 64),     # four segments, ragged last, 64 candidates: the most that fit
    (256, 1, 64),
])
def test_two_launch_rows_equal_brute_force(W, topk, max_row):
    from unifattn.kernels.topk import fits
    assert fits(W, topk, max_row) and W > max_row
    s = adversarial_rows(W, topk, seed=W * 7 + topk)
    got, want = run_kernel(s, topk, c0=5, max_row=max_row)
    assert torch.equal(got, want)


def test_two_launch_ties_span_segments_and_short_segments():
    """Per-segment candidates padded with key 0 (segments with fewer candidates than topk), ties at
    the k-th key spanning segment boundaries, +inf ties in several segments; HKV=2, nq=2."""
    max_row, W, k = 32, 96, 8
    s = torch.full((2, 2, W), -INF)
    s[0, 0, 28:36] = 5.0                  # 8 tied best across the seg 0 / seg 1 boundary
    s[0, 0, 60:68] = 5.0                  # 8 more, seg 1 / seg 2: must lose to the lower columns
    s[0, 0, 70:] = 1.0
    s[0, 1, [3, 9, 30]] = 2.0             # seg 0: 3 candidates (< k: 5 key-0 paddings)
    s[0, 1, 33:40] = 2.0                  # seg 1: 7 tied; only the first 5 kept
    s[0, 1, 64:96] = 2.0                  # seg 2: 32 tied, none kept
    s[1, 0, :] = torch.arange(W, dtype=torch.float32) % 3     # 0 1 2 0 1 2 ...: 2.0 tied everywhere
    s[1, 1, [31, 32, 63, 64, 95]] = INF   # +inf at every segment edge, fewer than k
    s[1, 1, 40] = -0.0
    s[1, 1, 50] = 0.0
    s[1, 1, 10] = -1e-45
    s[1, 1, 70] = 1e-45
    got, want = run_kernel(s, k, c0=3, bblk=torch.tensor([1, 2], dtype=torch.int32), max_row=max_row)
    assert torch.equal(got, want)
    assert got[0, 0].tolist() == [c + 3 - 1 for c in range(28, 36)]
    assert got[1, 0].tolist() == [c + 3 - 2 for c in [3, 9, 30, 33, 34, 35, 36, 37]]


def test_two_launch_more_inf_than_topk_across_segments():
    max_row, W, k = 32, 100, 5
    s = torch.zeros(1, 1, W)
    s[0, 0, [2, 40, 41, 70, 90, 99, 5, 33]] = INF
    got, want = run_kernel(s, k, bblk=torch.zeros(1, dtype=torch.int32), max_row=max_row)
    assert torch.equal(got, want)
    assert got.flatten().tolist() == [2, 5, 33, 40, 41]


def test_two_launch_at_the_real_max_row():
    """The default MAX_ROW (32768): W = MAX_ROW + 1 and 2 * MAX_ROW, best keys tied across the
    segment edge; and W = MAX_ROW itself (one launch, 16 warps, 4 output steps)."""
    from unifattn.kernels.topk import MAX_ROW
    for W, k in [(MAX_ROW + 1, 4), (2 * MAX_ROW, 3), (MAX_ROW, 5)]:
        s = torch.zeros(1, 1, W)
        s[0, 0, MAX_ROW - 2:MAX_ROW + 2] = 1.0           # up to 4 tied best, two per side of the edge
        s[0, 0, -1] = 1.0
        got, want = run_kernel(s, k, bblk=torch.zeros(1, dtype=torch.int32))
        assert torch.equal(got, want), (W, k)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_equal_brute_force(seed):
    """Random HKV, nq, W, topk, max_row (one and two launches), integer scores with -inf / +inf / -0.0."""
    from unifattn.kernels.topk import fits
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        while True:
            HKV, nq, W = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 150)
            topk, max_row = rng.randint(1, W + 4), rng.choice([32, 64, 128])
            if fits(W, topk, max_row):
                break
        s = torch.randint(-2, 3, (HKV, nq, W), generator=g).float()
        s[torch.rand(HKV, nq, W, generator=g) < 0.3] = -INF
        s[torch.rand(HKV, nq, W, generator=g) < 0.05] = INF
        s[torch.rand(HKV, nq, W, generator=g) < 0.2] = -0.0
        bblk = torch.randint(0, 9, (nq,), generator=g, dtype=torch.int32)
        got, want = run_kernel(s, topk, c0=rng.randint(0, 9), bblk=bblk, max_row=max_row)
        assert torch.equal(got, want), (HKV, nq, W, topk, max_row)


# --------------------------------------------------------------------------- launch table
@pytest.mark.parametrize("W, want", [
    (512, (4, 16, None)),          # MoBA's 512-block rows: unbounded (1.56 ms bounded against 1.50)
    (2048, (4, 16, None)),
    (3000, (8, 16, None)),         # held as 2048 + 1024 keys: under 4096, unbounded
    (4096, (8, 8, 64)),            # four 8-warp programs an SM
    (8192, (8, 8, 64)),
    (12288, (16, 8, 64)),          # 8192 + 4096 keys, two 16-warp programs an SM
    (16384, (16, 8, 64)),
    (20480, (16, 4, 64)),          # 40 keys a thread: 4-key output steps
    (24576, (16, 16, None)),       # 48 keys a thread: one program an SM
    (32768, (16, 16, None)),
])
def test_launch_config_bounds_registers_where_it_was_measured_to_pay(W, want):
    """kernels.topk.launch_config: the 64-register bound from 4096 to 20480 keys a row (tests/sm90_compile.py
    checks that these launches do not spill), none below or above, none when occupancy=False."""
    from unifattn.kernels.topk import KEYS_PER_THREAD, launch_config, split
    main, tail = split(W)
    assert launch_config(main, tail) == want
    warps, _, _ = want
    assert launch_config(main, tail, occupancy=False) == (warps, KEYS_PER_THREAD, None)
    if want[2] is not None:            # a round's final launch reads columns too: 4-key steps
        assert launch_config(main, tail, keys_in=True)[1:] == (4, 64)


# --------------------------------------------------------------------------- limits and fallback
def test_topk_rows_refuses_rows_that_do_not_fit():
    from unifattn.kernels.topk import MAX_ROW, fits, topk_rows
    out = torch.full((1, 1, 17), -7, dtype=torch.int32, device=DEVICE)
    bblk = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert not fits(33, 17, 32) and fits(33, 16, 32) and fits(32, 1000, 32) and fits(10 ** 6, 16, 32)
    with pytest.raises(ValueError, match=r"W=33 scores with topk=17: over 32 scores .* needs topk <= 16\. "
                                         r"Fix: SelectConfig\(topk_impl='auto'\)"):
        topk_rows(torch.zeros(1, 1, 33, device=DEVICE), out, bblk, 0, 17, max_row=32)
    assert (out == -7).all()                                          # nothing written before the refusal
    W, k = MAX_ROW + 1, MAX_ROW // 2 + 1                              # at the default limit
    assert not fits(W, k)
    with pytest.raises(ValueError, match=r"Fix: SelectConfig\(topk_impl='auto'\)"):
        topk_rows(torch.zeros(1, 1, W, device=DEVICE), torch.empty(1, 1, k, dtype=torch.int32, device=DEVICE),
                  bblk, 0, k)


def test_max_row_is_read_at_call_time(monkeypatch):
    """fits() and topk_rows() read MAX_ROW at call time (they bound it at import as a default
    argument: lowering it did not reach select())."""
    import unifattn.kernels.topk as kt
    monkeypatch.setattr(kt, "MAX_ROW", 32)
    assert not kt.fits(33, 17), "fits() still uses the MAX_ROW bound when the module was imported"


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_select_auto_falls_back_to_torch_when_fits_is_false(monkeypatch):
    """select(topk_impl='auto') must take the torch path for a tile whose rows do not fit, and the
    kernel where they fit; topk_impl='kernel' must raise the kernel's error instead. fits() is
    stubbed (select imports it at call time), since lowering MAX_ROW does not reach it (see above)."""
    import unifattn.kernels.topk as kt
    from unifattn.select import SelectConfig
    x = _dot_inputs(1, 30, 2, 1, seed=3)
    ref = select_reference(_dot6, **x)
    spy = _Spy(kt.topk_rows)
    monkeypatch.setattr(kt, "topk_rows", spy)
    with poisoned():
        idx = select(_dot6, config=SelectConfig(topk_impl="auto", query_tile=7), **x)
    assert torch.equal(idx.cpu(), ref.cpu()) and spy.calls == 5                 # kernel on every tile
    monkeypatch.setattr(kt, "fits", lambda W, topk, max_row=kt.MAX_ROW: False)
    spy.calls = 0
    with poisoned():
        idx = select(_dot6, config=SelectConfig(topk_impl="auto", query_tile=7), **x)
    assert torch.equal(idx.cpu(), ref.cpu()) and spy.calls == 0                 # torch on every tile
    with pytest.raises(ValueError, match=r"Fix: SelectConfig\(topk_impl='auto'\)"):
        select(_dot6, config=SelectConfig(topk_impl="kernel", query_tile=7), **x)


# --------------------------------------------------------------------------- select() end to end
def _plain(q: Vec["D"], k: Vec["D"]):
    return q @ k


_dot6 = selector(topk=6, always=(sink(1), local(2)))(_plain)


def _dot_inputs(B, T, HKV, G, seed, D=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, T, HKV * G, D), generator=g).float()
    k = torch.randint(-2, 3, (B, T, HKV, D), generator=g).float()
    if HKV == 1 and G == 1:
        q, k = q[:, :, 0], k[:, :, 0]
    return dict(q=q.to(DEVICE), k=k.to(DEVICE))


def _brute_select(sel, topk, cu_seqlens, x):
    dense = reference_scores(sel, cu_seqlens=cu_seqlens, **x).cpu()         # [B, T, HKV, C] float64
    B, T, HKV, _ = dense.shape
    out = torch.full((B, T, HKV, topk), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(HKV):
                keep = brute_row(dense[b, t, h].tolist(), topk)
                out[b, t, h, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
    return out


SELECT_CASES = [
    # name, granularity, always, topk, B, T, HKV, G, cu_seqlens, query_tile
    ("varlen-blocks-gqa", block(4), (local(1),), 3, 1, 61, 2, 2, [0, 9, 9, 10, 33, 61], 3),
    ("batch-tokens-hkv3", "token", (sink(2), local(1)), 5, 3, 19, 3, 1, None, 5),
    ("topk1-straddle", "token", (), 1, 2, 17, 2, 1, None, 4),
    ("topk-above-W", "token", (sink(1),), 40, 1, 26, 2, 1, [0, 1, 14, 26], 6),
    ("blocks-ragged", block(2), (), 4, 2, 23, 1, 3, None, 9),   # block(2): block means of integers stay exact
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=[c[0] for c in SELECT_CASES])
def test_select_kernel_torch_reference_agree(case):
    """Tiles straddling sequences (query_tile small), varlen with empty / one-token sequences,
    block granularity, B > 1, HKV > 1 with G > 1, topk 1 and topk above every row's candidates:
    kernel == torch == auto == select_reference == brute force on the float64 scores."""
    from unifattn.select import SelectConfig
    _, gran, always, topk, B, T, HKV, G, cu, qt = case
    sel = selector(topk=topk, granularity=gran, always=always)(_plain)
    x = _dot_inputs(B, T, HKV, G, seed=T)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    want = _brute_select(sel, topk, cu, x)
    assert torch.equal(select_reference(sel, cu_seqlens=cu, **x).cpu(), want)
    for impl in ("kernel", "torch", "auto"):
        with poisoned():
            got = select(sel, cu_seqlens=None if cu is None else cu.to(DEVICE),
                         config=SelectConfig(topk_impl=impl, query_tile=qt, block_t=16, block_s=16), **x)
        assert got.shape == (B, T, HKV, topk)
        assert torch.equal(got.cpu(), want), impl


def test_select_all_tied_scores_keep_lowest_columns_per_head():
    """Every score equal (k = 0): each row keeps its forced columns and then the lowest ones,
    whatever the tile; HKV=2 heads see the same ties."""
    from unifattn.select import SelectConfig
    sel = selector(topk=4, always=(local(1),))(_plain)
    x = _dot_inputs(2, 13, 2, 1, seed=0)
    x["k"] = torch.zeros_like(x["k"])
    want = _brute_select(sel, 4, None, x)
    with poisoned():
        got = select(sel, config=SelectConfig(topk_impl="kernel", query_tile=5), **x)
    assert torch.equal(got.cpu(), want)
    assert got[1, 12, 1].tolist() == [0, 1, 2, 12]


# --------------------------------------------------------------------------- argument checks
def test_non_contiguous_scores_are_refused_or_read_right():
    """The kernel indexes src + r * L + column, i.e. assumes a contiguous [HKV, nq, W]: a transposed
    view was read with the wrong strides, silently. Now refused (select() passes fresh buffers)."""
    from unifattn.kernels.topk import topk_rows
    base = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(0))    # [nq, HKV, W]
    s = base.transpose(0, 1)                                                    # [HKV, nq, W] view
    out = torch.full((3, 2, 4), -7, dtype=torch.int32, device=DEVICE)
    bblk = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"topk_rows: s: expected contiguous float32 \[HKV, nq, W\]"):
        topk_rows(s.to(DEVICE), out, bblk, 0, 4)
    topk_rows(s.contiguous().to(DEVICE), out, bblk, 0, 4)
    assert torch.equal(out.cpu(), brute(s, 4, 0, bblk))


def test_non_contiguous_out_is_refused_or_written_right():
    """out is written at out + (i * HKV + h) * topk: a column slice of a wider buffer had rows written
    over each other, silently. Now refused."""
    from unifattn.kernels.topk import topk_rows
    s = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))
    big = torch.full((3, 2, 6), -7, dtype=torch.int32, device=DEVICE)
    out = big[:, :, :4]
    bblk = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"topk_rows: out: expected contiguous int32 \[nq, HKV, topk\]"):
        topk_rows(s.to(DEVICE), out, bblk, 0, 4)
    with pytest.raises(ValueError, match=r"topk_rows: out: expected"):                 # [HKV, nq, topk]
        topk_rows(s.to(DEVICE), torch.empty(2, 3, 4, dtype=torch.int32, device=DEVICE), bblk, 0, 4)
    with pytest.raises(ValueError, match=r"topk_rows: bblk: expected contiguous int32 \[nq\]"):
        topk_rows(s.to(DEVICE), torch.empty(3, 2, 4, dtype=torch.int32, device=DEVICE), bblk[:2], 0, 4)
    out = torch.full((3, 2, 4), -7, dtype=torch.int32, device=DEVICE)
    topk_rows(s.to(DEVICE), out, bblk, 0, 4)
    assert torch.equal(out.cpu(), brute(s, 4, 0, bblk))


@pytest.mark.parametrize("W, topk", [(2000, 7), (1025, 16), (700, 1)])
def test_many_rounds_of_segment_candidates(W, topk):
    """Rows far longer than a segment (max_row=32): three to four rounds of per-segment candidates
    before the last selection; integer scores tie across every segment edge, and one row holds
    more +inf than topk spread over the segments (the lowest columns must win in every round)."""
    g = torch.Generator().manual_seed(W)
    s = torch.randint(-3, 4, (2, 2, W), generator=g).float()
    s[0, 1, torch.randperm(W, generator=g)[:3 * topk + 1]] = INF
    s[1, 0, W // 2:] = -INF
    got, want = run_kernel(s, topk, c0=5, max_row=32)
    assert torch.equal(got, want)
