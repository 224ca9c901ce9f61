"""Attention layers (torch.nn.Module) built on the ops: a linear-attention layer from any rule,
and sparse top-k attention with a selector (lightning indexer, MoBA, or your own).

    layer = LinearAttention(d_model=256, num_heads=4, head_dim=64, rule=rules.kda, form="reference")
    y = layer(x)                                   # x, y [B, T, d_model]
    with torch.no_grad():
        S = layer.init_state(B)                    # [B, HV, K, V] float32
        y_t, S = layer.step(x_t, S)                # one token, state updated in place

LinearAttention, for a rule with state S [K, V] per value head:

    q, k = x W_q, x W_k          [B, T, H, K]      (l2-normalized for delta rules)
    v    = x W_v                 [B, T, HV, V]
    extra token inputs of the rule, one small projection each, mapped into the range the
    checker asks for:    log-gate (<= 0)   g = logsigmoid(x W_g + b) / gate_normalizer
                         decay in (0, 1]   a = exp(logsigmoid(x W_a + b) / gate_normalizer)
                         raw beta          beta = sigmoid(x W_b + b)
                         anything else     x W + b (the rule does its own preprocessing)
    Params of the rule (per value head) as nn.Parameters, stored unconstrained and mapped
    the same way (decay: sigmoid(raw), log-gate: -softplus(raw)). Params are float32 (float64
    in a float64 layer), and gates and Params are mapped in float32 at least, whatever x's dtype.
    o = ops.linear_attention(rule, q, k, v, **inputs, form=form)    [B, T, HV, V]
    y = (RMSNorm_V(o) * [sigmoid(x W_og)]) W_o

Forms. `form` is an explicit argument of the constructor (and of forward), never switched
behind the user. The generated forms ("chunk", "recurrent") have no backward yet: when
autograd is recording and a parameter needs a gradient the op raises a RuntimeError.
Training therefore currently needs form="reference" (the differentiable token loop);
run inference with form="chunk" and decode with `step` (form="recurrent", state in place).

SparseAttention: q [B, T, HQ, D], k, v [B, T, HKV, D]; a selector picks per query (and KV
head) the keys to keep, ops.sparse_attention attends over them only. The selector's inputs
named q, k or kmean are the attention's own q and k; every other input is a projection of
the hidden state (the lightning indexer: qi [B, T, HI, DI], ki [B, T, DI], w [B, T, HI]).
Top-k has no gradient, and the indexer projections get none from the main loss: train them
with `indexer_loss` (KL distillation from the attention, DeepSeek-V3.2's recipe), e.g.
`loss = lm_loss + layer.indexer_loss(x)` or `forward(x, return_indexer_loss=True)`.
Under DDP add that loss (or pass find_unused_parameters=True): otherwise the indexer
parameters have no gradient and DDP waits for them.

No positional encoding is applied (NoPE, as Kimi Linear's global layers): in a hybrid stack
the linear layers carry position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unifattn import ops, validate
from unifattn.dsl import check
from unifattn.dsl.rule import Rule
from unifattn.dsl.selector import Selector

__all__ = ["LinearAttention", "SparseAttention"]


def _positive_int(name: str, x, *, allow_none=False):
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, int):
        validate.fail(name, "a positive int", f"{type(x).__name__} {x!r}", f"pass {name}=<int>", TypeError)
    if x < 1:
        validate.fail(name, "a positive int", repr(x), f"pass {name} >= 1")


def _check_hidden(x, d_model: int, weight: torch.Tensor | None = None, name: str = "x"):
    """x [B, T, d_model]; with weight, also in the dtype of that projection weight (see _check_dtype)."""
    validate.check_tensor(name, x)
    if x.dim() != 3 or x.shape[-1] != d_model:
        validate.fail(name, f"[B, T, d_model={d_model}]", f"{tuple(x.shape)}", "pass hidden states [B, T, D]")
    if weight is not None:
        _check_dtype(name, x, weight)


def _check_dtype(name: str, x: torch.Tensor, weight: torch.Tensor):
    """The dtype F.linear would refuse, said the project's way. Not checked under autocast (it casts) or
    against other than plain float weights (quantized projections, int8 or float8, take other inputs)."""
    if x.dtype != weight.dtype and weight.dtype in validate.FLOATS and not torch.is_autocast_enabled(x.device.type):
        validate.fail(name, f"the dtype of the layer's weights ({weight.dtype})", str(x.dtype),
                      f"cast with {name}.to({weight.dtype}), convert the layer with .to({x.dtype}), or run under "
                      "torch.autocast", TypeError)


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0), stable for large y."""
    return y + torch.log(-torch.expm1(-y))


