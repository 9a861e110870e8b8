"""minivb.llama against transformers' LlamaForCausalLM (5.24.0), and the KV cache against full recomputation.

Tiny configs with weights redrawn at a scale that keeps activations of order one (transformers' own init
gives near-flat logits on which everything agrees). Batches are left-padded, as generation feeds them.
"""

import math

import pytest
import torch
import transformers

from minivb.config import LlamaConfig
from minivb.llama import Llama
from tests.tiny import copy_into

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=101,
            max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6)
TOL = 1e-4


def build(num_key_value_heads=2, attn_implementation="sdpa", seed=0):
    """(transformers model, minivb model) with the same randomized weights, both in eval mode."""
    torch.manual_seed(seed)
    ref_config = transformers.LlamaConfig(num_key_value_heads=num_key_value_heads, **TINY)
    ref_config._attn_implementation = attn_implementation
    ref = transformers.LlamaForCausalLM(ref_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)  # RMSNorm gains away from 1, so that a missing one shows
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    ours = Llama(LlamaConfig(num_key_value_heads=num_key_value_heads, **TINY)).eval()
    copy_into(ref, ours, "language_model")  # through the checkpoint key table
    return ref, ours


def left_padded_batch(lengths, total, seed=1):
    """inputs_embeds (B, total, D), attention_mask (B, total) with row b holding lengths[b] real tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(lengths), total, TINY["hidden_size"], generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
    return embeds, mask


def generation_positions(mask):
    """What generation passes: each row's first real token at position 0 (pads get 1, as transformers does)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("num_key_value_heads", [2, 4])  # grouped-query attention, then one kv head per query head
@torch.no_grad()
def test_logits_match_transformers(num_key_value_heads):
    ref, ours = build(num_key_value_heads)
    embeds, mask = left_padded_batch([7, 4], total=7)
    for position_ids in (None, generation_positions(mask)):
        expected = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        got = ours(embeds, mask, position_ids)
        assert expected.std() > 0.5  # logits far from flat: differences would show
        # All positions, pad rows included: fully masked rows give zero attention in both (sdpa).
        assert (got - expected).abs().max() <= TOL
        last = ours(embeds, mask, position_ids, only_last_logits=True)
        assert last.shape == (2, 1, TINY["vocab_size"])
        assert (last - expected[:, -1:]).abs().max() <= TOL


