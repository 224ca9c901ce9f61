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
        return f"{r.name}_recurrent_fwd", recurrent.emit(r, facts, digest), digest
    if form == "chunk":
        require_chunk(r, facts)
        from . import chunk
        digest = cache.key(r.ir_text(), chunk.TEMPLATE_VERSION, form)
        return f"{r.name}_chunk_fwd", chunk.emit(r, facts, digest), digest
    raise ValueError(f"form: expected one of {FORMS}; got {form!r}. Fix: use form='chunk' or 'recurrent'")


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
