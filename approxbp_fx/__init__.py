"""approxbp-fx: Approx-BP and MS-BP as a torch.compile backend.

``torch.compile(model, backend="approxbp")`` (no import needed once installed)
saves k-bit derivative codes instead of GELU/SiLU inputs for backward, where
inductor's own partitioner confirms that shrinks the saved set.
"""

from __future__ import annotations

from ._compat import check_torch_version

# First, before anything touches torch's internals: an unsupported torch fails
# here with the version and the supported range, not later inside a compile.
check_torch_version()

from . import kernels  # noqa: F401  (registers the approxbp:: custom ops)

# auto-apply
from .auto import disable, enable, is_enabled

# backend
from .backend import approxbp, backend

# configuration
from .config import ApproxBPConfig
from .coefficients import StepTable, table

# reporting
from .explain import Explanation, explain
from .measure import saved_activation_bytes
from .report import ApproxBPFallbackWarning

__all__ = [
    # auto-apply
    "enable",
    "disable",
    "is_enabled",
    # backend
    "backend",
    "approxbp",
    # configuration
    "ApproxBPConfig",
    "StepTable",
    "table",
    # reporting
    "explain",
    "Explanation",
    "saved_activation_bytes",
    "ApproxBPFallbackWarning",
]

__version__ = "0.1.0"