@torch.no_grad()
def test_logits_match_transformers_eager_at_real_tokens():
    # Eager attention gives pad rows a uniform softmax instead of zeros: only real tokens are comparable.
    ref, ours = build(2, attn_implementation="eager")
    embeds, mask = left_padded_batch([7, 4], total=7)
    expected = ref(inputs_embeds=embeds, attention_mask=mask).logits
    got = ours(embeds, mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= TOL


@torch.no_grad()
def test_cached_decoding_matches_full_recomputation():
    ref, ours = build(2)
    prompt, new = 6, 4
    embeds, mask = left_padded_batch([6, 3], total=prompt + new)
    mask[:, prompt:] = 1  # generated tokens are never padding
    positions = generation_positions(mask)
    expected = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    full = ours(embeds, mask, positions)

    cache = ours.new_cache(batch_size=2, max_length=prompt + new)
    steps = [ours(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)]  # prefill
    for t in range(prompt, prompt + new):
        steps.append(ours(embeds[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache))
    cached = torch.cat(steps, dim=1)
    assert cache.length == prompt + new
    assert (cached - full).abs().max() <= TOL
    assert (cached - expected).abs().max() <= TOL


@torch.no_grad()
def test_reorder_selects_cache_rows():
    _, ours = build(2)
    embeds, mask = left_padded_batch([5, 2, 4], total=6)
    positions = generation_positions(mask)
    cache = ours.new_cache(batch_size=3, max_length=6)
    ours(embeds[:, :5], mask[:, :5], positions[:, :5], cache)
    index = torch.tensor([2, 0, 0])  # beam search: row 1 dropped, row 0 kept twice
    cache.reorder(index)
    step = ours(embeds[index, 5:], mask[index], positions[index, 5:], cache)
    full = ours(embeds[index], mask[index], positions[index])
    assert (step - full[:, 5:]).abs().max() <= TOL
    with pytest.raises(ValueError, match="index"):
        cache.reorder(torch.tensor([0, 1]))


@torch.no_grad()
@pytest.mark.parametrize("num_key_value_heads", [2, 4])
def test_rows_that_share_a_prompt_equal_rows_that_copy_it(num_key_value_heads):
    """generate.prefill runs each prompt once and its beams share its keys and values (KVCache.share_prompt): every
    decode step equals the model run over each row's whole sequence, the prompt copied to every row."""
    _, ours = build(num_key_value_heads)
    prompt, new, copies = 5, 3, 3
    embeds, mask = left_padded_batch([5, 2], total=prompt + new)  # two examples, one left-padded
    mask[:, prompt:] = 1
    positions = generation_positions(mask)
    cache = ours.new_cache(batch_size=2, max_length=prompt)
    ours(embeds[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)
    cache.share_prompt(copies, new)
    assert cache.prompt_keys.shape == (3, 2, num_key_value_heads, prompt, 16)  # (layers, B, Hkv, P, Dh), once
    assert cache.keys.shape == (3, 2 * copies, num_key_value_heads, new, 16)  # (layers, R, Hkv, new, Dh)
    # Each row continues its example's prompt with tokens of its own; beams move within their example.
    g = torch.Generator().manual_seed(2)
    rows = embeds.repeat_interleave(copies, dim=0)  # (R, prompt + new, D)
    rows[:, prompt:] = torch.randn(rows[:, prompt:].shape, generator=g)
    row_mask, row_positions = mask.repeat_interleave(copies, 0), positions.repeat_interleave(copies, 0)
    for t in range(prompt, prompt + new):
        if t == prompt + 1:
            index = torch.tensor([2, 2, 0, 4, 3, 3])  # rows of example 0 stay among 0-2, of example 1 among 3-5
            cache.reorder(index, start=prompt)
            rows[:, :t] = rows[index, :t]
        step = ours(rows[:, t : t + 1], row_mask[:, : t + 1], row_positions[:, t : t + 1], cache)
        full = ours(rows[:, : t + 1], row_mask[:, : t + 1], row_positions[:, : t + 1])
        assert (step[:, 0] - full[:, -1]).abs().max() <= TOL, t
    with pytest.raises(ValueError, match="share a prompt"):
        cache.reorder(torch.tensor([3, 1, 2, 0, 4, 5]))  # a beam of example 1 cannot continue example 0's prompt
    with pytest.raises(ValueError, match="max_length"):
        ours(rows[:, :1], torch.ones(2 * copies, prompt + new + 1), None, cache)  # past the room it was given


@torch.no_grad()
def test_bf16_runs_and_follows_transformers(monkeypatch):
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")  # bf16 arithmetic, as transformers does it (see fast.py)
    ref, ours = build(2)
    embeds, mask = left_padded_batch([7, 4], total=7)
    fp32 = ours(embeds, mask)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    # from_pretrained(dtype=bfloat16) keeps RoPE's inv_freq in fp32; ref.to() rounded it, so restore it.
    rope = ref.model.rotary_emb
    rope.inv_freq = rope.compute_default_rope_parameters(ref.config)[0]
    assert ours.rope_cos.dtype == torch.float32  # .to(bfloat16) must not round the RoPE tables
    embeds = embeds.bfloat16()
    got = ours(embeds, mask)
    expected = ref(inputs_embeds=embeds, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    assert (got.float() - expected.float()).abs().max() <= 1e-2  # same operations, same roundings
    assert (got.float() - fp32).abs().max() <= 0.25  # and still the same model


@torch.no_grad()
def test_bad_inputs_raise():
    _, ours = build(4)
    embeds, mask = left_padded_batch([3, 2], total=3)
    with pytest.raises(ValueError, match="inputs_embeds"):
        ours(embeds[..., :10], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(embeds, mask[:, :2])
    cache = ours.new_cache(batch_size=2, max_length=4)
    ours(embeds, mask, cache=cache)
    with pytest.raises(ValueError, match="max_length"):
        ours(embeds[:, :2], torch.ones(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.randn(1, TINY["max_position_embeddings"] + 1, TINY["hidden_size"]))
