"""The Q-Former: a BERT-base that condenses each frame's ViT features into Q = 32 query outputs.

Where it sits: the ViT (vit.py) gives frame features (N, 257, 1408); the Q-Former turns them into query outputs
(N, 32, 768); model.py projects those to the language model's width and puts 32 per frame into the prompt.
InstructBLIP's change to BLIP-2 is that the instruction enters the Q-Former too, so the queries pick out what the
question is about.

One sequence of Q + L positions goes through the layers: the Q learned query tokens, then the L instruction tokens
(BERT word + position embeddings). Each layer is post-LayerNorm BERT, x = LayerNorm(x + sublayer(x)):
  1. self-attention over all Q + L positions: queries and text read each other; text padding is masked out as a key,
     the queries are always visible;
  2. on layers 0, f, 2f, ... (f = cross_attention_frequency, 2 officially): cross-attention from the Q query
     positions only to the frame features; the text sees the image only through the queries;
  3. a feed-forward with separate weights for query positions (query_ffn) and text positions (text_ffn).
Only the query positions leave; the text is a guide.

It mirrors transformers' InstructBlipVideoQFormerModel (models/instructblipvideo/modeling_instructblipvideo.py).

Shapes: N images (B videos x T frames; each frame carries its video's instruction), Q queries (32), L instruction
tokens, P frame feature tokens (1 class + 256 patches = 257), Hq hidden size (768), Cv frame feature size (1408),
h heads (12), d = Hq/h head size (64), I feed-forward size (3072).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .config import QFormerConfig


class QFormerAttention(nn.Module):
    """Multi-head attention plus BERT's output step, LayerNorm(x + out(attention)). Self- or cross-attention."""

    def __init__(self, config: QFormerConfig, context_size: int):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"qformer hidden_size {config.hidden_size} must be divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        # Keys and values come from `context`: the sequence itself (Hq wide) or the frame features (Cv wide).
        self.key = nn.Linear(context_size, config.hidden_size)
        self.value = nn.Linear(context_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        num_images, length, _ = projected.shape  # (N, S, Hq)
        return projected.view(num_images, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, S, d)

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (N, S, Hq) asks, context (N, S_kv, Hq or Cv) answers; key_mask (N, 1, 1, S_kv), True = visible."""
        query = self._split_heads(self.query(hidden))  # (N, h, S, d)
        key = self._split_heads(self.key(context))  # (N, h, S_kv, d)
        value = self._split_heads(self.value(context))  # (N, h, S_kv, d)
        if return_attention:
            # The explicit softmax, so the weights can be returned (the notebooks draw them).
            scores = query @ key.transpose(-2, -1) * self.head_dim**-0.5  # (N, h, S, S_kv)
            if key_mask is not None:
                # Every row keeps at least the Q query keys, so no row is all -inf.
                scores = scores.masked_fill(~key_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            attended = weights @ value  # (N, h, S, d)
        else:
            weights = None
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)  # (N, h, S, d)
        attended = attended.transpose(1, 2).flatten(2)  # (N, S, Hq)
        return self.norm(hidden + self.out(attended)), weights


class QFormerFeedForward(nn.Module):
    """BERT's feed-forward with its output step: LayerNorm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(
                f"qformer hidden_act {config.hidden_act!r} is not supported; the official checkpoints use 'gelu'"
            )
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as BERT uses.
        return self.norm(hidden + self.fc2(F.gelu(self.fc1(hidden))))  # (N, S, I) inside, (N, S, Hq) out


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerAttention(config, context_size=config.hidden_size)
        self.cross_attn = None
        if has_cross_attention:
            self.cross_attn = QFormerAttention(config, context_size=config.encoder_hidden_size)
        self.text_ffn = QFormerFeedForward(config)
        self.query_ffn = QFormerFeedForward(config)

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        key_mask: torch.Tensor,
        frame_features: torch.Tensor,
        return_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden, self_weights = self.self_attn(hidden, hidden, key_mask, return_attentions)  # (N, Q+L, Hq)
        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]  # (N, Q, Hq), (N, L, Hq)
        cross_weights = None
        if self.cross_attn is not None:
            # Every frame feature is real (no padding), hence no mask.
            queries, cross_weights = self.cross_attn(queries, frame_features, None, return_attentions)  # (N, Q, Hq)
        # The text runs through text_ffn on every layer, the last one included although its text output is then
        # dropped: transformers (and LAVIS) do the same, and it keeps every layer one function.
        hidden = torch.cat([self.query_ffn(queries), self.text_ffn(text)], dim=1)  # (N, Q+L, Hq)
        return hidden, self_weights, cross_weights


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers)
        )

    def _check_inputs(self, query_tokens, input_ids, attention_mask, frame_features) -> None:
        config = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (images, text length), got shape {tuple(input_ids.shape)}")
        num_images, text_length = input_ids.shape
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}; "
                "it masks the instruction only (the queries are always attended)"
            )
        if text_length > config.max_position_embeddings:
            raise ValueError(
                f"the Q-Former instruction has {text_length} tokens, more than max_position_embeddings "
                f"{config.max_position_embeddings}; truncate it"
            )
        if (
            query_tokens.dim() != 3
            or query_tokens.shape[0] != num_images
            or query_tokens.shape[2] != config.hidden_size
        ):
            raise ValueError(
                f"query_tokens must have shape ({num_images}, queries, {config.hidden_size}), "
                f"got {tuple(query_tokens.shape)}"
            )
        if (
            frame_features.dim() != 3
            or frame_features.shape[0] != num_images
            or frame_features.shape[2] != config.encoder_hidden_size
        ):
            raise ValueError(
                f"frame_features must have shape ({num_images}, tokens, {config.encoder_hidden_size}), "
                f"got {tuple(frame_features.shape)}"
            )

    def forward(
        self,
        query_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        frame_features: torch.Tensor,
        return_attentions: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Query outputs (N, Q, Hq) for queries (N, Q, Hq), instruction ids and mask (N, L), frames (N, P, Cv).

        With return_attentions=True, also return {"self": per layer (N, h, Q+L, Q+L),
        "cross": per cross-attention layer (N, h, Q, P)}.
        """
        self._check_inputs(query_tokens, input_ids, attention_mask, frame_features)
        num_images, text_length = input_ids.shape
        num_queries = query_tokens.shape[1]

        # Which keys each position may read: all Q queries, then the unpadded text tokens.
        query_visible = attention_mask.new_ones(num_images, num_queries)  # (N, Q)
        key_mask = torch.cat([query_visible, attention_mask], dim=1).bool()  # (N, Q+L)
        key_mask = key_mask[:, None, None, :]  # (N, 1, 1, Q+L): the same for every head and every asking position

        # The compute dtype: the weights' own, except bf16 weights on a CPU without native bf16, which compute in
        # fp32 (fast.py).
        weight_dtype = self.word_embeddings.weight.dtype
        with fast.phase("vision", self.word_embeddings.weight) as compute:
            # The text positions count from 0, as if the queries were not there: queries get no position embedding.
            positions = torch.arange(text_length, device=input_ids.device)  # (L,)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (N, L, Hq)
            # One LayerNorm over the concatenation, queries included.
            hidden = self.embed_norm(torch.cat([query_tokens.to(compute), text], dim=1))  # (N, Q+L, Hq)

            self_attentions, cross_attentions = [], []
            for layer in self.layers:
                hidden, self_weights, cross_weights = layer(
                    hidden, num_queries, key_mask, frame_features, return_attentions
                )
                self_attentions.append(self_weights)
                if cross_weights is not None:
                    cross_attentions.append(cross_weights)
        query_output = hidden[:, :num_queries].to(weight_dtype)  # (N, Q, Hq)
        if return_attentions:
            return query_output, {"self": self_attentions, "cross": cross_attentions}
        return query_output
