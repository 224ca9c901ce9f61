"""Layers and hybrid stacks: generated forms == reference form, decoding == full forward,
sparse attention == float64 dense masked attention (values and gradients), a hybrid LM learns,
bad arguments raise clear errors."""
import copy
import os

import pytest
import torch

import unifattn as ua
from unifattn.hybrid import HybridLM, HybridStack
from unifattn.layers import LinearAttention, SparseAttention
from unifattn.testing import assert_close

from conftest import DEVICE

D_MODEL = 32


def _x(B=2, T=40, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D_MODEL, generator=g).to(DEVICE).requires_grad_(grad)


# --------------------------------------------------------------------------- LinearAttention
@pytest.mark.parametrize("name", ["kda", "gla", "retnet", "mamba2", "rwkv7"])
def test_linear_chunk_equals_reference(name):
    torch.manual_seed(0)
    layer = LinearAttention(D_MODEL, 2, 8, ua.rules.BUILTIN[name], num_v_heads=4, form="chunk").to(DEVICE)
    x = _x()
    S0 = 0.1 * torch.randn(2, 4, 8, 8, device=DEVICE)
    with torch.no_grad():
        y, S = layer(x, state=S0, return_state=True)
        y_ref, S_ref = layer(x, state=S0.double(), return_state=True, form="reference")
    assert_close(y, y_ref, torch.float32, f"{name} layer output")
    assert_close(S, S_ref, torch.float32, f"{name} layer final state")


def test_linear_params_satisfy_checker():
    """Params and gates come out in the ranges the checker asks for."""
    for name in ("retnet", "mamba2", "gla", "kda"):
        layer = LinearAttention(D_MODEL, 2, 8, ua.rules.BUILTIN[name])
        _, _, _, inputs = layer.rule_inputs(_x(T=5).cpu())
        for inp, cond, _ in ua.dsl.check(layer.rule).runtime_checks:
            x = inputs[inp]
            assert bool((x <= 0).all()) if cond == "<= 0" else bool(((x > 0) & (x <= 1)).all()), (name, inp)
    gamma = LinearAttention(D_MODEL, 2, 8, ua.rules.retnet).rule_inputs(_x(T=1).cpu())[3]["gamma"]
    assert torch.allclose(gamma.double(), 1 - 2.0 ** (-5 - torch.arange(2.0, dtype=torch.float64)), atol=1e-6)


def test_linear_varlen_equals_separate_sequences():
    torch.manual_seed(1)
    layer = LinearAttention(D_MODEL, 2, 8, ua.rules.gated_deltanet).to(DEVICE)
    a, b = _x(B=1, T=13, seed=1), _x(B=1, T=27, seed=2)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        y, S = layer(torch.cat([a, b], 1), cu_seqlens=cu, return_state=True)
        ya, Sa = layer(a, return_state=True)
        yb, Sb = layer(b, return_state=True)
    assert_close(y, torch.cat([ya, yb], 1), torch.float32, "varlen output")
    assert_close(S, torch.cat([Sa, Sb], 0), torch.float32, "varlen final states")


def test_linear_step_decoding_equals_forward():
    torch.manual_seed(2)
    layer = LinearAttention(D_MODEL, 2, 8, ua.rules.kda, num_v_heads=4, output_gate=True).to(DEVICE)
    x = _x(B=2, T=12)
    with torch.no_grad():
        y_full, S_full = layer(x, return_state=True)
        S = layer.init_state(2)
        ys = []
        for t in range(x.shape[1]):
            y_t, S_out = layer.step(x[:, t], S)
            assert S_out is S                       # updated in place
            ys.append(y_t)
    assert_close(torch.stack(ys, 1), y_full, torch.float32, "decoded outputs")
    assert_close(S, S_full, torch.float32, "decoded state")


