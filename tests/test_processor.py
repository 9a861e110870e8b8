"""The processor (minivb/processor.py) against transformers, on the two shipped checkpoint folders.

Reference for the ids: transformers' InstructBlipVideoProcessor.from_pretrained(folder) and
AutoTokenizer.from_pretrained(folder). Reference for the pixels: BlipImageProcessorPil, per frame.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageSequence
from transformers import AutoTokenizer, InstructBlipVideoProcessor
from transformers.models.auto.video_processing_auto import AutoVideoProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.video_processing_utils import BaseVideoProcessor

from minivb.processor import load_processor
from minivb.video import sample_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")
GIF = os.path.join(ROOT, "tests", "data", "clock_cc0_1bpp.gif")
CHECKPOINTS = ["vicuna-tiny", "flan-t5-tiny"]
Q = 32

TEXTS = [
    "What is happening in the video?",
    "Question: what is happening? Short answer:",
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "repeated   spaces,\ttabs\tand\nnew\n\nlines",
    "Ünïcödé àccents: café, naïve, Straße, Ångström",
    "日本語のテキストと中文字符",
    "emoji 🎬🐰😀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "zero\u200bwidth and non\u00a0breaking",
    "HeLLo WoRLD, don't can't won't I'm you're",
    "numbers 3.14159 and 1,000,000!!! ???...",
    "an <image> token typed by the user",
    "x",
]
# Long enough for more than 512 Q-Former tokens: the Q-Former tokenizer cuts it on the left.
LONG = " ".join(f"word{i}" for i in range(400)) + " So, what is the rabbit doing?"


@functools.cache
def ours(name):
    return load_processor(os.path.join(WEIGHTS, name))


class _NoVideoProcessor(BaseVideoProcessor):
    """Stands in for the video processor: the reference here is for ids, not pixels."""

    def __call__(self, videos, **kwargs):
        return {}


class _TextOnlyInstructBlipVideoProcessor(InstructBlipVideoProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)


@functools.cache
def reference(name):
    """transformers' InstructBlipVideoProcessor.from_pretrained(folder), all but the video processor.

    In transformers 5.24 the only video processor for InstructBLIP-Video is torchvision-based (and needs
    config.json to be found); torchvision is no test dependency, and it resizes with torchvision rather than
    PIL anyway. So that one part is stubbed, and everything else is loaded by from_pretrained as it is:
    both tokenizers (the folder and qformer_tokenizer/) and num_query_tokens from processor_config.json.
    Pixels are checked against BlipImageProcessorPil below.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: _NoVideoProcessor()))
        return _TextOnlyInstructBlipVideoProcessor.from_pretrained(os.path.join(WEIGHTS, name))


@functools.cache
def auto_tokenizer(name):
    return AutoTokenizer.from_pretrained(os.path.join(WEIGHTS, name))


@functools.cache
def blip_image_processor():
    with open(os.path.join(WEIGHTS, "vicuna-tiny", "preprocessor_config.json")) as f:
        values = json.load(f)
    for key in ("image_processor_type", "processor_class"):
        values.pop(key)
    return BlipImageProcessorPil(**values)


def reference_pixels(images) -> torch.Tensor:
    return torch.from_numpy(blip_image_processor()(images, return_tensors="np")["pixel_values"])


def dummy_videos(count):
    return [np.zeros((4, 2, 2, 3), np.uint8)] * count


# --- the shipped folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_shipped_folder_layout_and_official_values(name):
    folder = os.path.join(WEIGHTS, name)
    for file in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "qformer_tokenizer/tokenizer.json", "qformer_tokenizer/tokenizer_config.json",
                 "qformer_tokenizer/vocab.txt"):
        assert os.path.isfile(os.path.join(folder, file)), file
    with open(os.path.join(folder, "processor_config.json")) as f:
        assert json.load(f) == {"num_query_tokens": 32, "processor_class": "InstructBlipVideoProcessor"}
    proc = ours(name)
    assert proc.image_size == (224, 224) and proc.resample == Image.Resampling.BICUBIC
    assert proc.image_mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert proc.image_std.flatten().tolist() == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert proc.num_query_tokens == Q
    qformer = proc.qformer_tokenizer
    assert qformer.get_vocab_size() == 30523 and qformer.token_to_id("[DEC]") == 30522


