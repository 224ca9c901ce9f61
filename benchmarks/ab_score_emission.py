"""A/B of the scoring kernel's two emissions on one GPU, one process: the lightning indexer's head
sum added straight into the program's accumulator (`direct`, the emitter's default since session 12)
against a separate per-G head-sum tile added afterwards (`bsum`, the emission before).

    python benchmarks/ab_score_emission.py

Both modules are generated from the same selector (the second with the root shortcut turned off),
written to a temporary folder and imported side by side; their scores must agree bit for bit at
T = 2048 (G = 1: the same additions in the same order). Then the scoring kernel alone and the whole
select (check_inputs=False) at T = 32768, top-2048, in the order A B A B per config.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_select import TOPK, bench, inputs, scoring_only  # noqa: E402

from unifattn.codegen import selector as cgs  # noqa: E402
from unifattn.select import select, select_scores  # noqa: E402
from unifattn.selectors import lightning_indexer as li  # noqa: E402


def emissions():
    texts = {"direct": cgs.source(li)}
    init = cgs._Emitter.__init__

    def no_root(self, sel):
        init(self, sel)
        self.root = None
    cgs._Emitter.__init__ = no_root
    try:
        texts["bsum"] = cgs.source(li)
    finally:
        cgs._Emitter.__init__ = init
    assert texts["direct"] != texts["bsum"], "the two emissions should differ"
    return import_sources(texts, "ab")


def import_sources(texts: dict, prefix: str) -> dict:
    """tag -> generated module text  ->  tag -> the module, written to a temporary folder and imported
    side by side (the A/B scripts' variants of one generated kernel)."""
    d = pathlib.Path(tempfile.mkdtemp())
    mods = {}
    for tag, text in texts.items():
        name = f"{prefix}_{tag}"
        p = d / f"{name}.py"
        p.write_text(text)
        spec = importlib.util.spec_from_file_location(name, p)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
        mods[tag] = m
    return mods


def main():
    mods = emissions()
    real = cgs.module

    def use(tag):
        cgs.module = lambda sel: mods[tag] if sel is li else real(sel)
    x = inputs(2048, seed=3)
    got = {}
    for tag in mods:
        use(tag)
        got[tag] = select_scores(li, **x)
    assert torch.equal(got["direct"], got["bsum"]), "the emissions disagree"
    print("scores at T=2048: identical")
    x = inputs(32768)
    rows = []
    for cfg in [cgs.SelectConfig(), cgs.SelectConfig(block_s=128), cgs.SelectConfig(block_s=128, num_stages=3)]:
        for tag in ["direct", "bsum", "direct", "bsum"]:
            use(tag)
            s_ms = bench(scoring_only(x, cfg))
            u_ms = bench(lambda: select(li, topk=TOPK, config=cfg, check_inputs=False, **x))
            rows.append((cfg.block_t, cfg.block_s, cfg.num_warps, cfg.num_stages, tag, s_ms, u_ms))
            print(f"  {rows[-1]}", flush=True)
    cgs.module = real
    print(f"\n{'BT':>4} {'BS':>4} {'warps':>5} {'stages':>6} {'emission':>8} {'score ms':>9} {'select unchecked':>17}")
    for bt, bs, w, st, tag, s_ms, u_ms in rows:
        print(f"{bt:>4} {bs:>4} {w:>5} {st:>6} {tag:>8} {s_ms:>9.3f} {u_ms:>17.3f}")


if __name__ == "__main__":
    main()
