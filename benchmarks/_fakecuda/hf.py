"""What Hugging Face's eager forward decides from tensor values, decided as on a real GPU.

transformers guards its value-dependent branches with ``is_tracing(tensor)``,
which is true for a FakeTensor as it is under torch.compile: a fake eager forward
takes the compile branch. One such branch changes the saved bytes.
``masking_utils.find_packed_sequence_indices`` looks for packed sequences in the
position ids; when it cannot look, the causal mask is materialised instead of
left to SDPA's ``is_causal``. On a GPU, eager LLaMA then runs flash attention with
GQA (k, v at 8 heads); on fake tensors it would run memory-efficient attention
on k, v repeated to 32 heads, saving 32 MiB more per layer at batch 4 x 1024
(+7.3% on the H100's LLaMA-1B eager cell).

:func:`install` answers "not packed" in eager forwards, which is what a real
eager forward finds for the benchmark's inputs: they carry no ``position_ids``,
so the models number positions 0..L-1 themselves (cell.measure checks it).
Under torch.compile the function runs unchanged, as on the GPU.
Fragile by name: a transformers without the function needs no patch and gets none.
"""

from __future__ import annotations

import torch


def install() -> None:
    import transformers.masking_utils as masking_utils  # private to transformers

    real = getattr(masking_utils, "find_packed_sequence_indices", None)
    if real is None:
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor):
        if torch.compiler.is_compiling():
            return real(position_ids)
        return None  # eager: positions are 0..L-1 in every row, so nothing is packed

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
