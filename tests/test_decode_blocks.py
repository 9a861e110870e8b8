"""minivb/decode_blocks.py: a greedy decode step's blocks compiled whole equal the blocks run one by one.

As in test_fast.py, MINIVB_FUSED=1 takes the compiled one-row kernels on any processor, and a lowered size threshold
lets the tiny models take them; MINIVB_BLOCKS=1 compiles the blocks at first use (the rent is tested on its own).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minivb
from minivb import compiling, decode_blocks, fast, native, packing, quant
from tests import tiny

# Widths whose heads are 16 wide: the int8 o projections add their terms in groups inside each head (_heads_product)
OVERRIDES = {"llama": dict(hidden_size=64, intermediate_size=128),
             "t5": dict(d_model=64, d_kv=16, d_ff=128)}
LAYERS = {"llama": 2, "t5": 3}
NEW_TOKENS = 6
# Every token a new one: the tiny T5 would answer its start token over and over, whose keys are then all alike (and
# attention the same with any weights)
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, no_repeat_ngram_size=1)


# One row takes native.py's kernels where the CPU has their instructions; "/compiled": inductor's (MINIVB_NATIVE=0)
@pytest.fixture(scope="module", params=[f"{text}{int8}{kernels}" for text in ("llama", "t5") for int8 in ("", "-int8")
                                        for kernels in ("", "/compiled")])
def model(request, tmp_path_factory):
    text, _, quantize = request.param.removesuffix("/compiled").partition("-")
    reference = tiny.build(text, text_overrides=OVERRIDES[text])
    path = tiny.save(reference, tmp_path_factory.mktemp("tiny"))
    model = minivb.load_model(path, dtype=torch.bfloat16, quantize=quantize or None)
    batch = {k: v[:1] for k, v in tiny.batch(reference).items() if k != "labels"}  # one row: greedy decoding
    return text, model, batch


@pytest.fixture(autouse=True)
def one_row_kernels(monkeypatch, request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("model", "").endswith("/compiled"):
        monkeypatch.setenv("MINIVB_NATIVE", "0")
    monkeypatch.setenv("MINIVB_FUSED", "1")
    monkeypatch.setenv("MINIVB_COMPILE", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)


def compiled_blocks(monkeypatch) -> list:
    """Records the name of each whole block that runs compiled (not its plain forward)."""
    calls, compiled = [], compiling._compiled

    def counting(function, *options):
        kernel = compiled(function, *options)
        if kernel is None or function not in (decode_blocks.t5_block, decode_blocks.llama_block):
            return kernel
        return lambda *args: calls.append(function.__name__) or kernel(*args)

    monkeypatch.setattr(compiling, "_compiled", counting)
    return calls


@torch.no_grad()
def test_whole_blocks_generate_the_tokens_of_the_blocks_one_by_one(model, monkeypatch):
    """Greedy decoding, bf16 and int8, LLaMA and T5: the same tokens and scores within bf16's rounding. Every step
    takes the whole blocks but T5's first (its cross-attention not yet in the cache): each cache has a slot to spare
    (`decode_blocks._write`)."""
    text, model, batch = model
    monkeypatch.setenv("MINIVB_BLOCKS", "0")
    plain, plain_trace = model.generate(**batch, **GREEDY, return_trace=True)
    monkeypatch.setenv("MINIVB_BLOCKS", "1")
    calls = compiled_blocks(monkeypatch)
    whole, whole_trace = model.generate(**batch, **GREEDY, return_trace=True)
    if compiling._compiler_found():
        # LLaMA: steps 2..6 feed tokens at slots P..P+4 of P+6; T5: steps 2..6 at slots 1..5 of 7
        assert calls == [f"{text}_block"] * ((NEW_TOKENS - 1) * LAYERS[text])
    assert torch.equal(whole, plain) and len(set(plain[0].tolist())) == NEW_TOKENS
    assert score_error(whole_trace, plain_trace) <= 0.05


def score_error(got_trace, want_trace) -> float:
    """The largest difference between two greedy traces' scores, relative to each step's largest score; the tokens
    that cannot come (-inf: EOS until min_new_tokens) the same in both."""
    worst = 0.0
    for got, want in zip(got_trace.scores, want_trace.scores):
        finite = want.isfinite()
        assert torch.equal(finite, got.isfinite())
        worst = max(worst, ((got[finite] - want[finite]).abs().max() / want[finite].abs().max()).item())
    return worst


@torch.no_grad()
def test_which_steps_take_whole_blocks(model, monkeypatch):
    text, model, _ = model
    lm = model.language_model
    blocks = lm.layers if text == "llama" else lm.decoder.blocks
    width = blocks[0].attn_norm.weight.shape[0]
    row = torch.zeros(1, 1, width, dtype=torch.bfloat16)
    cache = lm.new_cache(1, 4)
    cache.advance(1)
    if text == "t5":
        assert not decode_blocks.takes(blocks, row, cache)  # the first step projects the encoder output
        keys = torch.zeros(1, lm.config.num_heads, 3, lm.config.d_kv, dtype=torch.bfloat16)
        cache.cross = [(keys, keys)] * len(blocks)
    assert decode_blocks.takes(blocks, row, cache)
    assert not decode_blocks.takes(blocks, row.expand(1, 2, width), cache)  # a prompt
    assert not decode_blocks.takes(blocks, torch.zeros(2, 1, width, dtype=torch.bfloat16), lm.new_cache(2, 4))
    assert not decode_blocks.takes(blocks, row.float(), cache)  # rows in another dtype than the weights
    with torch.enable_grad():
        assert not decode_blocks.takes(blocks, row, cache)
    cache.advance(2)
    assert not decode_blocks.takes(blocks, row, cache)  # the cache's last slot: its slices would be contiguous
    cache.length = 1
    for switch, value in (("MINIVB_BLOCKS", "0"), ("MINIVB_FUSED", "0")):
        monkeypatch.setenv(switch, value)
        assert not decode_blocks.takes(blocks, row, cache)
        monkeypatch.setenv(switch, "1")
    # Packed copies that take their weights' places (packing.PackedWeight.replaces): one made by beams, in any block
    layers = [layer for block in blocks for layer in decode_blocks._products(block)]
    for layer in layers:
        monkeypatch.setattr(layer, "packed", packing.PackedWeight(replaces=True))
    assert decode_blocks.takes(blocks, row, cache)  # none made yet
    layers[-1].packed.copy = (packing._identity(layers[-1].weight), layers[-1].weight.clone())
    assert not decode_blocks.takes(blocks, row, cache)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 10**9)  # a model whose rows take the library's kernels
    assert not decode_blocks.takes(blocks, row, cache)


def test_int8_blocks_take_the_grouped_options_only_through_quants_kernels(model, monkeypatch):
    """decode_blocks._grouped: an int8 block whose products are native.py's compiles with the bf16 blocks' options
    (compiling._BLOCK_OPTIONS); through quant.py's grouped kernels (MINIVB_NATIVE=0, or no VNNI), with theirs."""
    text, model, _ = model
    lm = model.language_model
    layer = lm.layers[0].attn.q_proj if text == "llama" else lm.decoder.blocks[0].attn.q
    int8 = isinstance(layer, quant.Int8Linear)
    monkeypatch.setattr(native, "ready", native.ready)  # restored after: the switch below empties it
    native.available(torch.int8)  # what the model's steps set, whatever ran before
    assert decode_blocks._grouped(layer) == (int8 and torch.int8 not in native.ready)
    monkeypatch.setenv("MINIVB_NATIVE", "0")
    native.available(torch.int8)
    assert decode_blocks._grouped(layer) == int8


