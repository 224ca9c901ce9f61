"""A/B of the scoring kernel's NaN-score flag (CHECK, set in checked select() calls) on one GPU, one
process: the flag as a count over the whole [BT, BS] tile and a branch (`count`, session 12), as a
row max within each warp and one relaxed atomic per row that saw a NaN (`rowmax`, the template now),
or as a masked relaxed atomic per element (`elem`), beside no flag at all (`none`).

    python benchmarks/ab_nan_flag.py

The variants are the generated lightning-indexer module with the template's CHECK block swapped,
written to a temporary folder and imported side by side. Each must raise its flag on a NaN score and
leave it clear on finite ones (T = 2048); then the scoring kernel alone and the whole select
(check_inputs True and False) at T = 32768, top-2048, in the order A B C D A B C D.

H200, 2026-11-29 (session 13, call 5; torch 2.11, Triton 3.6), ms:

       flag  score ms  select ms  unchecked
       none     3.064        nan      9.313
      count     3.642     12.145      9.314
     rowmax     3.500     11.833      9.315
       elem     3.846     12.200      9.305
       none     3.091        nan      9.369
      count     3.623     11.943      9.316
     rowmax     3.496     11.594      9.316
       elem     3.848     12.225      9.316

The flag still costs ~0.43 ms of scoring; the rest of the checked call's extra ~2.3 ms is the host
sync that reads the verdicts (the GPU then idles while the host prepares the next call, ~1 ms of
Python and launches) and the input scan.
"""
from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ab_score_emission import import_sources  # noqa: E402
from bench_select import TOPK, bench, inputs  # noqa: E402

from unifattn.codegen import selector as cgs  # noqa: E402
from unifattn.select import _plan, _prepare, _run_tiles, select  # noqa: E402
from unifattn.selectors import lightning_indexer as li  # noqa: E402

FLAG = {
    "count": """
            n_nan = tl.sum(tl.sum(m_nan.to(tl.int32), 1), 0)
            if n_nan > 0:
                tl.atomic_or(flags, 1)
""",
    "elem": """
            tl.atomic_or(flags + tl.zeros([BT, BS], dtype=tl.int32), 1, mask=m_nan, sem="relaxed")
""",
}


def variants():
    text = cgs.source(li)
    a = text.index("            m_nan = ")
    a = text.index("\n", a) + 1
    b = text.index("    # unchecked, NaN ranks lowest")
    texts = {"rowmax": text}
    for tag, block in FLAG.items():
        texts[tag] = text[:a] + block.lstrip("\n") + text[b:]
    return import_sources(texts, "ab_flag")


def main():
    mods = variants()
    real = cgs.module

    def use(tag):
        cgs.module = lambda sel: mods[tag] if sel is li else real(sel)

    def scoring(x, flag):
        p, _ = _prepare(li, x, None, TOPK)
        return lambda: _run_tiles(li, p, _plan(li, p, None), lambda *a: None, flag)
    x = inputs(2048, seed=3)
    for tag in mods:                             # the flag: clear on finite scores, set on a NaN one
        use(tag)
        f = torch.zeros(1, dtype=torch.int32, device="cuda")
        scoring(x, f)()
        torch.cuda.synchronize()
        assert int(f) == 0, f"{tag}: flag set on finite scores"
        xn = {k: v.clone() for k, v in x.items()}
        xn["w"][0, 1000, 0] = float("inf")              # a head weight: inf * relu(dot <= 0) = NaN
        p, _ = _prepare(li, xn, None, TOPK, check_inputs=False)
        _run_tiles(li, p, _plan(li, p, None), lambda *a: None, f)
        torch.cuda.synchronize()
        assert int(f) == 1, f"{tag}: flag clear on a NaN score"
    print("flags at T=2048: right in every variant")
    x = inputs(32768)
    rows = []
    for tag in ["none", "count", "rowmax", "elem"] * 2:
        use("rowmax" if tag == "none" else tag)
        flag = None if tag == "none" else torch.zeros(1, dtype=torch.int32, device="cuda")
        s_ms = bench(scoring(x, flag))
        c_ms = bench(lambda: select(li, topk=TOPK, **x)) if tag != "none" else float("nan")
        u_ms = bench(lambda: select(li, topk=TOPK, check_inputs=False, **x))
        rows.append((tag, s_ms, c_ms, u_ms))
        print(f"  {rows[-1]}", flush=True)
    cgs.module = real
    print(f"\n{'flag':>7} {'score ms':>9} {'select ms':>10} {'unchecked':>10}")
    for tag, s_ms, c_ms, u_ms in rows:
        print(f"{tag:>7} {s_ms:>9.3f} {c_ms:>10.3f} {u_ms:>10.3f}")


if __name__ == "__main__":
    main()
