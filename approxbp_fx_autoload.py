"""``import torch`` calls :func:`autoload` (the ``torch.backends`` entry point).

A top-level module on purpose: importing anything under ``approxbp_fx`` would
import the whole package into every ``import torch`` on this machine. This file
reads one environment variable and imports approxbp_fx only when it is set.
"""

import os

ENV_VAR = "APPROXBP_FX_AUTO"
# Values of ENV_VAR (compared lower-cased, stripped) that mean "off" and "on with
# the defaults"; approxbp_fx.auto reads them too, and its error message lists them.
OFF = ("", "0", "false", "off", "no")
ON = ("1", "true", "on", "yes")


class AutoloadError(BaseException):
    """A value of ``APPROXBP_FX_AUTO`` that means neither off, on nor a config.

    A BaseException on purpose: torch's loader (``_import_device_backends``)
    wraps every Exception an entry point raises in its own RuntimeError,
    "Failed to load the backend extension", which would then be the last line
    the user reads. This one passes through, so the last line says what to set.
    """


def autoload() -> None:
    value = os.environ.get(ENV_VAR, "")
    if value.strip().lower() in OFF:
        return
    from approxbp_fx.auto import enable_from_env

    try:
        enable_from_env()
    except ValueError as err:
        # import torch still fails: a typo must not train silently without the rewrite.
        raise AutoloadError(str(err)) from None
