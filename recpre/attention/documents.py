"""Document ids for packed rows: which tokens may attend to which, and where positions restart.

A packed training row holds several documents separated by EOS tokens. A token after an EOS starts a new
document; the EOS itself belongs to the document it ends. Document ids are non-decreasing runs within a row
(0, 0, 0, 1, 1, 2, ...), which is what the varlen kernels (flash, nki) need: a document is a contiguous run.
"""

from __future__ import annotations

import torch


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token document index [B, S] (int64), counting from 0 in every row."""
    is_eos = input_ids == eos_id
    starts = torch.zeros_like(is_eos, dtype=torch.long)
    starts[:, 1:] = is_eos[:, :-1].long()
    return starts.cumsum(dim=1)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S], True at the first token of every run of equal ids (always True at position 0)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] (int64) that restart at 0 at every document start, for RoPE."""
    seq = doc_ids.shape[1]
    idx = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    start_idx = torch.where(document_starts(doc_ids), idx, torch.zeros_like(idx))
    return idx - start_idx.cummax(dim=1).values


def document_segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths (int32, [n_docs + 1]) over the flattened batch, and the longest document.

    Every row starts a new segment, so segments never cross rows. `max_seqlen` is a host int (one sync),
    as varlen kernels take it as a Python number.
    """
    flat_starts = document_starts(doc_ids).flatten()
    start_idx = flat_starts.nonzero().flatten()
    total = torch.tensor([flat_starts.numel()], device=doc_ids.device, dtype=start_idx.dtype)
    cu_seqlens = torch.cat([start_idx, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen
