"""save_checkpoint writes the official layout: transformers loads it and computes the same logits as minivb."""

import pytest
import torch
import transformers
from safetensors import safe_open

import minivb
from tests import tiny


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_saved_checkpoint_round_trips_through_transformers(tmp_path, text):
    hf_model = tiny.build(text, seed=11)
    model = minivb.load_model(tiny.save(hf_model, tmp_path / "original"))
    minivb.save_checkpoint(model, tmp_path / "saved")

    with safe_open(tmp_path / "original" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "saved" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key

    reloaded = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    batch = tiny.batch(hf_model)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-4)
    again = minivb.load_model(tmp_path / "saved")
    assert again.config == model.config


def test_official_key_inverts_map_key():
    for name in ["vision.blocks.3.attn.qkv.weight", "qformer.layers.2.query_ffn.norm.bias", "query_tokens",
                 "language_model.decoder.relative_attention_bias.weight",
                 "language_model.decoder.blocks.1.cross_attn.k.weight", "language_model.layers.0.mlp.up_proj.weight"]:
        assert minivb.map_key(minivb.official_key(name)) == name
    with pytest.raises(ValueError, match="no entry in the key table"):
        minivb.official_key("vision.nothing.weight")
