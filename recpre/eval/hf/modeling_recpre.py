"""Self-contained Hugging Face modeling code for recpre models (GPT and recurrent-depth), written by export_hf.

Copied verbatim into an exported folder as `modeling_recpre.py`; it imports only torch and transformers, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works without recpre installed. Parameter names equal recpre's (`transformer.wte.weight`, `transformer.prelude.0...`),
and the computation is the same: embed (times the embedding scale) -> prelude -> r iterations of
core(adapter([s, e])) -> ln_f -> coda -> ln_f -> tied head. `num_steps=` on forward and on `generate` picks the
recurrence depth (default: the mean recurrence). The initial state follows config.json's `state_init`: `zero`
(export's default) is deterministic; `like-init` draws fresh noise in every forward, as in training.
No KV cache: generation recomputes the full sequence (use recpre.generation for cached decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class RecpreConfig(PretrainedConfig):
    model_type = "recpre"

    def __init__(
        self,
        architecture: str = "recurrent",
        block_size: int = 256,
        vocab_size: int = 4096,
        padded_vocab_size: int = 4096,
        n_embd: int = 128,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        intermediate_size: int = 352,
        n_layers: int = 4,
        n_layers_prelude: int = 1,
        n_layers_core: int = 2,
        n_layers_coda: int = 1,
        block_kind: str = "sandwich",
        norm_eps: float = 1e-6,
        injection: str = "linear",
        state_init: str = "zero",
        mean_recurrence: int = 4,
        rope_base: float = 50000.0,
        qk_bias: bool = True,
        bias: bool = False,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
        emb_scale: float = 1.0,
        **kwargs,
    ) -> None:
        self.architecture = architecture
        self.block_size = block_size
        self.max_position_embeddings = block_size
        self.padded_vocab_size = padded_vocab_size
        self.n_embd = self.hidden_size = n_embd
        self.n_heads = self.num_attention_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.intermediate_size = intermediate_size
        self.n_layers = n_layers
        self.n_layers_prelude = n_layers_prelude
        self.n_layers_core = n_layers_core
        self.n_layers_coda = n_layers_coda
        self.num_hidden_layers = n_layers if architecture == "gpt" else n_layers_prelude + n_layers_core + n_layers_coda
        self.block_kind = block_kind
        self.norm_eps = norm_eps
        self.injection = injection
        self.state_init = state_init
        self.mean_recurrence = mean_recurrence
        self.rope_base = rope_base
        self.qk_bias = qk_bias
        self.bias = bias
        self.tie_embeddings = tie_embeddings
        self.init_std = init_std
        self.emb_scale = emb_scale
        kwargs.setdefault("tie_word_embeddings", False)  # the head reads wte directly; nothing for HF to tie
        super().__init__(vocab_size=vocab_size, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, S, H, D] by integer positions [B, S] (float32 math)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device).float() / d))
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, c: RecpreConfig) -> None:
        super().__init__()
        self.c = c
        q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
        self.Wqkv = nn.Linear(c.n_embd, q_dim + 2 * kv_dim, bias=c.bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, c.n_heads, c.head_dim)) if c.qk_bias else None
        self.proj = nn.Linear(q_dim, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        c = self.c
        B, S, _ = x.shape
        q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
        q, k, v = self.Wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, S, c.n_heads, c.head_dim)
        k = k.view(B, S, c.kv_heads, c.head_dim)
        v = v.view(B, S, c.kv_heads, c.head_dim)
        if self.qk_bias is not None:
            q = q + self.qk_bias[0].to(q.dtype)
            k = k + self.qk_bias[1].to(k.dtype)
        q, k = _rope(q, positions, c.rope_base), _rope(k, positions, c.rope_base)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.kv_heads != c.n_heads:
            k = k.repeat_interleave(c.n_heads // c.kv_heads, dim=1)
            v = v.repeat_interleave(c.n_heads // c.kv_heads, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, q_dim))


class GatedMLP(nn.Module):
    def __init__(self, c: RecpreConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.n_embd, 2 * c.intermediate_size, bias=c.bias)
        self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class Block(nn.Module):
    _NORMS = {"sandwich": (1, 2, 3, 4), "pre": (1, 3), "post": (2, 4)}

    def __init__(self, c: RecpreConfig) -> None:
        super().__init__()
        self.kind = c.block_kind
        for i in self._NORMS[c.block_kind]:
            setattr(self, f"norm_{i}", RMSNorm(c.n_embd, c.norm_eps))
        self.attn = Attention(c)
        self.mlp = GatedMLP(c)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "sandwich":
            x = self.norm_2(self.attn(self.norm_1(x), positions, mask) + x)
            return self.norm_4(self.mlp(self.norm_3(x)) + x)
        if self.kind == "pre":
            x = x + self.attn(self.norm_1(x), positions, mask)
            return x + self.mlp(self.norm_3(x))
        x = self.norm_2(x + self.attn(x, positions, mask))
        return self.norm_4(x + self.mlp(x))


class RecpreForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RecpreConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: RecpreConfig) -> None:
        super().__init__(config)
        c = config
        t = nn.ModuleDict()
        t["wte"] = nn.Embedding(c.padded_vocab_size, c.n_embd)
        t["ln_f"] = RMSNorm(c.n_embd, c.norm_eps)
        if c.architecture == "gpt":
            t["h"] = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        else:
            t["prelude"] = nn.ModuleList(Block(c) for _ in range(c.n_layers_prelude))
            if c.injection == "linear":
                t["adapter"] = nn.Linear(2 * c.n_embd, c.n_embd, bias=c.bias)
            t["core_block"] = nn.ModuleList(Block(c) for _ in range(c.n_layers_core))
            t["coda"] = nn.ModuleList(Block(c) for _ in range(c.n_layers_coda))
        self.transformer = t
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention) and module.qk_bias is not None:
            nn.init.zeros_(module.qk_bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self):
        return None  # the tied head reads transformer.wte.weight; nothing to tie or resize separately

    @property
    def head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def _initial_state(self, e: torch.Tensor) -> torch.Tensor:
        if self.config.state_init == "zero":
            return torch.zeros_like(e)
        std = self.config.init_std
        s = torch.empty_like(e)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return s * self.config.emb_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        c = self.config
        B, S = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal[None] & keep[:, None, :]) | torch.eye(S, dtype=torch.bool, device=input_ids.device)[None]
            mask = mask[:, None]
            if position_ids is None:
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)[None].expand(B, S)
        t = self.transformer
        x = t.wte(input_ids)
        if c.emb_scale != 1.0:
            x = x * c.emb_scale
        if c.architecture == "gpt":
            for block in t.h:
                x = block(x, position_ids, mask)
        else:
            for block in t.prelude:
                x = block(x, position_ids, mask)
            e, s = x, self._initial_state(x)
            for _ in range(c.mean_recurrence if num_steps is None else int(num_steps)):
                s = t.adapter(torch.cat([s, e], dim=-1)) if c.injection == "linear" else s + e
                for block in t.core_block:
                    s = block(s, position_ids, mask)
            x = t.ln_f(s)
            for block in t.coda:
                x = block(x, position_ids, mask)
        x = t.ln_f(x)
        logits = F.linear(x, self.head_weight).float()
        if logits.shape[-1] > c.vocab_size:  # padded embedding rows are not tokens
            logits = logits[..., : c.vocab_size]
        loss = None
        if labels is not None:  # Hugging Face convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, num_steps=None, **kwargs):
        """Keeps `num_steps`, so `generate(..., num_steps=d)` decodes at depth d (each call may pick its own)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "num_steps": num_steps}


RecpreConfig.register_for_auto_class()
RecpreForCausalLM.register_for_auto_class("AutoModelForCausalLM")
