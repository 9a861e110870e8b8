"""Fine-tuning (finetune.py, train.py's shared loop): the recipe freezes what it must, bit for bit; the checkpoint loads
in minivb and transformers; 1 and 2 processes (torchrun, gloo) follow the same losses; --resume reaches the weights
of an uninterrupted run; a re-initialised bridge learns; bad input is refused before anything is written."""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import minivb
from minivb import data, finetune, memory, toy, train
from minivb.__main__ import main as cli
from minivb.checkpoint import stored_dtypes
from minivb.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "toy-vicuna"
BRIDGE = ("query_tokens", "qformer.", "language_projection.")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A toy dataset in the annotation format, written once for the module: (annotations.json, videos folder)."""
    folder = tmp_path_factory.mktemp("toy-dataset")
    annotations = data.write_toy_dataset(str(folder), clips=8, seed=3)
    entries = data.read_annotations(annotations, str(folder / "videos"))
    return annotations, str(folder / "videos"), entries


def run(dataset, out, *extra, batch_size=4, lr=1e-3, epochs=1):
    annotations, videos, _ = dataset
    argv = ["finetune", "--model", str(TOY), "--annotations", annotations, "--videos", videos, "--out", str(out),
            "--batch-size", str(batch_size), "--lr", str(lr), "--epochs", str(epochs), "--num-workers", "0", *extra]
    return cli(argv)


def losses(out) -> list[float]:
    with open(Path(out) / "loss.csv", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(Path(path) / "model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


# ----------------------------------------------------------------------------- the shared pieces


def test_learning_rate_warms_up_then_decays_to_the_floor():
    assert train.learning_rate(0, 100, 1e-3, 10, floor=0.0) == pytest.approx(1e-4)
    assert train.learning_rate(9, 100, 1e-3, 10, floor=0.0) == pytest.approx(1e-3)
    assert train.learning_rate(55, 100, 1e-3, 10, floor=0.0) == pytest.approx(0.5e-3)  # half-way down the cosine
    assert train.learning_rate(100, 100, 1e-3, 10, floor=0.0) == pytest.approx(0.0, abs=1e-12)
    assert train.learning_rate(100, 100, 1e-3, 10) == pytest.approx(1e-4)  # the toy's floor: 10 % of the peak


def test_save_checkpoint_writes_each_tensor_in_its_stored_dtype(tmp_path):
    model = minivb.load_model(TOY)  # float32, from bfloat16 files
    minivb.save_checkpoint(model, tmp_path, dtype=stored_dtypes(str(TOY)))
    with safe_open(tmp_path / "model.safetensors", "pt") as saved, safe_open(TOY / "model.safetensors", "pt") as shipped:
        assert sorted(saved.keys()) == sorted(shipped.keys())
        for key in shipped.keys():
            a, b = saved.get_tensor(key), shipped.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key  # the same bytes, not just close


def test_processes_share_each_global_batch(dataset):
    """The global batch of every step is the same questions for 1 and 2 processes, resumed or not."""
    annotations, videos, entries = dataset
    processor = minivb.load_processor(TOY)
    decoded = data.VideoQADataset(entries, videos, 4)
    decoded = [decoded[i] for i in range(len(decoded))]  # each clip decoded once for the 6 passes below

    def questions(world_size, rank, start_step):
        return [batch["qformer_input_ids"] for batch in finetune.batches(
            decoded, "{}", processor, False, 4, batch_size=4, epochs=2, start_step=start_step, seed=0, rank=rank,
            world_size=world_size, num_workers=0)]

    one = questions(1, 0, 0)
    assert len(one) == 2 * (len(entries) // 4)
    halves = [questions(2, rank, 0) for rank in range(2)]
    for step, batch in enumerate(one):
        for rank in range(2):
            for row, ids in enumerate(halves[rank][step]):
                assert torch.equal(ids[ids != 0], batch[2 * row + rank][batch[2 * row + rank] != 0])
    resumed = questions(1, 0, 5)
    assert all(torch.equal(a, b) for a, b in zip(resumed, one[5:], strict=True))
    assert not torch.equal(one[0], one[len(entries) // 4])  # each epoch is shuffled anew


# ----------------------------------------------------------------------------- the recipe and its checkpoint


@pytest.fixture(scope="module")
def finetuned(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned")
    assert run(dataset, out, "--save-every", "2") == 0
    return out


def frozen_bit_for_bit_and_bridge_unchanged(before, after) -> set[str]:
    """Check that the frozen tensors of `after` are those of `before` bit for bit and the bridge's are float32;
    return the bridge's keys that did not move."""
    assert set(before) == set(after)
    unchanged = set()
    for key in before:
        if key.startswith(BRIDGE):
            assert after[key].dtype == torch.float32, key  # as trained: bfloat16 would round the updates away
            if torch.equal(after[key], before[key].float()):
                unchanged.add(key)
        else:
            assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    return unchanged


