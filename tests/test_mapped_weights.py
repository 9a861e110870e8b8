"""Weights stored in the dtype asked for are the checkpoint's own pages (checkpoint.py): nothing copied at load, the
file never written through them, and a checkpoint rewritten under a live model replaced, not overwritten."""

import os
import shutil

import pytest
import torch

import minivb
from minivb.saving import replacing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "weights", "vicuna-tiny")  # stored in bfloat16


def mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files (or [heap]) whose mapping in this process holds `tensor`'s first byte."""
    address, files = tensor.data_ptr(), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end and len(fields) == 6:
                files.append(fields[5])
    return files


def test_weights_in_the_stored_dtype_are_the_files_pages(tmp_path):
    path = shutil.copytree(TINY, tmp_path / "tiny")
    file = os.path.realpath(path / "model.safetensors")
    model = minivb.load_model(path, dtype=torch.bfloat16)
    weights = dict(model.named_parameters())
    assert all(mapped_files(p) == [file] for p in weights.values())
    cast = minivb.load_model(path, dtype=torch.float32)  # a cast copy: the process's own memory
    assert all(file not in mapped_files(p) for p in cast.parameters())
    # Mapped or copied, the same numbers.
    for name, param in cast.named_parameters():
        assert torch.equal(param, weights[name].float()), name


def test_writing_a_mapped_weight_never_writes_the_file(tmp_path):
    path = shutil.copytree(TINY, tmp_path / "tiny")
    before = (path / "model.safetensors").read_bytes()
    model = minivb.load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():
        model.query_tokens.add_(1.0)  # what an optimizer step does to a trained parameter: a private copy of the page
    assert (path / "model.safetensors").read_bytes() == before
    again = minivb.load_model(path, dtype=torch.bfloat16)
    assert torch.equal(again.query_tokens + 1.0, model.query_tokens)


def test_saving_over_the_checkpoint_a_model_maps(tmp_path):
    path = shutil.copytree(TINY, tmp_path / "tiny")
    model = minivb.load_model(path, dtype=torch.bfloat16)
    old = {name: p.clone() for name, p in model.named_parameters()}
    changed = minivb.load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in changed.parameters():
            param.mul_(-1)
    # Written beside and renamed over: the live model keeps the old file's pages (written in place, the file's
    # new bytes would show through them, or a shorter file kill the process with SIGBUS).
    minivb.save_checkpoint(changed, path)
    for name, param in model.named_parameters():
        assert torch.equal(param, old[name]), name
    reloaded = minivb.load_model(path, dtype=torch.bfloat16)
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, -old[name]), name
    assert sorted(os.listdir(path)) == sorted(os.listdir(TINY))  # no temporary file left behind


def test_a_failed_write_leaves_the_file_whole(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"the old checkpoint")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(file) as temporary:
            open(temporary, "wb").write(b"half of the new")
            raise RuntimeError("disk full")
    assert file.read_bytes() == b"the old checkpoint" and os.listdir(tmp_path) == ["model.safetensors"]


def test_pages_read_once_are_dropped_only_when_memory_is_short(monkeypatch):
    from minivb import checkpoint, memory

    file = os.path.join(TINY, "model.safetensors")
    with open(file, "rb") as f:
        header, start = checkpoint._header(f)
        checkpoint._drop_pages(f, header["language_model.lm_head.weight"], start)  # the real call runs
    dropped = []
    monkeypatch.setattr(checkpoint, "_drop_pages", lambda f, entry, start: dropped.append(entry["shape"]))
    reference = minivb.load_model(TINY, dtype=torch.bfloat16, quantize="int8")
    assert dropped == []  # plenty of memory: the file's pages stay cached for the next load
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**6)
    model = minivb.load_model(TINY, dtype=torch.bfloat16, quantize="int8", check_memory=False)
    int8 = [m for m in model.modules() if isinstance(m, minivb.quant.Int8Linear)]
    assert sorted(dropped) == sorted([m.out_features, m.in_features] for m in int8)  # mapped weights: never
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_dtype_outside_the_table_is_still_read(tmp_path):
    # _read_once knows the float dtypes of SAFETENSORS_DTYPES; any other tensor goes through safetensors, cast as
    # before.
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(TINY, tmp_path / "tiny")
    tensors = load_file(path / "model.safetensors")
    tensors["language_projection.bias"] = (tensors["language_projection.bias"].float() * 100).round().to(torch.int64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = minivb.load_model(path, dtype=torch.float32)
    assert torch.equal(model.projection.bias, tensors["language_projection.bias"].float())
