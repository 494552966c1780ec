"""Shared inputs for the attention tests: random shapes and packed-row document ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recpre.attention import expand_kv
from recpre.attention.documents import document_ids

EOS = 0


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool = True
    docs: str | None = None  # None | "one" | "two" | "many"

    def __str__(self) -> str:
        kind = "causal" if self.causal else "full"
        return f"b{self.batch}h{self.heads}kv{self.kv_heads}s{self.seq}d{self.head_dim}-{kind}-{self.docs or 'nodoc'}"


# Odd sequence lengths, GQA ratios 1/2/4/8 (MQA), head dims 32-128, 1, 2 and many documents per row.
CASES = [
    Case(2, 4, 4, 17, 32),
    Case(1, 8, 2, 37, 64),
    Case(2, 4, 1, 63, 96, causal=False),
    Case(1, 2, 2, 130, 128),
    Case(2, 6, 3, 41, 48, causal=False),
    Case(1, 1, 1, 1, 32),
    Case(2, 4, 2, 45, 64, docs="one"),
    Case(2, 4, 2, 53, 96, docs="two"),
    Case(2, 8, 2, 97, 32, docs="many"),
    Case(1, 4, 4, 70, 128, docs="many", causal=False),
    Case(3, 2, 1, 29, 64, docs="two", causal=False),
]


def make_docs(case: Case, generator: torch.Generator) -> torch.Tensor | None:
    """doc_ids [B, S] from token rows with EOS placed as the case asks."""
    if case.docs is None:
        return None
    b, s = case.batch, case.seq
    ids = torch.randint(1, 100, (b, s), generator=generator)
    if case.docs == "two":
        for row in range(b):
            ids[row, int(torch.randint(1, s - 1, (1,), generator=generator))] = EOS
    elif case.docs == "many":
        ids[torch.rand(b, s, generator=generator) < 0.15] = EOS
        ids[:, 3] = EOS  # at least two documents, one of them very short
        ids[:, 4] = EOS
    return document_ids(ids, EOS)


def make_inputs(case: Case, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    shape_q = (case.batch, case.heads, case.seq, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq, case.head_dim)
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in (shape_q, shape_kv, shape_kv))
    dy = torch.randn(shape_q, generator=g).to(device, dtype)
    docs = make_docs(case, g)
    return q, k, v, dy, None if docs is None else docs.to(device)


def forward_backward(fn, q, k, v, dy, **kwargs):
    """Output and (dq, dk, dv) of fn at these inputs for the output gradient dy."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    return out.detach(), grads


def per_document_reference(q, k, v, doc_ids, *, causal: bool, scale=None):
    """Eager attention run on every document separately, stitched back together: the masking ground truth."""
    from recpre.attention import eager_attention

    out = torch.empty_like(q)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    for row in range(q.shape[0]):
        for doc in doc_ids[row].unique():
            idx = (doc_ids[row] == doc).nonzero().flatten()
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            out[row : row + 1, :, sl] = eager_attention(
                q[row : row + 1, :, sl], k[row : row + 1, :, sl], v[row : row + 1, :, sl], causal=causal, scale=scale
            )
    return out
