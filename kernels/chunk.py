"""One chunkwise forward for every affine transition class of linear attention.

Per (sequence, value head), with state S in R^{K x V}, alpha_t = exp(g_t):

    delta=False:  S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T
    delta=True:   S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

gate "none" (alpha = 1), "scalar" (one alpha per head and step) or "diagonal" (one per key
channel) times delta False / True gives the six classes: identity, scalar, diagonal, delta,
scalar_delta, diagonal_delta. All six run the same kernels, specialised by the compile-time
flags GATE and DELTA:

    chunk_cumsum_kernel   gated classes      G = chunk-local cumsum of g (fp32, log2 units)
    chunk_intra_kernel    delta or diagonal  Aqk, qg = q 2^G (diagonal gate), Ai = (I + Akk)^-1 (delta)
    chunk_wu_kernel       delta              w, u (WY factors); kg = k 2^(G_C - G) (diagonal gate)
    chunk_state_kernel    all                state entering each chunk, v~ = u - w S (delta)
    chunk_output_kernel   all                o

Shapes: q, k [B, T, H, K]; v [B, T, HV, V] with HV % H == 0 (value head i reads q/k head
i // (HV // H)); g [B, T, HV] (scalar) or [B, T, HV, K] (diagonal); beta [B, T, HV]; states
[N, HV, K, V] fp32. With cu_seqlens (B == 1) the N sequences are packed along T.
"""
from __future__ import annotations

import logging

import torch

from .utils import empty, interpreting, load_tuned, next_pow2, save_tuned, tuned_key

log = logging.getLogger(__name__)

GATES = {"none": 0, "scalar": 1, "diagonal": 2}
# transition class -> (gate, delta): the flags chunk_fwd takes for each class the checker names
CLASS_FLAGS = {
    "identity": ("none", False),
    "scalar": ("scalar", False),
    "diagonal": ("diagonal", False),
    "delta": ("none", True),
    "scalar_delta": ("scalar", True),
    "diagonal_delta": ("diagonal", True),
}
CHUNK_SIZES = (16, 32, 64)
MAX_HEAD_DIM = 256

# best (BV, num_warps, num_stages) per kernel and shape, found once per process on a GPU
_TUNED: dict = {}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int):
    """Chunks of packed sequences, computed once per call.

    Returns (chunk_indices [NT, 2] int32 of (sequence, chunk within sequence), chunk_offsets
    [N + 1] int32 = first global chunk of each sequence, NT = total number of chunks).
    """
    cu = cu_seqlens.to(torch.int64)
    n_chunks = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
    chunk_offsets = torch.zeros(len(n_chunks) + 1, dtype=torch.int64, device=cu.device)
    chunk_offsets[1:] = torch.cumsum(n_chunks, 0)
    NT = int(chunk_offsets[-1])
    i_n = torch.repeat_interleave(torch.arange(len(n_chunks), device=cu.device), n_chunks)
    i_t = torch.arange(NT, device=cu.device) - chunk_offsets[i_n]
    chunk_indices = torch.stack([i_n, i_t], 1).to(torch.int32).contiguous()
    return chunk_indices, chunk_offsets.to(torch.int32), NT


def validate_qkv(q, k, v):
    """Shapes and dtypes every chunk form takes: q, k [B, T, H, K], v [B, T, HV, V]. Returns (B, T, H, K, HV, V)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q, k: expected equal shapes [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}; "
                         "fix: one key per query head and token")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v: expected [B, T, HV, V] = [{B}, {T}, HV, V], got {tuple(v.shape)}; fix: v for the same tokens as q")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"v: expected value heads HV a multiple of H={H}, got HV={HV}; fix: repeat q, k heads or "
                         "use HV = H * group")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v: expected one dtype among fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         "fix: cast all three to one dtype")
    if not (1 <= K <= MAX_HEAD_DIM and 1 <= V <= MAX_HEAD_DIM):
        raise ValueError(f"head dims: expected 1 <= K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}; fix: split the heads "
                         f"(more heads of at most {MAX_HEAD_DIM}), or use form='recurrent'")
    return B, T, H, K, HV, V


def validate_sequences(initial_state, cu_seqlens, B: int, HV: int, K: int, V: int) -> int:
    """cu_seqlens and the initial state's shape; returns N, the number of sequences."""
    check_cu_seqlens(cu_seqlens, B)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, K, V):
        raise ValueError(f"initial_state: expected [N, HV, K, V] = [{N}, {HV}, {K}, {V}], got "
                         f"{tuple(initial_state.shape)}")
    return N


