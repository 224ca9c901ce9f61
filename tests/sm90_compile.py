"""Compile kernels for Hopper (sm_90) on a machine without a GPU: Triton's frontend, its NVIDIA
passes and the bundled ptxas run on the CPU. The interpreter runs kernels as numpy and accepts code
that the compiler rejects (a non-constexpr global, an op with no lowering); this catches that.

    python tests/sm90_compile.py [names...]     # run by tests/test_sm90_compile.py, without TRITON_INTERPRET

Prints one line per kernel variant and exits 1 if any fails to compile.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need the real JIT"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, pointers: dict, constexprs: dict, scalars: dict | None = None):
    """ASTSource signature of a @triton.jit function: pointers name -> '*dtype' (None: a None constexpr),
    constexprs name -> value, other parameters i32 unless scalars says otherwise."""
    while not isinstance(fn, JITFunction):    # through @triton.heuristics
        fn = fn.fn
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in pointers and pointers[name] is not None:
            sig[name] = pointers[name]
        elif name in pointers or name in constexprs:
            sig[name] = "constexpr"
            consts[name] = constexprs.get(name)
        else:
            sig[name] = (scalars or {}).get(name, "i32")
    for p in fn.params:                       # constexpr parameters left at their defaults
        if p.is_constexpr and p.name not in consts and p.name not in pointers and p.name not in constexprs:
            default = getattr(p, "default", None)
            if default is not None and default is not inspect.Parameter.empty:
                sig[p.name] = "constexpr"
                consts[p.name] = default
    return fn, sig, consts


PTXAS = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", p)
         for p in ("ptxas-blackwell", "ptxas")]


def ptxas_info(kernel) -> str:
    """ptxas' verdict on a compiled kernel for sm_90a: 'R regs, S B spilled'."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        for exe in PTXAS:
            out = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                 text=True)
            if out.returncode == 0:
                regs = re.search(r"Used (\d+) registers", out.stderr)
                spill = re.search(r"(\d+) bytes spill stores", out.stderr)
                return f"{regs.group(1) if regs else '?':>3} regs, {spill.group(1) if spill else '?':>4} B spilled"
        return "ptxas failed: " + out.stderr.strip().splitlines()[-1][:80]
    finally:
        os.unlink(f.name)


def compile_one(label, fn, pointers, constexprs, scalars=None, options=None, no_spills=False):
    """Compile one variant; no_spills: also fail it when ptxas spills registers (a register bound that
    is too tight for the kernel)."""
    fn, sig, consts = signature(fn, pointers, constexprs, scalars)
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET, options=options or {})
        info = ptxas_info(k) if no_spills else ""
        if no_spills and not re.search(r" 0 B spilled", info):
            print(f"FAIL  {label}: {info}", flush=True)
            return False
        print(f"ok    {label} ({time.perf_counter() - t0:.1f} s) {info}", flush=True)
        return True
    except Exception as exc:  # noqa: BLE001 - report every variant
        msg = str(exc).strip().splitlines()
        print(f"FAIL  {label}: {type(exc).__name__}: {' | '.join(msg[-6:])[:1500]}", flush=True)
        return False


def topk():
    """The top-k kernel as topk_rows launches it (kernels.topk.launch_params: warps, output step, register
    bound), none spilling: a row class whose register bound is too tight fails here."""
    from unifattn.kernels import topk as m
    ptr = {"src": "*fp32", "col_in": "*i32", "out": "*i32", "out_col": "*i32", "bblk": "*i32"}
    ok = []
    for W, ki, fin, group in ((m.MAX_ROW, False, True, 0), (m.MAX_ROW, False, True, m.GROUP),
                              (m.MAX_ROW, False, False, m.GROUP), (m.MAX_ROW, True, False, m.GROUP),
                              (8192, True, True, m.GROUP), (256, False, True, m.GROUP), (2048, False, True, m.GROUP),
                              (4096, False, True, m.GROUP), (6144, False, True, m.GROUP),
                              (8192, False, True, m.GROUP), (12288, False, True, m.GROUP),
                              (16384, False, True, m.GROUP), (16384, True, True, m.GROUP),
                              (20480, False, True, m.GROUP), (20480, True, True, m.GROUP),
                              (24576, True, True, m.GROUP)):
        const, opts = m.launch_params(W, ki, fin)
        ok.append(compile_one(f"topk_rows_kernel W={W} keys_in={ki} final={fin} group={group} {opts}",
                              m.topk_rows_kernel, {**ptr, "src": "*i32" if ki else "*fp32"},
                              dict(const, ASM=True, GROUP=group), options=opts, no_spills=True))
    return ok


