"""minivb.t5 against transformers' T5ForConditionalGeneration (5.24.0), and its cache against full recomputation.

Tiny configs with weights redrawn at a scale that keeps activations of order one (transformers' own init gives
near-flat logits on which everything agrees). The encoder batch is right-padded, as the T5 tokenizer pads.
Small relative_attention_num_buckets / max_distance so that the log-spaced buckets and the clamp at max_distance
are both reached by these short sequences.
"""

import math

import pytest
import torch
import transformers
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention as RefT5Attention
from transformers.models.t5.modeling_t5 import T5LayerNorm as RefT5LayerNorm

from minivb.checkpoint import map_key
from minivb.config import T5Config, _from_dict
from minivb.t5 import T5, T5LayerNorm, relative_position_bucket

TINY = dict(vocab_size=120, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=12, relative_attention_max_distance=9)
VARIANTS = {
    # The official InstructBLIP-Flan-T5 text config: gated, exact GELU named explicitly, untied and unscaled.
    "flan-t5": dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False),
    # "gated-gelu" alone: transformers derives the tanh GELU ("gelu_new").
    "t5-v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # The original T5: ReLU, not gated, lm_head tied to `shared`, decoder output scaled by d_model**-0.5.
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}
TOL = 1e-4
S, L = 11, 11  # encoder and decoder lengths


def build(variant="flan-t5", attn_implementation="eager", seed=0):
    """(transformers model, minivb model) with the same randomized weights, both in eval mode."""
    torch.manual_seed(seed)
    ref_config = transformers.T5Config(**TINY, **VARIANTS[variant])
    ref_config._attn_implementation = attn_implementation
    ref = transformers.T5ForConditionalGeneration(ref_config).eval()
    tied = VARIANTS[variant]["tie_word_embeddings"]
    if not tied:
        # transformers 5 always ties lm_head to `shared` at construction; an untied checkpoint (Flan-T5) unties it
        # when loaded because the two tensors differ. Do the same by hand.
        ref.lm_head.weight = nn.Parameter(torch.empty_like(ref.lm_head.weight))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # tied parameters appear once
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * noise)  # RMSNorm gains away from 1, so that a missing one shows
            elif name == "shared.weight" or "relative_attention_bias" in name:
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(noise / 2)  # unscaled decoder output: logits of std ~4, far from flat yet fp32-friendly
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    # The real path: the config.json transformers writes for this text config, read by minivb.config.
    ours = T5(_from_dict(T5Config, ref_config.to_dict())).eval()
    if tied:
        ours.tie_lm_head()  # what the loader does when the checkpoint has no lm_head.weight
    # The checkpoint key table maps InstructBLIP's "language_model." names; a bare T5 lacks the prefix.
    state = {map_key("language_model." + k).removeprefix("language_model."): p for k, p in ref.named_parameters()}
    params = dict(ours.named_parameters())
    assert set(state) == set(params)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return ref, ours


