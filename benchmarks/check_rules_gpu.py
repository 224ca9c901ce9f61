"""Every built-in rule, in every form the checker gives it, against the float64 reference on a GPU.

    python benchmarks/check_rules_gpu.py [--shard I/N] [--rules NAME ...]   # part `rules` of benchmarks/h200.sh

The CPU suite runs the same comparisons under the Triton interpreter at small shapes; this runs
them compiled for the GPU at shapes that use whole tiles and ragged chunks (K = V = 64 and 128,
T = 1, 200 and 1000 with an initial state, varlen, grouped value heads), in fp32, bf16 and fp16
(tolerances from the one table, outputs NaN-poisoned before the launch). Prints one line per
case and a summary; exits 1 when any case fails. `--shard I/N` takes every N-th rule from the I-th
(h200.sh runs N processes side by side: compiling is CPU work, and the machine has 16 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import unifattn as ua
from unifattn.dsl import check
from unifattn.testing import assert_matches_reference, make_inputs

CASES = [  # (B, T, H, HV, K, V, initial_state, cu_seqlens)
    (2, 1, 2, 2, 64, 64, True, None),
    (2, 200, 2, 4, 64, 64, True, None),
    (1, 1000, 2, 2, 128, 128, True, None),
    (1, 1000, 2, 2, 128, 128, False, [0, 1, 300, 300, 1000]),
]


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", default="0/1", help="I/N: every N-th rule from the I-th")
    ap.add_argument("--rules", nargs="*", help="only these rules")
    ap.add_argument("--forms", nargs="*", default=["chunk", "recurrent"], help="only these forms")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"], help="only these dtypes")
    a = ap.parse_args()
    shard, shards = (int(x) for x in a.shard.split("/"))
    os.environ.setdefault("UNIFATTN_CACHE_DIR", tempfile.mkdtemp())
    failed = []
    n = 0
    chosen = [(n, r) for n, r in ua.rules.BUILTIN.items() if not a.rules or n in a.rules]
    for name, r in chosen[shard::shards]:
        for form in [f for f in ("chunk", "recurrent") if f in check(r).forms and f in a.forms]:
            for dtype in [getattr(torch, d) for d in a.dtypes]:
                for i, (B, T, H, HV, K, V, h0, cu) in enumerate(CASES):
                    case = make_inputs(r, B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, device="cuda", seed=i,
                                       initial_state=h0, cu_seqlens=cu)
                    n += 1
                    try:
                        assert_matches_reference(r, form=form, scale=K ** -0.5, **case)
                        status = "ok"
                    except Exception as exc:  # noqa: BLE001 - report every case, then fail
                        status = f"FAIL {type(exc).__name__}: {str(exc)[:300]}"
                        failed.append((name, form, dtype, i))
                    print(f"{name:17s} {form:9s} {str(dtype):15s} case {i}: {status}", flush=True)
    print(f"\n{n - len(failed)} of {n} cases match the float64 reference"
          + ("" if not failed else f"; failed: {failed}"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
