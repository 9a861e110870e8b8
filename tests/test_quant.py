"""int8 weight-only quantization (quant.py): the error of one layer, the logits of a model, generation, loading."""

import json
import os
import shutil
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
from .test_mapped_weights import mapped_files

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
    assert torch.equal(layer.weight, quantized) and torch.equal(layer.weight_scale, scales.bfloat16())
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
        assert torch.equal(layer.weight, quantized) and torch.equal(layer.weight_scale, scales.to(layer.weight_scale.dtype))


def test_int8_halves_the_official_language_model():
    config = load_config(ROOT / "tests/data/official/vicuna-7b")
    bf16 = memory.weight_bytes(build_on_meta(config, torch.bfloat16))
    int8 = memory.weight_bytes(build_on_meta(config, torch.bfloat16, "int8"))
    assert int8 <= 0.65 * bf16


def test_refusal_suggests_int8_and_the_cli_falls_back_to_it(monkeypatch, capsys):
    from minivb.__main__ import main

    path = ROOT / "weights" / "vicuna-tiny"
    config = load_config(path)
    asked = memory.Workload(num_beams=2, max_new_tokens=2)  # what the CLI below asks, and checks for
    bf16 = memory.estimate(build_on_meta(config, torch.bfloat16), asked).total
    int8 = memory.estimate(build_on_meta(config, torch.bfloat16, "int8"), asked).total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (bf16 + int8) // 2)
    with pytest.raises(memory.NotEnoughMemory, match="quantize='int8'"):
        minivb.load_model(path, dtype=torch.bfloat16, workload=asked)
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
    # MemAvailable read once for the choice, once by the loader (checkpoint.load_state), and where int8 weights pack
    # (on AMD: the lm_head here), once for the room to pack (memory.room_to_pack)
    assert len(reads) == 2 + (memory.packable_bytes(build_on_meta(config, torch.bfloat16, "int8")) > 0)
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


# ----------------------------------------------------------------------------- an int8 checkpoint, written once


@pytest.fixture(scope="module", params=["llama", "t5-sharded"])
def quantized(request, tmp_path_factory):
    """(source checkpoint, its int8 checkpoint written by save_quantized)."""
    text = request.param.split("-")[0]
    folder = tmp_path_factory.mktemp(request.param)
    source = tiny.save(tiny.build(text), folder / "source", sharded=request.param.endswith("sharded"))
    quant.save_quantized(source, folder / "int8")
    return source, folder / "int8"


def test_a_quantized_checkpoint_loads_as_quantizing_at_load_does(quantized):
    source, out = quantized
    assert load_config(out).quantization == "int8"
    for dtype in (torch.float32, torch.bfloat16):
        at_load = minivb.load_model(source, dtype=dtype, quantize="int8")
        from_file = minivb.load_model(out, dtype=dtype)  # no quantize=: the checkpoint's config says int8
        a, b = at_load.state_dict(), from_file.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # The int8 weights are the file's own pages, each on a 64-byte boundary (torch._weight_int8pack_mm's need): the
    # writer puts those whose size is a multiple of 64 bytes first (here all but the 130 x 48 lm_head, which comes
    # after them, still on a boundary; at the official sizes, all).
    layers = [m for m in from_file.modules() if isinstance(m, Int8Linear)]
    files = {os.path.realpath(f) for f in out.glob("*.safetensors")}
    assert len(layers) >= 7 and len(files) == len(list(source.glob("*.safetensors")))
    for layer in layers:
        mapped = mapped_files(layer.weight)
        assert len(mapped) == 1 and mapped[0] in files and layer.weight.data_ptr() % 64 == 0
    batch = tiny.batch(tiny.build(load_config(source).text.model_type))
    batch.pop("labels", None)
    assert torch.equal(at_load.generate(**batch, max_new_tokens=4, num_beams=3),
                       from_file.generate(**batch, max_new_tokens=4, num_beams=3))
    assert torch.equal(at_load.generate(**batch, max_new_tokens=4), from_file.generate(**batch, max_new_tokens=4))


