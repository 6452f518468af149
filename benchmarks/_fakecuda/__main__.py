"""Run a benchmark module in a process whose torch sees the fake CUDA device.

    python -m benchmarks._fakecuda benchmarks.train_step --device fake-cuda ...
    python -m benchmarks._fakecuda --build        # (re)build the native hooks and print their path

``benchmarks.train_step --device fake-cuda`` starts this itself; nobody needs to
type it. It loads the native hooks before torch (hooks.cpp says why), then runs
the module as ``__main__`` with the remaining arguments.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from benchmarks._fakecuda import native


def main() -> int:
    if sys.argv[1:] == ["--build"]:
        print(native.build(force=True))
        return 0
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    native.load()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (printed; the exit code says so)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: the autograd engine's CUDA worker thread may still be
    # dropping its last graph task, which holds the FakeTensorMode (a Python object). If
    # that happens during finalisation, the thread dies taking the GIL and std::terminate
    # aborts the process (exit 134) after a run that succeeded.
    os._exit(rc)