# --------------------------------------------------------------------------- input maps
# How a raw projection (or raw Param) becomes a value the checker's runtime check accepts.
# One place, so the token path and the Param path cannot drift apart.
def _log_gate(z: torch.Tensor, normalizer: float) -> torch.Tensor:
    return F.logsigmoid(z) / normalizer                                    # <= 0


def _decay(z: torch.Tensor, normalizer: float) -> torch.Tensor:
    return torch.exp(F.logsigmoid(z) / normalizer)                         # in (0, 1]


def _fp32_at_least(z: torch.Tensor) -> torch.Tensor:
    """Gates are mapped in float32 or float64: in bf16 a decay of 1 - 2^-9 rounds to 1 (no decay at all),
    and a float64 layer (a reference) must not drop to float32 here."""
    return z if z.dtype == torch.float64 else z.float()


def _default_param_value(name: str, cond: str | None, shape, HV: int) -> torch.Tensor:
    """The value the op sees at init, per value head (float64 on the CPU, shape [HV, *dims]).

    On the CPU whatever the default device: under `with torch.device("meta")` (FSDP's deferred
    init) the checks below read values, which meta tensors do not have."""
    cpu = dict(dtype=torch.float64, device="cpu")
    per_head = 1 - 2.0 ** (-5.0 - torch.arange(HV, **cpu))                 # RetNet's multi-scale decays
    per_head = per_head.reshape((HV,) + (1,) * (len(shape) - 1)).expand(shape)
    if cond == "in (0, 1]":
        return per_head.clone()
    if cond == "<= 0":
        return torch.log(per_head)
    if name == "A_log":                                                    # Mamba2: A ~ U[1, 16]
        return torch.log(torch.empty(shape, **cpu).uniform_(1, 16))
    if name == "dt_bias":                                                  # Mamba2: dt log-uniform [1e-3, 1e-1]
        dt = torch.exp(torch.empty(shape, **cpu).uniform_(math.log(1e-3), math.log(1e-1)))
        return _inv_softplus(dt)
    return torch.zeros(shape, **cpu)


class _ParamMap:
    """raw nn.Parameter <-> the constrained value the rule sees."""

    def __init__(self, cond: str | None):
        self.cond = cond

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if self.cond == "in (0, 1]":
            return torch.sigmoid(raw)
        if self.cond == "<= 0":
            return -F.softplus(raw)
        return raw

    def inverse(self, value: torch.Tensor) -> torch.Tensor:
        if self.cond == "in (0, 1]":
            return torch.logit(value.clamp(max=1 - 1e-7))
        if self.cond == "<= 0":
            return _inv_softplus((-value).clamp(min=1e-12))
        return value


