"""minivb.qformer.QFormer against transformers' InstructBlipVideoQFormerModel on a tiny randomized Q-Former.

The weights go from transformers' module into ours through the checkpoint key table (minivb.checkpoint.map_key),
so these tests check the table's Q-Former rows too. fp32, batch 2 with a padded instruction in row 1,
max abs diff <= 1e-4 on the query outputs and on every self- and cross-attention map.
"""

import pytest
import torch
from transformers.models.instructblipvideo.configuration_instructblipvideo import InstructBlipVideoQFormerConfig
from transformers.models.instructblipvideo.modeling_instructblipvideo import InstructBlipVideoQFormerModel

from minivb.config import QFormerConfig
from minivb.qformer import QFormer
from tests.tiny import copy_into, randomize

# 3 layers with cross_attention_frequency 2: cross-attention on layers 0 and 2, not 1. layer_norm_eps far from the
# official 1e-12: a LayerNorm that ignored the config would fail the parity checks.
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=64, cross_attention_frequency=2, encoder_hidden_size=64, layer_norm_eps=1e-2)
NUM_QUERIES, TEXT_LENGTH, NUM_FRAME_TOKENS = 4, 6, 5
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = InstructBlipVideoQFormerConfig(**TINY, attn_implementation="eager")  # eager: it can return attentions
    reference = InstructBlipVideoQFormerModel(config).eval()
    randomize(reference, seed=1)
    ours = QFormer(QFormerConfig(**TINY)).eval()
    copy_into(reference, ours, "qformer")  # through the key table; every parameter filled
    return reference, ours


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    query_tokens = torch.randn(2, NUM_QUERIES, TINY["hidden_size"], generator=g)
    input_ids = torch.randint(1, TINY["vocab_size"], (2, TEXT_LENGTH), generator=g)
    attention_mask = torch.ones(2, TEXT_LENGTH, dtype=torch.long)
    attention_mask[1, -2:] = 0  # row 1: a shorter instruction, right-padded as the BERT tokenizer pads
    input_ids[1, -2:] = 0
    frame_features = torch.randn(2, NUM_FRAME_TOKENS, TINY["encoder_hidden_size"], generator=g)
    return query_tokens, input_ids, attention_mask, frame_features


def run_reference(reference, query_tokens, input_ids, attention_mask, frame_features):
    """Called as InstructBlipVideoModel calls it: the mask covers [queries; text], the frames are all visible."""
    full_mask = torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.long), attention_mask], dim=1)
    return reference(
        input_ids=input_ids,
        attention_mask=full_mask,
        query_embeds=query_tokens,
        encoder_hidden_states=frame_features,
        encoder_attention_mask=torch.ones(frame_features.shape[:2], dtype=torch.long),
        output_attentions=True,
    )


def max_diff(a, b):
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


@torch.no_grad()
def test_query_output_and_attentions_match_transformers(models):
    reference, ours = models
    inputs = make_inputs()
    expected = run_reference(reference, *inputs)
    expected_queries = expected.last_hidden_state[:, :NUM_QUERIES]  # InstructBLIP keeps the query positions only
    assert expected_queries.std() > 0.5  # not flat: differences would show
    assert max_diff(expected_queries[0], expected_queries[1]) > 0.5

    fast = ours(*inputs)  # scaled_dot_product_attention
    assert fast.shape == (2, NUM_QUERIES, TINY["hidden_size"])
    assert max_diff(fast, expected_queries) <= TOLERANCE

    query_output, attentions = ours(*inputs, return_attentions=True)  # explicit softmax
    assert max_diff(query_output, expected_queries) <= TOLERANCE
    sequence = NUM_QUERIES + TEXT_LENGTH
    # transformers 5.24.0 records the cross-attention maps in `attentions` too (its recorder matches the module
    # name ".attention" inside "crossattention.attention"); the self-attention maps are the square ones.
    expected_self = [a for a in expected.attentions if a.shape[-2:] == (sequence, sequence)]
    assert len(attentions["self"]) == len(expected_self) == 3
    assert len(attentions["cross"]) == len(expected.cross_attentions) == 2  # layers 0 and 2
    for mine, theirs in zip(attentions["self"], expected_self):
        assert mine.shape == (2, 4, sequence, sequence)
        assert torch.all(mine[1, :, :, -2:] == 0)  # nobody reads row 1's padding
        assert max_diff(mine, theirs) <= TOLERANCE
    for mine, theirs in zip(attentions["cross"], expected.cross_attentions):
        assert mine.shape == (2, 4, NUM_QUERIES, NUM_FRAME_TOKENS)
        assert theirs.max() > 0.5  # peaked, not uniform (uniform would be 1/5)
        assert max_diff(mine, theirs) <= TOLERANCE


@torch.no_grad()
def test_fast_and_explicit_attention_agree(models):
    _, ours = models
    inputs = make_inputs(seed=3)
    query_output, _ = ours(*inputs, return_attentions=True)
    assert max_diff(ours(*inputs), query_output) <= 1e-5


@torch.no_grad()
def test_instruction_steers_queries_but_padding_does_not(models):
    _, ours = models
    query_tokens, input_ids, attention_mask, frame_features = make_inputs(seed=4)
    before = ours(query_tokens, input_ids, attention_mask, frame_features)

    padded = input_ids.clone()
    padded[1, -2:] = 7  # a different token under the padding mask: invisible
    assert max_diff(ours(query_tokens, padded, attention_mask, frame_features), before) == 0

    reworded = input_ids.clone()
    reworded[1, 0] = (reworded[1, 0] + 1) % TINY["vocab_size"]  # a different visible word: row 1 changes, row 0 not
    after = ours(query_tokens, reworded, attention_mask, frame_features)
    assert max_diff(after[1], before[1]) > 1e-2
    assert max_diff(after[0], before[0]) == 0


@torch.no_grad()
def test_frames_reach_queries_through_cross_attention(models):
    _, ours = models
    query_tokens, input_ids, attention_mask, frame_features = make_inputs(seed=5)
    before = ours(query_tokens, input_ids, attention_mask, frame_features)
    after = ours(query_tokens, input_ids, attention_mask, frame_features.flip(0))  # swap the two images
    assert max_diff(after[0], before[0]) > 1e-2


def test_rejects_bad_inputs(models):
    _, ours = models
    query_tokens, input_ids, attention_mask, frame_features = make_inputs()
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        ours(query_tokens, input_ids[0], attention_mask[0], frame_features)
    with pytest.raises(ValueError, match="attention_mask must match input_ids"):
        ours(query_tokens, input_ids, torch.ones(2, NUM_QUERIES + TEXT_LENGTH), frame_features)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        long_ids = torch.ones(2, 65, dtype=torch.long)
        ours(query_tokens, long_ids, torch.ones_like(long_ids), frame_features)
    with pytest.raises(ValueError, match=r"query_tokens must have shape \(2, queries, 48\)"):
        ours(query_tokens[:1], input_ids, attention_mask, frame_features)
    with pytest.raises(ValueError, match=r"frame_features must have shape \(2, tokens, 64\)"):
        ours(query_tokens, input_ids, attention_mask, frame_features[..., :32])


def test_rejects_unsupported_activation():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        QFormer(QFormerConfig(**TINY, hidden_act="relu"))
