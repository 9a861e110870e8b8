"""The key table covers exactly the official parameter names, with the same shapes, at full size.

minivb is built from the official configs on the meta device (no memory, no download), and its parameters are
compared with the state-dict keys of transformers' model built from the same configs.
"""

import json
from pathlib import Path

import pytest
import torch

from minivb.checkpoint import ALIASES, map_key
from minivb.config import load_config
from minivb.model import InstructBlipVideo

OFFICIAL = Path(__file__).parent / "data" / "official"


@pytest.mark.parametrize("name", ["vicuna-7b", "flan-t5-xl"])
def test_key_table_covers_official_checkpoint_exactly(name):
    config = load_config(OFFICIAL / name)
    with torch.device("meta"):
        model = InstructBlipVideo(config)
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    official = json.loads((OFFICIAL / name / "state_dict_keys.transformers-5.24.0.json").read_text())["keys"]

    covered = {}
    for entry in official:
        key, shape = entry["name"], tuple(entry["shape"])
        target = ALIASES.get(key) or map_key(key)
        assert target is not None, f"no key-table entry for official key {key}"
        assert target in ours, f"{key} maps to {target}, which minivb does not have"
        assert ours[target] == shape, f"{key}: official shape {shape}, minivb {ours[target]}"
        if key not in ALIASES:
            assert target not in covered, f"{key} and {covered.get(target)} both map to {target}"
            covered[target] = key
    assert set(covered) == set(ours), f"minivb parameters no official key fills: {set(ours) - set(covered)}"


def test_official_architecture_defaults():
    config = load_config(OFFICIAL / "vicuna-7b")
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.num_attention_heads) == (1408, 39, 16)
    assert (config.vision.intermediate_size, config.vision.patch_size, config.vision.image_size) == (6144, 14, 224)
    assert config.vision.layer_norm_eps == 1e-6
    assert (config.qformer.hidden_size, config.qformer.num_hidden_layers, config.qformer.vocab_size) == (768, 12, 30523)
    assert config.qformer.cross_attention_frequency == 2 and config.qformer.encoder_hidden_size == 1408
    assert config.text.vocab_size == 32064  # padded in the official Vicuna config
    assert config.placeholder_token_id == 32001  # image checkpoint: image_token_index

    t5 = load_config(OFFICIAL / "flan-t5-xl").text
    assert t5.dense_act_fn == "gelu" and t5.is_gated_act  # InstructBLIP's T5 uses exact GELU
    assert t5.scale_decoder_outputs is False  # untied Flan-T5: no d_model**-0.5 before lm_head
