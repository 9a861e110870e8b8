"""Flan-T5, the language model of the InstructBLIP-Flan-T5 checkpoints: an encoder-decoder Transformer.

Where it sits: model.py projects the Q-Former's query outputs to d_model and puts them in front of the
embedded prompt; `T5.encode` reads that sequence once, and `T5.decode` writes the answer token by token
(generate.py: once for the start token, then once per new token, with a `T5Cache`), cross-attending to
the encoder output at every step.

Both stacks are pre-norm and residual. An encoder block:
    h = h + o(attention(q(norm(h)), k(norm(h)), v(norm(h)), bias = position bias + padding mask))
    h = h + wo(act(wi_0(norm(h))) * wi_1(norm(h)))      gated (T5 v1.1, Flan-T5); wo(relu(wi(norm(h)))) in T5
a decoder block adds, between the two, cross-attention whose keys and values come from the encoder output.
What sets T5 apart from the textbook Transformer:
  - no position embeddings: each stack learns one bias per head and per bucket of relative distance
    (key position - query position), added to the attention scores of all its layers;
  - no 1/sqrt(Dk) scaling of the scores (T5 folds it into the initialisation of q);
  - RMS LayerNorm: no mean subtraction, no bias.

It mirrors transformers' T5ForConditionalGeneration (models/t5/modeling_t5.py) numerically.

Letters used in shape comments:
    B batch, S encoder length, L decoder tokens in this call, K decoder keys (cache.length + L),
    D d_model, H heads, Dk d_kv, F d_ff, V vocabulary size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_attention, decode_blocks, fast
from .config import T5Config
from .fast import Linear  # nn.Linear; a decode step's few rows take the faster products of fast.py
from .llama import KVCache  # the decoder's self-attention cache is LLaMA's


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written out as transformers' "gelu_new" is (so bf16 rounds the same way)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU: what the official InstructBLIP T5 checkpoints name in dense_act_fn
    "gelu_new": gelu_tanh,  # what feed_forward_proj "gated-gelu" implies when dense_act_fn is absent
    "relu": F.relu,  # the original T5
}


class T5LayerNorm(nn.Module):
    """x / rms(x) * weight: no mean subtraction, no bias."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers' T5LayerNorm: the mean of squares in fp32, x * rsqrt(...) promoted to fp32, then rounded
        # to the weight's dtype (a no-op in fp32) before the gain. Same ops, same order: bf16 matches bit for bit.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Bucket id in [0, num_buckets) of each relative position (key position - query position).

    Half the buckets (of each direction's half, when bidirectional) hold the exact distances 0 .. max_exact - 1;
    the other half hold log-spaced distances up to max_distance; anything farther shares the last bucket.
    The encoder is bidirectional: keys after the query get their own half. The decoder is causal: only keys
    at or before the query count, so it spends all buckets on looking back.
    """
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # future keys (masked anyway) fold onto distance 0
    max_exact = num_buckets // 2
    # The same float ops as transformers, so that distances on a bucket edge land in the same bucket. The clamp
    # only keeps log(0) out of the way: distances below max_exact take the exact branch of torch.where.
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    log_bucket = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5Cache(KVCache):
    """What the decoder keeps between steps: LLaMA's KVCache for self-attention, plus the cross-attention.

    keys / values: self-attention, (num_layers, B, H, max_length, Dk), preallocated; slots [0, length) filled.
    cross: per layer the cross-attention (keys, values) (B / rows_per_example, H, S, Dk), one row per example,
    computed from the encoder output on the first decode call and reused by every later one (the encoder output does
    not change while decoding).
    rows_per_example (kept as KVCache's `copies`): decoder rows that share one encoder output (beam search's beams),
    in a row; beam search only moves rows among those of their example (KVCache.reorder checks it), so their
    cross-attention stays in place.
    """

    def __init__(self, num_layers, batch_size, num_heads, max_length, head_dim, dtype, device, rows_per_example=1):
        super().__init__(num_layers, batch_size, num_heads, max_length, head_dim, dtype, device)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.copies = rows_per_example

    def reorder(self, index: torch.LongTensor, start: int = 0) -> None:
        """Row b becomes old row index[b]; with one row per example, its cross-attention moves with it."""
        super().reorder(index, start)  # refuses rows that would leave their example's rows
        if self.copies == 1 and not torch.equal(index, torch.arange(len(index), device=index.device)):
            self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                          for kv in self.cross]


class T5Attention(nn.Module):
    """Multi-head attention with no bias in q, k, v, o and no score scaling; `bias` brings positions and masks."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, length, Dk)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(states)), self.heads(self.v(states))  # (B, H, length, Dk) each

    def queries_keys_values(self, x: torch.Tensor, norm: nn.Module) -> list[torch.Tensor]:
        """Self-attention's three products of norm(x) (one call for a decode step's row): (B, H, L, Dk) each."""
        return [self.heads(p) for p in fast.linears(x, self.q, self.k, self.v, norm=norm)]

    def attend(self, q, keys, values, bias) -> torch.Tensor:
        """q (R, H, L, Dk), keys and values (B, H, K, Dk) with R a multiple of B -> (R, L, D).

        R > B in cross-attention for beams: the R / B rows of an example (its beams, in a row) share its encoder
        output, and attend to it as the query heads of grouped-query attention, `copies` of them a key/value head:
        the same kernel and sums as each beam on a copy of its own (as transformers repeats the encoder output for
        each beam: flan-t5-xxl's 160 encoder tokens are then 5 x 63 MB of keys and values projected at the first
        beam step and read at every one)."""
        R, H, L, Dk = q.shape
        copies = R // keys.shape[0]
        if copies > 1:  # row r = (b, c), head h -> row b, query head (h, c)
            q = q.view(-1, copies, H, L, Dk).transpose(1, 2).reshape(-1, H * copies, L, Dk)  # (B, H * copies, L, Dk)
        # F.scaled_dot_product_attention, faster for a decode step's query
        out = decode_attention.attention(q, keys, values, bias, scale=1.0, enable_gqa=copies > 1)
        if copies > 1:
            out = out.view(-1, H, copies, L, Dk).transpose(1, 2)  # (B, copies, H, L, Dk)
        return self.o(out.reshape(R, H, L, Dk).transpose(1, 2).reshape(R, L, H * Dk))  # (R, L, D)

    def forward(self, x, norm, keys, values, bias) -> torch.Tensor:
        """Cross-attention: x (B, L, D), the queries' side before its norm -> (B, L, D)."""
        return self.attend(self.heads(fast.linears(x, self.q, norm=norm)[0]), keys, values, bias)


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"text_config.dense_act_fn {config.dense_act_fn!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.dense_act_fn]
        self.gated = config.is_gated_act
        D, Fd = config.d_model, config.d_ff
        if self.gated:
            self.wi_0 = Linear(D, Fd, bias=False)  # through the activation: the gate
            self.wi_1 = Linear(D, Fd, bias=False)  # linear: what the gate lets through
        else:
            self.wi = Linear(D, Fd, bias=False)
        self.wo = Linear(Fd, D, bias=False)

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """x (B, length, D) before its norm -> (B, length, D)."""
        if self.gated:  # act(norm(x) wi_0) * norm(x) wi_1: (B, length, F)
            return self.wo(fast.gated(x, self.wi_0, self.wi_1, self.act, norm))  # (B, length, D)
        return self.wo(self.act(fast.linears(x, self.wi, norm=norm)[0]))


class T5Block(nn.Module):
    # transformers clamps the residual stream to the fp16 range after each sublayer (clamp_value in T5Block) and
    # keeps `wo` in fp32 when loading in fp16; both act only in fp16, where T5 v1.1 is known to overflow anyway.
    # Neither is replicated: run T5 in bf16 or fp32.
    def __init__(self, config: T5Config, layer_idx: int, is_decoder: bool):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the cache this block owns
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5Attention(config)
        if is_decoder:
            self.cross_attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
            self.cross_attn = T5Attention(config)
        self.ffn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)

    def cross_keys_values(self, encoder_hidden, cache: T5Cache | None):
        if cache is None:
            return self.cross_attn.keys_values(encoder_hidden)
        if cache.cross[self.layer_idx] is None:  # first decode call: project the encoder output once
            # Copied, each into a buffer one key longer than they are: each head's keys in one block, where heads()
            # leaves them transposed (the decode attention, which folds the batch into the heads, would copy them at
            # every step), and spaced as the self-attention's are in their cache, which has room to spare
            # (generate.prefill): one compiled decode attention serves both (compiling._compiled: dynamo
            # compiles contiguous keys apart, 0.1-0.3 s at a process's first 5-beam step)
            cross = []
            for t in self.cross_attn.keys_values(encoder_hidden):  # (B, H, S, Dk) each
                room = t.new_empty(*t.shape[:2], t.shape[2] + 1, t.shape[3])  # (B, H, S + 1, Dk)
                room[:, :, :-1] = t
                cross.append(room[:, :, :-1])
            cache.cross[self.layer_idx] = tuple(cross)
        return cache.cross[self.layer_idx]

    def forward(self, h, bias, cache=None, encoder_hidden=None, cross_bias=None) -> torch.Tensor:
        # Each sublayer is given h and its pre-norm, which fast.linears applies before the products it feeds: in a
        # decode step, in the products' compiled call (LLaMA's blocks do the same).
        q, keys, values = self.attn.queries_keys_values(h, self.attn_norm)  # (B, H, L, Dk) each
        if cache is not None:
            keys, values = cache.update(self.layer_idx, keys, values)  # (B, H, K, Dk)
        h = h + self.attn.attend(q, keys, values, bias)
        if encoder_hidden is not None:
            keys, values = self.cross_keys_values(encoder_hidden, cache)  # (B or fewer: one per example, H, S, Dk)
            h = h + self.cross_attn(h, self.cross_attn_norm, keys, values, cross_bias)
        return h + self.ffn(h, self.ffn_norm)


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks sharing one relative position bias table, then a final norm."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        # The official checkpoints store this table on block 0's self-attention; every block of the stack uses it.
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.blocks = nn.ModuleList(T5Block(config, i, is_decoder) for i in range(num_layers))
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, h, attention_mask=None, encoder_hidden=None, encoder_attention_mask=None, cache=None):
        """h (B, L, D) -> (B, L, D). attention_mask (B, K): 1 = attend, 0 = pad (K = L without a cache).

        With a cache, the L new tokens sit at positions cache.length .. cache.length + L - 1, and the position
        bias is computed for those query rows only.
        """
        past = 0 if cache is None else cache.length
        L = h.shape[1]
        key_positions = torch.arange(past + L, device=h.device)  # (K,)
        relative = key_positions[None, :] - key_positions[past:, None]  # (L, K)
        buckets = relative_position_bucket(relative, not self.is_decoder, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, K)
        # Masked scores get the dtype's lowest value, not -inf: as in transformers, a query row that sees no key
        # (a left-pad row) then spreads its attention evenly instead of producing NaN.
        keep = relative <= 0 if self.is_decoder and L > 1 else None  # causal: (L, K)
        if attention_mask is not None:
            not_pad = attention_mask[:, None, None, :].bool()  # (B, 1, 1, K)
            keep = not_pad if keep is None else keep & not_pad  # (B, 1, L, K)
        if keep is not None:
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)  # (B or 1, H, L, K)
        cross_bias = None
        if encoder_hidden is not None and encoder_attention_mask is not None:
            not_pad = encoder_attention_mask[:, None, None, :].bool()  # (B, 1, 1, S); no position bias across
            cross_bias = torch.zeros(not_pad.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~not_pad, torch.finfo(h.dtype).min)
        whole = self.is_decoder and decode_blocks.takes(self.blocks, h, cache)  # greedy steps: a speed path
        for block in self.blocks:
            if whole:
                h = decode_blocks.t5_step(block, h, bias, cache, encoder_hidden, cross_bias)  # (1, 1, D)
            else:
                h = block(h, bias, cache, encoder_hidden, cross_bias)  # (B, L, D)
        if cache is not None:
            cache.advance(L)
        return self.final_norm(h)


