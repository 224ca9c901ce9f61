"""Hybrid stacks: linear-attention layers with sparse (or dense) global layers between them.

    stack = HybridStack("LLLS" * 6, d_model=1024, num_heads=16, linear_rule=rules.kda,
                        selector=rules.lightning_indexer, topk=2048, linear_form="reference")
    y = stack(x)                                     # x, y [B, T, d_model]
    lm = HybridLM(vocab_size=32000, pattern="LLLS", d_model=512, num_heads=8)
    logits = lm(tokens)                              # tokens [B, T] -> [B, T, vocab_size]

Each letter of `pattern` is one pre-norm residual block

    h = x + mixer(RMSNorm(x))          mixer: 'L' LinearAttention, 'S' SparseAttention,
    y = h + SwiGLU(RMSNorm(h))                'A' dense causal softmax attention (torch SDPA)

where SwiGLU(x) = (silu(x W_gate) * x W_up) W_down. Today's hybrid models (Kimi Linear,
Qwen3-Next) use 3 linear : 1 dense global layer ("LLLA"); "LLLS" puts sparse top-k
attention in the global slot. No positional encoding (NoPE): the linear layers carry
position.

Forms: the linear layers run `linear_form` ("chunk" by default). The generated forms have
no backward yet, so training (autograd on, parameters requiring grad) raises from the op:
train with linear_form="reference", or pass linear_form=... per call to forward.
Sparse layers' indexers train through `return_indexer_loss=True` (add the returned loss
to the LM loss; see unifattn.layers.SparseAttention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unifattn import validate
from unifattn.layers import LinearAttention, SparseAttention, _check_hidden, _positive_int

__all__ = ["DenseAttention", "SwiGLU", "HybridBlock", "HybridStack", "HybridLM", "MIXERS"]

MIXERS = {"L": "LinearAttention", "S": "SparseAttention", "A": "DenseAttention"}


class DenseAttention(nn.Module):
    """Causal softmax attention with grouped KV heads (torch SDPA): x [B, T, d_model] -> same.

    With cu_seqlens (B == 1, packed sequences) attention stays inside each sequence.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, scale: float | None = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, x in (("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            _positive_int(name, x)
        if num_heads % num_kv_heads != 0:
            validate.fail("num_kv_heads", f"a divisor of num_heads={num_heads}", f"num_kv_heads={num_kv_heads}",
                          "e.g. num_kv_heads=1 (MQA) or num_kv_heads=num_heads")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **kw)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        _check_hidden(x, self.q_proj.in_features, self.q_proj.weight)
        B, T, _ = x.shape
        if cu_seqlens is not None:
            validate.seqlens(cu_seqlens, B, T)
        G = self.num_heads // self.num_kv_heads
        # [B, T, H*D] -> [B, H, T, D]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if G > 1:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            # [T, T] mask: causal and inside one sequence
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=x.device, dtype=torch.int64)
            seq = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens, output_size=T)
            t = torch.arange(T, device=x.device)
            mask = (seq[:, None] == seq[None, :]) & (t[None, :] <= t[:, None])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))   # not -1: B*T may be 0


