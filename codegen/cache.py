"""Generated sources on disk: keyed by content, written atomically, imported by path.

Path: $UNIFATTN_CACHE_DIR (default ~/.cache/unifattn) / <rule>_<form>_<pass>_<hash12>.py.
The hash covers the rule's IR text, the template text and CODEGEN_VERSION, so
any change to what would be emitted gives a new file; two processes writing
the same file write identical bytes through tempfile + os.replace, so a reader
never sees a partial file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

CODEGEN_VERSION = "1"

_MODULES: dict[str, object] = {}


def cache_dir() -> Path:
    d = os.environ.get("UNIFATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "unifattn")
    return Path(d)


def key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in (CODEGEN_VERSION,) + parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def path_for(stem: str, digest: str) -> Path:
    return cache_dir() / f"{stem}_{digest}.py"


def write(path: Path, text: str) -> Path:
    """Write text to path atomically (no-op when identical bytes are already there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: Path):
    """Import a generated file once per process."""
    name = f"unifattn_generated.{path.stem}"
    if name in _MODULES:
        return _MODULES[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod           # triton's jit looks kernels' globals up through the module
    spec.loader.exec_module(mod)
    _MODULES[name] = mod
    return mod
