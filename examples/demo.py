"""The main job: declare a rule, check it, generate its kernels, run them against the reference;
select sparse keys with the lightning indexer; train a small hybrid (linear : sparse) model.

Runs on a GPU when there is one, else on the CPU through the Triton interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import unifattn as ua  # noqa: E402
import unifattn.codegen.selector  # noqa: E402,F401
from unifattn.dsl import Scalar, Vec, check, diag, exp, l2norm, outer, rule, sigmoid  # noqa: E402
from unifattn.testing import assert_close  # noqa: E402


@rule(state=("K", "V"))
def my_kda(S, q: Vec["K"], k: Vec["K"], v: Vec["V"], g: Vec["K"], b: Scalar):
    """KDA with its preprocessing inside the rule: unit keys, beta = sigmoid(b)."""
    k = l2norm(k)
    beta = sigmoid(b)
    S = diag(exp(g)) @ S
    S = S + beta * outer(k, v - S.T @ k)
    return S, S.T @ q


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts = check(my_kda)
    print(f"rule {my_kda.name}: transition class '{facts.transition}', forms {facts.forms}")
    for p in facts.proofs:
        print(f"  proof: {p}")
    for k, v in facts.bounds.items():
        print(f"  bound: {k}: {v}")
    for form in facts.forms:
        print(f"  generated {form} kernel: {ua.codegen.source_path(my_kda, form)}")

    torch.manual_seed(0)
    B, T, H, K, V = 1, 100, 2, 32, 32
    q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device)) / 4
    b = torch.randn(B, T, H, device=device)
    S0 = torch.randn(B, H, K, V, device=device) * 0.1
    args = dict(g=g, b=b, initial_state=S0, output_final_state=True)
    o_ref, S_ref = ua.ops.linear_attention(my_kda, q.double(), k.double(), v.double(),
                                           g=g.double(), b=b.double(), initial_state=S0.double(),
                                           output_final_state=True, form="reference")
    for form in facts.forms:
        o, S = ua.ops.linear_attention(my_kda, q, k, v, form=form, **args)
        assert_close(o, o_ref, torch.float32, f"{form} output")
        assert_close(S, S_ref, torch.float32, f"{form} final state")
        err = (o.double() - o_ref).abs().max().item()
        print(f"  {form:9s} vs float64 reference: max |error| {err:.2e}  (within the fp32 tolerance)")

    # sparse: the lightning indexer picks top-k keys per query, sparse attention reads only those
    sel = ua.rules.lightning_indexer
    print(f"selector {sel.name}: top-{sel.topk} of {sel.granularity}; generated scoring kernel: "
          f"{ua.codegen.selector.source_path(sel)}")
    Tq, HQ, D = 128, 4, 32
    qi, ki, w = (torch.randn(1, Tq, 2, 16, device=device), torch.randn(1, Tq, 16, device=device),
                 torch.rand(1, Tq, 2, device=device))
    idx = ua.ops.select(sel, topk=32, qi=qi, ki=ki, w=w)
    from unifattn.select import SelectConfig
    via_torch = ua.ops.select(sel, topk=32, qi=qi, ki=ki, w=w, config=SelectConfig(topk_impl="torch"))
    print(f"  the top-k kernel picks the same keys as torch.topk: {torch.equal(via_torch, idx)}")
    qs = torch.randn(1, Tq, HQ, D, device=device, requires_grad=True)
    ks, vs = (torch.randn(1, Tq, 1, D, device=device, requires_grad=True) for _ in range(2))
    o = ua.ops.sparse_attention(qs, ks, vs, idx)
    o.square().sum().backward()
    kept = (idx >= 0).sum(-1).float().mean().item()
    print(f"  selected {kept:.1f} keys per query on average (of {(Tq + 1) / 2:.1f} causal); "
          f"sparse attention out {tuple(o.shape)}, gradients for q, k, v: "
          f"{all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qs, ks, vs))}")
    # hybrid LM: 2 KDA layers : 1 sparse (lightning indexer) layer; trains with the reference form
    # of the linear layers (the generated kernels have no backward yet), infers with the chunk kernels
    torch.manual_seed(0)
    lm = ua.hybrid.HybridLM(16, "LLS", d_model=32, num_heads=2, num_kv_heads=1, linear_rule=ua.rules.kda,
                            linear_form="reference", topk=8, index_heads=2, index_dim=8).to(device)
    src = torch.randint(1, 16, (2, 12), device=device)
    tokens = torch.cat([src, torch.zeros_like(src[:, :1]), src], 1)          # copy task: a b c 0 a b c
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for step in range(5):
        logits, aux = lm(tokens[:, :-1], return_indexer_loss=True)
        loss = torch.nn.functional.cross_entropy(logits[:, 12:].reshape(-1, 16), tokens[:, 13:].reshape(-1))
        opt.zero_grad()
        (loss + aux).backward()                                               # aux: indexer distillation
        opt.step()
        if step in (0, 4):
            print(f"hybrid LM 'LLS' step {step}: copy loss {loss.item():.3f}, indexer loss {aux.item():.4f}")
    with torch.no_grad():
        err = (lm(tokens[:, :-1], linear_form="chunk") - lm(tokens[:, :-1])).abs().max().item()
    print(f"  chunk-kernel logits vs reference form: max |error| {err:.1e}")
    print("ok")


if __name__ == "__main__":
    main()
