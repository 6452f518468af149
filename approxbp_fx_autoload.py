"""``import torch`` calls :func:`autoload` (the ``torch.backends`` entry point).

A top-level module on purpose: importing anything under ``approxbp_fx`` would
import the whole package into every ``import torch`` on this machine. This file
reads one environment variable and imports approxbp_fx only when it is set.
"""

import os


def autoload() -> None:
    if os.environ.get("APPROXBP_FX_AUTO", "").strip().lower() in ("", "0", "false", "off", "no"):
        return
    from approxbp_fx.auto import enable_from_env

    enable_from_env()
