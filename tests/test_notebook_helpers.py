"""notebooks/helpers.py: the functions whose numbers the notebooks' pictures and asserts rely on."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import helpers  # noqa: E402

import minivb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_layout_segments_reads_frames_pads_and_text():
    placeholder, per_frame = 9, 3
    ids = [9] * 6 + [0, 0] + [5, 6]  # two frames of 3 visual tokens, two pads, two text tokens
    mask = [1] * 6 + [0, 0] + [1, 1]
    assert helpers.layout_segments(ids, mask, placeholder, per_frame) == [
        ("frame 0", 0, 3), ("frame 1", 3, 3), ("pad", 6, 1), ("pad", 7, 1), ("text", 8, 1), ("text", 9, 1)]


def test_crossing_finds_where_the_order_changes():
    assert helpers.crossing([3, 2, 1, 0], [0, 1, 2, 3]) == 2  # a below b from index 2 on
    assert helpers.crossing([0, 1, 2], [1, 2, 3]) is None


def test_shape_box_and_patches_on_a_drawn_square():
    frame = np.full((112, 112, 3), 230, dtype=np.uint8)
    frame[28:56, 14:42] = (220, 30, 30)  # a red square covering patches (2, 1), (2, 2), (3, 1), (3, 2) of 14 px
    assert helpers.shape_box(frame) == (14, 28, 42, 56)
    covered = helpers.shape_patches(frame, grid=8).reshape(8, 8)
    assert covered.nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]


def test_write_shards_round_trip(tmp_path):
    tiny = ROOT / "weights" / "vicuna-tiny"
    from safetensors import safe_open

    with safe_open(tiny / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    names = helpers.write_shards(tensors, tmp_path / "sharded", count=3, config_from=tiny)
    assert sum(name.startswith("model-") for name in names) == 3
    sharded, single = minivb.load_model(tmp_path / "sharded"), minivb.load_model(tiny)
    single_state = single.state_dict()
    assert all(torch.equal(t, single_state[n]) for n, t in sharded.state_dict().items())


def test_decode_bytes_counts_the_decoder_side_only():
    from minivb.config import load_config
    from minivb.model import build_on_meta

    vicuna = build_on_meta(load_config(ROOT / "weights" / "vicuna-tiny"), torch.bfloat16)
    lm = vicuna.language_model
    expected = 2 * sum(p.numel() for p in lm.parameters()) - 2 * lm.embed_tokens.weight.numel()
    assert helpers.decode_bytes(vicuna) == expected  # every LM weight but the looked-up embedding table
    flan = build_on_meta(load_config(ROOT / "weights" / "flan-t5-tiny"), torch.float32)
    t5 = flan.language_model
    assert helpers.decode_bytes(flan) == 4 * sum(p.numel() for m in (t5.decoder, t5.lm_head) for p in m.parameters())
