"""minivb.vit.VisionTransformer against transformers' InstructBlipVideoVisionModel on a tiny randomized ViT.

The weights go from transformers' module into ours through the checkpoint key table (minivb.checkpoint.map_key),
so these tests check the table's vision rows too. fp32, batch 2, max abs diff <= 1e-4.
"""

import pytest
import torch
from transformers.models.instructblipvideo.configuration_instructblipvideo import InstructBlipVideoVisionConfig
from transformers.models.instructblipvideo.modeling_instructblipvideo import InstructBlipVideoVisionModel

from minivb.config import VisionConfig
from minivb.vit import VisionTransformer
from tests.tiny import copy_into, randomize

# layer_norm_eps far from the official 1e-6: a LayerNorm that ignored the config would fail the parity checks.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14, layer_norm_eps=1e-2)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = InstructBlipVideoVisionConfig(**TINY, attn_implementation="eager")  # eager: it can return attentions
    reference = InstructBlipVideoVisionModel(config).eval()
    randomize(reference, seed=1)
    ours = VisionTransformer(VisionConfig(**TINY)).eval()
    copy_into(reference, ours, "vision_model")  # through the key table; every parameter filled
    return reference, ours


def pixels(height, width, seed=0):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


@torch.no_grad()
def test_features_and_attentions_match_transformers(models):
    reference, ours = models
    pixel_values = pixels(28, 28)
    expected = reference(pixel_values, output_attentions=True)
    assert expected.last_hidden_state.shape == (2, 5, 64)  # 1 class token + 2 x 2 patches
    assert expected.last_hidden_state.std() > 0.5  # not flat: differences would show
    assert max_diff(expected.last_hidden_state[0], expected.last_hidden_state[1]) > 0.5  # the two images differ

    fast = ours(pixel_values)  # scaled_dot_product_attention
    assert max_diff(fast, expected.last_hidden_state) <= TOLERANCE

    features, attentions = ours(pixel_values, return_attentions=True)  # explicit softmax
    assert max_diff(features, expected.last_hidden_state) <= TOLERANCE
    assert len(attentions) == len(expected.attentions) == TINY["num_hidden_layers"]
    for mine, theirs in zip(attentions, expected.attentions):
        assert mine.shape == (2, 4, 5, 5)
        assert theirs.max() > 0.5  # peaked, not uniform (uniform would be 1/5)
        assert max_diff(mine, theirs) <= TOLERANCE


@torch.no_grad()
def test_fast_and_explicit_attention_agree(models):
    _, ours = models
    pixel_values = pixels(28, 28, seed=3)
    features, _ = ours(pixel_values, return_attentions=True)
    assert max_diff(ours(pixel_values), features) <= 1e-5


@pytest.mark.parametrize("height, width", [(42, 42), (28, 56), (70, 42)])
@torch.no_grad()
def test_interpolated_positions_match_transformers(models, height, width):
    reference, ours = models
    pixel_values = pixels(height, width, seed=2)
    expected = reference(pixel_values, interpolate_pos_encoding=True, output_attentions=True)
    num_tokens = 1 + (height // 14) * (width // 14)
    features, attentions = ours(pixel_values, interpolate_pos_encoding=True, return_attentions=True)
    assert features.shape == (2, num_tokens, 64)
    assert max_diff(features, expected.last_hidden_state) <= TOLERANCE
    assert max_diff(ours(pixel_values, interpolate_pos_encoding=True), expected.last_hidden_state) <= TOLERANCE
    for mine, theirs in zip(attentions, expected.attentions):
        assert max_diff(mine, theirs) <= TOLERANCE


@torch.no_grad()
def test_interpolation_is_identity_at_the_trained_size(models):
    _, ours = models
    pixel_values = pixels(28, 28, seed=4)
    assert torch.equal(ours(pixel_values, interpolate_pos_encoding=True), ours(pixel_values))


@torch.no_grad()
def test_interpolated_positions_are_not_the_trained_ones(models):
    """At 42 px the 2 x 2 grid of learned positions is resized to 3 x 3; the corners keep their neighbourhood."""
    _, ours = models
    positions = ours.position_embeddings(42, 42)
    assert positions.shape == (1, 10, 64)
    assert torch.equal(positions[:, 0], ours.position_embedding[:, 0])  # the class position is never resized
    assert max_diff(positions[:, 1:5], ours.position_embedding[:, 1:5]) > 0.1


def test_rejects_bad_pixel_values(models):
    _, ours = models
    with pytest.raises(ValueError, match="4-D"):
        ours(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="4-D"):
        ours(torch.zeros(1, 2, 3, 28, 28))
    with pytest.raises(ValueError, match="3 color channels"):
        ours(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="expects 28x28.*interpolate_pos_encoding=True"):
        ours(torch.zeros(2, 3, 42, 42))
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        ours(torch.zeros(2, 3, 10, 28), interpolate_pos_encoding=True)


def test_rejects_unsupported_activation():
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        VisionTransformer(VisionConfig(**TINY, hidden_act="quick_gelu"))