def _check_mask(name: str, mask, batch_size: int, length: int) -> None:
    if mask is not None and tuple(mask.shape) != (batch_size, length):
        raise ValueError(f"{name} must have shape ({batch_size}, {length}), got {tuple(mask.shape)}")


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # the encoder's and decoder's token embeddings
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)

    def tie_lm_head(self) -> None:
        """Share lm_head's weight with `shared`: transformers 5 writes T5 that way and leaves lm_head out of the file."""
        self.lm_head.weight = self.shared.weight

    def new_cache(self, batch_size: int, max_length: int, dtype=None, device=None,
                  rows_per_example: int = 1) -> T5Cache:
        """An empty T5Cache for up to max_length decoder tokens; dtype and device default to the model's;
        rows_per_example: rows sharing one encoder output (T5Cache)."""
        c, weight = self.config, self.shared.weight
        return T5Cache(c.num_decoder_layers, batch_size, c.num_heads, max_length, c.d_kv,
                       dtype or weight.dtype, device or weight.device, rows_per_example)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (B, S, D), attention_mask (B, S) 1 = keep, 0 = pad -> encoder_hidden (B, S, D)."""
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs_embeds must have shape (batch, length, {self.config.d_model}), "
                             f"got {tuple(inputs_embeds.shape)}")
        _check_mask("attention_mask", attention_mask, *inputs_embeds.shape[:2])
        # bf16 weights on a CPU without native bf16 compute the prompt in fp32 (fast.py).
        with fast.phase("prefill", self.lm_head.weight) as compute:
            return self.encoder(inputs_embeds.to(compute), attention_mask).to(self.lm_head.weight.dtype)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask=None, decoder_attention_mask=None,
               cache: T5Cache | None = None, only_last_logits: bool = False) -> torch.Tensor:
        """decoder_input_ids (B, L) -> logits (B, L, V), or (B, 1, V) for the last position only.

        encoder_hidden (B, S, D) and encoder_attention_mask (B, S) come from `encode`; with a cache whose
        cross-attention is filled, encoder_hidden is not read again. They may hold one row per example where each
        example has B / that many decoder rows in a row (its beams), which share it (T5Attention.attend).
        decoder_attention_mask (B, K) covers the cached tokens and the new ones; causality is always applied on top.
        """
        if decoder_input_ids.dim() != 2:
            raise ValueError(f"decoder_input_ids must have shape (batch, length), got {tuple(decoder_input_ids.shape)}")
        B, L = decoder_input_ids.shape
        past = 0 if cache is None else cache.length
        if B % encoder_hidden.shape[0]:
            raise ValueError(f"encoder_hidden has batch size {encoder_hidden.shape[0]}, decoder_input_ids has {B}: "
                             "expected the same, or a multiple (the rows of each example, in a row)")
        _check_mask("encoder_attention_mask", encoder_attention_mask, *encoder_hidden.shape[:2])
        _check_mask("decoder_attention_mask (cached + new tokens)", decoder_attention_mask, B, past + L)
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch size {cache.batch_size}, decoder_input_ids has {B}")
        # A decode step (one token a row) computes in the weights' dtype; several tokens at once (teacher forcing)
        # in fp32 where bf16 is slow (fast.py).
        with fast.phase("decode" if L == 1 else "prefill", self.lm_head.weight) as compute:
            h = self.shared(decoder_input_ids).to(compute)  # (B, L, D)
            h = self.decoder(h, decoder_attention_mask, encoder_hidden, encoder_attention_mask, cache)
            if only_last_logits:
                h = h[:, -1:]  # (B, 1, D): generation only needs the next token's logits
            if self.config.scale_decoder_outputs:
                # The original (tied) T5 rescales before the shared output embedding; Flan-T5 (untied) does not.
                h = h * self.config.d_model**-0.5
            return self.lm_head(h).to(self.lm_head.weight.dtype)  # (B, L, V)

    def forward(self, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> torch.Tensor:
        """Encode, then decode all of decoder_input_ids at once (teacher forcing): logits (B, L, V)."""
        encoder_hidden = self.encode(inputs_embeds, attention_mask)  # (B, S, D)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)