def _validate(q, k, v, g, beta, gate, delta, initial_state, cu_seqlens, chunk_size):
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {sorted(GATES)}, got {gate!r}")
    B, T, H, K, HV, V = validate_qkv(q, k, v)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: expected one of {CHUNK_SIZES}, got {chunk_size}")
    if gate == "none":
        if g is not None:
            raise ValueError("g: given, but gate='none' ignores it; pass gate='scalar' or 'diagonal'")
    else:
        want = (B, T, HV) if gate == "scalar" else (B, T, HV, K)
        if g is None or tuple(g.shape) != want:
            got = None if g is None else tuple(g.shape)
            raise ValueError(f"g: gate={gate!r} expects a log gate of shape {list(want)}, got {got}")
    if delta and (beta is None or tuple(beta.shape) != (B, T, HV)):
        got = None if beta is None else tuple(beta.shape)
        raise ValueError(f"beta: delta=True expects shape [{B}, {T}, {HV}], got {got}")
    N = validate_sequences(initial_state, cu_seqlens, B, HV, K, V)
    return B, T, H, K, HV, V, N


def check_cu_seqlens(cu_seqlens, B: int):
    if cu_seqlens is None:
        return
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences expect B == 1, got B={B}; flatten the batch into T")
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected a 1-D int32/int64 tensor of N + 1 >= 2 boundaries, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")


def _launch(name, kernel, configs, grid, key, args, V, writes, tune=False):
    """Launch with the best admitted config of `configs`; `writes` names the outputs in args.

    Under the interpreter, or with one candidate, the first config runs. Otherwise a choice made
    earlier (this process, or tuned.json) runs, else the first config, so a first call compiles one
    config per kernel. With tune=True, a call without a choice tunes: the first config (one the H200
    probes verified for every class at K = V = 128, diag_chunk_configs.py) runs as the probe's
    reference; every other candidate is admitted only if it reproduces those outputs (Hopper miscompiles, ALGORITHMS.md 6b), then the fastest
    admitted one is kept, in memory and on disk (tuned.json in the cache dir), so a second
    process does not tune again. A candidate that faults the GPU cannot be caught in-process:
    such configs stay out of the candidate lists.
    A config's BV, if it has one, is capped at V's power of two; grid(kwargs) gives the grid.
    """
    candidates = _candidates(configs, max(16, next_pow2(V)))

    def run(c):
        kwargs, num_warps, num_stages = c
        kernel[grid(kwargs)](**{**args, **kwargs}, num_warps=num_warps, num_stages=num_stages)   # a config's
        # constexprs override the call's defaults (the intra kernel's BK)

    if interpreting() or len(candidates) == 1:
        return run(candidates[0])
    key = (name, _source_hash(kernel)) + tuple(key)
    if key not in _TUNED:
        # tuned.json is read once per kernel and shape; None remembers "no choice on disk", so an
        # untuned call does not reopen the file (it ran 5 times per forward: ~60 us of host time)
        plain = [_plain(c) for c in candidates]
        hit = load_tuned(tuned_key(key))
        _TUNED[key] = candidates[plain.index(hit)] if hit in plain else None
    if _TUNED[key] is None:
        if not tune:
            return run(candidates[0])
        _TUNED[key] = _tune(key, candidates, run, [args[w] for w in writes if args.get(w) is not None])
    run(_TUNED[key])


