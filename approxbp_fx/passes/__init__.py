"""The joint-graph rewrites, in the order the partitioner applies them.

1. save_act_codes: activations save k-bit derivative codes instead of their input.
"""

from . import save_act_codes

__all__ = ["save_act_codes"]
