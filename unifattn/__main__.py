"""python -m unifattn show RULE | list: what the checker knows about a rule or selector."""
from __future__ import annotations

import argparse
import sys


def show_selector(sel) -> int:
    from unifattn.codegen.selector import source_path
    print(f"selector {sel.name}  ({sel.where})")
    if sel.doc:
        print(f"  {sel.doc.splitlines()[0]}")
    print("\n" + "\n".join("  " + ln for ln in sel.source.rstrip().splitlines()) + "\n")
    gran = "token" if sel.block_size == 1 else f"block({sel.block_size})"
    print(f"top-k            : {sel.topk} per query, granularity {gran}, causal")
    print(f"always kept      : {', '.join(map(repr, sel.always)) or 'nothing'}")
    print(f"inputs           : {', '.join(map(repr, sel.inputs))}")
    print("output           : int32 indices [B, T, HKV, topk], ascending, -1 padded")
    print(f"generated scoring: {source_path(sel)}")
    return 0


def show(name: str) -> int:
    import unifattn as ua
    from unifattn.dsl import check
    if name in ua.rules.SELECTORS:
        return show_selector(ua.rules.SELECTORS[name])
    r = ua.rules.BUILTIN.get(name)
    if r is None:
        print(f"unknown rule {name!r}; built-in rules: {', '.join(ua.rules.BUILTIN)}; "
              f"selectors: {', '.join(ua.rules.SELECTORS)}", file=sys.stderr)
        return 2
    f = check(r)
    print(f"rule {r.name}  ({r.where})")
    if r.doc:
        print(f"  {r.doc.splitlines()[0]}")
    print("\n" + "\n".join("  " + ln for ln in r.source.rstrip().splitlines()) + "\n")
    print(f"transition class : {f.transition}")
    print(f"inputs           : {', '.join(map(repr, r.inputs))}")
    print(f"shapes           : q, k [B, T, H, {r.state_dims[0]}]; v [B, T, HV, {r.state_dims[1]}]; "
          f"state [N, HV, {r.state_dims[0]}, {r.state_dims[1]}] float32")
    for key in ("query", "key", "value", "log_gate", "beta"):
        node = getattr(f, key)
        if node is not None:
            print(f"{key:17s}: {node!r}")
    if f.lowrank is not None:
        print(f"low rank a, b    : {f.lowrank[0]!r}, {f.lowrank[1]!r}")
    for k, v in f.bounds.items():
        print(f"bound            : {k}: {v}")
    for p in f.proofs:
        print(f"proof            : {p}")
    print(f"forms            : reference, {', '.join(f.forms)}" + (f"  ({f.reason})" if f.reason else ""))
    try:
        from unifattn.codegen import source_path
        for form in f.forms:
            print(f"generated {form:9s}: {source_path(r, form)}")
    except ImportError:
        pass
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unifattn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print a rule, its transition class, shapes, bounds and kernel forms")
    s.add_argument("rule")
    sub.add_parser("list", help="list the built-in rules (with their classes) and selectors")
    a = p.parse_args(argv)
    if a.cmd == "show":
        return show(a.rule)
    import unifattn as ua
    from unifattn.dsl import check
    for name, r in ua.rules.BUILTIN.items():
        print(f"{name:18s} {check(r).transition}")
    for name, sel in ua.rules.SELECTORS.items():
        gran = "token" if sel.block_size == 1 else f"block({sel.block_size})"
        print(f"{name:18s} selector, top-{sel.topk} {gran}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
