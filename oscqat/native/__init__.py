"""Native CPU loops for the oscillation tracker, built at first use with the system C compiler.

Why: on a CPU the tracker's sparse per-step update is some thirty small torch ops, and their
dispatch, not their arithmetic, is most of its cost (about 2.7 ms of a 100 ms compiled step on
a 2-core VM; the 1.03x budget of a compiled full step over compiled LSQ is 3 ms). The loops in
``tracker.c`` do the same float32 arithmetic in the same order, so results are bit-identical to
the torch path (``tests/test_native.py``), which stays the fallback and the reference.

The library is plain C (no torch headers: about a second to build) and is cached per source
hash and compiler in ``$OSCQAT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/oscqat``, else
``~/.cache/oscqat``); a build goes to a temporary name first, so concurrent trials never load a
half-written file. No compiler, a failed build or ``OSCQAT_NATIVE=0``: ``load()`` returns None
and the tracker uses torch ops, with one warning naming the reason (none for ``OSCQAT_NATIVE=0``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("tracker.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]  # float32 exactly as torch does it

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "oscqat_find_moved": (_i64, [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i64]),
    "oscqat_update_moved": (None, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _f32, _f32,
                                   _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64,
                                   _ptr, _ptr]),
    "oscqat_candidates": (_i64, [_ptr, _i64, _ptr, _ptr, _f32, _ptr]),
    "oscqat_freeze": (None, [_ptr, _i64, _i64, _ptr, _ptr, _f32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                             _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]),
    "oscqat_pin": (None, [_ptr, _ptr, _ptr, _i64]),
}
_loaded: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    if os.environ.get("OSCQAT_CACHE_DIR"):
        return Path(os.environ["OSCQAT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oscqat"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(directory: Path | None = None) -> Path:
    """Compile ``tracker.c`` into ``directory`` (default ``cache_dir()``) unless a build of this
    source with this compiler is there; returns the shared library's path. Raises RuntimeError
    naming what failed."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + " ".join(FLAGS).encode() + sys.platform.encode()).hexdigest()[:16]
    directory = Path(directory or cache_dir())
    target = directory / f"oscqat_tracker_{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same source wrote the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def load() -> ctypes.CDLL | None:
    """The native library, built on first use; None when disabled or unavailable (warned once)."""
    global _loaded, _tried
    if os.environ.get("OSCQAT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not _tried:
        _tried = True
        try:
            _loaded = _bind(build())
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"oscqat: the tracker's native CPU loops are unavailable ({exc}); using torch ops "
                          "(same results, slower on a CPU). Set OSCQAT_NATIVE=0 to silence this.",
                          RuntimeWarning, stacklevel=2)
            _loaded = None
    return _loaded
