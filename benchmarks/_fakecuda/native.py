"""Build, cache and load ``hooks.cpp``, the native half of the fake-CUDA instrument.

Imports no torch: the library must be loaded before ``import torch`` (see hooks.cpp),
so this module finds torch's headers and libraries through ``importlib`` alone.

The build is one ``g++`` call (about 2 s) against the torch found in this Python,
written to ``$APPROXBP_FAKECUDA_CACHE`` (default ``~/.cache/approxbp_fx/fakecuda``)
as ``libfakecudahooks-<torch version>-<source hash>.so``: a new torch or an edited
``hooks.cpp`` builds a new file, so nothing needs clearing by hand. To rebuild by
force, delete the file (or the directory), or run ``python -m benchmarks._fakecuda --build``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("hooks.cpp")
CACHE_ENV = "APPROXBP_FAKECUDA_CACHE"
_loaded: str | None = None  # the library this process loaded, if any


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "approxbp_fx" / "fakecuda"
    return Path(os.environ.get(CACHE_ENV, default))


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise RuntimeError("fake CUDA: torch is not installed in this Python")
    return Path(spec.origin).parent


def library_path() -> Path:
    """Where the library for this torch and this hooks.cpp lives (built or not)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"libfakecudahooks-{importlib.metadata.version('torch')}-{digest}.so"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(force: bool = False) -> Path:
    """The library, compiled first if missing (or if ``force``). Needs g++ (or ``$CXX``)."""
    out = library_path()
    if out.exists() and not force:
        return out
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("fake CUDA needs a C++ compiler to build its hooks: install g++ or set CXX")
    torch_dir = _torch_dir()
    lib = torch_dir / "lib"
    # A CUDA build registers its own guard and hooks at load time: linking libtorch_cuda
    # makes it load (and register) before this library, whose registrations then win.
    # Untested here (no CUDA torch on the CPU machines); kept so a GPU box can run it too.
    cuda = ["-Wl,--no-as-needed", "-ltorch_cuda"] if (lib / "libtorch_cuda.so").exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name then renamed: two processes building at once
    # (pytest-xdist) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O1", "-w", "-std=c++17", "-shared", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1",
           f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{lib}", "-lc10", "-ltorch_cpu", *cuda,
           f"-Wl,-rpath,{lib}", "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        os.unlink(tmp)
        raise RuntimeError(f"fake CUDA: building {SOURCE.name} failed:\n{' '.join(cmd)}\n{e.stderr}") from e
    os.replace(tmp, out)
    return out


def load() -> str:
    """Build if needed and load the library into this process, which must not have imported torch."""
    global _loaded
    if "torch" in sys.modules:
        raise RuntimeError("fake CUDA: the native hooks must load before torch (run through python -m benchmarks._fakecuda)")
    path = str(build())
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded = path
    return path


def active() -> bool:
    """True in a process that loaded the hooks before torch."""
    return _loaded is not None