def test_official_special_tokens():
    vicuna, t5 = ours("vicuna-tiny"), ours("flan-t5-tiny")
    assert [vicuna.tokenizer.token_to_id(t) for t in ("[PAD]", "<image>", "<video>")] == [32000, 32001, 32002]
    assert (vicuna.eos_token_id, vicuna.pad_token_id, vicuna.padding_side) == (2, 32000, "left")
    assert [t5.tokenizer.token_to_id(t) for t in ("<image>", "<video>")] == [32100, 32101]
    assert (t5.eos_token_id, t5.pad_token_id, t5.padding_side) == (1, 0, "right")
    for name in CHECKPOINTS:
        tokenizer = auto_tokenizer(name)
        assert (ours(name).eos_token_id, ours(name).pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    # The Vicuna prompt starts with </s> (id 2), as the checkpoint was trained; T5 ends with </s> (id 1).
    assert vicuna(text="What is happening in the video?", videos=dummy_videos(1))["input_ids"][0, 4 * Q:].tolist() \
        == [2, 1724, 338, 10464, 297, 278, 4863, 29973]
    assert t5(text="Hello world", videos=dummy_videos(1))["input_ids"][0, 4 * Q:].tolist() == [8774, 296, 1]


# --- ids: equal to transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_ids_equal_transformers_processor_batched(name):
    batch = ours(name)(text=TEXTS, videos=dummy_videos(len(TEXTS)))
    expected = reference(name)(images=dummy_videos(len(TEXTS)), text=TEXTS, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert batch[key].dtype == torch.long
        assert torch.equal(batch[key], expected[key]), key
    # the text part, as the checkpoint's AutoTokenizer pads it, after the 4*Q placeholders
    text = auto_tokenizer(name)(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"][:, 4 * Q:], text["input_ids"])
    assert torch.equal(batch["attention_mask"][:, 4 * Q:], text["attention_mask"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_ids_equal_transformers_one_text_at_a_time(name):
    for text in TEXTS + [LONG]:
        batch = ours(name)(text=text, videos=dummy_videos(1))
        expected = reference(name)(images=dummy_videos(1), text=text, return_tensors="pt")
        assert torch.equal(batch["input_ids"], expected["input_ids"]), text
        assert torch.equal(batch["attention_mask"], expected["attention_mask"]), text


def test_padding_layout():
    texts = ["What?", "What is happening in the video?"]
    vicuna = ours("vicuna-tiny")(text=texts, videos=dummy_videos(2))["input_ids"]
    # [<video> x 4Q][PAD ...][</s>][prompt]: left padding puts the pads between the placeholders and BOS
    assert vicuna[0, :4 * Q].eq(32002).all() and vicuna[0, 4 * Q:4 * Q + 5].eq(32000).all()
    assert vicuna[0, 4 * Q + 5:].tolist() == [2, 1724, 29973]
    t5 = ours("flan-t5-tiny")(text=texts, videos=dummy_videos(2))
    # [<video> x 4Q][prompt][</s>][pad ...]
    assert t5["input_ids"][0, :4 * Q].eq(32101).all() and t5["input_ids"][0, 4 * Q:].tolist()[:3] == [363, 58, 1]
    assert t5["input_ids"][0, 4 * Q + 3:].eq(0).all() and t5["attention_mask"][0, 4 * Q + 3:].eq(0).all()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_qformer_cuts_long_instructions_on_the_left(name):
    batch = ours(name)(text=[LONG, "short"], videos=dummy_videos(2))
    qformer = AutoTokenizer.from_pretrained(os.path.join(WEIGHTS, name), subfolder="qformer_tokenizer")
    full = qformer(LONG)["input_ids"]
    assert len(full) > 800
    expected = qformer(LONG, truncation=True)["input_ids"]
    assert len(expected) == 512
    assert batch["qformer_input_ids"].shape == (2, 512)
    assert batch["qformer_input_ids"][0].tolist() == expected == [101] + full[-511:]  # [CLS] + the end
    assert batch["qformer_attention_mask"][1].sum() == 3  # [CLS] short [SEP], then padding
    # transformers' processor cuts only when asked (truncation=True); then it agrees
    truncated = reference(name)(images=dummy_videos(1), text=LONG, truncation=True, return_tensors="pt")
    assert batch["qformer_input_ids"][0].tolist() == truncated["qformer_input_ids"][0].tolist()


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
       name=st.sampled_from(CHECKPOINTS))
def test_ids_equal_auto_tokenizer_on_random_text(text, name):
    assume("<video>" not in text and "<image>" not in text)  # placeholders in the text are refused (tested below)
    batch = ours(name)(text=text, images=[np.zeros((2, 2, 3), np.uint8)])
    tokenizer = auto_tokenizer(name)
    assert batch["input_ids"][0, Q:].tolist() == tokenizer(text)["input_ids"]
    qformer = reference(name).qformer_tokenizer
    assert batch["qformer_input_ids"][0].tolist() == qformer(text, truncation=True)["input_ids"]


@pytest.mark.parametrize("num_frames", [1, 2, 7])
def test_other_frame_counts_get_T_times_Q_placeholders(num_frames):
    proc = ours("vicuna-tiny")
    four = proc(text="What?", videos=[GIF])
    batch = proc(text="What?", videos=[GIF], num_frames=num_frames)
    assert batch["pixel_values"].shape == (1, num_frames, 3, 224, 224)
    assert batch["input_ids"].shape == (1, num_frames * Q + 3)
    assert batch["input_ids"][0, :num_frames * Q].eq(32002).all()
    assert torch.equal(batch["input_ids"][:, num_frames * Q:], four["input_ids"][:, 4 * Q:])


def copy_without_config(name, destination):
    """The processor files of a shipped checkpoint, without config.json (and without weights)."""
    shutil.copytree(os.path.join(WEIGHTS, name), destination,
                    ignore=shutil.ignore_patterns("config.json", "generation_config.json", "*.safetensors*"))
    return str(destination)


def write_config(folder, text_type="llama", **values):
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "instructblipvideo", "text_config": {"model_type": text_type}, **values}, f)


def test_placeholder_token_follows_config(tmp_path):
    folder = copy_without_config("vicuna-tiny", tmp_path / "vicuna")
    image = [np.zeros((3, 3, 3), np.uint8)]
    bare = load_processor(folder)  # no config.json: <video> for videos, <image> for images
    assert bare(text="a", images=image)["input_ids"][0, :Q].eq(32001).all()
    assert bare(text="a", images=image)["input_ids"].shape == (1, Q + 2)
    assert bare(text="a", videos=dummy_videos(1))["input_ids"][0, :4 * Q].eq(32002).all()
    write_config(folder, video_token_index=32002, num_query_tokens=32)
    assert load_processor(folder)(text="a", images=image)["input_ids"][0, :Q].eq(32002).all()
    write_config(folder, image_token_index=32001, num_query_tokens=32)
    assert load_processor(folder)(text="a", videos=dummy_videos(1))["input_ids"][0, :4 * Q].eq(32001).all()


def test_num_query_tokens_from_config_when_no_processor_config(tmp_path):
    folder = copy_without_config("flan-t5-tiny", tmp_path / "t5")
    os.remove(os.path.join(folder, "processor_config.json"))
    write_config(folder, text_type="t5", num_query_tokens=8, video_token_index=32101)
    batch = load_processor(folder)(text="a", videos=dummy_videos(1), num_frames=3)
    assert batch["input_ids"].shape == (1, 3 * 8 + len(auto_tokenizer("flan-t5-tiny")("a")["input_ids"]))
    assert batch["input_ids"][0, :3 * 8].eq(32101).all() and batch["input_ids"][0, 3 * 8] != 32101


# --- pixels: equal to BlipImageProcessorPil -----------------------------------------------------------

RNG = np.random.default_rng(0)
PALETTE = Image.fromarray(RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)).quantize(16)
PALETTE_TRANSPARENT = PALETTE.copy()
PALETTE_TRANSPARENT.info["transparency"] = 3
IMAGES = {
    "RGB": Image.fromarray(RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
    "RGBA": Image.fromarray(RNG.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA"),
    "LA": Image.fromarray(RNG.integers(0, 256, (37, 53, 2), dtype=np.uint8), "LA"),
    "L": Image.fromarray(RNG.integers(0, 256, (37, 53), dtype=np.uint8)),
    "1": Image.fromarray(RNG.integers(0, 2, (37, 53)).astype(bool)),
    "P": PALETTE,
    "P with transparency": PALETTE_TRANSPARENT,
    "I;16 low": Image.fromarray(RNG.integers(0, 300, (37, 53)).astype(np.uint16)),
    "I;16 full range": Image.fromarray(RNG.integers(0, 65536, (37, 53)).astype(np.uint16)),
    "I": Image.fromarray(RNG.integers(-1000, 70000, (37, 53)).astype(np.int32)),
    "F": Image.fromarray(RNG.normal(100, 100, (37, 53)).astype(np.float32)),
    "CMYK": Image.fromarray(RNG.integers(0, 256, (37, 53, 4), dtype=np.uint8), "CMYK"),
    "1x1": Image.fromarray(RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8)),
    "very tall": Image.fromarray(RNG.integers(0, 256, (2000, 3, 3), dtype=np.uint8)),
    "very wide": Image.fromarray(RNG.integers(0, 256, (2, 2000, 3), dtype=np.uint8)),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_pixels_equal_blip_image_processor_pil(kind):
    image = IMAGES[kind]
    batch = ours("vicuna-tiny")(text="a", images=[image])
    expected = reference_pixels(image)  # (1, 3, 224, 224)
    assert batch["pixel_values"].shape == (1, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], expected)  # bit for bit (max abs diff 0.0)


def test_image_arrays_and_paths_give_the_same_pixels(tmp_path):
    array = np.array(IMAGES["RGB"])
    path = tmp_path / "image.png"
    IMAGES["RGB"].save(path)
    batch = ours("flan-t5-tiny")(text=["a", "b", "c"], images=[array, torch.from_numpy(array), str(path)])
    expected = reference_pixels(array)  # transformers given the numpy array itself
    for i in range(3):
        assert torch.equal(batch["pixel_values"][i], expected[0])


def test_video_pixels_are_blip_image_processor_pil_per_frame():
    with Image.open(GIF) as gif:
        frames = [frame.copy() for frame in ImageSequence.Iterator(gif)]
    batch = ours("vicuna-tiny")(text=["a", "b"], videos=[GIF, np.stack([np.asarray(f.convert("RGB")) for f in frames])])
    expected = reference_pixels([frames[i] for i in sample_indices(61, 4)])  # (4, 3, 224, 224)
    assert batch["pixel_values"].shape == (2, 4, 3, 224, 224)
    assert torch.equal(batch["pixel_values"][0], expected)
    assert torch.equal(batch["pixel_values"][1], expected)


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_decode_equals_transformers(name):
    proc, tokenizer = ours(name), auto_tokenizer(name)
    texts = ["Hello , world ! I do n't know .", "café 🐰  two  spaces", "What is it ?"]
    ids = proc(text=texts, videos=dummy_videos(3))["input_ids"]
    ids = torch.cat([ids, torch.full((3, 1), 32090)], dim=1)  # an id past the tokenizer (model vocab is padded)
    for skip in (True, False):
        for clean_up in (None, False):
            assert proc.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up) == \
                tokenizer.batch_decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up)
    assert proc.decode(ids[1]) == tokenizer.decode(ids[1], skip_special_tokens=True)
    assert proc.decode(ids[1].tolist()) == proc.batch_decode(ids)[1]