class SwiGLU(nn.Module):
    """(silu(x W_gate) * x W_up) W_down."""

    def __init__(self, d_model: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(d_model, hidden, **kw)
        self.up_proj = nn.Linear(d_model, hidden, **kw)
        self.down_proj = nn.Linear(hidden, d_model, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HybridBlock(nn.Module):
    """x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)); kind is 'L', 'S' or 'A'."""

    def __init__(self, kind: str, mixer: nn.Module, d_model: int, mlp_hidden: int, norm_eps: float, *,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.kind = kind
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps, **kw)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=norm_eps, **kw)
        self.mlp = SwiGLU(d_model, mlp_hidden, **kw)

    def forward(self, x, *, cu_seqlens=None, linear_form=None, return_indexer_loss=False):
        h = self.attn_norm(x)
        aux = None
        if self.kind == "L":
            h = self.mixer(h, cu_seqlens=cu_seqlens, form=linear_form)
        elif self.kind == "S" and return_indexer_loss and self.mixer.lightning:
            h, aux = self.mixer(h, cu_seqlens=cu_seqlens, return_indexer_loss=True)
        else:
            h = self.mixer(h, cu_seqlens=cu_seqlens)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, aux


class HybridStack(nn.Module):
    """Pre-norm residual blocks following `pattern` ('L' linear, 'S' sparse, 'A' dense attention).

    Args:
        pattern: e.g. "LLLS" * 6.
        d_model, num_heads: hidden size and query heads of every mixer.
        head_dim: per-head size, default d_model // num_heads.
        num_kv_heads: KV heads of 'S' and 'A' layers (default num_heads).
        num_v_heads: value heads of 'L' layers (default num_heads).
        linear_rule: the rule of 'L' layers; linear_form: their form ("reference" to train).
        selector, topk, index_heads, index_dim: the 'S' layers' selector (see SparseAttention).
        mlp_hidden: SwiGLU hidden size, default 8/3 d_model rounded up to a multiple of 8.
        linear_kwargs, sparse_kwargs: extra keyword arguments of LinearAttention / SparseAttention.
    """

    def __init__(self, pattern: str, d_model: int, num_heads: int, head_dim: int | None = None, *,
                 num_kv_heads: int | None = None, num_v_heads: int | None = None, linear_rule=None,
                 linear_form: str = "chunk", selector=None, topk: int | None = None, index_heads: int = 4,
                 index_dim: int = 32, mlp_hidden: int | None = None, norm_eps: float = 1e-6,
                 linear_kwargs: dict | None = None, sparse_kwargs: dict | None = None, device=None, dtype=None):
        super().__init__()
        from unifattn import rules
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(MIXERS):
            validate.fail("pattern", f"a non-empty string of {sorted(MIXERS)} ({MIXERS})", repr(pattern),
                          "e.g. pattern='LLLS' * 6")
        _positive_int("d_model", d_model)
        _positive_int("num_heads", num_heads)
        _positive_int("mlp_hidden", mlp_hidden, allow_none=True)
        validate.form("linear_form", linear_form)   # a stack without L layers would ignore it
        if head_dim is None:
            if d_model % num_heads:
                validate.fail("head_dim", f"given, or d_model={d_model} divisible by num_heads={num_heads}",
                              "neither", "pass head_dim=... explicitly")
            head_dim = d_model // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        linear_rule = rules.kda if linear_rule is None else linear_rule
        selector = rules.lightning_indexer if selector is None else selector
        mlp_hidden = -(-(8 * d_model // 3) // 8) * 8 if mlp_hidden is None else mlp_hidden
        kw = dict(device=device, dtype=dtype)
        self.pattern, self.linear_form, self.d_model = pattern, linear_form, d_model
        blocks = []
        for kind in pattern:
            if kind == "L":
                mixer = LinearAttention(d_model, num_heads, head_dim, linear_rule, num_v_heads=num_v_heads,
                                        form=linear_form, **(linear_kwargs or {}), **kw)
            elif kind == "S":
                mixer = SparseAttention(d_model, num_heads, num_kv_heads, head_dim, selector, topk=topk,
                                        index_heads=index_heads, index_dim=index_dim, **(sparse_kwargs or {}), **kw)
            else:
                mixer = DenseAttention(d_model, num_heads, num_kv_heads, head_dim, **kw)
            blocks.append(HybridBlock(kind, mixer, d_model, mlp_hidden, norm_eps, **kw))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, linear_form: str | None = None,
                return_indexer_loss: bool = False):
        """y [B, T, d_model]; with return_indexer_loss also the sum of the sparse layers' indexer
        losses (a scalar, 0 when there is none) to add to the training loss."""
        _check_hidden(x, self.d_model)           # dtype: checked by each mixer (norms may be kept in fp32)
        if linear_form is not None:
            validate.form("linear_form", linear_form)   # a stack without L layers would ignore it
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, a = block(x, cu_seqlens=cu_seqlens, linear_form=linear_form, return_indexer_loss=return_indexer_loss)
            if a is not None:
                aux = aux + a
        return (x, aux) if return_indexer_loss else x


class HybridLM(nn.Module):
    """Token embeddings -> HybridStack -> RMSNorm -> vocabulary head: tokens [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab_size: int, pattern: str, d_model: int, num_heads: int, head_dim: int | None = None, *,
                 tie_embeddings: bool = False, norm_eps: float = 1e-6, device=None, dtype=None, **stack_kwargs):
        super().__init__()
        _positive_int("vocab_size", vocab_size)
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(vocab_size, d_model, **kw)
        self.stack = HybridStack(pattern, d_model, num_heads, head_dim, norm_eps=norm_eps, **stack_kwargs, **kw)
        self.norm = nn.RMSNorm(d_model, eps=norm_eps, **kw)
        self.head = nn.Linear(d_model, vocab_size, bias=False, **kw)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                linear_form: str | None = None, return_indexer_loss: bool = False):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            validate.fail("tokens", "an int64/int32 tensor [B, T]", got, "pass token ids, e.g. tokenizer output")
        V = self.embed.num_embeddings
        if tokens.numel() and bool(((tokens < 0) | (tokens >= V)).any()):
            validate.fail("tokens", f"ids in [0, vocab_size={V})", f"ids from {int(tokens.min())} to {int(tokens.max())}",
                          "check the tokenizer's vocabulary size against the model's")
        out = self.stack(self.embed(tokens), cu_seqlens=cu_seqlens, linear_form=linear_form,
                         return_indexer_loss=return_indexer_loss)
        h, aux = out if return_indexer_loss else (out, None)
        logits = self.head(self.norm(h))
        return (logits, aux) if return_indexer_loss else logits