@torch.no_grad()
def test_whole_blocks_are_rented_until_they_pay(model, monkeypatch):
    """By default (MINIVB_BLOCKS unset) the blocks run their forward while what compiling them whole would have saved
    adds up to BLOCK_COMPILE_SECONDS (compiling.BLOCKS); a decode whose first step shows that its steps to come pay
    compiles them from its second step on (compiling.first_of), with the same tokens."""
    text, model, batch = model
    monkeypatch.setenv("MINIVB_BLOCKS", "0")
    reference = model.generate(**batch, **GREEDY)
    monkeypatch.delenv("MINIVB_BLOCKS")
    monkeypatch.delenv("MINIVB_COMPILE")  # the kernels one by one are rented too (compiling.KERNELS)
    monkeypatch.setattr(compiling.BLOCKS, "paid", 0.0)
    monkeypatch.setattr(compiling.BLOCKS, "bought", False)
    step = decode_blocks.BLOCK_SAVES * LAYERS[text]  # what a step's blocks would save
    monkeypatch.setattr(compiling, "BLOCK_COMPILE_SECONDS", 4 * step)
    calls = compiled_blocks(monkeypatch)
    short = model.generate(**batch, **dict(GREEDY, max_new_tokens=3, min_new_tokens=3))  # 2 steps: ~3 paid
    assert calls == [] and not compiling.BLOCKS.bought and torch.equal(short, reference[:, :3])
    assert compiling.BLOCKS.paid == pytest.approx(2 * step)
    monkeypatch.setattr(compiling.BLOCKS, "paid", 0.0)
    long = model.generate(**batch, **GREEDY)  # step 1 paid 1, the 4 to come ~4 more
    assert compiling.BLOCKS.bought and torch.equal(long, reference)
    if compiling._compiler_found():  # steps 2-5
        assert calls == [f"{text}_block"] * (4 * LAYERS[text])