def test_clean_up_tokenization_spaces():
    t5 = ours("flan-t5-tiny")
    ids = t5(text="Hello , world ! I do n't know .", videos=dummy_videos(1))["input_ids"]
    assert t5.batch_decode(ids) == ["Hello, world! I don't know."]  # T5's tokenizer_config: clean up
    assert t5.batch_decode(ids, clean_up_tokenization_spaces=False) == ["Hello , world ! I do n't know ."]
    assert t5.batch_decode(ids, clean_up_tokenization_spaces=True) == \
        auto_tokenizer("flan-t5-tiny").batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    vicuna = ours("vicuna-tiny")
    ids = vicuna(text="Hello , world !", videos=dummy_videos(1))["input_ids"]
    assert vicuna.batch_decode(ids) == ["Hello , world !"]  # Vicuna's tokenizer_config: no clean-up
    # Honoured when asked (transformers 5.24 ignores True for BPE tokenizers such as LLaMA's, with a warning)
    assert vicuna.batch_decode(ids, clean_up_tokenization_spaces=True) == ["Hello, world!"]


def test_decode_errors():
    proc = ours("vicuna-tiny")
    with pytest.raises(ValueError, match=r"ids of shape \(B, L\), got \(3,\)"):
        proc.batch_decode(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"decode expects ids of shape \(L,\), got \(1, 3\)"):
        proc.decode(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="token ids must be integers >= 0, got -1"):
        proc.batch_decode([[5, -1]])
    with pytest.raises(ValueError, match="token ids must be integers >= 0, got 'a'"):
        proc.decode([5, "a"])
    with pytest.raises(ValueError, match="a list of lists"):
        proc.batch_decode([1, 2])


