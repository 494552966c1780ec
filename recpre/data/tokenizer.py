"""Byte-level BPE tokenizers: training (tokenizers library), loading, and the vocab check against a model.

Byte-level with no normalizer, so decode(encode(text)) == text for every string.
Special tokens take the first ids: <|bos|> = 0, <|eos|> = 1, <|pad|> = 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from recpre.data.atomic import atomic_write_text
from recpre.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
# Names other tokenizers use for the same roles, so a foreign tokenizer.json also loads.
_ALIASES = {
    "bos": [BOS, "<|begin_text|>", "<|begin_of_text|>", "<s>", "<bos>"],
    "eos": [EOS, "<|end_text|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"],
    "pad": [PAD, "<pad>", "<|padding|>"],
}
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Thin wrapper with the ids the pipeline needs; `encode` adds no special tokens."""

    def __init__(self, backend, path: Path | None = None):
        self.backend = backend
        self.path = path
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = _first_id(vocab, "bos")
        self.eos_id: int | None = _first_id(vocab, "eos")
        self.pad_id: int | None = _first_id(vocab, "pad")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Parallel over texts in Rust threads (not limited by the GIL)."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def _first_id(vocab: dict[str, int], role: str) -> int | None:
    for name in _ALIASES[role]:
        if name in vocab:
            return vocab[name]
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a folder holding tokenizer.json (or the file itself)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"tokenizer {file} does not exist; pass a folder holding {TOKENIZER_FILE}")
    try:
        backend = Backend.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on a malformed file
        raise UserError(
            f"tokenizer {file} cannot be read ({err}); rebuild it with scripts/build_tokenizer.py"
        ) from None
    return Tokenizer(backend, file)


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    output_dir: str | Path,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE with `vocab_size` ids in total (special tokens included); write tokenizer.json."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs at least 259")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]

    def counted():
        for doc in documents:
            seen[0] += 1
            yield doc

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise UserError("tokenizer training input holds no documents; check --input")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / TOKENIZER_FILE, backend.to_str())
    return Tokenizer(backend, output_dir / TOKENIZER_FILE)


def check_vocab(tokenizer_vocab: int, model_vocab: int, *, source: str | Path | None = None) -> None:
    """A tokenizer with more ids than the model's embedding would index past it: refuse before training."""
    if tokenizer_vocab > model_vocab:
        where = f" {source}" if source else ""
        raise UserError(
            f"tokenizer{where} has {tokenizer_vocab} tokens but the model's vocab_size is {model_vocab}; "
            "use a smaller tokenizer or set model.overrides.vocab_size >= " + str(tokenizer_vocab)
        )


def tokenizer_info(tokenizer: Tokenizer) -> dict:
    """Ids recorded beside packed data so the loader knows EOS/PAD without the tokenizer."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
    }
