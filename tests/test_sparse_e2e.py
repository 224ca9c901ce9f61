"""Both built-in selectors end to end: select -> sparse attention -> gradients, vs a dense float64 reference."""
import pytest
import torch

import unifattn as ua
from unifattn.kernels.utils import poisoned
from unifattn.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the CPU through TRITON_INTERPRET=1


def dense_masked(q, k, v, idx, block_size):
    """float64 softmax attention restricted to the selected keys (and causal)."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    mask = torch.zeros(B, HKV, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(HKV):
            for t in range(T):
                for j in idx[b, t, h].tolist():
                    if j < 0:
                        continue
                    lo, hi = (j, j + 1) if block_size in (None, 1) else (j * block_size, (j + 1) * block_size)
                    mask[b, h, t, lo:min(hi, t + 1)] = True
    mask = mask.repeat_interleave(G, dim=1)
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(G, dim=1), vd.repeat_interleave(G, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vd).transpose(1, 2)


@pytest.mark.parametrize("which", ["lightning_indexer", "moba"])
def test_select_then_sparse_attention_with_gradients(which):
    torch.manual_seed(0)
    B, T, HQ, HKV, D = 1, 96, 4, 2, 32
    q, k, v = (torch.randn(B, T, h, D).to(DEVICE) for h in (HQ, HKV, HKV))
    if which == "lightning_indexer":
        qi, ki, w = (x.to(DEVICE) for x in (torch.randn(B, T, 2, 16), torch.randn(B, T, 16), torch.rand(B, T, 2)))
        idx = ua.ops.select(ua.rules.lightning_indexer, topk=24, qi=qi, ki=ki, w=w)
        idx = idx.expand(B, T, HKV, 24).contiguous()      # one index list shared by every KV head
        block = None
    else:
        idx = ua.ops.select(ua.rules.moba, topk=2, q=q, kmean=k)
        block = 64
    assert idx.dtype == torch.int32
    ref = [x.cpu().double().requires_grad_(True) for x in (q, k, v)]
    o_ref = dense_masked(*ref, idx.cpu(), block)
    do = torch.randn_like(o_ref)
    (o_ref * do).sum().backward()
    ours = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with poisoned():
        o = ua.ops.sparse_attention(*ours, idx, block_size=block)
        (o * do.float().to(DEVICE)).sum().backward()
    assert_close(o, o_ref, torch.float32, f"{which} output")
    for name, a, b in zip("qkv", ours, ref):
        assert_close(a.grad, b.grad, torch.float32, f"{which} d{name}")