AVX2_PROCESS = """
import json, os, sys, pytest, torch
import minivb
from minivb import compiling, decode_attention, fast, native
from tests import tiny
from tests.test_decode_blocks import GREEDY, OVERRIDES, compiled_blocks, score_error
fast.FUSED_MIN_WEIGHTS = 0  # the tiny model's products take the kernels a real one's do
reference = tiny.build("llama", text_overrides=OVERRIDES["llama"])
model = minivb.load_model(tiny.save(reference, sys.argv[1]), dtype=torch.bfloat16)
batch = {k: v[:1] for k, v in tiny.batch(reference).items() if k != "labels"}
with torch.no_grad():
    os.environ["MINIVB_BLOCKS"] = "0"
    plain, plain_trace = model.generate(**batch, **GREEDY, return_trace=True)
    os.environ["MINIVB_BLOCKS"] = "1"
    calls = compiled_blocks(pytest.MonkeyPatch())
    whole, whole_trace = model.generate(**batch, **GREEDY, return_trace=True)
    q_proj = model.language_model.layers[0].attn.q_proj
    route = fast.decode_route(torch.zeros(1, q_proj.in_features, dtype=torch.bfloat16), q_proj.weight)
print(json.dumps({"width": compiling._vector_width(), "isa": native.ISA, "route": route, "blocks": len(calls),
                  "attention": decode_attention.compiled_attention_pays(), "same": torch.equal(plain, whole),
                  "worst": score_error(whole_trace, plain_trace)}))
"""


@pytest.mark.skipif(not {"avx2", "fma"} <= fast._cpu_flags(), reason="this CPU has no AVX2 and FMA")
def test_without_avx512_whole_blocks_call_the_avx2_kernels(tmp_path):
    """A CPU without AVX-512 (ATEN_CPU_CAPABILITY=avx2, in a process of its own: inductor's kernels 256 bits wide, and
    native.py's AVX2 build): one row takes native.py's kernels, and on AMD (Zen 2 and 3) the greedy steps take whole
    blocks that call them, the same tokens and scores within bf16's rounding as the blocks one by one."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MINIVB_")}
    env.update(ATEN_CPU_CAPABILITY="avx2", MINIVB_NATIVE_BF16="0", MINIVB_COMPILE="1", MINIVB_CACHE=str(tmp_path),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run([sys.executable, "-c", AVX2_PROCESS, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parents[1])
    if "could not build kernels.c" in done.stderr or "no C compiler" in done.stderr:
        pytest.skip("kernels.c could not be built here")
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["width"] == 256 and got["isa"] == "AVX2" and got["route"] == "native"
    assert got["attention"] == ("AuthenticAMD" in fast._cpu_flags())
    steps = NEW_TOKENS - 1  # the first token comes from the prompt
    assert got["blocks"] == (steps * LAYERS["llama"] if got["attention"] and compiling._compiler_found() else 0)
    assert got["same"] and got["worst"] <= 0.05