# --- errors of the call -------------------------------------------------------------------------------


def test_call_errors():
    proc = ours("vicuna-tiny")
    video = dummy_videos(1)
    with pytest.raises(ValueError, match="text is required"):
        proc(text=None, videos=video)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        proc(text=[], videos=[])
    with pytest.raises(ValueError, match="item 1 is a int"):
        proc(text=["a", 3], videos=video * 2)
    with pytest.raises(ValueError, match="batch size mismatch: 2 texts but 1 videos"):
        proc(text=["a", "b"], videos=video)
    with pytest.raises(ValueError, match="batch size mismatch: 1 texts but 2 images"):
        proc(text="a", images=[np.zeros((2, 2, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match="exactly one of videos"):
        proc(text="a")
    with pytest.raises(ValueError, match="exactly one of videos"):
        proc(text="a", videos=video, images=[np.zeros((2, 2, 3), np.uint8)])
    with pytest.raises(ValueError, match="videos must be a list with one entry per text, got a str"):
        proc(text="a", videos=GIF)
    with pytest.raises(ValueError, match="text 0 contains the placeholder token '<video>'"):
        proc(text="<video> what?", videos=video)
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        proc(text="a", videos=video, num_frames=0)
    with pytest.raises(ValueError, match="zero size"):
        proc(text="a", images=[Image.new("RGB", (0, 3))])
    with pytest.raises(ValueError, match="dtype uint8.*got float64"):
        proc(text="a", images=[np.zeros((2, 2, 3))])
    with pytest.raises(ValueError, match="mode 'La' to RGB"):
        proc(text="a", images=[Image.new("La", (2, 2))])
    with pytest.raises(FileNotFoundError, match="missing.gif"):
        proc(text="a", videos=["missing.gif"])


# --- errors of loading --------------------------------------------------------------------------------


def edit_json(path, **changes):
    with open(path) as f:
        values = json.load(f)
    values.update(changes)
    with open(path, "w") as f:
        json.dump(values, f)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nothere"):
        load_processor(tmp_path / "nothere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a checkpoint directory, got a file"):
        load_processor(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json in checkpoint directory"):
        load_processor(tmp_path)

    folder = copy_without_config("vicuna-tiny", tmp_path / "vicuna")
    preprocessor = os.path.join(folder, "preprocessor_config.json")
    original = open(preprocessor).read()
    edit_json(preprocessor, do_normalize=False)
    with pytest.raises(ValueError, match="do_normalize = False is not supported"):
        load_processor(folder)
    open(preprocessor, "w").write(original)
    edit_json(preprocessor, size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="size must be .*'height'"):
        load_processor(folder)
    open(preprocessor, "w").write("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        load_processor(folder)
    open(preprocessor, "w").write(original)

    write_config(folder, video_token_index=32002, num_query_tokens=16)
    with pytest.raises(ValueError, match="num_query_tokens = 32 but config.json says 16"):
        load_processor(folder)
    os.remove(os.path.join(folder, "config.json"))

    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    edit_json(tokenizer_config, pad_token="<nope>")
    with pytest.raises(ValueError, match="pad_token '<nope>' from tokenizer_config.json is not in tokenizer.json"):
        load_processor(folder)
    edit_json(tokenizer_config, pad_token="[PAD]")

    with open(os.path.join(folder, "qformer_tokenizer", "tokenizer.json"), "w") as f:
        f.write('{"truncated": ')
    with pytest.raises(ValueError, match="qformer_tokenizer/tokenizer.json is not a valid tokenizer file"):
        load_processor(folder)
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_processor(folder)


# --- properties ---------------------------------------------------------------------------------------

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "La", "RGBa",
         "I;16", "I;16B"]


def random_image(mode, width, height, seed):
    image = Image.new(mode, (width, height))
    if width and height:  # fill with noise through a raw byte buffer, whatever the mode
        raw = np.random.default_rng(seed).integers(0, 256, len(image.tobytes()), dtype=np.uint8).tobytes()
        image.frombytes(raw)
    return image


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), width=st.integers(0, 40), height=st.integers(0, 40), seed=st.integers(0, 9))
def test_property_any_pil_image(mode, width, height, seed):
    """Any mode and size: a documented ValueError, or finite pixels equal to transformers'."""
    image = random_image(mode, width, height, seed)
    if width == 0 or height == 0 or mode == "La":
        with pytest.raises(ValueError, match="zero size" if width == 0 or height == 0 else "to RGB"):
            ours("vicuna-tiny")(text="q", images=[image])
        return
    pixel_values = ours("vicuna-tiny")(text="q", images=[image])["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and torch.isfinite(pixel_values).all()
    assert torch.equal(pixel_values, reference_pixels(image))


DTYPES = [np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.one_of(st.tuples(st.integers(0, 6), st.integers(0, 9), st.integers(0, 9), st.just(3)).map(list),
                       st.lists(st.integers(0, 6), min_size=1, max_size=5)),
       dtype=st.sampled_from(DTYPES + [np.uint8] * 4), as_tensor=st.booleans(), num_frames=st.integers(1, 6))
def test_property_any_video_array(shape, dtype, as_tensor, num_frames):
    """Any shape, dtype and frame count: valid (T, H, W, 3) uint8 gives finite pixels; anything else a ValueError."""
    video = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    if as_tensor:
        video = torch.from_numpy(video)
    valid = dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3 and min(shape) > 0
    event("valid" if valid else "refused")
    if not valid:
        with pytest.raises(ValueError, match=r"\(T, H, W, 3\)|uint8|empty video|zero size"):
            ours("flan-t5-tiny")(text="q", videos=[video], num_frames=num_frames)
        return
    batch = ours("flan-t5-tiny")(text="q", videos=[video], num_frames=num_frames)
    assert batch["pixel_values"].shape == (1, num_frames, 3, 224, 224)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["input_ids"].shape == (1, num_frames * Q + len(auto_tokenizer("flan-t5-tiny")("q")["input_ids"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.tuples(st.sampled_from(MODES), st.integers(0, 12), st.integers(0, 12)), max_size=5),
       num_frames=st.integers(1, 5))
def test_property_any_list_of_frames(frames, num_frames):
    """Frames of mixed modes and sizes: valid lists give (1, T, 3, 224, 224) finite pixels."""
    images = [random_image(mode, width, height, 0) for mode, width, height in frames]
    used = [frames[i] for i in sample_indices(len(frames), num_frames)] if frames else []
    if not frames or any(w == 0 or h == 0 for _, w, h in frames) or any(m == "La" for m, _, _ in used):
        with pytest.raises(ValueError, match="empty video|zero size|to RGB"):
            ours("vicuna-tiny")(text="q", videos=[images], num_frames=num_frames)
        return
    pixel_values = ours("vicuna-tiny")(text="q", videos=[images], num_frames=num_frames)["pixel_values"]
    assert pixel_values.shape == (1, num_frames, 3, 224, 224) and torch.isfinite(pixel_values).all()
