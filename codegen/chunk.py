"""Emit the chunk form of a rule: a generated preparation kernel + the shared chunk pipeline.

The checker reduced the rule to its class template: o = S^T query, S' = A S +
key value^T with A built from log_gate and beta (Facts). The chunkwise
algorithm of each class is written once, in unifattn.kernels.chunk, specialised
by compile-time flags (GATE none / scalar / diagonal, DELTA). What is specific
to a rule is the element-wise code that turns the raw inputs into query, key,
value, log_gate and beta (gate parameterizations, activations, l2norm); that
code is printed here from the Facts into one `<rule>_chunk_prep` kernel. Facts
that are raw inputs are passed through with no copy.

The plan (networkx DAG of stages with the bytes between them) gives the launch
order written into the file's header and run by `forward`.
"""
from __future__ import annotations

import networkx as nx

from unifattn.dsl import ir
from unifattn.dsl.checker import Facts
from unifattn.dsl.rule import Rule

from .printer import Printer
from .recurrent import header

TEMPLATE_VERSION = "chunk-5"
FACTS = ("query", "key", "value", "log_gate", "beta", "lowrank_a", "lowrank_b")


def fact_nodes(facts: Facts) -> dict[str, ir.Node]:
    """The facts the chunk form reads, by name (dplr's low-rank pair A = Diag(exp g) + a b^T as lowrank_a, _b)."""
    out = {f: getattr(facts, f) for f in FACTS[:5]}
    a, b = facts.lowrank or (None, None)
    out.update(lowrank_a=a, lowrank_b=b)
    return {f: n for f, n in out.items() if n is not None}


def plan(facts: Facts, computed: list[str]) -> nx.DiGraph:
    """Stages of the chunk forward (as the shared pipeline declares them) and the tensors between them."""
    from unifattn.kernels.chunk import chunk_stages
    from unifattn.kernels.chunk_dplr import dplr_stages
    g = nx.DiGraph()
    src = "prep" if computed else "inputs"
    g.add_node(src, tensors="q, k, v, g, a, b" if facts.transition == "dplr" else "q, k, v, g, beta")
    stages = dplr_stages() if facts.transition == "dplr" else chunk_stages(facts.gate, facts.delta)
    for stage, reads in stages.items():
        g.add_node(stage)
        g.add_edge(src, stage)
        for dep, tensors in reads.items():
            g.add_edge(dep, stage, tensors=tensors)
    return g


def launch_order(g: nx.DiGraph) -> list[str]:
    """Kernel launch order: a deterministic topological order of the plan."""
    return list(nx.lexicographical_topological_sort(g, key=lambda n: ("prep", "inputs", "cumsum", "intra", "wu",
                                                                      "state", "output").index(n)))


def _raw(node: ir.Node | None) -> str | None:
    return node.name if node is not None and node.op == "input" else None


def emit(r: Rule, facts: Facts, digest: str) -> str:
    K, V = r.state_dims
    dims = {K: ("o_k", "m_k", "K"), V: ("o_v", "m_v", "V")}
    nodes = fact_nodes(facts)
    computed = [f for f in FACTS if f in nodes and _raw(nodes[f]) is None]
    order = launch_order(plan(facts, computed))
    raw = {f: _raw(nodes[f]) for f in FACTS if f in nodes and _raw(nodes[f]) is not None}
    text = header(r, facts, "chunk", "fwd", digest, " -> ".join(order))
    text += "\nimport torch\nimport triton\nimport triton.language as tl\n\n"
    dplr = facts.transition == "dplr"          # its own pipeline; the six affine classes share chunk_fwd
    pipeline = "chunk_dplr import chunk_dplr_fwd" if dplr else "chunk import chunk_fwd"
    text += f"from unifattn.kernels.{pipeline}\nfrom unifattn.kernels.utils import empty\n\n"
    if not dplr:
        text += f"GATE = {facts.gate!r}\nDELTA = {facts.delta}\n"
    text += f"COMPUTED = {tuple(computed)!r}\nRAW = {raw!r}\n"
    text += f"PLAN = {tuple(s for s in order if s not in ('prep', 'inputs'))!r}   # launch order of the stages\n"
    if computed:
        text += "\n\n" + _prep_kernel(r, facts, computed, dims)
    text += "\n\n" + _forward(r, facts, computed)
    return text