def test_quantizing_at_load_names_the_command_that_does_it_once(quantized, monkeypatch, capsys):
    source, out = quantized
    minivb.load_model(source, dtype=torch.bfloat16, quantize="int8")
    assert capsys.readouterr().err == ""  # a tiny model: nothing worth saying
    monkeypatch.setattr(minivb.model, "QUANTIZE_NOTICE_WEIGHTS", 1)
    minivb.load_model(source, dtype=torch.bfloat16, quantize="int8")
    count = sum(m.weight.numel() for m in build_on_meta(load_config(source), torch.bfloat16, "int8").modules()
                if isinstance(m, Int8Linear))
    err = capsys.readouterr().err
    assert f"quantizing {count / 1e9:.1f} G weights to int8 while loading" in err
    assert f"`python -m minivb quantize --model {source} --out DIR` does it once" in err
    minivb.load_model(out, dtype=torch.bfloat16, quantize="int8")  # already int8: nothing to quantize
    minivb.load_model(source, dtype=torch.bfloat16)
    assert capsys.readouterr().err == ""


def test_the_quantized_files_keep_the_official_keys_and_halve_the_language_model(quantized):
    from safetensors import safe_open

    source, out = quantized
    dtypes = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    int8 = {key for key, dtype in dtypes.items() if dtype == "I8"}
    scales = {key for key in dtypes if key.endswith(".weight_scale")}
    assert int8 and {key + "_scale" for key in int8} == scales and {dtypes[key] for key in scales} == {"F32"}
    assert all(key.startswith("language_model.") for key in int8)
    originals = set()
    for file in source.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            originals.update(handle.keys())
    assert set(dtypes) - scales == originals  # every other key as it was
    config = json.loads((out / "config.json").read_text())
    assert config.pop("quantization_config")["quant_method"] == "minivb-int8"
    assert config == json.loads((source / "config.json").read_text())
    if (source / "model.safetensors.index.json").is_file():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(dtypes)


def test_an_int8_weight_off_a_64_byte_boundary_is_copied(quantized, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source, out = quantized
    moved = shutil.copytree(out, tmp_path / "moved")
    file = sorted(moved.glob("*.safetensors"))[-1]
    save_file(load_file(file), file, metadata={"format": "pt"})  # safetensors' own writer: its data 8-byte aligned
    with safe_open(file, framework="pt") as handle:
        off = [k for k in handle.keys() if handle.get_slice(k).get_dtype() == "I8" and handle.get_tensor(k).data_ptr() % 64]
    assert off  # else this checkpoint tests nothing
    model = minivb.load_model(moved, dtype=torch.bfloat16)
    assert all(m.weight.data_ptr() % 64 == 0 for m in model.modules() if isinstance(m, Int8Linear))
    batch = tiny.batch(tiny.build(load_config(source).text.model_type))
    batch.pop("labels", None)
    reference = minivb.load_model(out, dtype=torch.bfloat16)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, num_beams=2),  # int8pack_mm: would crash unaligned
                       reference.generate(**batch, max_new_tokens=3, num_beams=2))


def test_quantized_checkpoint_errors(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    source, out = quantized
    with pytest.raises(ValueError, match="already quantized"):
        quant.save_quantized(out, tmp_path / "again")
    with pytest.raises(ValueError, match="must not be the source"):
        quant.save_quantized(source, source)
    with pytest.raises(ValueError, match="save_quantized"):
        minivb.save_checkpoint(minivb.load_model(out), tmp_path / "float")
    # A config with another method's quantization_config.
    other = shutil.copytree(out, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        minivb.load_model(other)
    # int8 tensors under a config that does not say so; float weights under one that does.
    unmarked = shutil.copytree(out, tmp_path / "unmarked")
    config.pop("quantization_config")
    (unmarked / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stored as int8, but .* no quantization_config"):
        minivb.load_model(unmarked)
    floats = shutil.copytree(out, tmp_path / "floats")
    file, tensors = next((f, t) for f in sorted(floats.glob("*.safetensors")) for t in [load_file(f)]
                         if any(v.dtype == torch.int8 for v in t.values()))
    key = next(k for k, t in tensors.items() if t.dtype == torch.int8)
    tensors[key] = tensors[key].float()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key!r} should be int8"):
        minivb.load_model(floats)


def test_the_cli_quantizes_once_and_loads_the_result(tmp_path, capsys):
    from minivb.__main__ import main

    path = ROOT / "weights" / "vicuna-tiny"
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "int8")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "int8")]) == 0
    assert "linear weights in int8" in capsys.readouterr().out
    assert main(["ask", "--model", str(tmp_path / "int8"), "--video", str(CLIP), "--num-beams", "2",
                 "--max-new-tokens", "3", "Q?"]) == 0
    assert "does not fit" not in capsys.readouterr().err
