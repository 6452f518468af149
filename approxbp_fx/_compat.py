"""The torch versions approxbp-fx supports, checked once at ``import approxbp_fx``.

The rewrites read AOTAutograd's joint graph and inductor's
``custom_partitioner_fn`` hook, neither of which is a public, stable API; a
torch outside the tested range may import fine and then mis-rewrite or crash
deep inside a compile. Failing at import, with the installed version and the
range in the message, is cheaper for everyone.
"""

from __future__ import annotations

import re

__all__ = ["SUPPORTED_TORCH", "check_torch_version"]

# [lowest, first unsupported) as (major, minor); keep in step with
# pyproject.toml's "torch>=2.11,<2.15".
SUPPORTED_TORCH = ((2, 11), (2, 15))


def _range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TORCH
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def check_torch_version(version: str | None = None) -> None:
    """Raise ImportError unless ``version`` (default: ``torch.__version__``) is supported.

    Pre-releases and local builds count by their major.minor: ``2.15.0a0+git``
    is 2.15 (unsupported), ``2.13.0+cpu`` is 2.13.
    """
    if version is None:
        import torch

        version = torch.__version__
    text = str(version)
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    lo, hi = SUPPORTED_TORCH
    if match is None or not lo <= (int(match[1]), int(match[2])) < hi:
        raise ImportError(
            f"approxbp-fx supports torch{_range()}, but torch {text} is installed. "
            f"Install a supported torch (e.g. pip install torch==2.13.0), or an approxbp-fx "
            f"release that supports torch {text}."
        )
