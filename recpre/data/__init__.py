"""Data: raw sources -> tokenizer -> packed parquet -> resumable, rank-sharded loader; plus the embedded corpus.

Modules (one concern each): sources (raw documents), tokenizer, packed (the parquet format), pipeline
(tokenize + pack), shuffle (global shuffle + split), stats (counts), corpus (embedded default corpus),
loader (PackedLoader), documents (document ids / positions for masking), atomic (all-or-nothing outputs).
Names below are imported lazily so the data CLIs start without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EmbeddedCorpus": "recpre.data.corpus",
    "prepare_embedded_corpus": "recpre.data.corpus",
    "document_ids": "recpre.data.documents",
    "document_position_ids": "recpre.data.documents",
    "PackedLoader": "recpre.data.loader",
    "Tokenizer": "recpre.data.tokenizer",
    "check_vocab": "recpre.data.tokenizer",
    "load_tokenizer": "recpre.data.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'recpre.data' has no attribute {name!r}")