def _prep_kernel(r: Rule, facts: Facts, computed: list[str], dims) -> str:
    nodes = fact_nodes(facts)
    roots = [nodes[f] for f in computed]
    used = {n.name: n for n in ir.walk(roots) if n.op in ("input", "param")}
    specs = [s for s in r.inputs if s.name in used]
    names: dict[int, str] = {}
    lines = []
    for s in specs:
        n = used[s.name]
        names[id(n)] = f"b_{s.name}"
        if s.kind == "param":
            off = "i_hv" if not s.shape else f"i_hv * {dims[s.shape[0]][2]} + {dims[s.shape[0]][0]}"
            mask = "" if not s.shape else f", mask={dims[s.shape[0]][1]}, other=0.0"
        else:
            head = f"(i_t * H_{s.name} + i_hv // (HV // H_{s.name}))"
            off = head if not s.shape else f"{head} * {dims[s.shape[0]][2]} + {dims[s.shape[0]][0]}"
            mask = "" if not s.shape else f", mask={dims[s.shape[0]][1]}, other=0.0"
        lines.append(f"b_{s.name} = tl.load({s.name} + {off}{mask}).to(tl.float32)")
    # statements of the rule that feed the facts keep their names (b_dt, b_g, ...)
    # loads of vectors are masked (0 in the padding lanes); statements are not, the stores are
    pr = Printer(names, [id(used[s.name]) for s in specs if s.shape], {d: m for d, (_, m, _) in dims.items()})
    wanted = {id(n) for n in ir.walk(roots)}
    for st in r.statements:
        if id(st.node) in wanted and id(st.node) not in names and not ir.depends_on_state(st.node):
            lines.append(f"# line {st.line}: {st.source}")
            lines.append(f"b_{st.target} = {pr(st.node)}")
            names[id(st.node)] = f"b_{st.target}"
    for f in computed:
        node = nodes[f]
        expr = pr(node)
        if node.shape:
            o_d, m_d, D = dims[node.shape[0]]
            lines.append(f"# {f}: {ir.to_text(node)}")
            lines.append(f"tl.store(out_{f} + (i_t * HV + i_hv) * {D} + {o_d}, "
                         f"({expr}).to(out_{f}.dtype.element_ty), mask={m_d})")
        else:
            lines.append(f"# {f}: {ir.to_text(node)}")
            lines.append(f"tl.store(out_{f} + i_t * HV + i_hv, {expr})")
    tok = [s for s in specs if s.kind == "token"]
    args = ", ".join(s.name for s in specs)
    if args:                 # no input pointers when the facts read no input (a constant decay or beta)
        args = f"\n    {args},          # raw inputs: token [B * T, heads, *], params [HV, *]"
    outs = ", ".join(f"out_{f}" for f in computed)
    heads = "".join(f"H_{s.name}, " for s in tok)
    body = "\n".join("    " + ln for ln in lines)
    return f'''@triton.jit
def {r.name}_chunk_prep({args}
    {outs},          # prepared facts [B * T, HV, *]
    {heads}HV, K, V, BK: tl.constexpr, BV: tl.constexpr,
):
    """One program per (token, value head): the rule's element-wise preprocessing."""
    i_t, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
{body}
'''


