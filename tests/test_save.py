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


def test_safetensors_writer_round_trips_aligned_and_checks_each_tensor(tmp_path):
    from minivb.checkpoint import ALIGN
    from minivb.saving import write_safetensors, write_tensors

    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(-64, 64, dtype=torch.int8).reshape(2, 64),
               "c": torch.randn(7)}
    file = tmp_path / "x.safetensors"
    assert write_tensors(file, tensors) == sum(t.nbytes for t in tensors.values())
    header_length = int.from_bytes(file.read_bytes()[:8], "little")
    assert (8 + header_length) % ALIGN == 0  # the data starts on a 64-byte boundary
    with safe_open(file, "pt") as f:  # safetensors' own reader agrees with every byte
        assert list(f.keys()) == sorted(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor)
    # A tensor that differs from its header entry is refused, and the old file is left as it was.
    with pytest.raises(ValueError, match=r"tensor 'a' is torch.float32 \(3, 5\); its header entry says torch.bfloat16"):
        write_safetensors(file, [("a", torch.bfloat16, (3, 5))], lambda key: torch.zeros(3, 5))
    with safe_open(file, "pt") as f:
        assert torch.equal(f.get_tensor("c"), tensors["c"])
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind
