"""Built-in selectors: how a query scores keys for sparse top-k attention (ALGORITHMS.md §5).

Run one with unifattn.select.select(selector, **inputs) -> int32 indices [B, T, HKV, topk],
then unifattn.kernels.sparse_attention with those indices (block_size=n for block selectors).
"""
from unifattn.dsl.selector import Heads, Vec, block, local, relu, selector, sum_heads


@selector(topk=2048, granularity="token")
def lightning_indexer(qi: Heads["HI", "DI"], ki: Vec["DI"], w: Heads["HI"]):
    """DeepSeek Sparse Attention indexer (V3.2-Exp): I_ts = sum_j w_tj relu(q_tj . k_s).

    qi [B, T, HI, DI] indexer queries, ki [B, T, DI] one indexer key per token shared
    by all heads, w [B, T, HI] per-token head weights -> one index list [B, T, 1, 2048]
    shared by every attention head (MQA mode).
    """
    return sum_heads(w * relu(qi @ ki))


@selector(topk=16, granularity=block(64), always=(local(1),))
def moba(q: Vec["D"], kmean: Vec["D"]):
    """MoBA (2502.13189): score of block j is q . mean(K_block j); top 16 blocks of 64 keys,
    the query's own block always kept (and causally masked by the attention kernel).

    q [B, T, HQ, D] the attention queries, kmean=k [B, T, HKV, D] the keys (mean-pooled per
    block by the op) -> block indices [B, T, HKV, 16]; the HQ // HKV query heads of a KV
    group share one list (their scores are summed).
    """
    return q @ kmean


BUILTIN = {s.name: s for s in (lightning_indexer, moba)}

__all__ = list(BUILTIN)
