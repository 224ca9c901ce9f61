"""Call-time checks for every op: one place, one message format.

Every failure says what was expected, what came, and the fix. Shapes use the
legend q, k [B, T, H, K]; v [B, T, HV, V]; Scalar inputs [B, T, H or HV];
Vec inputs [B, T, H or HV, K|V]; Param inputs [HV] / [HV, K|V];
state [N, HV, K, V]; cu_seqlens [N + 1] (B == 1).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(what: str, expected: str, got: str, fix: str, exc=ValueError):
    raise exc(f"{what}: expected {expected}; got {got}. Fix: {fix}")


FORMS = ("reference", "chunk", "recurrent")


def form(name: str, value) -> None:
    """A linear-attention form name (the op's form=, a layer's or a stack's)."""
    if value not in FORMS:
        fail(name, f"one of {FORMS}", repr(value), f"{name}='reference' to train (the generated forms have no "
             "backward yet), 'chunk' for inference, 'recurrent' for decoding")


def _shape(x) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"


@dataclass(frozen=True)
class Dims:
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int


def check_tensor(name: str, x, exc=TypeError):
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__, f"pass {name} as a tensor", exc)


def seqlens(cu_seqlens, B: int, T: int, what: str = "x") -> int:
    """Check FlashAttention-style offsets [N + 1] of sequences packed along T (B == 1); returns N."""
    check_tensor("cu_seqlens", cu_seqlens)
    if B != 1:
        fail(what, "batch size 1 when cu_seqlens packs sequences", f"B={B}",
             f"concatenate the sequences along T: {what}.reshape(1, -1, *{what}.shape[2:])")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        fail("cu_seqlens", "a 1-D int32/int64 tensor [N + 1] of sequence starts", _shape(cu_seqlens),
             "build it as torch.tensor([0, len0, len0 + len1, ...], dtype=torch.int32)")
    c = cu_seqlens.detach().cpu().tolist()
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        fail("cu_seqlens", f"non-decreasing offsets from 0 to T={T}", str(c[:8]) + ("..." if len(c) > 8 else ""),
             "offsets are cumulative sequence lengths starting at 0")
    return len(c) - 1