def test_linear_reference_trains_and_generated_forms_refuse_grad():
    layer = LinearAttention(D_MODEL, 2, 8, ua.rules.kda, form="reference").to(DEVICE)
    layer(_x(T=6)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(RuntimeError, match="form='reference'"):
        layer(_x(T=6), form="chunk")


# --------------------------------------------------------------------------- SparseAttention
def _dense_masked(layer, x, idx):
    """float64: softmax attention of each query over exactly the keys listed in idx (token granularity)."""
    B, T, _ = x.shape
    q, k, v = layer.qkv(x)                                                   # [B, T, H, D]
    G = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    mask = torch.zeros(B, T, layer.num_kv_heads, T + 1, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, torch.where(idx >= 0, idx, T).long(), True)
    mask = mask[..., :T].repeat_interleave(G, 2).permute(0, 2, 1, 3)       # [B, H, T, T]
    s = torch.einsum("bthd,bshd->bhts", q, k) * layer.head_dim ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    o = torch.einsum("bhts,bshd->bthd", p, v)
    return layer.o_proj(o.reshape(B, T, -1))


def test_sparse_layer_matches_dense_masked_reference():
    torch.manual_seed(3)
    layer = SparseAttention(D_MODEL, 4, 2, 16, topk=8, index_heads=2, index_dim=8).to(DEVICE)
    x = _x(B=2, T=48, grad=True)
    y, idx = layer(x, return_indices=True)
    assert idx.shape == (2, 48, 2, 8) and idx.dtype == torch.int32
    r = torch.randn_like(y)
    (y * r).sum().backward()
    ref = copy.deepcopy(layer).double()
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = _dense_masked(ref, x_ref, idx)
    (y_ref * r.double()).sum().backward()
    assert_close(y, y_ref, torch.float32, "sparse layer output")
    assert_close(x.grad, x_ref.grad, torch.float32, "dx")
    for (n, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        if n.startswith(("index_proj", "k_norm")):
            assert p.grad is None, f"{n}: the indexer must get no gradient from the main loss"
        else:
            assert torch.isfinite(p.grad).all()
            assert_close(p.grad, p_ref.grad, torch.float32, f"d {n}")


def test_sparse_indexer_loss_trains_indexer_only():
    torch.manual_seed(4)
    layer = SparseAttention(D_MODEL, 4, 1, 16, topk=8, index_heads=2, index_dim=8).to(DEVICE)
    x = _x(B=1, T=32, grad=True)
    for dense in (False, True):
        layer.zero_grad()
        loss = layer.indexer_loss(x, dense=dense)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert x.grad is None
        grads = {n: p.grad for n, p in layer.named_parameters()}
        assert all(grads[n] is None for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
        assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if n.startswith("index_proj"))
    y, aux = layer(x, return_indexer_loss=True)
    assert torch.allclose(aux, layer.indexer_loss(x), atol=1e-6)


def test_sparse_moba_layer_trains():
    torch.manual_seed(5)
    layer = SparseAttention(D_MODEL, 2, 1, 16, ua.rules.moba, topk=2).to(DEVICE)
    x = _x(B=1, T=64, grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="lightning indexer"):
        layer.indexer_loss(x)


# --------------------------------------------------------------------------- hybrid
def test_hybrid_lm_learns_copy_task():
    torch.manual_seed(6)
    V, half = 10, 12
    lm = HybridLM(V + 1, "LLS", D_MODEL, 2, num_kv_heads=1, linear_form="reference", topk=8, index_heads=2,
                  index_dim=8).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(1, V + 1, (2, half), generator=g)
    tokens = torch.cat([src, torch.zeros(2, 1, dtype=torch.long), src], 1).to(DEVICE)   # a b c 0 a b c
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        logits, aux = lm(inp, return_indexer_loss=True)
        loss = torch.nn.functional.cross_entropy(logits[:, half:].reshape(-1, V + 1), tgt[:, half:].reshape(-1))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    with pytest.raises(RuntimeError, match="form='reference'"):
        lm(inp, linear_form="chunk")
    with torch.no_grad():                          # inference through the generated kernels
        assert_close(lm(inp, linear_form="chunk"), lm(inp), torch.float32, "hybrid LM logits")


def test_hybrid_stack_dense_and_varlen():
    torch.manual_seed(7)
    stack = HybridStack("LA", D_MODEL, 2, num_kv_heads=1).to(DEVICE)
    a, b = _x(B=1, T=10, seed=3), _x(B=1, T=14, seed=4)
    cu = torch.tensor([0, 10, 24], device=DEVICE)
    with torch.no_grad():
        y = stack(torch.cat([a, b], 1), cu_seqlens=cu)
        assert_close(y, torch.cat([stack(a), stack(b)], 1), torch.float32, "packed hybrid stack")


# --------------------------------------------------------------------------- errors
@ua.dsl.rule(state=("K", "V"))
def cubic(S, q: ua.dsl.Vec["K"], k: ua.dsl.Vec["K"], v: ua.dsl.Vec["V"]):
    """Not affine in S: recurrent_only, no chunk form."""
    S = S @ S.T @ S
    S = S + ua.dsl.outer(k, v)
    return S, S.T @ q


def _cubic_rule():
    return cubic


@pytest.mark.parametrize("make, exc, match", [
    (lambda: LinearAttention(D_MODEL, 2, 8, "kda"), TypeError, "rule: expected a rule"),
    (lambda: LinearAttention(D_MODEL, 2, 8, ua.rules.kda, num_v_heads=3), ValueError, "multiple of num_heads=2"),
    (lambda: LinearAttention(D_MODEL, 2, 0, ua.rules.kda), ValueError, "head_dim: expected a positive int"),
    (lambda: LinearAttention(D_MODEL, 2.0, 8, ua.rules.kda), TypeError, "num_heads: expected a positive int"),
    (lambda: LinearAttention(D_MODEL, 2, 8, ua.rules.kda, form="fast"), ValueError, "form: expected one of"),
    (lambda: LinearAttention(D_MODEL, 2, 8, _cubic_rule(), form="chunk"), ValueError, "form='recurrent'"),
    (lambda: LinearAttention(D_MODEL, 2, 8, ua.rules.retnet, param_init={"gamma": torch.full((2,), 1.5)}),
     ValueError, r"values in \(0, 1\]"),
    (lambda: LinearAttention(D_MODEL, 2, 8, ua.rules.retnet, param_init={"gamma": torch.tensor([0.5, float("nan")])}),
     ValueError, r"param_init\['gamma'\]: expected finite values"),
    (lambda: SparseAttention(D_MODEL, 4, 3, 8), ValueError, "divisor of num_heads=4"),
    (lambda: SparseAttention(D_MODEL, 4, 2, 8, selector=ua.rules.kda), TypeError, "selector: expected a selector"),
    (lambda: SparseAttention(D_MODEL, 4, 2, 512), ValueError, "at most 256"),
    (lambda: HybridStack("LLX", D_MODEL, 2), ValueError, "pattern: expected"),
    (lambda: HybridStack("LS", D_MODEL, 3), ValueError, "divisible by num_heads=3"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match) as e:
        make()
    assert "Fix:" in str(e.value)


DDP_STEPS = """
import datetime, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from unifattn.hybrid import HybridLM
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
torch.manual_seed(8)
lm = DDP(HybridLM(11, "LS", 32, 2, num_kv_heads=1, linear_form="reference", topk=4, index_heads=2, index_dim=8))
tokens = torch.randint(0, 11, (1, 12))
for _ in range(2):
    logits, aux = lm(tokens, return_indexer_loss=True)
    (logits.logsumexp(-1).mean() + aux).backward()
missing = [n for n, p in lm.named_parameters() if p.grad is None]
print("missing gradients:", missing, flush=True)
os._exit(0)   # no teardown: gloo's destructor can deadlock against the GIL (Reducer joins a thread that decrefs)
"""


def test_hybrid_lm_under_ddp(tmp_path):
    """One process of DDP (gloo): every parameter gets a gradient once the indexer loss is added.

    Run in a child process with a time limit: tearing DDP down over gloo deadlocked once in CI (the
    Reducer's destructor joins gloo's worker thread while holding the GIL that thread waits for)."""
    import subprocess
    import sys
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or DEVICE != "cpu":
        pytest.skip("gloo DDP on the CPU")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", DDP_STEPS, str(tmp_path / "store")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert "missing gradients: []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
