"""``import torch`` calls :func:`autoload` (the ``torch.backends`` entry point).

A top-level module on purpose: importing anything under ``approxbp_fx`` would
import the whole package into every ``import torch`` on this machine. This file
reads one environment variable and imports approxbp_fx only when it is set.
"""

import os

ENV_VAR = "APPROXBP_FX_AUTO"
# Values of ENV_VAR that mean "off" (compared lower-cased, stripped); approxbp_fx.auto reads them too.
OFF = ("", "0", "false", "off", "no")


def autoload() -> None:
    if os.environ.get(ENV_VAR, "").strip().lower() in OFF:
        return
    from approxbp_fx.auto import enable_from_env

    enable_from_env()