def _source_hash(kernel) -> str:
    """Triton's hash of the kernel's source and the jit functions it calls: a tuned choice made for an
    earlier version of a kernel (tuned.json outlives code changes) is not reused for the new one."""
    fn = kernel
    while not hasattr(fn, "cache_key") and hasattr(fn, "fn"):      # through @triton.heuristics wrappers
        fn = fn.fn
    if hasattr(fn, "cache_key"):
        return fn.cache_key[:16]
    # under the interpreter a kernel is its Python function, without Triton's hash: hash its text (or,
    # for a callable without source, its name)
    import hashlib
    import inspect
    try:
        text = inspect.getsource(fn)
    except (TypeError, OSError):
        text = type(fn).__qualname__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_CANDIDATES: dict = {}


def _candidates(configs, bv_cap: int) -> list:
    """configs as (kwargs, num_warps, num_stages), BV capped at bv_cap, duplicates dropped; memoized per
    list (the lists are module constants; a replaced list, as tests do, gets its own entry)."""
    hit = _CANDIDATES.get((id(configs), bv_cap))
    if hit is not None and hit[0] is configs and hit[1] == len(configs):
        return hit[2]
    seen, candidates = set(), []
    for c in configs:
        kwargs = dict(c.kwargs)
        if "BV" in kwargs:
            kwargs["BV"] = min(kwargs["BV"], bv_cap)
        ident = (tuple(sorted(kwargs.items())), c.num_warps, c.num_stages)
        if ident not in seen:
            seen.add(ident)
            candidates.append((kwargs, c.num_warps, c.num_stages))
    _CANDIDATES[(id(configs), bv_cap)] = (configs, len(configs), candidates)
    return candidates


def _tune(key, candidates, run, outputs, timer=None):
    """Index-stable choice among candidates: probe-admitted, then fastest; remembered on disk."""
    disk_key = tuned_key(key)
    hit = load_tuned(disk_key)
    plain = [_plain(c) for c in candidates]
    if hit is not None and hit in plain:
        return candidates[plain.index(hit)]
    if timer is None:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=5, rep=25)  # noqa: E731
    run(candidates[0])
    reference = [o.detach().clone() for o in outputs]
    admitted, times = [], []
    for c in candidates:
        if c is not candidates[0]:
            try:
                run(c)
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is skipped, not fatal
                log.warning("chunk kernel config %s skipped for %s: %s: %s", _plain(c), key, type(exc).__name__,
                            str(exc)[:200])
                continue
        else:
            run(c)
        if c is not candidates[0] and not all(_agrees(o, r) for o, r in zip(outputs, reference)):
            log.warning("chunk kernel config %s rejected for %s: its outputs differ from the reference config's",
                        _plain(c), key)
            continue
        admitted.append(c)
        times.append(timer(lambda c=c: run(c)))
    best = admitted[min(range(len(admitted)), key=times.__getitem__)]
    save_tuned(disk_key, _plain(best))
    return best


