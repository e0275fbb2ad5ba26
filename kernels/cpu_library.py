"""C kernels for the CPU path, compiled on first use with the machine's C compiler.

Torch's CPU ops cannot read a paged KV cache in place, stream bf16 weights at a third of memory
bandwidth at batch 1, and cost microseconds of Python each, so the decode hot path has a few
small C kernels (kernels/csrc/). Like Triton's own launcher stubs they are built at run time:
every csrc/*.c into one library with `cc -O3 -march=native -fopenmp`, once per (sources,
compiler, CPU) into the user's cache, and loaded with ctypes. OpenMP resolves to the libgomp
torch has already loaded, so the kernels share torch's thread pool instead of adding their own.
Where no compiler is found or the build fails, `load()` returns None (with one warning) and
callers keep the torch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "kernels"


def _compiler() -> str | None:
    for cc in ("cc", "gcc", "clang"):
        if path := shutil.which(cc):
            return path
    return None


def _cpu_signature() -> str:
    """-march=native code is only valid on the CPU it was built for: key the cache on its flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library of every kernels/csrc/*.c, or None where it cannot be built here."""
    sources = sorted(SOURCE_DIR.glob("*.c"))
    headers = sorted(SOURCE_DIR.glob("*.h"))
    cc = _compiler()
    if cc is None:
        warnings.warn("no C compiler found: the CPU path falls back to the slower torch "
                      "reference (install gcc to get the CPU kernels)", RuntimeWarning,
                      stacklevel=2)
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([*(f.read_text() for f in sources + headers), version,
                                     *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"tandem_cpu-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent workers never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        build = subprocess.run([cc, *FLAGS, f"-I{SOURCE_DIR}", "-o", tmp,
                                *map(str, sources), "-lm"], capture_output=True, text=True)
        if build.returncode != 0:
            os.unlink(tmp)
            warnings.warn("building the CPU kernels failed, the CPU path falls back to the "
                          f"torch reference:\n{build.stderr[-2000:]}", RuntimeWarning,
                          stacklevel=2)
            return None
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))
