"""The joint-graph rewrites, in the order the partitioner applies them.

Each rule module exports ``find_sites``, ``predict``, ``apply_sites`` and
``rewrite``; :mod:`approxbp_fx.partition` drives them through the real
partitioner and keeps only what measurably shrinks the saved set.
"""

from . import save_act_codes, share_norm_input

# 1. save_act_codes first: an activation's codes replace its input; the norm
#    rule then never sees nodes the activation rule owns (overlaps are skipped).
# 2. share_norm_input: a norm's backward reads the tensor its consumers save.
RULES = {
    "save_act_codes": save_act_codes,
    "share_norm_input": share_norm_input,
}

__all__ = ["RULES", "save_act_codes", "share_norm_input"]
