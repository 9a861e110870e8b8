"""int8 weight-only quantization (quant.py): the error of one layer, the logits of a model, generation, loading."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minivb
from minivb import memory
from minivb.config import load_config
from minivb.model import build_on_meta
from minivb import quant
from minivb.quant import Int8Linear, quantize_rows

from . import tiny

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "tests" / "data" / "clock_cc0_1bpp.gif"


def test_one_layer_error_is_bounded(monkeypatch):
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 64)  # loaded in 5 blocks of rows, the last one short
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 512, generator=generator) * torch.rand(300, 1, generator=generator)  # rows of all scales
    quantized, scales = quantize_rows(weight)
    assert quantized.dtype == torch.int8 and int(quantized.abs().max()) == 127
    # Rounding to the nearest step: no weight moves more than half a step of its own row.
    error = (quantized.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())

    layer = Int8Linear(512, 300, bias=False, dtype=torch.bfloat16)
    layer.load_weight(weight)
    assert torch.equal(layer.weight, quantized) and torch.equal(layer.scales, scales.bfloat16())
    x = torch.randn(7, 512, generator=generator)
    exact = x @ weight.T
    reference = layer(x)  # fp32: dequantize, then F.linear
    fast = layer(x.bfloat16()).float()  # bf16: torch._weight_int8pack_mm
    assert (reference - exact).norm() / exact.norm() < 0.01
    assert (fast - reference).norm() / reference.norm() < 0.01


@pytest.fixture(scope="module", params=["llama", "t5"])
def checkpoint(request, tmp_path_factory):
    return tiny.save(tiny.build(request.param), tmp_path_factory.mktemp(request.param))


def test_logits_stay_close_to_bf16(checkpoint):
    reference = tiny.build(load_config(checkpoint).text.model_type)
    batch = tiny.batch(reference)
    bf16 = minivb.load_model(checkpoint, dtype=torch.bfloat16)
    int8 = minivb.load_model(checkpoint, dtype=torch.bfloat16, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in int8.language_model.modules())
    with torch.no_grad():
        a, b = bf16(**batch).logits[:, -1].float(), int8(**batch).logits[:, -1].float()
    assert a.std() > 0.5  # logits far from flat, so that agreement means something
    assert F.cosine_similarity(a, b, dim=-1).min() >= 0.99
    ids = int8.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=5, num_beams=3)
    assert ids.shape[0] == 2 and ids.shape[1] >= 1


def test_quantized_load_equals_quantizing_the_loaded_weights(checkpoint):
    # The checkpoint holds fp32 (as transformers writes it): quantized from the file's own values, not bf16's.
    fp32 = minivb.load_model(checkpoint, dtype=torch.float32)
    int8 = minivb.load_model(checkpoint, dtype=torch.bfloat16, quantize="int8")
    layers = {name: m for name, m in int8.named_modules() if isinstance(m, Int8Linear)}
    assert len(layers) >= 7
    plain = dict(fp32.named_modules())
    for name, layer in layers.items():
        quantized, scales = quantize_rows(plain[name].weight)
        assert torch.equal(layer.weight, quantized) and torch.equal(layer.scales, scales.to(layer.scales.dtype))


def test_int8_halves_the_official_language_model():
    config = load_config(ROOT / "tests/data/official/vicuna-7b")
    bf16 = memory.weight_bytes(build_on_meta(config, torch.bfloat16))
    int8 = memory.weight_bytes(build_on_meta(config, torch.bfloat16, "int8"))
    assert int8 <= 0.65 * bf16


def test_refusal_suggests_int8_and_the_cli_falls_back_to_it(monkeypatch, capsys):
    from minivb.__main__ import main

    path = ROOT / "weights" / "vicuna-tiny"
    config = load_config(path)
    bf16 = memory.estimate(build_on_meta(config, torch.bfloat16)).total
    int8 = memory.estimate(build_on_meta(config, torch.bfloat16, "int8")).total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (bf16 + int8) // 2)
    with pytest.raises(memory.NotEnoughMemory, match="quantize='int8'"):
        minivb.load_model(path, dtype=torch.bfloat16)
    assert main(["ask", "--model", str(path), "--video", str(CLIP), "--num-beams", "2", "--max-new-tokens", "2",
                 "Q?"]) == 0
    assert "loaded in int8" in capsys.readouterr().err


def test_auto_takes_the_fastest_that_fits_with_one_estimate(monkeypatch, capsys):
    path = ROOT / "weights" / "vicuna-tiny"
    config = load_config(path)
    bf16 = memory.estimate(build_on_meta(config, torch.bfloat16)).total
    int8 = memory.estimate(build_on_meta(config, torch.bfloat16, "int8")).total
    reads = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: reads.append(device) or (bf16 + int8) // 2)
    model = minivb.load_model(path, dtype="auto")
    assert len(reads) == 2  # MemAvailable read once for the choice, once by the loader (checkpoint.load_state)
    assert any(isinstance(m, Int8Linear) for m in model.language_model.modules())
    assert model.language_model.norm.weight.dtype == torch.bfloat16
    assert "loaded in int8" in capsys.readouterr().err
    monkeypatch.setattr(memory, "available_bytes", lambda device: bf16 + 1)
    model = minivb.load_model(path, dtype="auto")
    assert not any(isinstance(m, Int8Linear) for m in model.modules()) and model.projection.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be 'auto' or a floating torch.dtype"):
        minivb.load_model(path, dtype="int8")


def test_bad_quantize_is_refused():
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        minivb.load_model(ROOT / "weights" / "vicuna-tiny", quantize="int4")
