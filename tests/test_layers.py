"""Layers and hybrid stacks: generated forms == reference form, decoding == full forward,
sparse attention == float64 dense masked attention (values and gradients), a hybrid LM learns,
bad arguments raise clear errors."""
import copy
import os

import pytest
import torch

import unifattn as ua
from unifattn.hybrid import DenseAttention, HybridLM, HybridStack
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


def test_linear_gates_keep_precision_in_bf16_and_fp64():
    """Gates and Params are mapped in fp32 at least: a bf16 layer keeps RetNet's slow decays below 1 (they
    rounded to 1), and a float64 layer, a reference, maps its log-gates and Params in float64."""
    x = _x(T=3).cpu()
    retnet = LinearAttention(D_MODEL, 8, 4, ua.rules.retnet).bfloat16()
    gamma = retnet.rule_inputs(x.bfloat16())[3]["gamma"].double()
    assert torch.allclose(1 - gamma, 2.0 ** (-5 - torch.arange(8.0, dtype=torch.float64)), rtol=2e-2), gamma
    torch.manual_seed(10)
    kda = LinearAttention(D_MODEL, 2, 8, ua.rules.kda).double()
    g = kda.rule_inputs(x.double())[3]["g"]
    assert g.dtype == torch.float64
    z = kda.input_proj["g"](x.double()).view(g.shape)
    assert torch.allclose(g, torch.nn.functional.logsigmoid(z) / 16, rtol=1e-13, atol=0)
    assert LinearAttention(D_MODEL, 2, 8, ua.rules.retnet, dtype=torch.float64).params["gamma"].dtype == torch.float64


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
    (lambda: HybridStack("A", D_MODEL, 2, mlp_hidden=0), ValueError, "mlp_hidden: expected a positive int"),
    (lambda: HybridStack("SA", D_MODEL, 2, linear_form="fast"), ValueError, "linear_form: expected one of"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match) as e:
        make()
    assert "Fix:" in str(e.value)


def _lin():
    return LinearAttention(D_MODEL, 2, 8, ua.rules.retnet, form="reference")


def _sparse():
    return SparseAttention(D_MODEL, 2, 1, 8, topk=4, index_heads=2, index_dim=8)


_X16, _X64 = torch.zeros(1, 3, 16), torch.zeros(1, 3, D_MODEL, dtype=torch.float64)
_DTYPE = "expected the dtype of the layer's weights"


@pytest.mark.parametrize("call, exc, match", [
    (lambda: HybridStack("A", D_MODEL, 2)(_X16), ValueError, r"x: expected \[B, T, d_model=32\]"),
    (lambda: HybridStack("A", D_MODEL, 2)([[0.0] * D_MODEL]), TypeError, "x: expected a torch.Tensor"),
    (lambda: HybridStack("A", D_MODEL, 2)(_X64.float(), linear_form="fast"), ValueError, "linear_form: expected one"),
    (lambda: _sparse().indexer_loss(_X16), ValueError, r"x: expected \[B, T, d_model=32\]"),
    (lambda: _lin()(_X64), TypeError, "x: " + _DTYPE),
    (lambda: _lin().step(_X64[:, 0]), TypeError, "x_t: " + _DTYPE),
    (lambda: _sparse()(_X64), TypeError, "x: " + _DTYPE),
    (lambda: DenseAttention(D_MODEL, 2, 1, 8)(_X64), TypeError, "x: " + _DTYPE),
    (lambda: HybridStack("A", D_MODEL, 2)(_X64), TypeError, "x: " + _DTYPE),
])
def test_bad_hidden_states(call, exc, match):
    """Wrong hidden states raise the project's errors, not torch's shape or dtype errors from inside."""
    with pytest.raises(exc, match=match) as e:
        call()
    assert "Fix:" in str(e.value)


def test_autocast_mixed_dtypes_allowed():
    with torch.autocast("cpu", dtype=torch.bfloat16):         # autocast casts for the projections
        assert DenseAttention(D_MODEL, 2, 1, 8)(_X64.bfloat16()).shape == (1, 3, D_MODEL)


def test_empty_batch_and_sequence():
    """B = 0 or T = 0 gives an empty output of the right shape (an -1 in a reshape cannot be inferred there)."""
    torch.manual_seed(9)
    sparse = SparseAttention(D_MODEL, 2, 1, 8, topk=4, index_heads=2, index_dim=8).to(DEVICE)
    dense = DenseAttention(D_MODEL, 2, 1, 8).to(DEVICE)
    lm = HybridLM(11, "LSA", D_MODEL, 2, num_kv_heads=1, linear_form="reference", topk=4, index_heads=2,
                  index_dim=8).to(DEVICE)
    with torch.no_grad():
        for B, T in ((0, 5), (2, 0)):
            x = torch.randn(B, T, D_MODEL, device=DEVICE)
            assert sparse(x).shape == (B, T, D_MODEL)
            assert dense(x).shape == (B, T, D_MODEL)
            assert lm(torch.zeros(B, T, dtype=torch.long, device=DEVICE)).shape == (B, T, 11)
        x = torch.randn(1, 0, D_MODEL, device=DEVICE)
        assert dense(x, cu_seqlens=torch.tensor([0, 0], device=DEVICE)).shape == (1, 0, D_MODEL)


def test_linear_params_init_under_meta_device():
    """Deferred init (FSDP): build under torch.device("meta"), materialize, reset -> the documented Params."""
    with torch.device("meta"):
        lm = HybridLM(11, "LA", D_MODEL, 2, linear_rule=ua.rules.retnet)
        mamba = LinearAttention(D_MODEL, 2, 8, ua.rules.mamba2, num_v_heads=4)
    assert lm.stack.blocks[0].mixer.params["gamma"].is_meta
    lm.to_empty(device="cpu")
    mamba.to_empty(device="cpu")
    for m in list(lm.modules()) + list(mamba.modules()):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    gamma = torch.sigmoid(lm.stack.blocks[0].mixer.params["gamma"].detach().double())
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(2.0, dtype=torch.float64)), atol=1e-6)
    A = mamba.params["A_log"].detach().exp()
    dt = torch.nn.functional.softplus(mamba.params["dt_bias"].detach())
    assert bool(((A >= 1) & (A <= 16)).all()) and bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all())


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
