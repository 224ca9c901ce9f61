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
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            params = [a.arg for a in fn.args.args]
            stored = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            modules = {n.value.id for n in ast.walk(fn)
                       if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
            clash |= {p for p in params if p in inputs and (p in stored or p in modules or params.count(p) > 1)}
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
