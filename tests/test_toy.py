"""The toy world and the shipped toy checkpoint: clips are reproducible, the held-out split is unseen, the trained
model really answers, and transformers reads the checkpoint and answers the same."""

from pathlib import Path

import numpy as np
import pytest
import torch

import minivb
from minivb import toy, train

TOY = Path(__file__).resolve().parents[1] / "weights" / "toy-vicuna"


@pytest.fixture(scope="module")
def toy_model():
    return minivb.load_model(TOY), minivb.load_processor(TOY)


# ----------------------------------------------------------------------------- the world


def test_clips_are_deterministic_from_the_seed():
    a, b, other = toy.make_clip(123), toy.make_clip(123), toy.make_clip(124)
    assert np.array_equal(a.frames, b.frames) and (a.color, a.shape, a.direction) == (b.color, b.shape, b.direction)
    assert not np.array_equal(a.frames, other.frames)
    first, again = toy.make_example(7), toy.make_example(7)
    assert (first.question, first.answer) == (again.question, again.answer)
    # Asking another question about the same seed keeps the clip.
    assert np.array_equal(toy.make_example(7, question_type="shape").clip.frames, first.clip.frames)


def test_clips_follow_the_rules_of_the_world():
    for seed in range(40):
        clip = toy.make_clip(seed, size=96)
        assert clip.frames.shape == (4, 96, 96, 3) and clip.frames.dtype == np.uint8
        background = clip.frames[0, 0, 0]
        assert background.min() >= 200  # light
        centres = []
        for frame in clip.frames:
            shape_pixels = np.argwhere(np.abs(frame.astype(int) - background).sum(-1) > 60)  # (n, 2) as (y, x)
            width = shape_pixels[:, 1].max() - shape_pixels[:, 1].min() + 1
            assert 0.15 * 96 - 1 <= width <= 0.30 * 96 + 2  # PIL fills both end pixels of a box
            centres.append(shape_pixels.mean(0))
        dy, dx = np.diff(np.array(centres), axis=0).T  # (3,) each: the motion between frames
        expected = toy.DIRECTIONS[clip.direction]
        along, across = (dx, dy) if expected[0] else (dy, dx)
        sign = expected[0] or expected[1]
        assert (sign * along > 0.05 * 96).all() and (np.abs(across) < 1).all(), (seed, clip.direction)
        assert along.max() / along.min() < 1.6  # a similar step each frame
    kinds = {toy.make_example(seed).question_type for seed in range(60)}
    assert kinds == set(toy.QUESTION_TYPES)


def test_heldout_split_is_disjoint_from_training():
    assert toy.split_seed("heldout", 0) == toy.HELDOUT_OFFSET
    assert toy.split_seed("train", toy.HELDOUT_OFFSET - 1) < toy.split_seed("heldout", 0)
    with pytest.raises(ValueError, match="index"):
        toy.split_seed("train", toy.HELDOUT_OFFSET)
    # Training draws clip k of step s from seed s * batch_size + k: a `make train-toy` run stays far below.
    heldout = toy.heldout_examples(200, question_types=("color",))
    training = [toy.make_clip(toy.split_seed("train", i)) for i in range(200)]
    training_frames = {clip.frames.tobytes() for clip in training}
    assert not any(example.clip.frames.tobytes() in training_frames for example in heldout)


def test_answers_are_short():
    example = toy.make_example(5, question_type="describe")
    clip = example.clip
    assert example.answer == f"a {clip.color} {clip.shape} moves {clip.direction}"
    assert toy.make_example(5, question_type="color").answer in toy.COLORS


# ----------------------------------------------------------------------------- the shipped checkpoint


@pytest.fixture(scope="module")
def heldout_accuracy(toy_model):
    model, processor = toy_model
    accuracy = train.evaluate(model, processor, num_clips=200, question_types=("color", "shape", "direction"))
    print("held-out accuracy:", train.format_accuracy(accuracy))
    return accuracy


@pytest.mark.parametrize("kind", ["color", "shape", "direction"])
def test_toy_checkpoint_answers_heldout_clips(heldout_accuracy, kind):
    assert heldout_accuracy[kind] >= 0.95, heldout_accuracy


def test_transformers_loads_the_toy_checkpoint_and_answers_the_same(toy_model):
    transformers = pytest.importorskip("transformers")
    model, processor = toy_model
    hf_model = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(TOY, dtype=torch.float32).eval()
    examples = [toy.make_example(toy.split_seed("heldout", 500 + i), question_type=kind)
                for i, kind in enumerate(toy.QUESTION_TYPES * 2)]
    batch = processor(text=[e.question for e in examples], videos=[e.clip.frames for e in examples])
    args = dict(max_new_tokens=8, num_beams=1, do_sample=False, eos_token_id=processor.eos_token_id,
                pad_token_id=processor.pad_token_id)
    ours = model.generate(**batch, **args)
    with torch.no_grad():
        theirs = hf_model.generate(**batch, **args)[:, batch["input_ids"].shape[1]:]  # new tokens only
    ours_text = processor.batch_decode(ours)
    assert ours_text == processor.batch_decode(theirs)
    # The same answers, and real ones: colour questions are the easiest, so they must all be right.
    assert all(train.is_correct(text, e.answer) for text, e in zip(ours_text, examples) if e.question_type == "color")


def test_toy_checkpoint_is_official_and_small():
    config = minivb.load_config(TOY)
    assert config.text.eos_token_id == 2  # Vicuna's </s>, as the tokenizer says
    assert minivb.load_processor(TOY).eos_token_id == 2
    assert (TOY / "model.safetensors").stat().st_size < 16e6