def scan():
    from unifattn.kernels import checks as m
    ptr = {f"x{i}": f"*{dt}" for i, dt in enumerate(("fp32", "bf16", "fp16", "fp32", "bf16", "fp16", "fp32", "bf16"))}
    ptr["flags"] = "*i32"
    ranges = {f"R{i}": i % 3 for i in range(m.SLOTS)}
    return [compile_one(f"_scan_kernel {nt} tensors amax={amax}", m._scan_kernel,
                        {**ptr, **{f"x{i}": None for i in range(nt, m.SLOTS)}},
                        {**ranges, "NT": nt, "AMAX": amax, "BLOCK": m.BLOCK})
            for nt, amax in ((1, False), (5, True), (m.SLOTS, False), (m.SLOTS, True))] + \
        [compile_one(f"_index_scan_kernel block={n} bos={bos}", m._index_scan_kernel,
                     {"idx": "*i32", "bos": "*i32" if bos else None, "flags": "*i32"},
                     {"NBLK": n, "HAS_BOS": bos, "BLOCK": 1024}) for n, bos in ((1, False), (64, True))]


def intra():
    from unifattn.kernels import chunk_intra as m
    ok = []
    for gate, delta in ((2, False), (2, True), (1, True), (0, True)):
        for offdiag in ("blocks", "fused", "whole"):
            ptr = {"q": "*bf16", "k": "*bf16", "gc": "*fp32" if gate else None,
                   "beta": "*fp32" if delta else None, "Aqk": "*bf16" if gate == 2 else None,
                   "qg": "*bf16" if gate == 2 else None,
                   "Ai": "*bf16" if delta else None, "cu_seqlens": None, "chunk_indices": None}
            const = dict(H=4, HV=4, K=128, BT=64, BC=16, BK=64, GATE=gate, DELTA=delta, IS_VARLEN=False,
                         DOT_PREC="tf32", QG=gate == 2, OFFDIAG=offdiag)
            ok.append(compile_one(f"chunk_intra_kernel gate={gate} delta={delta} {offdiag}", m.chunk_intra_kernel,
                                  ptr, const))
    return ok


def state():
    """The state pass, whole and as two key halves, with and without kg."""
    from unifattn.kernels import chunk_state as m
    ok = []
    for gate, delta in ((1, True), (2, True), (2, False)):
        kg = gate == 2 and delta
        for variant in ({}, {"KSPLIT": True}):
            ptr = {"k": "*bf16", "v": "*bf16", "w": "*bf16" if delta else None, "gc": "*fp32" if gate else None,
                   "h": "*bf16", "v_new": "*bf16" if delta else None, "h0": "*fp32", "ht": "*fp32",
                   "cu_seqlens": "*i32", "chunk_offsets": "*i32"}
            const = dict(H=4, HV=8, K=128, V=128, BT=64, BK=128, BV=64, GATE=gate, DELTA=delta, USE_INITIAL_STATE=True,
                         STORE_FINAL_STATE=True, IS_VARLEN=True, DOT_PREC="tf32", KG=kg, **variant)
            ok.append(compile_one(f"chunk_state_kernel gate={gate} delta={delta} kg={kg} {variant or 'whole'}",
                                  m.chunk_state_kernel, ptr, const, options=dict(num_warps=4, num_stages=2)))
    return ok


def output():
    """The output kernel per gate; the per-channel gate with the intra kernel's qg."""
    from unifattn.kernels import chunk_state as m
    ok = []
    for gate in (0, 1, 2):
        ptr = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "gc": "*fp32" if gate else None, "h": "*bf16",
               "Aqk": "*bf16" if gate == 2 else None, "qg": "*bf16" if gate == 2 else None, "o": "*bf16",
               "cu_seqlens": "*i32", "chunk_indices": "*i32"}
        const = dict(H=4, HV=8, K=128, V=128, BT=64, BK=64, BV=64, GATE=gate, IS_VARLEN=True, DOT_PREC="tf32",
                     QG=gate == 2)
        ok.append(compile_one(f"chunk_output_kernel gate={gate}", m.chunk_output_kernel, ptr, const, {"scale": "fp32"},
                              options=dict(num_warps=4, num_stages=2)))
    return ok