def encoder_batch(batch_size=2, seed=1):
    """inputs_embeds (B, S, D) and a right-padded attention_mask (B, S): row 1 has 4 pads, row 2 (if any) 7."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch_size, S, TINY["d_model"], generator=g)
    mask = torch.ones(batch_size, S, dtype=torch.long)
    for b, pads in zip(range(1, batch_size), (4, 7)):
        mask[b, S - pads :] = 0
    return embeds, mask


def decoder_ids(batch_size=2, length=L, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (batch_size, length), generator=g)
    ids[:, 0] = 0  # decoder_start_token_id
    return ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_resolves_like_transformers(variant):
    ref_config = transformers.T5Config(**TINY, **VARIANTS[variant])
    ours = _from_dict(T5Config, ref_config.to_dict())
    for field in ("dense_act_fn", "is_gated_act", "scale_decoder_outputs", "num_decoder_layers",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
        assert getattr(ours, field) == getattr(ref_config, field), field
    assert ours.scale_decoder_outputs == VARIANTS[variant]["tie_word_embeddings"]
    assert ours.dense_act_fn == {"flan-t5": "gelu", "t5-v1.1": "gelu_new", "t5": "relu"}[variant]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_match_transformers(variant, attn_implementation):
    ref, ours = build(variant, attn_implementation)
    embeds, mask = encoder_batch()
    ids = decoder_ids()
    expected = ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    assert expected.std() > 0.5  # logits far from flat: differences would show
    got = ours(embeds, mask, ids)
    assert (got - expected).abs().max() <= TOL
    if VARIANTS[variant]["tie_word_embeddings"]:
        assert ours.lm_head.weight is ours.shared.weight


@torch.no_grad()
def test_decoder_attention_mask_matches_transformers():
    ref, ours = build("flan-t5")
    embeds, mask = encoder_batch()
    ids = decoder_ids()
    decoder_mask = torch.ones_like(ids)
    decoder_mask[0, :2] = 0  # left padding: query rows 0 and 1 of row 0 see no key at all (uniform in both)
    decoder_mask[1, -3:] = 0  # right padding
    expected = ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids,
                   decoder_attention_mask=decoder_mask).logits
    got = ours(embeds, mask, ids, decoder_mask)
    assert (got - expected).abs().max() <= TOL
    assert (got - ours(embeds, mask, ids)).abs().max() > 0.1  # the mask did change something


def test_relative_position_buckets_match_transformers():
    relative = torch.arange(-300, 301)[None, :] - torch.arange(0, 40)[:, None]
    for num_buckets, max_distance in ((32, 128), (12, 9)):
        for bidirectional in (True, False):
            expected = RefT5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
            got = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
            assert torch.equal(got, expected)
            # The range reaches the far bucket of each direction (the clamp at max_distance).
            far = {num_buckets // 2 - 1, num_buckets - 1} if bidirectional else {num_buckets - 1}
            assert far <= set(got.unique().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_layer_norm_matches_transformers_bitwise(dtype):
    g = torch.Generator().manual_seed(3)
    x = (10 * torch.randn(3, 5, 64, generator=g)).to(dtype)
    ref, ours = RefT5LayerNorm(64, eps=1e-6).to(dtype), T5LayerNorm(64, 1e-6).to(dtype)
    ref.weight.copy_(1 + torch.randn(64, generator=g))
    ours.weight.copy_(ref.weight)
    assert ours(x).dtype == dtype
    assert torch.equal(ours(x), ref(x))


@torch.no_grad()
def test_cached_decoding_matches_full_recomputation():
    _, ours = build("flan-t5")
    embeds, mask = encoder_batch()
    ids = decoder_ids(length=14)  # longer than max_distance: the decoder's bucket clamp is reached
    decoder_mask = torch.ones_like(ids)
    decoder_mask[1, :2] = 0  # a left-padded decoder row
    real = decoder_mask.bool()  # pad query rows see no key: uniform attention over whatever keys exist, not comparable
    encoder_hidden = ours.encode(embeds, mask)
    full = ours.decode(ids, encoder_hidden, mask, decoder_mask)
    cache = ours.new_cache(batch_size=2, max_length=16)
    steps = [ours.decode(ids[:, :3], encoder_hidden, mask, decoder_mask[:, :3], cache=cache)]  # prefill 3 tokens
    assert all(kv is not None for kv in cache.cross)
    for t in range(3, ids.shape[1]):
        # Cross-attention keys/values come from the cache from now on: zeros in place of the encoder output prove it.
        steps.append(ours.decode(ids[:, t : t + 1], torch.zeros_like(encoder_hidden), mask, decoder_mask[:, : t + 1],
                                 cache=cache, only_last_logits=True))
    assert cache.length == ids.shape[1]
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() <= TOL


@torch.no_grad()
def test_reorder_matches_full_recomputation():
    _, ours = build("t5")
    embeds, mask = encoder_batch(batch_size=3)
    ids = decoder_ids(batch_size=3, length=6)
    encoder_hidden = ours.encode(embeds, mask)
    cache = ours.new_cache(batch_size=3, max_length=8)
    ours.decode(ids[:, :5], encoder_hidden, mask, cache=cache)
    index = torch.tensor([2, 0, 0])  # beam search: keep row 2, and row 0 twice
    cache.reorder(index)
    last = ours.decode(ids[:, 5:], encoder_hidden[index], mask[index], cache=cache)
    reordered_ids = torch.cat([ids[index, :5], ids[:, 5:]], dim=1)
    full = ours.decode(reordered_ids, encoder_hidden[index], mask[index])
    assert (last - full[:, -1:]).abs().max() <= TOL
    with pytest.raises(ValueError, match="reorder"):
        cache.reorder(torch.tensor([0, 1]))


@torch.no_grad()
def test_beams_of_one_example_share_its_encoder_output():
    """2 examples x 2 beams: the decoder's 4 rows read the 2 rows of encoder output (as generate passes it), each
    example's beams as more queries of one row, and equal the decoder run with the encoder output repeated for each
    beam; beams move among their example's rows and leave its cross-attention in place, and cannot leave them."""
    _, ours = build("t5")
    embeds, mask = encoder_batch(batch_size=2)
    encoder_hidden = ours.encode(embeds, mask)  # (2, S, D)
    repeated, repeated_mask = encoder_hidden.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    ids = decoder_ids(batch_size=4, length=6)
    cache = ours.new_cache(batch_size=4, max_length=8, rows_per_example=2)
    first = ours.decode(ids[:, :5], encoder_hidden, mask, cache=cache)
    assert (first - ours.decode(ids[:, :5], repeated, repeated_mask)).abs().max() <= TOL
    assert cache.cross[0][0].shape[0] == 2  # once per example
    cross, index = list(cache.cross), torch.tensor([1, 1, 2, 3])
    cache.reorder(index)
    assert all(new is old for new, old in zip(cache.cross, cross))
    last = ours.decode(ids[:, 5:], encoder_hidden, mask, cache=cache)
    full = ours.decode(torch.cat([ids[index, :5], ids[:, 5:]], dim=1), repeated, repeated_mask)
    assert (last - full[:, -1:]).abs().max() <= TOL
    with pytest.raises(ValueError, match="share a prompt"):
        cache.reorder(torch.tensor([2, 0, 1, 3]))
    with pytest.raises(ValueError, match="multiple"):
        ours.decode(ids[:3, :1], encoder_hidden, mask)


