"""IR + checker Facts -> kernel plan -> Triton source text -> cached module.

    source_path(rule, form) -> Path of the generated file (written if missing)
    module(rule, form)      -> the imported generated module
"""
from __future__ import annotations

import weakref
from pathlib import Path

from . import cache

FORMS = ("chunk", "recurrent")


def _emit(r, form: str) -> tuple[str, str]:
    """(file stem, source text) for a rule's form; deterministic for a given IR."""
    from unifattn.dsl import check
    from unifattn.dsl.checker import require_chunk
    facts = check(r)
    if form == "recurrent":
        from . import recurrent
        digest = cache.key(r.ir_text(), recurrent.TEMPLATE_VERSION, form)
        return f"{r.name}_recurrent_fwd", _names_free(r, form, recurrent.emit(r, facts, digest)), digest
    if form == "chunk":
        require_chunk(r, facts)
        from . import chunk
        digest = cache.key(r.ir_text(), chunk.TEMPLATE_VERSION, form)
        return f"{r.name}_chunk_fwd", _names_free(r, form, chunk.emit(r, facts, digest)), digest
    raise ValueError(f"form: expected one of {FORMS}; got {form!r}. Fix: use form='chunk' or 'recurrent'")


def _names_free(r, form: str, text: str) -> str:
    """text, once sure that no input name of r is also a name of the generated code's own. An input becomes a
    kernel parameter of its name: one that the template also declares (o, T, K, V, HV, BK, ...) is a
    duplicate argument, one that it assigns (i_t, bos, ...) or uses as a module (tl) is overwritten, and the
    kernel would fail or read the wrong memory. A RuleError instead, naming the input. The built-in rules'
    kernels are unchanged: the check only reads the text."""
    import ast
    import re

    from unifattn.dsl.errors import RuleError
    inputs = {s.name for s in r.inputs}
    clash = set()
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        found = re.search(r"duplicate argument '(\w+)'", str(exc))
        if not found or found.group(1) not in inputs:
            raise
        clash.add(found.group(1))
        tree = None
    if tree is not None:
        top = {a.asname or a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names}
        top |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        top |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            params = [a.arg for a in fn.args.args]
            jit = any("jit" in ast.unparse(d) for d in fn.decorator_list)
            names = [n for n in ast.walk(fn) if isinstance(n, ast.Name)]
            stored = {n.id for n in names if isinstance(n.ctx, ast.Store)}
            loaded = {n.id for n in names if isinstance(n.ctx, ast.Load)}
            # a kernel parameter the kernel also assigns, or one that hides a module-level name (tl, triton, a
            # helper) the function uses; a host function may reassign its own parameters (x = x.float())
            clash |= {p for p in params if p in inputs and (params.count(p) > 1 or (p in top and p in loaded)
                                                          or (jit and p in stored))}
    if clash:
        first = sorted(clash)[0]
        raise RuleError(r.name, r.where, f"input names other than the names inside its generated {form} kernel",
                        f"{', '.join(sorted(clash))}: the kernel would declare or assign them twice and read the "
                        "wrong values", f"rename the input(s), e.g. {first} -> {first}_in (form='reference' runs "
                        "the rule as written)")
    return text


def source(r, form: str) -> str:
    """The generated source text (not written)."""
    return _emit(r, form)[1]


def source_path(r, form: str) -> Path:
    """Where the generated file for (rule, form) lives; generated and written atomically if missing."""
    stem, text, digest = _emit(r, form)
    path = cache.path_for(stem, digest)
    if not path.exists() or path.read_text() != text:
        cache.write(path, text)
    return path


_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # rule -> {form: module}


def module(r, form: str):
    """The imported generated module of (rule, form), built on first use."""
    forms = _LOADED.setdefault(r, {})
    if form not in forms:
        forms[form] = cache.load(source_path(r, form))
    return forms[form]
