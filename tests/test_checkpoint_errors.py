"""Bad checkpoints get a clear error that names the problem: never a crash from inside torch or safetensors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minivb
from tests import tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.save(tiny.build("llama", seed=7), tmp_path_factory.mktemp("good"))


def copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def with_config(checkpoint, tmp_path, change):
    """A copy of the checkpoint whose config.json went through `change` (a function editing the dict in place)."""
    path = copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*nowhere"):
        minivb.load_model(tmp_path / "nowhere")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a checkpoint directory, got a file"):
        minivb.load_model(tmp_path / "model.safetensors")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minivb.load_model(tmp_path)


def test_config_not_json(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        minivb.load_model(path)


def test_unsupported_model_type(checkpoint, tmp_path):
    path = with_config(checkpoint, tmp_path, lambda config: config.update(model_type="blip-2"))
    with pytest.raises(ValueError, match=r"model_type 'blip-2' is not supported.*instructblipvideo.*instructblip"):
        minivb.load_model(path)


def test_unsupported_text_model(checkpoint, tmp_path):
    path = with_config(checkpoint, tmp_path, lambda config: config["text_config"].update(model_type="opt"))
    with pytest.raises(ValueError, match=r"text model 'opt' is not supported.*llama.*t5"):
        minivb.load_model(path)


def test_query_heads_not_a_multiple_of_key_value_heads(checkpoint, tmp_path):
    heads = {"num_attention_heads": 2, "num_key_value_heads": 4}
    path = with_config(checkpoint, tmp_path, lambda config: config["text_config"].update(heads))
    with pytest.raises(ValueError, match=r"num_attention_heads \(2\) must be a multiple of num_key_value_heads \(4\)"):
        minivb.load_model(path)


def test_pickled_weights_are_refused_with_a_hint(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*never loads.*safetensors"):
        minivb.load_model(path)


def test_truncated_safetensors_names_the_file(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        minivb.load_model(path)


def test_garbage_safetensors_names_the_file(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        minivb.load_model(path)


def test_missing_shard_is_named(tmp_path):
    path = tiny.save(tiny.build("llama", seed=8), tmp_path / "sharded", sharded=True)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        minivb.load_model(path)


def test_missing_tensors_are_listed(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    rewrite(path, lambda t: t.pop("language_model.model.norm.weight"))
    with pytest.raises(ValueError, match=r"lacks tensors.*language_model\.model\.norm\.weight"):
        minivb.load_model(path)


def test_missing_tensors_are_named_by_their_official_key(checkpoint, tmp_path):
    # The user greps the checkpoint's own names, not minivb's (qformer.layers.0.cross_attn.query.weight).
    path = copy(checkpoint, tmp_path)
    key = "qformer.encoder.layer.0.crossattention.attention.query.weight"
    rewrite(path, lambda t: t.pop(key))
    with pytest.raises(ValueError) as error:
        minivb.load_model(path)
    assert key in str(error.value) and "cross_attn" not in str(error.value)


def test_unexpected_tensors_are_listed(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    rewrite(path, lambda t: t.update({"vision_model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"does not expect.*vision_model\.extra_head\.weight"):
        minivb.load_model(path)


def test_wrong_shape_names_key_and_both_shapes(checkpoint, tmp_path):
    path = copy(checkpoint, tmp_path)
    rewrite(path, lambda t: t.update({"language_projection.weight": torch.zeros(3, 5)}))
    with pytest.raises(ValueError, match=r"language_projection\.weight.*\(3, 5\).*\(48, 32\)"):
        minivb.load_model(path)


@pytest.mark.parametrize("dtype", [torch.int64, "float16", None])
def test_bad_dtype(checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype"):
        minivb.load_model(checkpoint, dtype=dtype)


def test_bad_device(checkpoint):
    with pytest.raises(ValueError, match="device"):
        minivb.load_model(checkpoint, device="gpu0")


def test_loaded_dtype_and_progress(checkpoint):
    calls = []
    model = minivb.load_model(checkpoint, dtype=torch.bfloat16, progress=lambda *a: calls.append(a))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert calls and calls[0][:2] == (0, 1)
