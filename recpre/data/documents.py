"""Document boundaries inside packed rows, as the data side sees them.

Convention: an EOS token ends its document and belongs to it; the next token starts a new document. The one
implementation lives in `recpre.attention.documents` (attention masks and varlen kernels need it); this
module names it in the loader's terms (token ids and an EOS id).
"""

from __future__ import annotations

import torch

from recpre.attention.documents import document_ids, document_positions

__all__ = ["document_ids", "document_position_ids", "eos_positions"]


def eos_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Indices (as returned by nonzero) of EOS tokens: [n, input_ids.dim()]."""
    return torch.nonzero(input_ids == eos_id)


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position of each token within its own document (restarts at 0 after every EOS), int64."""
    return document_positions(document_ids(input_ids, eos_id))