def _forward(r: Rule, facts: Facts, computed: list[str]) -> str:
    nodes = fact_nodes(facts)
    roots = [nodes[f] for f in computed]
    used = {n.name for n in ir.walk(roots) if n.op in ("input", "param")}
    specs = [s for s in r.inputs if s.name in used]
    tok = [s for s in specs if s.kind == "token"]
    alloc = []
    for f in computed:
        node = nodes[f]
        if node.shape:
            d = "K" if node.shape[0] == r.state_dims[0] else "V"
            dt = "torch.float32" if f in ("log_gate", "beta", "lowrank_a", "lowrank_b") else "dtype"
            alloc.append(f"prep[{f!r}] = empty((B, T, HV, {d}), {dt}, device)")
        else:
            alloc.append(f"prep[{f!r}] = empty((B, T, HV), torch.float32, device)")
    launch = ""
    ins = ", ".join(f"x[{s.name!r}]" for s in specs)
    if ins:                  # none when the facts read no input (a constant decay or beta)
        ins = f"\n            {ins},"
    if computed:
        launch = f'''    if B * T:
        {r.name}_chunk_prep[(B * T, HV)]({ins}
            {", ".join(f"prep[{f!r}]" for f in computed)},
            {"".join(f"heads[{s.name!r}], " for s in tok)}HV, K, V,
            BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V), num_warps=1)
'''
    al = "\n".join("    " + a for a in alloc)
    return f'''def forward(x, heads, B, T, H, HV, K, V, scale, initial_state, output_final_state, cu_seqlens, tune=False):
    """Prepare the facts from the raw inputs x, then run the shared chunk pipeline."""
    device, dtype = x["q"].device, x["q"].dtype
    prep = {{f: x[name] for f, name in RAW.items()}}
{al}
{launch}    q, k = prep["query"], prep["key"]
    if q.shape[2] != k.shape[2]:          # one side became per value head: bring both to HV
        q = q.repeat_interleave(HV // q.shape[2], dim=2) if q.shape[2] != HV else q
        k = k.repeat_interleave(HV // k.shape[2], dim=2) if k.shape[2] != HV else k
    v = prep["value"]
    if v.shape[2] != HV:
        v = v.repeat_interleave(HV // v.shape[2], dim=2)
{_call(facts)}


def _per_value_head(x, HV, K=None):
    """x [B, T, heads(, K)] as fp32 [B, T, HV(, K)]; with K, a per-head scalar becomes one per channel."""
    if x is None:
        return None
    x = x.float()
    x = x.repeat_interleave(HV // x.shape[2], dim=2) if x.shape[2] != HV else x
    return x[..., None].expand(*x.shape, K).contiguous() if K is not None and x.dim() == 3 else x
'''


def _call(facts: Facts) -> str:
    """The generated forward's last lines: the pipeline call for the rule's class."""
    if facts.transition == "dplr":
        return '''    g = _per_value_head(prep.get("log_gate"), HV, K)   # per channel (a scalar gate is repeated)
    a, b = _per_value_head(prep["lowrank_a"], HV), _per_value_head(prep["lowrank_b"], HV)
    return chunk_dplr_fwd(q, k, v.to(dtype), a, b, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, tune=tune, stages=PLAN)'''
    return '''    g, beta = prep.get("log_gate"), prep.get("beta")
    g = _per_value_head(g, HV)
    beta = _per_value_head(beta, HV)
    return chunk_fwd(q, k, v.to(dtype), g, beta, gate=GATE, delta=DELTA, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                     tune=tune, stages=PLAN)'''


def run_chunk(mod, r: Rule, facts: Facts, full: dict, d, scale, initial_state, output_final_state, cu_seqlens,
              tune=False):
    x = {n: (t if t.is_contiguous() else t.contiguous()) for n, t in full.items()}
    heads = {s.name: x[s.name].shape[2] for s in r.inputs if s.kind == "token"}
    return mod.forward(x, heads, d.B, d.T, d.H, d.HV, d.K, d.V, scale, initial_state, output_final_state, cu_seqlens,
                       tune=tune)
