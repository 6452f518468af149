"""Benchmark scripts: they write JSON to docs/results/ and render docs/ from it.

Run each from the repository root as a module, ``python -m benchmarks.<name>``
(so the checkout's own approxbp_fx comes first on ``sys.path``); the
underscored modules are their shared parts, which tests import too.
"""