@torch.no_grad()
def test_bf16_matches_transformers(monkeypatch):
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")  # bf16 arithmetic, as transformers does it (see fast.py)
    # Against transformers' default (sdpa) attention, which runs the same kernel: on CPU the bf16 logits agree bit
    # for bit (norm rounding, gelu_new formula and masking all as transformers), far below bf16's own error.
    ref, ours = build("t5-v1.1", attn_implementation="sdpa")
    embeds, mask = encoder_batch()
    ids = decoder_ids()
    exact = ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    embeds = embeds.to(torch.bfloat16)
    expected = ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits.float()
    got = ours(embeds, mask, ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    bf16_error = (expected - exact).abs().max()
    assert bf16_error > 0.1  # bf16 does round: the comparison below is meaningful
    assert (got.float() - expected).abs().max() <= 0.02 * bf16_error
    encoder_hidden = ours.encode(embeds, mask)
    cache = ours.new_cache(batch_size=2, max_length=L)
    assert cache.keys.dtype == torch.bfloat16
    steps = [ours.decode(ids[:, t : t + 1], encoder_hidden, mask, cache=cache) for t in range(3)]
    assert (torch.cat(steps, dim=1).float() - got[:, :3].float()).abs().max() <= bf16_error


def test_bad_inputs_raise_value_errors():
    ours = T5(T5Config(**TINY, feed_forward_proj="gated-gelu"))
    embeds, mask = encoder_batch()
    with pytest.raises(ValueError, match="inputs_embeds"):
        ours.encode(embeds[..., :10], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.encode(embeds, mask[:, :5])
    encoder_hidden = ours.encode(embeds, mask)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        ours.decode(decoder_ids(), encoder_hidden, mask, torch.ones(2, 3))
    with pytest.raises(ValueError, match="full"):
        ours.decode(decoder_ids(), encoder_hidden, mask, cache=ours.new_cache(batch_size=2, max_length=4))
    with pytest.raises(ValueError, match="dense_act_fn"):
        T5(T5Config(**TINY, feed_forward_proj="gated-swish"))