# --------------------------------------------------------------------------- linear attention
class LinearAttention(nn.Module):
    """Linear attention layer from a rule: x [B, T, d_model] -> y [B, T, d_model].

    Args:
        d_model: hidden size.
        num_heads: H, query/key heads.
        head_dim: K, query/key head dimension (also V unless head_v_dim is given).
        rule: a rule declared with @unifattn.dsl.rule (e.g. unifattn.rules.kda).
        num_v_heads: HV, value heads (a multiple of H: grouped value heads); default H.
        head_v_dim: V, value head dimension; default head_dim.
        form: "chunk" (inference), "recurrent", or "reference" (training: the only form
            with a backward for now).
        qk_norm: "l2" (unit q, k: what delta rules need for a stable state), None, or
            "auto" (default): "l2" for delta-rule classes, None otherwise.
        gate_normalizer: divides log-gates (logsigmoid(z) / 16: decays near 0.96 at init).
        gate_rank: rank of the projections of K- or V-vector extra inputs
            (d_model -> gate_rank -> HV * dim); None for a full projection.
        output_norm: RMSNorm over each head's V features before the output projection.
        output_gate: multiply by sigmoid(x W_og) after the norm.
        param_init: {param name: tensor [HV, *dims] or callable(shape) -> tensor} overriding
            the initial value the rule sees for its Params (validated against the checker).
        scale: read-out scale, default K ** -0.5 (the op's default).
        bias: bias of the q, k, v and output projections.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, rule: Rule, *, num_v_heads: int | None = None,
                 head_v_dim: int | None = None, form: str = "chunk", qk_norm: str | None = "auto",
                 gate_normalizer: float = 16.0, gate_rank: int | None = 16, output_norm: bool = True,
                 output_gate: bool = False, param_init: dict | None = None, scale: float | None = None,
                 bias: bool = False, norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if not isinstance(rule, Rule):
            validate.fail("rule", "a rule declared with @unifattn.dsl.rule (e.g. unifattn.rules.kda)",
                          type(rule).__name__, "pass a rule object, e.g. rule=unifattn.rules.gated_deltanet",
                          TypeError)
        for name, x in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim)):
            _positive_int(name, x)
        _positive_int("num_v_heads", num_v_heads, allow_none=True)
        _positive_int("head_v_dim", head_v_dim, allow_none=True)
        _positive_int("gate_rank", gate_rank, allow_none=True)
        H, HV = num_heads, num_v_heads or num_heads
        K, V = head_dim, head_v_dim or head_dim
        if HV % H != 0:
            validate.fail("num_v_heads", f"a multiple of num_heads={H} (each group of HV // H value heads "
                          "reads one q/k head)", f"num_v_heads={HV}", f"use num_v_heads in {{{H}, {2 * H}, ...}}")
        names = [s.name for s in rule.inputs]
        for n in ("q", "k", "v"):
            if n not in names or rule.input(n).kind != "token":
                validate.fail(f"rule '{rule.name}'", "per-token inputs q, k, v", f"inputs {names}",
                              "declare q: Vec['K'], k: Vec['K'], v: Vec['V']")
        self.facts = facts = check(rule)
        self._check_form(form, facts, rule)
        if qk_norm == "auto":
            qk_norm = "l2" if facts.delta else None
        if qk_norm not in ("l2", None):
            validate.fail("qk_norm", "'auto', 'l2' or None", repr(qk_norm), "pass qk_norm='l2' or None")
        if not (isinstance(gate_normalizer, (int, float)) and gate_normalizer > 0):
            validate.fail("gate_normalizer", "a positive number", repr(gate_normalizer), "e.g. 16.0")
        self.rule, self.form = rule, form
        self.d_model, self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim = d_model, H, HV, K, V
        self.qk_norm, self.gate_normalizer, self.scale = qk_norm, float(gate_normalizer), scale
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, H * K, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, H * K, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, HV * V, bias=bias, **kw)

        # rule inputs beyond q, k, v
        dims = {rule.state_dims[0]: K, rule.state_dims[1]: V}
        conds = {name: cond for name, cond, _ in facts.runtime_checks}
        raw_beta = facts.beta is not None and facts.beta.op == "input"
        self._token_inputs: list[tuple[str, tuple[int, ...], str]] = []     # (name, dims, map)
        self.input_proj = nn.ModuleDict()
        self.params = nn.ParameterDict()
        self._param_maps: dict[str, _ParamMap] = {}
        self._param_init = dict(param_init or {})
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32    # a bf16 layer keeps fp32 Params
        for s in rule.inputs:
            if s.name in ("q", "k", "v"):
                continue
            tail = tuple(dims[d] for d in s.shape)
            if s.kind == "param":
                self._param_maps[s.name] = _ParamMap(conds.get(s.name))
                self.params[s.name] = nn.Parameter(torch.empty((HV,) + tail, device=device, dtype=param_dtype))
                continue
            if conds.get(s.name) == "<= 0":
                how = "log_gate"
            elif conds.get(s.name) == "in (0, 1]":
                how = "decay"
            elif raw_beta and facts.beta.name == s.name:
                how = "sigmoid"
            else:
                how = "raw"
            out = HV * math.prod(tail)
            if tail and gate_rank is not None and gate_rank < min(d_model, out):
                proj = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False, **kw),
                                     nn.Linear(gate_rank, out, bias=True, **kw))
            else:
                proj = nn.Linear(d_model, out, bias=True, **kw)
            self.input_proj[s.name] = proj
            self._token_inputs.append((s.name, tail, how))
        unknown = set(self._param_init) - set(self._param_maps)
        if unknown:
            validate.fail("param_init", f"keys among the Params of rule '{rule.name}': {sorted(self._param_maps)}",
                          str(sorted(unknown)), "drop the unknown keys")

        self.o_norm = nn.RMSNorm(V, eps=norm_eps, **kw) if output_norm else None
        self.g_proj = nn.Linear(d_model, HV * V, bias=True, **kw) if output_gate else None
        self.o_proj = nn.Linear(HV * V, d_model, bias=bias, **kw)
        self.reset_parameters()

    @staticmethod
    def _check_form(form, facts, rule):
        validate.form("form", form)
        if form not in ("reference", "recurrent") and form not in facts.forms:
            validate.fail(f"form={form!r} for rule '{rule.name}' ({rule.where})", f"a rule with the {form} form",
                          f"class '{facts.transition}' with forms {facts.forms} ({facts.reason})",
                          "use form='recurrent' (every rule has it) or 'reference'")

    def reset_parameters(self):
        """(Re)initialize the rule's Params (after a meta-device construction, e.g. FSDP)."""
        for name, raw in self.params.items():
            init = self._param_init.get(name)
            if init is None:
                value = _default_param_value(name, self._param_maps[name].cond, tuple(raw.shape), self.num_v_heads)
            else:
                value = init(tuple(raw.shape)) if callable(init) else init
                value = torch.as_tensor(value, dtype=torch.float64, device="cpu")
                if tuple(value.shape) != tuple(raw.shape):
                    validate.fail(f"param_init['{name}']", f"shape {list(raw.shape)} ([HV, *dims])",
                                  str(list(value.shape)), "give one value per value head")
                if not bool(torch.isfinite(value).all()):
                    validate.fail(f"param_init['{name}']", "finite values", f"{int((~torch.isfinite(value)).sum())} "
                                  f"NaN/inf of {value.numel()}", "give finite initial values")
                cond = self._param_maps[name].cond
                bad = (cond == "<= 0" and bool((value > 0).any())) or \
                      (cond == "in (0, 1]" and bool(((value <= 0) | (value > 1)).any()))
                if bad:
                    validate.fail(f"param_init['{name}']", f"values {cond} (the checker's bound for rule "
                                  f"'{self.rule.name}')", f"range [{float(value.min()):.4g}, {float(value.max()):.4g}]",
                                  "pick values inside the bound")
            raw_value = self._param_maps[name].inverse(value)
            if not bool(torch.isfinite(raw_value).all()):       # a value on the bound's edge (e.g. a log-gate of 0)
                validate.fail(f"param_init['{name}']", f"values strictly inside the parameterization's range "
                              f"({self._param_maps[name].cond})", f"range [{float(value.min()):.4g}, "
                              f"{float(value.max()):.4g}], whose raw parameter is not finite",
                              "move the values off the edge (e.g. -1e-4 instead of 0)")
            with torch.no_grad():
                raw.copy_(raw_value.to(raw.device, raw.dtype))

    def extra_repr(self) -> str:
        return (f"rule={self.rule.name}, form={self.form!r}, H={self.num_heads}, HV={self.num_v_heads}, "
                f"K={self.head_dim}, V={self.head_v_dim}, qk_norm={self.qk_norm}")

    # ---------------------------------------------------------------- forward
    def rule_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """q, k [B, T, H, K], v [B, T, HV, V] and the rule's other inputs, in range, from x [B, T, d_model]."""
        B, T, _ = x.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_dim, self.head_v_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, HV, V)
        if self.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        inputs = {}
        for name, tail, how in self._token_inputs:
            z = self.input_proj[name](x).view((B, T, HV) + tail)
            if how == "log_gate":
                z = _log_gate(_fp32_at_least(z), self.gate_normalizer)
            elif how == "decay":
                z = _decay(_fp32_at_least(z), self.gate_normalizer)
            elif how == "sigmoid":
                z = torch.sigmoid(z)
            inputs[name] = z
        for name, raw in self.params.items():
            inputs[name] = self._param_maps[name].forward(_fp32_at_least(raw))
        return q, k, v, inputs

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = o.reshape(B, T, self.num_v_heads * self.head_v_dim)
        if self.g_proj is not None:
            o = o * torch.sigmoid(self.g_proj(x))
        return self.o_proj(o)

    def forward(self, x: torch.Tensor, *, state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_state: bool = False, form: str | None = None):
        """y [B, T, d_model] (and the final state [N, HV, K, V] float32 when return_state).

        state: initial state [N, HV, K, V] (N = B, or len(cu_seqlens) - 1). form overrides the
        layer's form for this call. The generated forms raise under autograd (no backward yet).
        """
        _check_hidden(x, self.d_model, self.q_proj.weight)
        form = self.form if form is None else form
        if form != self.form:
            self._check_form(form, self.facts, self.rule)
        q, k, v, inputs = self.rule_inputs(x)
        o, S = ops.linear_attention(self.rule, q, k, v, scale=self.scale, initial_state=state,
                                    output_final_state=return_state, cu_seqlens=cu_seqlens, form=form, **inputs)
        y = self._out(x, o)
        return (y, S) if return_state else y

    # ---------------------------------------------------------------- decoding
    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        """Zero state [batch_size, HV, K, V] float32 for `step`."""
        device = self.o_proj.weight.device if device is None else device
        return torch.zeros(batch_size, self.num_v_heads, self.head_dim, self.head_v_dim, dtype=torch.float32,
                           device=device)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None):
        """Decode one token: x_t [B, d_model] (or [B, 1, d_model]) -> (y_t like x_t, state).

        Runs form="recurrent" with inplace_state=True: `state` ([B, HV, K, V], float32,
        contiguous) is updated in place and returned; None starts from zeros. Call it under
        torch.no_grad() (the generated kernels have no backward yet).
        """
        validate.check_tensor("x_t", x_t)
        squeeze = x_t.dim() == 2
        x = x_t[:, None] if squeeze else x_t
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[-1] != self.d_model:
            validate.fail("x_t", f"one token [B, d_model={self.d_model}] or [B, 1, d_model]", f"{tuple(x_t.shape)}",
                          "pass x[:, t]; use forward for whole sequences")
        _check_dtype("x_t", x, self.q_proj.weight)
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        q, k, v, inputs = self.rule_inputs(x)
        o, state = ops.linear_attention(self.rule, q, k, v, scale=self.scale, initial_state=state, form="recurrent",
                                        inplace_state=True, **inputs)
        y = self._out(x, o)
        return (y[:, 0] if squeeze else y), state


