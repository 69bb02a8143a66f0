"""Build llmq's C kernels once per machine with the system C compiler, and load them through ctypes.

The sources ship in this package (``int4_avx2.c``); the shared library lands in
``$LLMQ_KERNEL_CACHE`` (default ``~/.cache/llmq/kernels``) under a name that hashes the source, the flags
and the compiler, so an edit or another compiler builds anew and two processes never load half a file
(each builds into its own temporary name and renames). ``-fopenmp`` links ``libgomp.so.1``, the OpenMP
runtime torch itself loads, so the kernels share torch's threads rather than start a second pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_avx2.c")
FLAGS = ("-O3", "-std=c11", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Layer(ctypes.Structure):
    """``struct layer`` of ``int4_avx2.c``: a packed layer's buffers and sizes."""

    _fields_ = [("packed", _PTR), ("scales", _PTR), ("zeros", _PTR), ("K", _I64), ("N", _I64), ("group", _I64)]


DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the activation dtypes the kernel reads and writes


class NativeUnavailable(RuntimeError):
    """The kernels cannot run here; the message says why and what would fix it."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmq" / "kernels"
    return Path(os.environ.get("LLMQ_KERNEL_CACHE", default))


def compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def cpu_has_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


def library() -> ctypes.CDLL:
    """The int4_avx2 kernels, built on first use; raises :class:`NativeUnavailable` with the reason."""
    lib, why = _load()
    if lib is None:
        raise NativeUnavailable(why)
    return lib


def unavailable() -> str | None:
    """Why the native kernels cannot run here, or None when they can (found once per process)."""
    return _load()[1]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        return _build_and_load(), None
    except OSError as e:  # an unwritable cache, a library that will not load
        return None, f"{e} (set LLMQ_KERNEL_CACHE to a writable folder)"
    except NativeUnavailable as e:
        log.info("int4_avx2 kernel unavailable: %s", e)
        return None, str(e)


def _build_and_load() -> ctypes.CDLL:
    if not cpu_has_avx2():
        raise NativeUnavailable(f"this CPU has no AVX2 ({platform.machine()}, torch capability "
                                f"{torch.backends.cpu.get_cpu_capability()})")
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang) on PATH: install one, or set CC")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    path = cache_dir() / f"int4_avx2-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("building the int4_avx2 kernel with %s into %s (once per machine)", cc, path)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if run.returncode:
                raise NativeUnavailable(f"{cc} could not build {SOURCE.name}: {run.stderr.strip()[-500:]}")
            os.replace(built, path)
    lib = ctypes.CDLL(str(path))
    lib.llmq_int4_mm.argtypes = [ctypes.POINTER(Layer), _PTR, _I64, ctypes.c_int, _PTR, ctypes.c_int]
    lib.llmq_int4_dequant_t.argtypes = [ctypes.POINTER(Layer), _PTR, ctypes.c_int, ctypes.c_int]
    for fn in (lib.llmq_int4_mm, lib.llmq_int4_dequant_t):
        fn.restype = None
    return lib
