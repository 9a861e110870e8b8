"""The command line, end to end: from a GIF file to generated text, and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minivb

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "tests" / "data" / "clock_cc0_1bpp.gif"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "minivb", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("checkpoint", ["vicuna-tiny", "flan-t5-tiny"])
def test_ask_about_a_gif_gives_the_text_of_generate(checkpoint):
    path = ROOT / "weights" / checkpoint
    result = cli("ask", "--model", path, "--video", CLIP, "--num-beams", 2, "--max-new-tokens", 6,
                 "What is happening in the video?")
    assert result.returncode == 0, result.stderr

    # The same answer through the Python API: processor, generate with the tokenizer's eos, decode. The CLI's
    # default dtype, auto, is bfloat16 where it fits, as these small checkpoints do.
    model, processor = minivb.load_model(path, dtype=torch.bfloat16), minivb.load_processor(path)
    batch = processor(text="What is happening in the video?", videos=[str(CLIP)])
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=6, num_beams=2, repetition_penalty=1.5, length_penalty=1.0,
                             eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    assert ids.shape[1] >= 1
    assert result.stdout.strip() == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_ask_about_an_image():
    result = cli("ask", "--model", ROOT / "weights" / "vicuna-tiny", "--image", CLIP, "--num-beams", 1,
                 "--max-new-tokens", 3, "--dtype", "bfloat16", "Describe.")
    assert result.returncode == 0, result.stderr


def test_info_counts_parameters():
    result = cli("info", ROOT / "weights" / "vicuna-tiny")
    assert result.returncode == 0
    assert "LLaMA decoder: 2 layers x 32" in result.stdout
    total = sum(p.numel() for p in minivb.load_model(ROOT / "weights" / "vicuna-tiny").parameters())
    assert f"{total:,}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["ask", "--model", "no/such/dir", "--video", CLIP, "Q?"], "no/such/dir"),
    (["ask", "--model", ROOT / "weights" / "vicuna-tiny", "--video", "missing.gif", "Q?"], "missing.gif"),
    (["ask", "--model", ROOT / "weights" / "vicuna-tiny", "--video", CLIP, "--frames", 0, "Q?"], "--frames"),
    (["ask", "--model", ROOT / "weights" / "vicuna-tiny", "--video", CLIP, "--num-beams", 0, "Q?"], "num_beams"),
    (["info", ROOT / "README.md"], "expected a checkpoint directory"),
])
def test_errors_are_one_line_with_exit_code_2(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_ask_refuses_more_frames_than_positions_before_loading(monkeypatch, capsys):
    # Vicuna's 2048 positions hold 62 frames of 32 visual tokens with a short question and 30 new tokens: `ask` says
    # so from the batch's shapes, before it loads the weights (and long before the vision encoder would run).
    from minivb.__main__ import main

    monkeypatch.setattr(minivb, "load_model", lambda *args, **kwargs: pytest.fail("the weights were loaded"))
    path = ROOT / "weights" / "vicuna-tiny"
    assert minivb.load_config(path).text.max_position_embeddings == 2048
    assert main(["ask", "--model", str(path), "--video", str(CLIP), "--frames", "70", "Q?"]) == 2
    err = capsys.readouterr().err
    assert "(70 frames x 32 visual tokens" in err and "2048 (max_position_embeddings): at most 62 frames fit" in err