def dplr():
    """The DPLR chunk kernels, and the state / output kernels with their DPLR terms."""
    from unifattn.kernels import chunk_dplr as m, chunk_state as s
    rows = {"cu_seqlens": "*i32", "chunk_indices": "*i32"}
    ok = [compile_one("chunk_dplr_intra_kernel", m.chunk_dplr_intra_kernel,
                      {"q": "*bf16", "k": "*bf16", "a": "*fp32", "b": "*fp32", "gc": "*fp32", "Aqk": "*bf16",
                       "Aqa": "*bf16", "Abk": "*bf16", "Aab": "*fp32", "Ai": "*bf16", "qg": "*bf16", **rows},
                      dict(H=4, HV=8, K=128, BT=m.CHUNK, BK=64, IS_VARLEN=True, DOT_PREC="tf32"),
                      options=dict(num_warps=4)),
          compile_one("chunk_dplr_wu_kernel", m.chunk_dplr_wu_kernel,
                      {"k": "*bf16", "v": "*bf16", "a": "*fp32", "b": "*fp32", "gc": "*fp32", "Abk": "*bf16",
                       "Ai": "*bf16", "w": "*bf16", "u": "*bf16", "ag": "*bf16", "kg": "*bf16", **rows},
                      dict(H=4, HV=8, K=128, V=128, BT=m.CHUNK, BK=64, BV=64, IS_VARLEN=True, DOT_PREC="tf32"),
                      options=dict(num_warps=4, num_stages=2))]
    for variant in ({}, {"KSPLIT": True}):
        ok.append(compile_one(f"chunk_state_kernel dplr {variant or 'whole'}", s.chunk_state_kernel,
                              {"k": "*bf16", "v": "*bf16", "w": "*bf16", "gc": "*fp32", "h": "*bf16", "v_new": "*bf16",
                               "h0": "*fp32", "ht": "*fp32", "k2": "*bf16", "v2": "*bf16", "cu_seqlens": "*i32",
                               "chunk_offsets": "*i32"},
                              dict(H=4, HV=8, K=128, V=128, BT=m.CHUNK, BK=128, BV=64, GATE=2, DELTA=True,
                                   USE_INITIAL_STATE=True, STORE_FINAL_STATE=True, IS_VARLEN=True, DOT_PREC="tf32",
                                   KG=True, DPLR=True, **variant), options=dict(num_warps=4, num_stages=2)))
    ok.append(compile_one("chunk_output_kernel dplr", s.chunk_output_kernel,
                          {"q": "*bf16", "k": "*bf16", "v": "*bf16", "gc": "*fp32", "h": "*bf16", "Aqk": "*bf16",
                           "qg": "*bf16", "A2": "*bf16", "v2": "*bf16", "o": "*bf16", **rows},
                          dict(H=4, HV=8, K=128, V=128, BT=m.CHUNK, BK=64, BV=64, GATE=2, IS_VARLEN=True,
                               DOT_PREC="tf32", QG=True, DPLR=True), {"scale": "fp32"},
                          options=dict(num_warps=4, num_stages=2)))
    return ok