def test_frozen_towers_are_written_bit_for_bit_and_the_bridge_learns(finetuned):
    unchanged = frozen_bit_for_bit_and_bridge_unchanged(tensors(TOY), tensors(finetuned))
    # The last Q-Former layer's text feed-forward feeds nothing the loss reads: zero gradients, and no weight decay
    # on biases and gains. Every other trainable tensor moved.
    last = "qformer.encoder.layer.1."
    assert unchanged == {last + "intermediate.dense.bias", last + "output.dense.bias", last + "output.LayerNorm.weight",
                         last + "output.LayerNorm.bias"}


def test_checkpoint_loads_in_transformers_with_every_key(finetuned):
    model, info = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(
        finetuned, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    ours, processor = minivb.load_model(finetuned), minivb.load_processor(finetuned)
    batch = processor(text=["What colour is it?"], videos=[str(TOY / "example.gif")])
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, ours(**batch).logits, atol=1e-4)


def test_loss_files(finetuned, dataset):
    steps = len(dataset[2]) // 4
    assert len(losses(finetuned)) == steps and (finetuned / "loss.png").stat().st_size > 10_000
    assert (finetuned / finetune.STATE_FILE).is_file()


# ----------------------------------------------------------------------------- processes and resuming


def first_steps(dataset, tmp_path, steps=5, batch_size=4) -> tuple:
    """The dataset cut to its first `steps` batches."""
    annotations, videos, _ = dataset
    with open(annotations, encoding="utf-8") as f:
        first = json.load(f)[:steps * batch_size]
    annotations = str(tmp_path / "first.json")
    with open(annotations, "w", encoding="utf-8") as f:
        json.dump(first, f)
    return annotations, videos, None


def test_micro_batches_reach_the_weights_of_whole_batches(dataset, tmp_path):
    """--micro-batch-size 1: each step's 4 examples one at a time, their gradients summed (the global batch's token
    mean): the same losses and weights as 4 at once, to float rounding."""
    first = first_steps(dataset, tmp_path)
    assert run(first, tmp_path / "whole", batch_size=4) == 0
    assert run(first, tmp_path / "micro", "--micro-batch-size", "1", batch_size=4) == 0
    whole, micro = losses(tmp_path / "whole"), losses(tmp_path / "micro")
    assert len(whole) == 5 and max(whole) - min(whole) > 0.1
    for a, b in zip(whole, micro):
        assert abs(a - b) <= 1e-5 * abs(a), (whole, micro)
    before, after, micro = tensors(TOY), tensors(tmp_path / "whole"), tensors(tmp_path / "micro")
    # The bridge's moves, all together: AdamW's normalisation turns near-zero gradients (a key's bias: softmax
    # ignores a shift of all of a query's scores) into full steps that any other order of the sums changes, so
    # single elements may differ more (on the AMD EPYC, 5 of a Q-Former output matrix's 9216 by more than 1e-5, one
    # moved -0.0016 whole and -0.0006 in micro-batches); the whole move, but for 1 element in 1000, may not.
    keys = [key for key in after if key.startswith(BRIDGE) and not key.endswith("key.bias")]
    moved = torch.cat([(after[key] - before[key].float()).flatten() for key in keys])
    apart = torch.cat([(after[key] - micro[key]).flatten() for key in keys])
    flipped = apart.abs() > 1e-3 * moved.abs().max()
    assert flipped.sum() <= apart.numel() // 1000, (flipped.sum(), apart.numel())
    assert apart[~flipped].norm() <= 1e-4 * moved.norm(), (apart[~flipped].norm(), moved.norm())


