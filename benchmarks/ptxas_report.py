"""Registers and spills of the chunk kernels' launch candidates on Hopper, without a GPU.

    python benchmarks/ptxas_report.py [dplr]   # TRITON_INTERPRET must be unset

Compiles each candidate of kernels/chunk_intra.py and kernels/chunk_state.py for sm_90 (Triton's
frontend and the bundled ptxas run on the CPU) at K = V = 128, bf16, chunk 64, and prints ptxas'
register count and spill bytes per class. A config that spills, or that holds 255 registers on 4
warps, is a poor candidate before any timing; the numbers come from this machine's Triton, which
may differ from the GPU's.
"""
from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from sm90_compile import ptxas_info, signature  # noqa: E402

from unifattn.kernels import chunk_intra, chunk_state  # noqa: E402

CLASSES = {"identity": (0, False), "scalar": (1, False), "diagonal": (2, False), "delta": (0, True),
           "scalar_delta": (1, True), "diagonal_delta": (2, True)}
def report(label, fn, pointers, constexprs, configs, scalars=None):
    for cfg in configs:
        kw = dict(constexprs, **cfg.kwargs)
        jit_fn, sig, consts = signature(fn, pointers, kw, scalars)
        try:
            k = triton.compile(ASTSource(jit_fn, sig, constexprs=consts),
                               target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            info = ptxas_info(k)
        except Exception as exc:  # noqa: BLE001
            info = f"compile failed: {type(exc).__name__}"
        print(f"  {label:28s} {str(cfg.kwargs):22s} w{cfg.num_warps} s{cfg.num_stages}: {info}", flush=True)


def sparse():
    """Sparse attention passes at the benchmark shape (G = 16, D = 128, bf16), around the defaults."""
    from triton import Config

    from unifattn.kernels import sparse_kernels as sk
    meta = dict(HQ=64, HKV=4, G=16, K=128, V=128, BG=16, BK=128, BV=128, PREC="tf32", UPCAST=False, IS_VARLEN=False)
    print("sparse attention (token top-k, block 1; G=16, D=128)")
    fwd_cfgs = [Config({"BS": bs}, num_warps=w, num_stages=st) for bs, w, st in ((64, 4, 2), (64, 8, 2), (32, 4, 2))]
    report("fwd", sk.sparse_attn_fwd_kernel,
           {"q": "*bf16", "k": "*bf16", "v": "*bf16", "indices": "*i32", "bos": None, "o": "*bf16", "lse": "*fp32"},
           dict(meta, BLOCK=1), fwd_cfgs, {"scale": "fp32"})
    bwd_cfgs = [Config({"BS": bs}, num_warps=w, num_stages=st) for bs, w, st in ((64, 4, 2), (64, 8, 2), (32, 4, 2))]
    report("bwd (dq + atomic dk, dv)", sk.sparse_attn_bwd_kernel,
           {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "do": "*bf16", "lse": "*fp32", "dlse": None,
            "indices": "*i32", "bos": None, "dq": "*fp32", "dk": "*fp32", "dv": "*fp32", "delta": "*fp32"},
           dict(meta, BLOCK=1, HAS_DLSE=False, DKV=True), bwd_cfgs, {"scale": "fp32"})


def dplr():
    """The DPLR intra and wu kernels (chunk 64, K = V = 128, bf16 q / k, fp32 a / b)."""
    from unifattn.kernels import chunk_dplr as m
    print("dplr")
    report("intra", m.chunk_dplr_intra_kernel,
           {"q": "*bf16", "k": "*bf16", "a": "*fp32", "b": "*fp32", "gc": "*fp32", "Aqk": "*bf16", "Aqa": "*bf16",
            "Abk": "*bf16", "Aab": "*fp32", "Ai": "*bf16", "qg": "*bf16", "cu_seqlens": None,
            "chunk_indices": None},
           dict(H=16, HV=16, K=128, BT=m.CHUNK, BK=64, IS_VARLEN=False, DOT_PREC="tf32"), m.INTRA_CONFIGS)
    report("wu", m.chunk_dplr_wu_kernel,
           {"k": "*bf16", "v": "*bf16", "a": "*fp32", "b": "*fp32", "gc": "*fp32", "Abk": "*bf16", "Ai": "*bf16",
            "w": "*bf16", "u": "*bf16", "ag": "*bf16", "kg": "*bf16", "cu_seqlens": None, "chunk_indices": None},
           dict(H=16, HV=16, K=128, V=128, BT=m.CHUNK, BK=64, IS_VARLEN=False, DOT_PREC="tf32"), m.WU_CONFIGS)


def main():
    if sys.argv[1:] == ["dplr"]:
        return dplr()
    sparse()
    dplr()
    for cls, (gate, delta) in CLASSES.items():
        print(cls)
        if gate == 2 or delta:
            report("intra", chunk_intra.chunk_intra_kernel,
                   {"q": "*bf16", "k": "*bf16", "gc": "*fp32" if gate else None, "beta": "*fp32" if delta else None,
                    "Aqk": "*bf16" if gate == 2 else None, "Ai": "*bf16" if delta else None,
                    "qg": "*bf16" if gate == 2 else None, "cu_seqlens": None,
                    "chunk_indices": None},
                   dict(H=16, HV=16, K=128, BT=64, BC=16, BK=64, GATE=gate, DELTA=delta, IS_VARLEN=False,
                        DOT_PREC="tf32", QG=gate == 2), chunk_intra.INTRA_CONFIGS)
        report("state", chunk_state.chunk_state_kernel,
               {"k": "*bf16", "v": "*bf16", "w": "*bf16" if delta else None, "gc": "*fp32" if gate else None,
                "h": "*bf16", "v_new": "*bf16" if delta else None, "h0": None, "ht": None, "cu_seqlens": None,
                "chunk_offsets": None},
               dict(H=16, HV=16, K=128, V=128, BT=64, BK=128, GATE=gate, DELTA=delta, USE_INITIAL_STATE=False,
                    STORE_FINAL_STATE=False, IS_VARLEN=False, DOT_PREC="tf32", KG=gate == 2 and delta),
               chunk_state.STATE_CONFIGS)
        report("output", chunk_state.chunk_output_kernel,
               {"q": "*bf16", "k": "*bf16", "v": "*bf16", "gc": "*fp32" if gate else None, "h": "*bf16",
                "Aqk": "*bf16" if gate == 2 else None, "qg": "*bf16" if gate == 2 else None, "o": "*bf16",
                "cu_seqlens": None, "chunk_indices": None},
               dict(H=16, HV=16, K=128, V=128, BT=64, BK=64, GATE=gate, IS_VARLEN=False, DOT_PREC="tf32",
                    QG=gate == 2),
               chunk_state.OUTPUT_CONFIGS, {"scale": "fp32"})


if __name__ == "__main__":
    main()
