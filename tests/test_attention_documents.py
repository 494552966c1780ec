"""Document ids, per-document positions and varlen segments from packed token rows."""

from __future__ import annotations

import torch

from recpre.attention import attention_mask
from recpre.attention.documents import document_ids, document_positions, document_segments

EOS = 0


def test_token_after_eos_starts_a_document_and_eos_ends_its_own():
    ids = torch.tensor([[5, 1, 2, EOS, 3, EOS, EOS, 4], [EOS, 1, 1, 1, 1, 1, 1, EOS]])
    docs = document_ids(ids, EOS)
    assert docs.tolist() == [[0, 0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert docs.dtype == torch.long


def test_rows_without_eos_are_one_document():
    assert document_ids(torch.ones(2, 5, dtype=torch.long), EOS).eq(0).all()


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 3, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    one_doc = torch.zeros(1, 6, dtype=torch.long)
    assert document_positions(one_doc).tolist() == [list(range(6))]


def test_segments_never_cross_rows():
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0]])
    cu_seqlens, max_seqlen = document_segments(docs)
    assert cu_seqlens.tolist() == [0, 4, 6, 7, 8, 16]
    assert cu_seqlens.dtype == torch.int32
    assert max_seqlen == 8


def test_mask_from_documents_is_block_diagonal_and_causal():
    docs = document_ids(torch.tensor([[1, 2, EOS, 3, 4, EOS]]), EOS)
    mask = attention_mask(6, 6, causal=True, doc_ids=docs, device=docs.device)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3).tril().bool()
    expected[3:, 3:] = torch.ones(3, 3).tril().bool()
    assert torch.equal(mask, expected)


def test_random_rows_agree_with_a_python_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (4, 50), generator=g)
    docs, pos = document_ids(ids, EOS), document_positions(document_ids(ids, EOS))
    for row in range(4):
        doc, p = 0, 0
        for t in range(50):
            if t > 0 and ids[row, t - 1] == EOS:
                doc, p = doc + 1, 0
            assert (docs[row, t].item(), pos[row, t].item()) == (doc, p)
            p += 1


def test_agrees_with_the_data_package_helpers():
    """recpre.data.documents (the loader side) and this module must cut documents the same way."""
    from recpre.data import documents as data_docs

    ids = torch.randint(0, 5, (3, 40), generator=torch.Generator().manual_seed(3))
    assert torch.equal(data_docs.document_ids(ids, EOS), document_ids(ids, EOS))
    assert torch.equal(data_docs.document_position_ids(ids, EOS), document_positions(document_ids(ids, EOS)))
