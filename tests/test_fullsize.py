"""minivb.fullsize: full-size checkpoints in the official layout.

At full size only what costs nothing is checked (the key lists and configs, on the meta device); the writer itself
runs on the official configs narrowed to a few dozen channels, so shards, index and values are checked in seconds.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minivb
from minivb.config import config_from_dict
from minivb.fullsize import checkpoint_tensors, official_config, random_tensor, write_checkpoint

DATA = Path(__file__).parent / "data" / "official"
WEIGHTS = Path(__file__).parent.parent / "weights"


def official_keys(name):
    entries = json.loads((DATA / name / "state_dict_keys.transformers-5.24.0.json").read_text())["keys"]
    return sorted((entry["name"], tuple(entry["shape"])) for entry in entries)


@pytest.mark.parametrize("name", ["vicuna-7b", "flan-t5-xl"])
def test_full_size_key_list_is_the_official_one(name):
    assert sorted(checkpoint_tensors(official_config(name))) == official_keys(name)


@pytest.mark.parametrize("name", ["vicuna-7b", "flan-t5-xl"])
def test_config_is_the_official_transcription(name):
    published = json.loads((DATA / name / "config.json").read_text())
    ours = official_config(name, dtype=torch.float32)
    assert ours["text_config"] == {k: v for k, v in published["text_config"].items() if k != "_name_or_path"} | (
        {"_name_or_path": "google/flan-t5-xl"} if name == "flan-t5-xl" else {})
    # The video model's config: the same weights, the <video> placeholder instead of <image>.
    assert ours["model_type"] == "instructblipvideo" and "image_token_index" not in ours
    assert ours["video_token_index"] == published["image_token_index"] + 1  # <video> follows <image> in both tokenizers
    untouched = set(published) - {"_name_or_path", "architectures", "model_type", "image_token_index", "text_config",
                                  "vision_config", "qformer_config", "transformers_version"}
    assert {k: ours[k] for k in untouched} == {k: published[k] for k in untouched}


def test_derived_sizes_and_depth_cut():
    keys = dict(checkpoint_tensors(official_config("vicuna-13b")))
    assert keys["language_model.model.embed_tokens.weight"] == (32064, 5120)
    assert keys["language_model.model.layers.39.mlp.down_proj.weight"] == (5120, 13824)
    assert len(keys) == len(official_keys("vicuna-7b")) + 8 * 9  # 8 more layers of 9 tensors
    # LLaMA-13B has 13,015,864,320 parameters with its 32000-token vocabulary; Vicuna's 32064 add 2 x 64 rows.
    language_model = sum(torch.Size(s).numel() for k, s in keys.items() if k.startswith("language_model."))
    assert language_model == 13_015_864_320 + 2 * 64 * 5120

    # T5 v1.1 XXL (Flan-T5-XXL's architecture) has 11,135,332,352 parameters, the embedding aliases aside.
    keys = dict(checkpoint_tensors(official_config("flan-t5-xxl")))
    language_model = sum(torch.Size(s).numel() for k, s in keys.items()
                         if k.startswith("language_model.") and "embed_tokens" not in k)
    assert language_model == 11_135_332_352

    xxl = official_config("flan-t5-xxl", layers=(2, 3))
    keys = dict(checkpoint_tensors(xxl))
    assert keys["language_model.decoder.block.2.layer.1.EncDecAttention.q.weight"] == (4096, 4096)  # 64 heads x 64
    assert keys["language_model.encoder.block.2.layer.1.DenseReluDense.wi_1.weight"] == (10240, 4096)
    assert "language_model.encoder.block.3.layer.0.layer_norm.weight" not in keys
    assert "vision_model.encoder.layers.2.mlp.fc1.weight" not in keys
    assert keys["vision_model.encoder.layers.1.mlp.fc1.weight"] == (6144, 1408)  # widths kept
    config = config_from_dict(xxl)
    assert (config.vision.num_hidden_layers, config.text.num_layers, config.text.num_decoder_layers) == (2, 3, 3)
    with pytest.raises(ValueError, match="--layers"):
        official_config("vicuna-7b", layers=(0, 1))


def narrow(name, layers):
    """The official config of `name`, depth cut, every width a few dozen channels: the writer's test subject."""
    config = official_config(name, layers)
    config["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config["qformer_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    if name.startswith("flan-t5"):
        config["text_config"].update(d_model=32, d_kv=8, d_ff=64, num_heads=4)
    else:
        config["text_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_key_value_heads=4, head_dim=8)
    return config


@pytest.mark.parametrize("name,processor", [("vicuna-7b", "vicuna-tiny"), ("flan-t5-xl", "flan-t5-tiny")])
def test_written_checkpoint_loads_in_minivb_and_transformers(tmp_path, name, processor):
    transformers = pytest.importorskip("transformers")
    config = narrow(name, (2, 2))
    index = write_checkpoint(config, tmp_path, torch.bfloat16, WEIGHTS / processor, shard_bytes=1_500_000,
                             progress=None)

    # The official layout: numbered shards, an index naming every tensor once with the total of their bytes.
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(key for key, _ in checkpoint_tensors(config))
    total = 0
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert sorted(f.keys()) == sorted(k for k, s in index["weight_map"].items() if s == shard)
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.bfloat16
                assert torch.equal(tensor, random_tensor(key, tuple(tensor.shape), torch.bfloat16))
                total += tensor.numel() * 2
    assert index["metadata"]["total_size"] == total
    assert json.loads((tmp_path / "config.json").read_text()) == config

    # Values at a trained checkpoint's scale; each tensor seeded by its name, aliases equal to their target.
    norm = random_tensor("language_model.model.norm.weight", (32,), torch.bfloat16)
    matrix = random_tensor("language_model.model.layers.0.mlp.up_proj.weight", (64, 32), torch.bfloat16)
    assert torch.equal(norm, torch.ones(32, dtype=torch.bfloat16))
    assert 0.015 < matrix.float().std() < 0.025
    for query in ("language_model.encoder.block.0.layer.0.SelfAttention.q.weight",
                  "language_model.decoder.block.3.layer.1.EncDecAttention.q.weight"):  # T5's 1/sqrt(d_kv) folded in
        assert 0.002 < random_tensor(query, (64, 32), torch.bfloat16).float().std() < 0.003
    key = random_tensor("language_model.encoder.block.0.layer.0.SelfAttention.k.weight", (64, 32), torch.bfloat16)
    assert 0.015 < key.float().std() < 0.025
    assert torch.equal(random_tensor("language_model.encoder.embed_tokens.weight", (8, 4), torch.float32),
                       random_tensor("language_model.shared.weight", (8, 4), torch.float32))

    # Both libraries load the folder as it is, and their logits agree, finite and far from flat.
    processor_ = minivb.load_processor(tmp_path)
    batch = processor_(["What is happening?"], videos=[Path(__file__).parent / "data" / "clock_cc0_1bpp.gif"])
    if name.startswith("flan-t5"):
        batch["decoder_input_ids"] = torch.zeros(1, 1, dtype=torch.long)
    model = minivb.load_model(tmp_path, dtype=torch.float32)
    reference = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        ours = model(**batch).logits[0, -1]
        theirs = reference(**batch).logits[0, -1]
    assert torch.isfinite(ours).all() and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