@pytest.mark.parametrize("micro", [[], ["--micro-batch-size", "1"]])
def test_two_processes_follow_the_loss_of_one(dataset, tmp_path, micro):
    """torchrun with 2 gloo processes, --batch-size global: the same losses for 5 steps (<= 1e-4 relative); also
    with each process's 2 examples run one at a time (DDP all-reduces once, after the second)."""
    annotations, videos, _ = first_steps(dataset, tmp_path)
    assert run((annotations, videos, None), tmp_path / "one", batch_size=4) == 0
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
               "minivb", "finetune", "--model", str(TOY), "--annotations", annotations, "--videos", videos,
               "--out", str(tmp_path / "two"), "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", *micro]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 processes)" in result.stdout
    one, two = losses(tmp_path / "one")[:5], losses(tmp_path / "two")[:5]
    assert len(two) == 5 and max(one) - min(one) > 0.1  # the losses move: the comparison is not of constants
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    assert run(dataset, tmp_path / "straight", epochs=2) == 0
    real, calls = finetune.make_batch, []

    def crash_at_step_5(*args, **kwargs):  # a crash after the state of step 4 and before step 5 ends
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "make_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, tmp_path / "resumed", "--save-every", "4", epochs=2)
    monkeypatch.setattr(finetune, "make_batch", real)
    assert run(dataset, tmp_path / "resumed", "--save-every", "4", epochs=2) == 2  # refused without --resume
    assert run(dataset, tmp_path / "resumed", "--save-every", "4", "--resume", epochs=2) == 0
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # each step once, in order
    assert run(dataset, tmp_path / "other", "--save-every", "4", "--resume", epochs=2) == 2  # no state there


def mean_loss(model, dataset) -> float:
    """The loss over every question of the dataset at once, bare questions as prompts (as the toy was trained)."""
    annotations, videos, entries = dataset
    processor = minivb.load_processor(TOY)
    frames = [frames for entry, frames in data.VideoQADataset(entries, videos, 4)]
    batch = train.make_batch(processor, [e.question for e in entries], frames, [e.answer for e in entries], False)
    with torch.no_grad():
        return model(**batch, loss_only=True).loss.item()


def test_a_state_written_before_dtype_resumes_with_float32_towers(dataset, tmp_path, capsys):
    # A state written before --dtype has no "dtype" setting: its towers were float32, all finetune loaded then.
    assert run(dataset, tmp_path / "out", "--save-every", "4", "--dtype", "float32") == 0
    path = tmp_path / "out" / finetune.STATE_FILE
    state = torch.load(path, weights_only=True)
    del state["settings"]["dtype"]
    torch.save(state, path)
    capsys.readouterr()
    assert run(dataset, tmp_path / "out", "--save-every", "4", "--resume", "--dtype", "bfloat16") == 2
    assert "dtype was 'torch.float32', now 'torch.bfloat16'" in capsys.readouterr().err
    assert run(dataset, tmp_path / "out", "--save-every", "4", "--resume", "--dtype", "float32") == 0