def recurrent():
    """The generated recurrent kernel of every built-in rule (retnet, mamba2, dplr, ... included)."""
    import importlib.util

    import unifattn as ua
    from unifattn import codegen
    ok = []
    for name, r in ua.rules.BUILTIN.items():
        path = codegen.source_path(r, "recurrent")
        spec = importlib.util.spec_from_file_location(f"_sm90_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = next(v for k, v in vars(mod).items() if k.endswith("_recurrent_fwd"))
        tok = {s.name for s in r.inputs}
        ptr = {n: ("*bf16" if n in ("q", "k", "v") else "*fp32") for n in tok}
        ptr.update(o="*bf16", h0="*fp32", ht="*fp32", cu_seqlens=None)
        const = dict(BK=128, BV=16, USE_INITIAL=True, STORE_FINAL=True, IS_VARLEN=False)
        scal = {"scale": "fp32"}
        ok.append(compile_one(f"{name} recurrent", fn, ptr, const, scal))
    return ok


def prep():
    """The generated preparation kernel of every chunkable rule that has one (gates, activations)."""
    import importlib.util

    import unifattn as ua
    from unifattn import codegen
    from unifattn.dsl import check
    ok = []
    for name, r in ua.rules.BUILTIN.items():
        if "chunk" not in check(r).forms:
            continue
        path = codegen.source_path(r, "chunk")
        spec = importlib.util.spec_from_file_location(f"_sm90_chunk_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fns = [v for k, v in vars(mod).items() if k.endswith("_chunk_prep") and isinstance(v, JITFunction)]
        for fn in fns:
            ptr = {a: ("*bf16" if a in ("q", "k", "v") else "*fp32") for a in fn.arg_names
                   if a not in ("HV", "K", "V", "BK", "BV") and not a.startswith("H_")}
            ok.append(compile_one(f"{name} chunk prep", fn, ptr, dict(BK=128, BV=128)))
    return ok


def sparse():
    """Sparse attention forward and backward (token and block lists, varlen or not)."""
    from unifattn.kernels import sparse_kernels as sk
    meta = dict(HQ=64, HKV=4, G=16, K=128, V=128, BG=16, BK=128, BV=128, PREC="tf32", UPCAST=False, BS=64)
    ok = []
    for block, varlen in ((1, False), (64, True)):
        bos = "*i64" if varlen else None
        ok.append(compile_one(f"sparse_attn_fwd_kernel block={block} varlen={varlen}", sk.sparse_attn_fwd_kernel,
                              {"q": "*bf16", "k": "*bf16", "v": "*bf16", "indices": "*i32", "bos": bos,
                               "o": "*bf16", "lse": "*fp32"},
                              dict(meta, BLOCK=block, IS_VARLEN=varlen), {"scale": "fp32"}))
        ok.append(compile_one(f"sparse_attn_bwd_kernel block={block} varlen={varlen}", sk.sparse_attn_bwd_kernel,
                              {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "do": "*bf16", "lse": "*fp32",
                               "dlse": None, "indices": "*i32", "bos": bos, "dq": "*fp32", "dk": "*fp32",
                               "dv": "*fp32", "delta": "*fp32"},
                              dict(meta, BLOCK=block, IS_VARLEN=varlen, HAS_DLSE=False, DKV=block == 1),
                              {"scale": "fp32"}))
    return ok


def select():
    """The generated scoring kernels of both built-in selectors at the benchmark's shapes (the lightning
    indexer's loop over 16 heads; MoBA's GQA group loop), bf16 operands."""
    import unifattn as ua
    from unifattn.codegen import selector as cgs
    ok = []
    for name, sel, dims, G in (("lightning_indexer", ua.rules.lightning_indexer, {"DI": 64, "HI": 16}, 1),
                               ("moba", ua.rules.moba, {"D": 128}, 16)):
        fn = getattr(cgs.module(sel), cgs.kernel_name(sel))
        ptr = {f"{s.name}_ptr": "*bf16" for s in sel.inputs}
        ptr.update(o="*fp32", q_pos="*i32", q_bblk="*i32", flags="*i32")
        cfg = cgs.SelectConfig()
        const = dict(G=G, BLOCK=sel.block_size, NSINK=sel.n_sink, NLOCAL=sel.n_local, BT=cfg.block_t,
                     BS=cfg.block_s, PREC="tf32")
        for d, n in dims.items():
            const.update({f"NH_{d}": n} if d.startswith("H") else {f"D_{d}": n, f"BD_{d}": n})
        for warps, check, finite in ((cfg.num_warps, True, False), (cfg.num_warps, False, False),
                                     (cfg.num_warps, False, True), (8, True, False)):
            ok.append(compile_one(f"{name} score warps={warps} check={check} finite={finite}", fn, ptr,
                                  dict(const, CHECK=check, FINITE=finite),
                                  options=dict(num_warps=warps, num_stages=cfg.num_stages)))
    return ok


PARTS = {"topk": topk, "scan": scan, "intra": intra, "state": state, "output": output, "dplr": dplr,
         "recurrent": recurrent,
         "prep": prep, "sparse": sparse, "select": select}


def main():
    names = sys.argv[1:] or list(PARTS)
    results = [ok for n in names for ok in PARTS[n]()]
    print(f"{sum(results)} of {len(results)} kernel variants compile for sm_90")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
