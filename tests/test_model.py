"""Parity of the whole model with transformers: vision output, Q-Former output, visual tokens, logits and loss.

Checkpoints are tiny, written by transformers' own `save_pretrained`, with weights drawn at a scale where a
mistake shows (tests/tiny.py). fp32, batch 2 with padded instructions and prompts.
"""

import pytest
import torch
import transformers

import minivb
from tests import tiny

TOL = 1e-4


def reference(hf_model, batch, video=True):
    """transformers' intermediate outputs and final logits / loss for `batch`."""
    with torch.no_grad():
        get_features = hf_model.get_video_features if video else hf_model.get_image_features
        features = get_features(batch["pixel_values"], qformer_input_ids=batch["qformer_input_ids"],
                                qformer_attention_mask=batch["qformer_attention_mask"], return_dict=True)
        out = hf_model(**batch)
    query_output = features.qformer_outputs.last_hidden_state[:, : tiny.NUM_QUERY_TOKENS]
    return features.last_hidden_state, query_output, features.pooler_output, out.logits, out.loss


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def compare(hf_model, model, batch, video=True):
    frame_features, query_output, visual_tokens, logits, loss = reference(hf_model, batch, video)
    with torch.no_grad():
        out = model(**batch)
    assert logits.std() > 0.5, "reference logits are flat: the comparison would mean nothing"
    assert max_diff(out.frame_features, frame_features) <= TOL
    assert max_diff(out.query_output, query_output) <= TOL
    assert max_diff(out.visual_tokens, visual_tokens.reshape(out.visual_tokens.shape)) <= TOL
    assert max_diff(out.logits, logits) <= TOL
    assert abs(out.loss.item() - loss.item()) <= TOL


@pytest.mark.parametrize("text", ["llama", "t5"])
@pytest.mark.parametrize("num_frames", [1, 4, 3])
def test_video_model_matches_transformers(tmp_path, text, num_frames):
    hf_model = tiny.build(text, video=True)
    model = minivb.load_model(tiny.save(hf_model, tmp_path))
    compare(hf_model, model, tiny.batch(hf_model, num_frames=num_frames))


def test_loss_only_gives_transformers_loss_without_the_full_logits(tmp_path):
    """Training's shortcut: lm_head only where a label is scored, the same loss as over every position."""
    hf_model = tiny.build("llama", video=True)
    model = minivb.load_model(tiny.save(hf_model, tmp_path))
    batch = tiny.batch(hf_model)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    loss = reference(hf_model, batch)[-1]
    out = model(**batch, loss_only=True)
    assert out.logits is None
    assert abs(out.loss.item() - loss.item()) <= TOL


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_image_model_matches_transformers(tmp_path, text):
    hf_model = tiny.build(text, video=False)
    model = minivb.load_model(tiny.save(hf_model, tmp_path))
    compare(hf_model, model, tiny.batch(hf_model, video=False), video=False)


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_sharded_checkpoint(tmp_path, text):
    hf_model = tiny.build(text, video=True, seed=3)
    tiny.save(hf_model, tmp_path, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    compare(hf_model, minivb.load_model(tmp_path), tiny.batch(hf_model, num_frames=2))


def test_t5_tied_and_scaled(tmp_path):
    """transformers 5 writes T5 tied to `shared`, with no lm_head.weight; tie_word_embeddings true also scales."""
    hf_model = tiny.build("t5", tied=True, seed=4)
    assert hf_model.config.text_config.scale_decoder_outputs
    model = minivb.load_model(tiny.save(hf_model, tmp_path))
    assert model.language_model.lm_head.weight is model.language_model.shared.weight
    compare(hf_model, model, tiny.batch(hf_model))


def test_t5_untied_with_own_lm_head(tmp_path):
    """The official Flan-T5 checkpoints: their own lm_head.weight, no scaling."""
    tiny.add_own_lm_head(tiny.save(tiny.build("t5", seed=5), tmp_path))
    hf_model = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not torch.equal(hf_model.language_model.lm_head.weight, hf_model.language_model.shared.weight)
    model = minivb.load_model(tmp_path)
    assert model.language_model.lm_head.weight is not model.language_model.shared.weight
    compare(hf_model, model, tiny.batch(hf_model))


def test_prepended_visual_tokens_when_prompt_has_no_placeholders(tmp_path):
    """minivb's own convention (LAVIS layout): same logits as the placeholder layout over the same sequence."""
    hf_model = tiny.build("llama")
    model = minivb.load_model(tiny.save(hf_model, tmp_path))
    batch = tiny.batch(hf_model)
    num_visual = 4 * tiny.NUM_QUERY_TOKENS
    with torch.no_grad():
        with_placeholders = model(**batch)
        batch["input_ids"] = batch["input_ids"][:, num_visual:]
        batch["attention_mask"] = batch["attention_mask"][:, num_visual:]
        batch["labels"] = batch["labels"][:, num_visual:]
        prepended = model(**batch)
    assert max_diff(prepended.logits, with_placeholders.logits) <= 1e-5
    assert abs(prepended.loss.item() - with_placeholders.loss.item()) <= 1e-5


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_bfloat16_error_is_within_twice_transformers_own(tmp_path, text):
    hf_model = tiny.build(text, seed=6)
    tiny.save(hf_model, tmp_path)
    batch = tiny.batch(hf_model)  # with labels: T5 derives its decoder input from them
    with torch.no_grad():
        exact = hf_model(**batch).logits
        hf_bf16 = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
        hf_error = max_diff(hf_bf16(**batch).logits, exact)
        ours = minivb.load_model(tmp_path, dtype=torch.bfloat16)
        assert ours.projection.weight.dtype == torch.bfloat16
        our_error = max_diff(ours(**batch).logits, exact)
    assert our_error <= 2 * hf_error, f"minivb bf16 error {our_error:.4f}, transformers bf16 error {hf_error:.4f}"