def test_reinitialised_bridge_learns(dataset, tmp_path):
    """The recovery run, cut down (`make recover-toy` is the whole one): from a fresh Q-Former the loss falls.

    As in `make recover-toy`, the answers are the toy's plain ones: the frozen language model cannot learn "RED"."""
    annotations, videos, entries = dataset
    with open(annotations, encoding="utf-8") as f:
        records = json.load(f)
    for record in records:  # toy{index:09d}.mp4 is held-out clip `index`
        clip = toy.make_clip(toy.split_seed("heldout", int(record["video"][3:12])))
        record["answer"] = clip.answer(record["question_type"])
    plain = str(tmp_path / "plain.json")
    with open(plain, "w", encoding="utf-8") as f:
        json.dump(records, f)
    plain_dataset = (plain, videos, data.read_annotations(plain, videos))
    assert run(plain_dataset, tmp_path / "out", "--reinit-bridge", "--prompt", "{}", "--warmup-steps", "2",
               epochs=6) == 0
    fresh = minivb.load_model(TOY)
    finetune.reinitialise_bridge(fresh, seed=0)
    before = mean_loss(fresh, plain_dataset)
    after = mean_loss(minivb.load_model(tmp_path / "out"), plain_dataset)
    print(f"loss over the {len(entries)} questions: fresh bridge {before:.2f}, after 48 steps {after:.2f}")
    # Measured: 2.39 -> 0.35. A fresh bridge shows the language model noise: it can only guess (guessing among 4
    # colours alone costs ln 4 = 1.4).
    assert before > 2
    assert after < 0.3 * before


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "64"], "fewer than one batch"),
    (["--prompt", "Question: Short answer:"], "--prompt must hold"),
    (["--resume"], "no state.pt"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_arguments_are_refused_before_anything_is_written(dataset, tmp_path, capsys, extra, message):
    assert run(dataset, tmp_path / "out", *extra) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and error.count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_an_int8_checkpoint_is_refused(dataset, tmp_path, capsys):
    from minivb.quant import save_quantized

    save_quantized(TOY, tmp_path / "int8")
    assert run(dataset, tmp_path / "out", "--model", str(tmp_path / "int8")) == 2  # the last --model counts
    assert "is an int8 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- memory: a 7B on 24 GB


def training_need(model_dir, dtype, examples, frames=4):
    return finetune.training_need(load_config(model_dir), dtype, examples, frames).total


def test_towers_are_held_in_bfloat16_where_a_float32_step_does_not_fit(dataset, tmp_path, monkeypatch, capsys):
    bf16, fp32 = training_need(TOY, torch.bfloat16, 4), training_need(TOY, torch.float32, 4)
    assert bf16 < fp32
    monkeypatch.setattr(memory, "available_bytes", lambda device: (bf16 + fp32) // 2)
    assert run(dataset, tmp_path / "out", "--save-every", "4") == 0
    assert "the frozen towers are held in bfloat16" in capsys.readouterr().err
    # The frozen towers are copied from the source's files; the bridge trained in float32 against bf16 towers.
    unchanged = frozen_bit_for_bit_and_bridge_unchanged(tensors(TOY), tensors(tmp_path / "out"))
    assert len(unchanged) < 10
    trained = losses(tmp_path / "out")
    assert all(math.isfinite(loss) for loss in trained) and trained[-1] < trained[0]
    state = torch.load(tmp_path / "out" / finetune.STATE_FILE, weights_only=True)
    assert state["settings"]["dtype"] == "torch.bfloat16"  # a resume holds them in the same dtype


def test_a_step_that_does_not_fit_is_refused_with_what_would(dataset, tmp_path, monkeypatch, capsys):
    two = training_need(TOY, torch.bfloat16, 2)
    monkeypatch.setattr(memory, "available_bytes", lambda device: two + 10**6)  # 2 examples fit in bf16, not 4
    assert run(dataset, tmp_path / "out", "--dtype", "float32") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "frozen towers in torch.float32 needs about" in error
    assert "4 examples of 4 frames at once" in error and "--no-memory-check" in error
    assert "--micro-batch-size 2 --dtype bfloat16 (the global batch stays 4" in error
    assert not (tmp_path / "out").exists()


def test_processes_on_one_cpu_machine_are_counted_together(monkeypatch):
    # torchrun --nproc_per_node 2 on one CPU machine: both processes draw on its one MemAvailable. The toy's files
    # store bf16, so bf16 towers are those files' pages, mapped once for both; float32 towers are each process's own.
    config = load_config(TOY)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    model = finetune.training_model(config, torch.bfloat16)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert set(stored_dtypes(TOY).values()) == {torch.bfloat16} and frozen > 0
    one = {dtype: training_need(TOY, dtype, 4) for dtype in (torch.float32, torch.bfloat16)}
    two = {torch.float32: 2 * one[torch.float32], torch.bfloat16: 2 * one[torch.bfloat16] - frozen}
    args = argparse.Namespace(model=str(TOY), no_memory_check=False, num_frames=4, batch_size=8)
    for dtype, need in two.items():
        args.dtype = str(dtype).removeprefix("torch.")
        monkeypatch.setattr(memory, "available_bytes", lambda device: need)
        assert finetune.choose_dtype(args, torch.device("cpu"), 4) == dtype
        monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
        with pytest.raises(memory.NotEnoughMemory, match="GB for its 2 processes on this machine"):
            finetune.choose_dtype(args, torch.device("cpu"), 4)


def test_the_official_7b_fine_tunes_on_24_gb_in_bfloat16_only():
    # The official vicuna-7b config alone (no weights): on a 24 GB machine float32 does not fit at all (31.7 GB
    # of weights); bf16 with 2 examples of 4 frames a step does (measured: the full-size 7B, one example, peak
    # resident memory below), 16 do not.
    official = ROOT / "tests" / "data" / "official" / "vicuna-7b"
    available = 23 * 10**9
    assert training_need(official, torch.float32, 1) > 35e9
    assert training_need(official, torch.bfloat16, 2) < available < training_need(official, torch.bfloat16, 16)


@pytest.mark.parametrize("checkpoint", [TOY, ROOT / "weights" / "flan-t5-tiny"], ids=["vicuna", "t5"])
def test_gradients_through_frozen_bf16_towers_keep_no_float32_copy_of_their_weights(monkeypatch, checkpoint):
    # Without native bf16 a bf16 prompt computes in fp32 (fast.py), each weight upcast at its product. A product
    # keeps its weight for the backward pass: through a frozen tower that would be a whole fp32 language model.
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")
    model = minivb.load_model(checkpoint, dtype=torch.bfloat16)
    train.train_bridge_in_float32(model)
    processor = minivb.load_processor(checkpoint)
    frames = np.zeros((4, 224, 224, 3), dtype=np.uint8)
    batch = train.make_batch(processor, ["Question: what colour? Short answer:"], [frames], ["red"],
                             model.config.is_encoder_decoder)
    language_shapes = {shape for p in model.language_model.parameters() if p.dim() == 2
                       for shape in (tuple(p.shape), tuple(p.shape)[::-1])}  # a product may keep it transposed
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = model(**batch, loss_only=True).loss
    loss.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    copies = [t for t in kept if t.dtype == torch.float32 and tuple(t.shape) in language_shapes
              and not t.requires_grad]  # a trained weight of the bridge may have a language model's shape
    assert not copies
    # The gradient is the one of the same model in fp32 (the checkpoint is stored in bf16: the same weights), but
    # for the roundings to bf16 between the towers (frame features, visual tokens, the last hidden states).
    exact = minivb.load_model(checkpoint, dtype=torch.float32)
    train.train_bridge_in_float32(exact)
    exact(**batch, loss_only=True).loss.backward()
    ours, theirs = model.projection.weight.grad, exact.projection.weight.grad
    assert (ours - theirs).norm() <= 0.02 * theirs.norm()