def linear_inputs(r, q, k, v, inputs: dict, initial_state, cu_seqlens, scale) -> Dims:
    """Validate a linear_attention call against rule r; return the dimensions."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dim() != 4:
            fail(name, "a 4-D tensor [B, T, heads, dim]", _shape(x), "reshape to [batch, time, heads, head_dim]")
        if x.dtype not in FLOATS:
            fail(name, "a floating dtype (bf16, fp16, fp32, fp64)", _shape(x), f"cast {name} with .float()", TypeError)
    if not (q.dtype == k.dtype == v.dtype):
        fail("q, k, v", "one dtype", f"{q.dtype}, {k.dtype}, {v.dtype}", "cast all three to the same dtype", TypeError)
    if q.shape != k.shape:
        fail("k", f"the shape of q {tuple(q.shape)}", _shape(k), "q and k share [B, T, H, K]")
    B, T, H, K = q.shape
    if v.shape[:2] != (B, T):
        fail("v", f"[B, T, HV, V] with B, T = {B}, {T}", _shape(v), "v must cover the same batch and time as q")
    HV, V = v.shape[2], v.shape[3]
    if K == 0 or V == 0 or H == 0 or HV == 0:
        fail("q/v", "non-empty head and feature dimensions", f"q {_shape(q)}, v {_shape(v)}", "check the head_dim")
    if HV % H != 0:
        fail("v", f"a head count HV that is a multiple of q's H={H}", f"HV={HV}",
             "use grouped value heads (HV = H * group) or repeat q/k heads")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            fail(name, f"the device of q ({q.device})", str(x.device), f"move {name} with .to(q.device)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        fail("scale", "a Python number", type(scale).__name__, "pass scale=float(...)", TypeError)
    if scale is not None and not math.isfinite(scale):
        fail("scale", "a finite number (it multiplies every query)", repr(scale),
             "pass scale=None for K ** -0.5, or a finite float")

    # rule inputs beyond q, k, v
    dims = {r.state_dims[0]: K, r.state_dims[1]: V}
    needed = [s for s in r.inputs if s.name not in ("q", "k", "v")]
    known = {s.name for s in needed}
    for name in inputs:
        if name not in known:
            fail(f"input '{name}'", f"one of the inputs of rule '{r.name}': {sorted(known) or 'none'}", f"'{name}'",
                 "drop it or check the rule's signature (python -m unifattn show RULE)", TypeError)
    for s in needed:
        if s.name not in inputs or inputs[s.name] is None:
            fail(f"rule '{r.name}'", f"input {s!r}", "nothing", f"pass {s.name}=... to the call", TypeError)
        x = inputs[s.name]
        check_tensor(s.name, x)
        tail = tuple(dims[d] for d in s.shape)
        if s.kind == "param":
            want = (HV,) + tail
            if tuple(x.shape) != want:
                fail(s.name, f"a per-head parameter of shape {list(want)} ([HV{', ' + s.shape[0] if s.shape else ''}])",
                     _shape(x), f"give one value per value head ({HV})")
        else:
            ok = x.dim() == 3 + len(tail) and tuple(x.shape[:2]) == (B, T) and x.shape[2] in (H, HV) \
                and tuple(x.shape[3:]) == tail
            if not ok:
                legend = "[B, T, H or HV" + "".join(f", {d}" for d in s.shape) + "]"
                fail(s.name, f"{legend} = [{B}, {T}, {H} or {HV}{''.join(f', {t}' for t in tail)}]", _shape(x),
                     "one value per token and head" + (f", {s.shape[0]} features" if s.shape else ""))
        if x.dtype not in FLOATS:
            fail(s.name, "a floating dtype", _shape(x), f"cast {s.name} with .float()", TypeError)
        if x.device != q.device:
            fail(s.name, f"the device of q ({q.device})", str(x.device), f"move {s.name} with .to(q.device)")

    N = B if cu_seqlens is None else seqlens(cu_seqlens, B, T, "q")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        if tuple(initial_state.shape) != (N, HV, K, V):
            fail("initial_state", f"[N, HV, K, V] = [{N}, {HV}, {K}, {V}]", _shape(initial_state),
                 "one state per sequence (N = B, or len(cu_seqlens) - 1) and value head")
        if initial_state.dtype not in (torch.float32, torch.float64):
            fail("initial_state", "float32 (or float64 for references)", _shape(initial_state),
                 "keep recurrent states in float32: initial_state.float()", TypeError)
        if initial_state.device != q.device:
            fail("initial_state", f"the device of q ({q.device})", str(initial_state.device), "move it with .to(q.device)")
    return Dims(B, T, H, HV, K, V, N)


def finite(tensors: dict, ranges: tuple = ()):
    """Reject NaN / inf inputs (they would poison every later token silently) and values outside
    the ranges a rule's kernels need: ranges = ((name, "<= 0" | "in (0, 1]", why), ...).

    One read-only pass per tensor and one device-to-host sync for the whole call
    (kernels.checks.scan); the slow, precise messages run only on failure.
    """
    finite_later(tensors, ranges)()


def finite_later(tensors: dict, ranges: tuple = (), amax: bool = False):
    """finite, in two steps: the scan is queued now, and the returned function reads its flags and raises.
    On a GPU the flags are copied to pinned host memory right behind the scan and the function waits on
    an event recorded there: for the scan only, not for the kernels queued in between, which keep the
    GPU busy while the host reads. Their results must not leave the call before the function has run.
    amax: the function also returns {name: largest |x|} (0.0 for empty tensors), read in the same sync."""
    from unifattn.kernels.checks import scan_async
    cond = {name: (c, why) for name, c, why in ranges}
    items = [(name, x) for name, x in tensors.items() if x is not None and x.numel()]
    flags = scan_async([(x, cond.get(name, (None,))[0]) for name, x in items], amax=amax)
    done = None
    if flags is not None and flags.is_cuda:
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(flags.device))
        flags = host

    def read():
        if done is not None:
            done.synchronize()
        got = [0] if flags is None else flags.cpu()
        _finite_report(items, cond, int(got[0]))
        if amax:
            big = {} if flags is None else dict(zip((n for n, _ in items), got[1:].view(torch.float32).tolist()))
            return {name: big.get(name, 0.0) for name in tensors}
    return read


def _finite_report(items, cond, bad: int):
    if not bad:
        return
    for i, (name, x) in enumerate(items):
        if not bad >> min(i, 30) & 1:
            continue
        if not bool(torch.isfinite(x).all()):
            n = int((~torch.isfinite(x)).sum())
            fail(name, "finite values", f"{n} NaN/inf element(s) in {_shape(x)}",
                 f"find where {name} overflows upstream (e.g. a log of 0, an unclamped exp)")
        c, why = cond.get(name, (None, ""))
        if c == "<= 0":
            nonpositive(name, x, why)
        if c == "in (0, 1]" and bool(((x <= 0) | (x > 1)).any()):
            fail(name, f"values in (0, 1] ({why})", f"range [{float(x.min()):.4g}, {float(x.max()):.4g}]",
                 f"parameterize {name} as sigmoid(...) or exp(-softplus(...))")


def nonpositive(name: str, x: torch.Tensor, why: str):
    if x.numel() and bool((x > 0).any()):
        fail(name, f"values <= 0 ({why})", f"max {float(x.max()):.4g}",
             f"parameterize {name} so it cannot be positive, e.g. logsigmoid(...) or -softplus(...)")
