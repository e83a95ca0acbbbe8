"""Hand-written CPU kernels, compiled on first use with the system's C compiler.

Some updates cannot be expressed so that ``torch.compile`` (inductor) emits a single pass:
fused AdamP must update the moments while it reduces each row, which inductor does not fuse.
The kernels here are plain C (no torch headers: compiling takes well under a second), built
once per machine into a cache directory and called through :mod:`ctypes` with raw data
pointers. ctypes releases the GIL during the call, so row ranges run on several threads.

Nothing here is required: if no C compiler is found, compiling fails, or
``GRADKIT_NATIVE=0`` is set, :func:`adamp_kernels` returns None and callers use their
``torch.compile`` kernel instead. The cache directory is ``$GRADKIT_CACHE_DIR`` or
``$XDG_CACHE_HOME/gradkit`` (default ``~/.cache/gradkit``); a build is keyed by the source,
the compiler, the flags and the CPU, so a changed kernel or machine rebuilds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("adamp.c")
_BASE_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC"]
# tried in order: tuned for this CPU first, then portable
_FLAG_SETS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
_DTYPES = {torch.float32: "float", torch.float64: "double"}
# rows per thread below which a second thread is not worth starting
_MIN_ROWS_PER_THREAD = 64


def cache_dir() -> Path:
    root = os.environ.get("GRADKIT_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "gradkit")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in info.splitlines()
            if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _build(cc: str, source: Path) -> Path | None:
    """Compile ``source`` into the cache (atomically); the path, or None if no flag set
    compiles."""
    text = source.read_bytes()
    for extra in _FLAG_SETS:
        flags = [*_BASE_FLAGS, *extra]
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = cache_dir() / f"{source.stem}-{key}.so"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
            os.close(fd)
        except OSError:
            return None
        try:
            subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], check=True,
                           capture_output=True, timeout=300)
            os.replace(tmp, target)  # atomic: concurrent builders each write their own tmp
            return target
        except (OSError, subprocess.SubprocessError):
            Path(tmp).unlink(missing_ok=True)
    return None


class AdamPKernels:
    """The two passes of ``adamp.c`` for float32 and float64 tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, f64, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
        self._pass1, self._pass2 = {}, {}
        for dtype, name in _DTYPES.items():
            one = getattr(lib, f"adamp_pass1_{name}")
            one.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr,
                            f64, f64, f64, f64, f64, f64, c_int]
            one.restype = None
            two = getattr(lib, f"adamp_pass2_{name}")
            two.argtypes = [i64, i64, i64, ptr, ptr, ptr, f64, f64]
            two.restype = None
            self._pass1[dtype], self._pass2[dtype] = one, two
        self._decide = lib.adamp_decide
        self._decide.argtypes = [i64, i64, ptr, ptr, f64, f64]
        self._decide.restype = c_int

    @staticmethod
    def supports(*tensors: Tensor) -> bool:
        t = tensors[0]
        return (t.device.type == "cpu" and t.dtype in _DTYPES
                and all(x.dtype == t.dtype and x.device == t.device and x.is_contiguous()
                        for x in tensors))

    def pass1(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, u: Tensor, rows: int,
              hyper: tuple[float, float, float, float, float, float], nesterov: bool,
              ) -> Tensor:
        """Moments in place, direction into ``u``; returns the float64 row sums ``(4, rows)``:
        ``||p_r||², ||g_r||², <g_r, p_r>, <p_r, u_r>`` (``g`` times the sign in ``hyper``)."""
        cols = p.numel() // rows
        sums = torch.empty(4, rows, dtype=torch.float64)
        fn = self._pass1[p.dtype]
        ptrs = [t.data_ptr() for t in (p, g, m, v, u, sums)]
        _run_rows(rows, lambda a, b: fn(a, b, rows, cols, *ptrs, *hyper, int(nesterov)))
        _written(m, v, u)
        return sums

    def decide(self, sums: Tensor, cols: int, delta_sq: float, eps: float,
               ) -> tuple[Tensor, bool]:
        """From :meth:`pass1`'s sums: per-row coefficients (float64) of ``p`` removed from
        the direction, and whether the weight is projected (channel view first, then layer;
        the tests of :mod:`gradkit.optim._projection`)."""
        rows = sums.shape[1]
        coef = torch.empty(rows, dtype=torch.float64)
        hit = self._decide(rows, cols, sums.data_ptr(), coef.data_ptr(), delta_sq, eps)
        return coef, bool(hit)

    def pass2(self, p: Tensor, u: Tensor, coef: Tensor, rows: int, factor: float,
              neg_step: float) -> None:
        """``p <- p * factor + neg_step * (u - p * coef[r])`` row by row (coef float64)."""
        cols = p.numel() // rows
        fn = self._pass2[p.dtype]
        ptrs = [p.data_ptr(), u.data_ptr(), coef.data_ptr()]
        _run_rows(rows, lambda a, b: fn(a, b, cols, *ptrs, factor, neg_step))
        _written(p)


def _written(*tensors: Tensor) -> None:
    """Writes through raw pointers bypass autograd's version counters; bump them, so that a
    graph that saved one of these tensors fails loudly as after any in-place op."""
    torch.autograd.graph.increment_version(tensors)


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A pool per process (``pid``): a forked child must not reuse its parent's threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="gradkit-native")


def _run_rows(rows: int, fn) -> None:
    """``fn(begin, end)`` over ``[0, rows)``, split between ``torch.get_num_threads()``."""
    threads = max(1, min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD))
    if threads == 1:
        fn(0, rows)
        return
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [_pool(threads, os.getpid()).submit(fn, a, b) for a, b in itertools.pairwise(bounds)]
    for f in futures:
        f.result()


@functools.cache
def adamp_kernels() -> AdamPKernels | None:
    """The compiled AdamP kernels, or None (no compiler, build failure, GRADKIT_NATIVE=0)."""
    if os.environ.get("GRADKIT_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    path = _build(cc, _SOURCE) if cc else None
    if path is None:
        warnings.warn("gradkit: no C compiler could build the native AdamP kernel; fused "
                      "AdamP uses its torch.compile kernel instead", RuntimeWarning,
                      stacklevel=2)
        return None
    return AdamPKernels(ctypes.CDLL(str(path)))