# --------------------------------------------------------------------------- sparse attention
_ATTN_INPUTS = {"q": "q", "k": "k", "kmean": "k"}


def _is_lightning(sel: Selector) -> bool:
    return [(s.name, s.shape, s.heads) for s in sel.inputs] == \
        [("qi", ("HI", "DI"), True), ("ki", ("DI",), False), ("w", ("HI",), True)]


class SparseAttention(nn.Module):
    """Sparse top-k attention layer: x [B, T, d_model] -> y [B, T, d_model].

    Args:
        d_model: hidden size.
        num_heads: HQ query heads; num_kv_heads: HKV key/value heads (HQ % HKV == 0).
        head_dim: D (q, k and v; the sparse kernel takes D <= 256).
        selector: a selector (unifattn.rules.lightning_indexer, unifattn.rules.moba, or one
            declared with @unifattn.dsl.selector.selector).
        topk: keys (or key blocks) kept per query; default the selector's.
        index_heads, index_dim: sizes of the selector's own inputs (the lightning indexer's
            HI heads of DI features); ignored by selectors that only read q and k.
        scale: softmax scale, default D ** -0.5.
        check_indices: validate the selected indices before the attention kernel (a sort per
            list); off by default, the selector's output is valid by construction.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, selector=None, *,
                 topk: int | None = None, index_heads: int = 4, index_dim: int = 32, scale: float | None = None,
                 bias: bool = False, check_indices: bool = False, device=None, dtype=None):
        super().__init__()
        from unifattn import rules
        selector = rules.lightning_indexer if selector is None else selector
        if not isinstance(selector, Selector):
            validate.fail("selector", "a selector (e.g. unifattn.rules.lightning_indexer or unifattn.rules.moba)",
                          type(selector).__name__, "pass selector=unifattn.rules.lightning_indexer", TypeError)
        for name, x in (("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("index_heads", index_heads), ("index_dim", index_dim)):
            _positive_int(name, x)
        _positive_int("topk", topk, allow_none=True)
        if num_heads % num_kv_heads != 0:
            validate.fail("num_kv_heads", f"a divisor of num_heads={num_heads} (G query heads per KV head)",
                          f"num_kv_heads={num_kv_heads}", "e.g. num_kv_heads=1 (MQA) or num_kv_heads=num_heads")
        if head_dim > 256:
            validate.fail("head_dim", "at most 256 (the sparse attention kernel's limit)", str(head_dim),
                          "use more heads of a smaller head_dim")
        if topk is not None and topk < selector.n_forced:
            validate.fail("topk", f"at least the {selector.n_forced} keys forced by always={selector.always!r}",
                          str(topk), f"pass topk >= {selector.n_forced}")
        self.selector, self.topk = selector, selector.topk if topk is None else topk
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.scale, self.check_indices = scale, check_indices
        self.lightning = _is_lightning(selector)
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **kw)

        # the selector's own inputs: one projection of x each, no attention-head axis
        attn_dims = {d for s in selector.inputs if s.name in _ATTN_INPUTS for d in s.shape}
        sizes = {d: index_heads for d in selector.head_dims}
        self.index_proj = nn.ModuleDict()
        self._index_shapes: dict[str, tuple[int, ...]] = {}
        for s in selector.inputs:
            if s.name in _ATTN_INPUTS:
                if len(s.shape) != 1 or s.heads:
                    validate.fail(f"selector '{selector.name}' input '{s.name}'", "a Vec of the attention head dim",
                                  repr(s), "type it Vec['D'] or rename it (q, k, kmean are the attention's own)")
                continue
            shape = tuple(head_dim if d in attn_dims else sizes.get(d, index_dim) for d in s.shape)
            self._index_shapes[s.name] = shape
            self.index_proj[s.name] = nn.Linear(d_model, max(1, math.prod(shape)), bias=False, **kw)
        self.k_norm = nn.LayerNorm(index_dim, **kw) if self.lightning else None   # DeepSeek-V3.2's indexer key norm

    def extra_repr(self) -> str:
        return (f"selector={self.selector.name}, topk={self.topk}, HQ={self.num_heads}, HKV={self.num_kv_heads}, "
                f"D={self.head_dim}")

    def qkv(self, x: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def index_inputs(self, x: torch.Tensor) -> dict:
        """The selector's own inputs from x (lightning: qi [B, T, HI, DI], ki [B, T, DI], w [B, T, HI])."""
        B, T, _ = x.shape
        out = {name: self.index_proj[name](x).view((B, T) + shape) for name, shape in self._index_shapes.items()}
        if self.lightning:
            HI, DI = out["qi"].shape[2:]
            out["ki"] = self.k_norm(out["ki"])
            out["w"] = out["w"] * (HI * DI) ** -0.5           # DeepSeek's n_heads ** -0.5 * softmax_scale
        return out

    def select(self, q, k, index: dict, cu_seqlens=None) -> torch.Tensor:
        """int32 indices [B, T, HKV, topk] (the selector's list broadcast to every KV head)."""
        attn = {"q": q, "k": k}
        inputs = {s.name: attn[_ATTN_INPUTS[s.name]] if s.name in _ATTN_INPUTS else index[s.name]
                  for s in self.selector.inputs}
        with torch.no_grad():
            idx = ops.select(self.selector, topk=self.topk, cu_seqlens=cu_seqlens,
                             **{n: t.detach() for n, t in inputs.items()})
        if idx.shape[2] != self.num_kv_heads:                  # one list shared by all heads (lightning)
            idx = idx.expand(-1, -1, self.num_kv_heads, -1).contiguous()
        return idx

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, return_indices: bool = False,
                return_indexer_loss: bool = False):
        """y [B, T, d_model]; with return_indices also the int32 indices [B, T, HKV, topk]; with
        return_indexer_loss also the indexer's distillation loss (sparse stage) as a scalar."""
        _check_hidden(x, self.d_model, self.q_proj.weight)
        if x.shape[1] == 0:                                     # no tokens: nothing to select or attend
            y = self.o_proj(x.new_zeros(x.shape[0], 0, self.o_proj.in_features))
            out = (y,)
            if return_indices:
                out += (torch.zeros(x.shape[0], 0, self.num_kv_heads, self.topk, dtype=torch.int32, device=x.device),)
            if return_indexer_loss:
                out += (x.new_zeros((), dtype=torch.float32),)
            return out if len(out) > 1 else y
        q, k, v = self.qkv(x)
        if return_indexer_loss:
            index = self.index_inputs(x.detach())              # the indexer trains on its own loss only
        else:
            with torch.no_grad():
                index = self.index_inputs(x)
        idx = self.select(q, k, index, cu_seqlens)
        o = ops.sparse_attention(q, k, v, idx, block_size=self.selector.block_size, scale=self.scale,
                                 cu_seqlens=cu_seqlens, check_indices=self.check_indices)
        y = self.o_proj(o.reshape(x.shape[0], x.shape[1], self.num_heads * self.head_dim))   # not -1: B may be 0
        out = (y,)
        if return_indices:
            out += (idx,)
        if return_indexer_loss:
            out += (self._indexer_loss(q, k, index, idx[:, :, :1], cu_seqlens),)
        return out if len(out) > 1 else y

    def indexer_loss(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                     dense: bool = False) -> torch.Tensor:
        """ops.indexer_loss for this layer: KL(attention || indexer), gradients to the indexer only.

        dense=False: over the keys the indexer selects (the sparse training stage); dense=True:
        over all causal keys (the warm-up stage). x is detached: the backbone gets no gradient.
        """
        _check_hidden(x, self.d_model, self.q_proj.weight)
        x = x.detach()
        with torch.no_grad():
            q, k, _ = self.qkv(x)
        index = self.index_inputs(x)
        idx = None if dense else self.select(q, k, index, cu_seqlens)[:, :, :1]
        return self._indexer_loss(q, k, index, idx, cu_seqlens)

    def _indexer_loss(self, q, k, index, idx, cu_seqlens):
        if not self.lightning:
            validate.fail("indexer_loss", "a layer whose selector is the lightning indexer (qi, ki, w)",
                          f"selector '{self.selector.name}'",
                          "selectors that score with the attention's own q and k (MoBA) have nothing to distill",
                          TypeError)
        return ops.indexer_loss(q, k, index["qi"], index["ki"], index["w"], indices=idx, scale=self.scale,
                                cu_seqlens=cu_seqlens)
