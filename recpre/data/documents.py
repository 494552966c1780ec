"""Document boundaries inside packed rows, for document masking and per-document positions.

Convention: an EOS token ends its document and belongs to it; the next token starts a new document.
`recpre.attention` takes `doc_ids` [batch, seq] from `document_ids`; the model takes `position_ids`
from `document_position_ids` when `data.reset_position_ids` is on.
"""

from __future__ import annotations

import torch


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token document index within each row (0, 0, 0(eos), 1, 1, ...), int64, same shape as input_ids."""
    is_eos = (input_ids == eos_id).to(torch.int64)
    return torch.cumsum(is_eos, dim=-1) - is_eos


def eos_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Indices (as returned by nonzero) of EOS tokens: [n, input_ids.dim()]."""
    return torch.nonzero(input_ids == eos_id)


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position of each token within its own document (restarts at 0 after every EOS), int64."""
    seq = input_ids.shape[-1]
    idx = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
    prev_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    prev_eos[..., 1:] = input_ids[..., :-1] == eos_id
    starts = torch.where(prev_eos, idx, torch.zeros_like(idx))
    starts = torch.cummax(starts, dim=-1).values
    return idx - starts
