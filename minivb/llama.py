"""Vicuna, the language model of the InstructBLIP-Vicuna checkpoints: a LLaMA decoder.

Where it sits: the Q-Former's query outputs are projected to the LLaMA width and placed among the prompt's
token embeddings (model.py); this file turns that sequence of embeddings into next-token logits, and
generate.py calls it once for the prompt (prefill) and then once per new token (decode) with a KV cache.

A LLaMA block is pre-norm attention then pre-norm MLP, both residual:
    h = h + o_proj(attention(rope(q_proj(rmsnorm(h))), rope(k_proj(...)), v_proj(...)))
    h = h + down_proj(silu(gate_proj(rmsnorm(h))) * up_proj(rmsnorm(h)))
after the last block: a final RMSNorm and an untied lm_head (Vicuna does not share it with embed_tokens).

It mirrors transformers' LlamaForCausalLM (models/llama/modeling_llama.py) numerically: RMSNorm in fp32,
RoPE cos/sin computed in fp32 then cast to the activations' dtype, the "rotate_half" RoPE layout.

Letters used in shape comments:
    B batch, L new tokens in this call, S keys (cache.length + L), D hidden size, H query heads,
    Hkv key/value heads (H when there is no grouped-query attention), Dh head dim, V vocabulary size,
    P max_position_embeddings (rows of the RoPE tables).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_attention, decode_blocks, fast
from .config import LlamaConfig
from .fast import Linear  # nn.Linear; a decode step's few rows take the faster products of fast.py


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with no mean subtraction and no bias."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers does: bf16 then matches it closely.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_tables(config: LlamaConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, (max_position_embeddings, Dh), in fp32."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float, device=device)
    angles = positions[:, None] * inv_freq[None, :]  # (P, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, Dh): both halves rotate by the same angles
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + Dh/2]) by the position's angle: the "rotate_half" layout, not interleaved pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, L, Dh)
    return x * cos + rotated * sin


# A beam step moves the cache of every beam it keeps: cache[:, :, :, filled] = cache[:, :, :, filled].index_select(1,
# index), over all layers (num_layers, B, Hkv, filled, Dh). At once, index_select's copy of a 7B's keys with 5 beams
# and 33 generated tokens is 86 MB, a fresh allocation written out to memory and read back: 86 ms a step (keys and
# values), which made the late steps of a long beam search slower than transformers'. A few layers at a time, the
# copy stays in the processor's caches (ms a step, keys and values, 7B widths, 5 beams, native-bf16 machine;
# generated tokens 1 / 8 / 33 / 100): all layers at once 0.6 / 5.5 / 86 / 181; one layer at a time 0.7 / 9.1 / 23 /
# 47; REORDER_BYTES at a time 0.2 / 5.9 / 24 / 43. And only the rows that take another's place: AMD EPYC, the same
# shapes, 200 generated tokens, all rows / those that move, 4 of 5 rows moving 111 / 76 ms, 3 112 / 57, 2 (or a
# swap) 97 / 38. (A speed path, listed in fast.py's overview.)
REORDER_BYTES = 16 * 2**20


class KVCache:
    """Keys and values of every token seen so far, preallocated for max_length tokens.

    keys / values: (num_layers, B, Hkv, max_length, Dh); slots [0, length) are filled. Each layer's attention
    writes its new keys with `update`; `Llama.forward` calls `advance` once all layers have written.

    Beams share their prompt (and so do several samples of one prompt): after it, `share_prompt` keeps the prompt's
    keys and values once per example, prompt_keys / prompt_values (num_layers, B, Hkv, P, Dh), and makes keys /
    values hold only the tokens generated from then on, `copies` rows per example: their slot 0 is token P.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, max_length, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0
        self.prompt_keys = self.prompt_values = None  # set by share_prompt
        self.prompt_length = 0  # tokens held in prompt_keys / prompt_values, before keys' slot 0
        self.copies = 1  # rows of keys per row of prompt_keys

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, Hkv, L, Dh); return all its keys and values so far, (B, Hkv, S, Dh), or
        after share_prompt those since the prompt (`shared_prompt` gives the prompt's)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache full: {self.length} + {k.shape[2]} tokens exceed max_length {self.max_length}")
        start, end = self.length - self.prompt_length, end - self.prompt_length  # slots of keys / values
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]  # views, no copy

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def shared_prompt(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's prompt keys and values (B / copies, Hkv, P, Dh) after share_prompt, else None."""
        if self.prompt_keys is None:
            return None
        return self.prompt_keys[layer_idx], self.prompt_values[layer_idx]

    def share_prompt(self, copies: int, new_tokens: int) -> None:
        """The prompt just run stays one row per example, shared by the `copies` rows that each decode up to
        `new_tokens` tokens after it (generate.prefill: a beam search's beams, several samples of one prompt).

        Copied to every row instead (transformers runs each copy of the prompt), a 7B's 136-token prompt with 5
        beams is 0.4 GB of fresh memory written at the first beam step (~160 ms), and every beam step reads it five
        times over; 48 frames make that 5.1 GB. decode_attention.attention_after_shared_prompt reads it once.
        """
        if self.prompt_keys is not None:
            raise ValueError("KVCache.share_prompt: the prompt is shared already")
        layers, B, Hkv, _, Dh = self.keys.shape
        self.prompt_keys = self.keys[:, :, :, : self.length]  # (layers, B, Hkv, P, Dh)
        self.prompt_values = self.values[:, :, :, : self.length]
        self.prompt_length, self.copies = self.length, copies
        self.keys = self.keys.new_zeros(layers, B * copies, Hkv, new_tokens, Dh)  # (layers, R, Hkv, new, Dh)
        self.values = self.values.new_zeros(layers, B * copies, Hkv, new_tokens, Dh)
        self.max_length = self.length + new_tokens

    def reorder(self, index: torch.LongTensor, start: int = 0) -> None:
        """Row b becomes old row index[b] (beam search keeps the beams it extends), from slot `start` on.

        Slots before `start` stay in place: beam search passes the prompt's length, which all the beams of an
        example share, so that each step moves only the generated tokens, not the whole prompt.
        """
        if index.shape != (self.batch_size,):
            raise ValueError(f"KVCache.reorder: index must have shape ({self.batch_size},), got {tuple(index.shape)}")
        if self.copies > 1 and not torch.equal(index // self.copies,
                                               torch.arange(len(index), device=index.device) // self.copies):
            raise ValueError(f"KVCache.reorder: rows that share a prompt ({self.copies} a prompt) can only take each "
                             f"other's place, got index {index.tolist()}")
        # Only the rows that take another's place are worth moving (a row that keeps its own stays), and of them only
        # the filled slots (after share_prompt, keys' slot 0 is token prompt_length).
        moved = (index != torch.arange(len(index), device=index.device)).nonzero().flatten()  # (M,)
        if len(moved) == 0:
            return
        sources = index[moved]  # (M,): read into a copy before any is written (two beams may swap rows)
        filled = slice(max(start, self.prompt_length) - self.prompt_length, self.length - self.prompt_length)
        layer_bytes = self.keys[0, 0, :, filled].numel() * len(moved) * self.keys.element_size()  # the rows moved
        step = max(1, REORDER_BYTES // max(1, layer_bytes))  # layers moved at a time (above)
        for cache in (self.keys, self.values):
            for first in range(0, cache.shape[0], step):
                part = cache[first : first + step, :, :, filled]  # (layers, B, Hkv, filled, Dh)
                part[:, moved] = part[:, sources]  # (layers, M, Hkv, filled, Dh)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, Dh, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = Linear(D, self.num_heads * Dh, bias=bias)
        self.k_proj = Linear(D, self.num_kv_heads * Dh, bias=bias)
        self.v_proj = Linear(D, self.num_kv_heads * Dh, bias=bias)
        self.o_proj = Linear(self.num_heads * Dh, D, bias=bias)

    def forward(self, x, norm, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        """x (B, L, D) before its pre-norm `norm` -> (B, L, D)."""
        B, L, _ = x.shape
        # [p(norm(x)) for p in ...]: for a decode step's row, the norm and the products in one compiled call
        q, k, v = fast.linears(x, self.q_proj, self.k_proj, self.v_proj, norm=norm)
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = k.view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = v.view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        shared = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, Dh): after share_prompt, those since the prompt
            shared = cache.shared_prompt(self.layer_idx)  # the prompt's (B / copies, Hkv, P, Dh), or None
        # Grouped-query attention: each key/value head serves H / Hkv query heads, without materialising copies.
        # (decode_attention.attention is F.scaled_dot_product_attention, faster for a decode step's one query)
        if shared is not None:
            out = decode_attention.attention_after_shared_prompt(q, *shared, k, v, mask)
        else:
            out = decode_attention.attention(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)  # (B, L, H*Dh)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated linear unit."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(D, I, bias=bias)
        self.up_proj = Linear(D, I, bias=bias)
        self.down_proj = Linear(I, D, bias=bias)

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # silu(norm(x) gate_proj) * norm(x) up_proj: (B, L, I)
        return self.down_proj(fast.gated(x, self.gate_proj, self.up_proj, F.silu, norm))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        # Each sublayer is given h and its pre-norm, which fast.linears applies before the products it feeds.
        h = h + self.attn(h, self.attn_norm, cos, sin, mask, cache)
        return h + self.mlp(h, self.mlp_norm)


def attention_keep_mask(attention_mask, past: int, L: int, device) -> torch.Tensor:
    """Which keys each new token may look at: (B or 1, 1, L, S) bool, True = attend.

    Causal: new token i sits at slot past + i and sees slots 0..past + i. Padding: no one sees a pad slot.
    A left-pad query row sees nothing at all; scaled_dot_product_attention returns zeros for such a row
    (as it does inside transformers, whose sdpa path passes the same boolean mask), so it stays finite.
    Built once per forward, and always, even for one new token: given no mask, PyTorch 2.11 on an H100
    picks cuDNN attention, which re-plans for every new key length (milliseconds a step).
    """
    slots = torch.arange(past + L, device=device)  # (S,)
    keep = (slots[None, :] <= slots[past:, None])[None, None]  # (1, 1, L, S)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()  # (B, 1, L, S)
    return keep


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act must be 'silu' for LLaMA, got {config.hidden_act!r}")
        if config.head_dim % 2:
            raise ValueError(f"text_config.head_dim must be even for RoPE, got {config.head_dim}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Plain tensors, not buffers: model.to(torch.bfloat16) must not round them (transformers keeps RoPE in fp32).
        self.rope_cos, self.rope_sin = rope_tables(config, "cpu")

    def new_cache(self, batch_size: int, max_length: int, dtype=None, device=None) -> KVCache:
        """An empty KVCache for this model; dtype and device default to the model's."""
        c, weight = self.config, self.embed_tokens.weight
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, max_length, c.head_dim,
            dtype or weight.dtype, device or weight.device,
        )

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B or 1, 1, L, Dh) for these positions, looked up in fp32 then cast like transformers."""
        if self.rope_cos.device != position_ids.device:  # rebuilt once, on the first call on a new device
            self.rope_cos, self.rope_sin = rope_tables(self.config, position_ids.device)
        return self.rope_cos[position_ids][:, None].to(dtype), self.rope_sin[position_ids][:, None].to(dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        only_last_logits: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """inputs_embeds (B, L, D) -> logits (B, L, V), or (B, 1, V) for the last position only, or with
        return_hidden the final-normed hidden states (B, L, D) that lm_head would read (training scores a few).

        attention_mask (B, S): 1 = real token, 0 = pad, covering the cached tokens and the new ones.
        With a cache, the new tokens' keys and values are appended to it and cache.length grows by L.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        B, L, _ = inputs_embeds.shape
        past = 0 if cache is None else cache.length
        S = past + L
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds batch size {cache.batch_size}, inputs_embeds has {B}")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must have shape ({B}, {S}) (cached + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        if S > self.config.max_position_embeddings:
            raise ValueError(f"{S} tokens exceed max_position_embeddings {self.config.max_position_embeddings}")
        if position_ids is None:
            # As transformers' forward: positions count from the first slot, even on left-padded rows. generate.py
            # passes cumsum(attention_mask) - 1 itself so that each row's first real token sits at position 0.
            position_ids = (past + torch.arange(L, device=inputs_embeds.device))[None]  # (1, L)
        elif position_ids.shape[-1] != L:
            raise ValueError(f"position_ids must have shape ({B}, {L}), got {tuple(position_ids.shape)}")

        mask = attention_keep_mask(attention_mask, past, L, inputs_embeds.device)
        # The compute dtype: the weights' own, except a prompt with bf16 weights on a CPU without native bf16,
        # which computes in fp32 (fast.py). Decode steps (one token a row) stay in the weights' dtype.
        weight_dtype = self.norm.weight.dtype  # the model's dtype (the linear layers may be int8: quant.py)
        with fast.phase("decode" if L == 1 else "prefill", self.norm.weight) as compute:
            cos, sin = self.rope(position_ids, compute)  # (B or 1, 1, L, Dh)
            h = inputs_embeds.to(compute)
            whole = decode_blocks.takes(self.layers, h, cache)  # greedy steps: a speed path
            for layer in self.layers:
                if whole:
                    h = decode_blocks.llama_step(layer, h, cos, sin, mask, cache)  # (1, 1, D), compiled whole
                else:
                    h = layer(h, cos, sin, mask, cache)  # (B, L, D)
            if cache is not None:
                cache.advance(L)
            if only_last_logits:
                h = h[:, -1:]  # (B, 1, D): prefill only needs the next token's logits
            if return_hidden:
                return self.norm(h).to(weight_dtype)  # (B, L, D)
            return self.lm_head(self.norm(h)).to(weight_dtype)  # (B, L, V)