def _plain(c) -> list:
    """A candidate as the JSON value it is stored as."""
    kwargs, num_warps, num_stages = c
    return [[[k, v] for k, v in sorted(kwargs.items())], num_warps, num_stages]


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same values up to accumulation-order rounding of the output dtype; NaN where ref has none fails."""
    a, b = out.float(), ref.float()
    if not bool(torch.isfinite(a).eq(torch.isfinite(b)).all()):
        return False
    m = torch.isfinite(b)
    if not bool(m.any()):
        return True
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(ref.dtype, 1e-4)
    scale = max(1.0, float(b[m].abs().max()))
    return float((a[m] - b[m]).abs().max()) <= tol * scale


_FILTERED: dict = {}


def _filtered(configs: list, tag: str, keep) -> list:
    """The configs keep() admits (all of them if it admits none), memoized per list object and tag (tests
    replace the lists)."""
    hit = _FILTERED.get((id(configs), tag))
    if hit is None or hit[0] is not configs or hit[1] != len(configs):
        kept = [c for c in configs if keep(c)]
        hit = _FILTERED[(id(configs), tag)] = (configs, len(configs), kept or configs)
    return hit[2]


def _state_configs(BK: int) -> list:
    """The state pass's candidates for a padded key dimension BK. Under 32 the state cannot be cut in two
    halves of >= 16 rows (tl.dot's smallest inner dimension): the KSPLIT configs would run the whole
    state at their BV / warps / stages, combinations the H200 sweep did not admit, so they are left out."""
    from . import chunk_state
    if BK >= 32:
        return chunk_state.STATE_CONFIGS
    return _filtered(chunk_state.STATE_CONFIGS, "whole state", lambda c: not c.kwargs.get("KSPLIT"))


def _intra_configs(GATE: int) -> list:
    """The intra kernel's candidates: the OFFDIAG "whole" ones only for a per-channel gate (elsewhere they
    would compile and time the plain sub-blocks again)."""
    from . import chunk_intra
    if GATE == 2:
        return chunk_intra.INTRA_CONFIGS
    return _filtered(chunk_intra.INTRA_CONFIGS, "no whole chunk", lambda c: c.kwargs.get("OFFDIAG") != "whole")


def chunk_stages(gate: str, delta: bool) -> dict[str, dict[str, str]]:
    """The stages chunk_fwd runs for (gate, delta): stage -> {stage it reads from: tensor it reads}.

    codegen builds its kernel plan (a DAG) from this and hands chunk_fwd a launch order.
    """
    gated, diagonal = gate != "none", gate == "diagonal"
    stages: dict[str, dict[str, str]] = {}
    if gated:
        stages["cumsum"] = {}
    if delta or diagonal:
        stages["intra"] = {"cumsum": "gc"} if gated else {}
    if delta:
        stages["wu"] = {"intra": "Ai", **({"cumsum": "gc"} if gated else {})}
    stages["state"] = {**({"wu": "w, u"} if delta else {}), **({"cumsum": "gc"} if gated else {})}
    stages["output"] = {"state": "h" + (", v_new" if delta else ""), **({"intra": "Aqk, qg"} if diagonal else {}),
                        **({"cumsum": "gc"} if gated else {})}
    return stages


INT32_LIMIT = 2 ** 31


def check_sequence_extent(T: int, cu_seqlens, HV: int, K: int, V: int, BT: int):
    """The chunk kernels move their pointers to a sequence's first row in 64 bits but index the rows inside
    it in 32: one sequence's T * HV * max(K, V, BT) elements must stay under 2^31 (about a million tokens
    at HV=16, K=V=128). Raises a ValueError past that; one host read of cu_seqlens only in that range."""
    width = HV * max(K, V, BT)
    if T * width < INT32_LIMIT:
        return
    longest = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if longest * width >= INT32_LIMIT:
        raise ValueError(
            f"sequence length: expected at most {(INT32_LIMIT - 1) // width} tokens in one sequence at HV={HV}, "
            f"K={K}, V={V} (the chunk kernels index the rows of a sequence in 32 bits), got {longest}; fix: "
            "split the sequence and carry the state across the pieces (initial_state / output_final_state)")


def chunk_grid(cu_seqlens, B: int, T: int, BT: int, device):
    """(cu_seqlens as int32, chunk_indices, chunk_offsets, NT_grid, NB, n_chunks): per-chunk grids run
    (NT_grid, NB * HV) programs; with cu_seqlens NT_grid counts the chunks of all sequences and NB = 1."""
    if cu_seqlens is None:
        NT_grid = cdiv(T, BT)
        return None, None, None, NT_grid, B, B * NT_grid
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    chunk_indices, chunk_offsets, NT = prepare_chunk_indices(cu_seqlens, BT)
    return cu_seqlens, chunk_indices, chunk_offsets, NT, 1, NT


def empty_result(v, N: int, K: int, h0, output_final_state: bool):
    """Nothing to run (every sequence empty): an empty o, and each initial state passed through."""
    o = empty(v.shape, v.dtype, v.device)
    ht = None
    if output_final_state:
        ht = empty((N, v.shape[2], K, v.shape[3]), torch.float32, v.device)
        ht.copy_(h0 if h0 is not None else torch.zeros_like(ht))
    return o, ht


def _check_order(order, stages):
    done = set()
    for name in order:
        if name not in stages or not set(stages[name]) <= done:
            raise ValueError(f"stages: expected a launch order of {list(stages)} with every stage after the ones "
                             f"it reads ({stages}); got {list(order)}")
        done.add(name)
    if done != set(stages):
        raise ValueError(f"stages: expected all of {list(stages)}; got {list(order)}")


def chunk_fwd(q, k, v, g=None, beta=None, *, gate: str = "none", delta: bool = False, scale: float = 1.0,
              initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64, tune=False,
              stages=None):
    """Chunkwise forward of an affine linear-attention recurrence (see the module docstring).

    Args:
        q, k: [B, T, H, K], bf16 / fp16 / fp32 (one dtype with v). k need not be normalized.
        v: [B, T, HV, V], HV a multiple of H; value head i reads q/k head i // (HV // H).
        g: per-step log gate, fp32, <= 0: [B, T, HV] for gate="scalar", [B, T, HV, K] for
            "diagonal", None for "none". Any magnitude: exponents are anchored so none is > 0.
        beta: [B, T, HV] fp32, the delta rule's step size (delta=True only).
        gate: "none" | "scalar" | "diagonal".  delta: delta-rule transition.
        scale: multiplies o.
        initial_state: None or [N, HV, K, V] (fp32); N = B, or len(cu_seqlens) - 1.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: None, or int32/int64 [N + 1] boundaries of sequences packed along T (B == 1);
            chunks never cross a boundary and empty sequences pass their initial state through.
        chunk_size: 16, 32 or 64 rows per chunk.
        tune: on a GPU, pick each kernel's launch config among its candidates (probe-admitted, then
            fastest; remembered in tuned.json). Without it, a remembered choice or the first config runs.
        stages: launch order of the stages of chunk_stages(gate, delta) (codegen's plan); default:
            the order listed there. Checked: a stage must follow the stages it reads.

    Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] fp32 or None).
    Raises ValueError with expected / got for inconsistent arguments.
    """
    from . import chunk_intra, chunk_state

    B, T, H, K, HV, V, N = _validate(q, k, v, g, beta, gate, delta, initial_state, cu_seqlens, chunk_size)
    GATE, DELTA, BT, BC = GATES[gate], bool(delta), chunk_size, 16
    device = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if g is not None:
        g = g.contiguous().to(torch.float32)
    if beta is not None and DELTA:
        beta = beta.contiguous().to(torch.float32)
    else:
        beta = None
    h0 = None if initial_state is None else initial_state.contiguous().to(torch.float32)
    # fp32 inputs: exact fp32 dots; bf16/fp16: tensor cores (fp32 tiles in tf32)
    DOT_PREC = "ieee" if q.dtype == torch.float32 else "tf32"
    if interpreting() and q.dtype == torch.bfloat16:
        DOT_PREC = "upcast"  # see chunk_intra._dot
    BK_STATE = max(16, next_pow2(K))
    BK = min(64, BK_STATE)

    check_sequence_extent(T, cu_seqlens, HV, K, V, BT)
    cu_seqlens, chunk_indices, chunk_offsets, NT_grid, NB, n_chunks = chunk_grid(cu_seqlens, B, T, BT, device)
    if n_chunks == 0:
        return empty_result(v, N, K, h0, output_final_state)

    plan = chunk_stages(gate, DELTA)
    order = tuple(plan) if stages is None else tuple(stages)
    _check_order(order, plan)
    c = dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0, gc=None, Aqk=None, Ai=None, qg=None, w=None, u=None, kg=None,
             v_new=None, h=None, ht=None, o=None)
    shape_key = (H, HV, K, V, BT, GATE, DELTA, str(q.dtype), cu_seqlens is not None)
    per_chunk = lambda kwargs: (NT_grid, NB * HV)  # noqa: E731 - one program per (chunk, head)
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T)

    def cumsum():
        c["gc"] = empty(g.shape, torch.float32, device)
        _launch("cumsum", chunk_intra.chunk_cumsum_kernel, chunk_intra.CUMSUM_CONFIGS, per_chunk, shape_key,
                dict(g=g, gc=c["gc"], **common, HV=HV, K=K, BT=BT, BK=BK, GATE=GATE), V, ("gc",), tune=tune)

    def intra():
        c["Aqk"] = empty((B, T, HV, BT), q.dtype, device) if GATE == 2 else None
        c["Ai"] = empty((B, T, HV, BT), q.dtype, device) if DELTA else None
        # per-channel gate: the output kernel's gated queries q 2^G (in q's dtype, as that kernel's dot takes
        # them), written where q and G are loaded anyway; the output kernel then skips the fp32 G
        c["qg"] = empty((B, T, HV, K), q.dtype, device) if GATE == 2 else None
        _launch("intra", chunk_intra.chunk_intra_kernel, _intra_configs(GATE), per_chunk, shape_key,
                dict(q=q, k=k, gc=c["gc"], beta=beta, Aqk=c["Aqk"], Ai=c["Ai"], qg=c["qg"], **common, H=H, HV=HV, K=K,
                     BT=BT, BC=BC, BK=BK, GATE=GATE, DELTA=DELTA, DOT_PREC=DOT_PREC), V, ("Aqk", "Ai", "qg"),
                tune=tune)

    def wu():
        c["w"] = empty((B, T, HV, K), q.dtype, device)
        c["u"] = empty((B, T, HV, V), q.dtype, device)
        # per-channel gate: the keys as the state pass adds them, gated once here (not per V block there)
        c["kg"] = empty((B, T, HV, K), q.dtype, device) if GATE == 2 else None
        _launch("wu", chunk_intra.chunk_wu_kernel, chunk_intra.WU_CONFIGS, per_chunk, shape_key,
                dict(k=k, v=v, gc=c["gc"], beta=beta, Ai=c["Ai"], w=c["w"], u=c["u"], kg=c["kg"], **common, H=H,
                     HV=HV, K=K, V=V, BT=BT, BK=BK, GATE=GATE, DOT_PREC=DOT_PREC), V, ("w", "u", "kg"), tune=tune)

    def state():
        # sequential pass over chunks: states entering each chunk, v~ for delta rules
        c["h"] = empty((n_chunks, HV, K, V), q.dtype, device)
        c["v_new"] = empty(v.shape, v.dtype, device) if DELTA else None
        c["ht"] = empty((N, HV, K, V), torch.float32, device) if output_final_state else None
        _launch("state", chunk_state.chunk_state_kernel, _state_configs(BK_STATE),
                lambda kwargs: (cdiv(V, kwargs["BV"]), N * HV), shape_key + (h0 is None, c["ht"] is None),
                dict(k=k if c["kg"] is None else c["kg"], v=c["u"] if DELTA else v, w=c["w"], gc=c["gc"], h=c["h"],
                     v_new=c["v_new"], h0=h0, ht=c["ht"], cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets, T=T,
                     H=H, HV=HV, K=K, V=V, BT=BT, BK=BK_STATE, GATE=GATE, DELTA=DELTA, DOT_PREC=DOT_PREC,
                     KG=c["kg"] is not None), V, ("h", "v_new", "ht"), tune=tune)

    def output():
        c["o"] = empty(v.shape, v.dtype, device)
        _launch("output", chunk_state.chunk_output_kernel, chunk_state.OUTPUT_CONFIGS,
                lambda kwargs: (cdiv(V, kwargs["BV"]), NT_grid, NB * HV), shape_key,
                dict(q=q, k=k, v=c["v_new"] if DELTA else v, gc=c["gc"], h=c["h"], Aqk=c["Aqk"], qg=c["qg"],
                     o=c["o"],
                     cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=float(scale), T=T,
                     H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, GATE=GATE, DOT_PREC=DOT_PREC), V, ("o",), tune=tune)

    run = {"cumsum": cumsum, "intra": intra, "wu": wu, "state": state, "output": output}
    for name in order:
        run[name]()
    o, ht = c["o"], c["ht"]
    return o, ht
