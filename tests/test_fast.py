"""minivb/fast.py: the compute-dtype rule, the fp32 compute of bf16 weights, and the decode products.

Both kinds of machine are tested on whichever one runs the tests: MINIVB_NATIVE_BF16=0/1 overrides the detection,
and MINIVB_FUSED=1 takes the compiled one-row kernels on any processor (by default, AMD's only); MINIVB_COMPILE=1
compiles them at first use (the rent of compiling.py is tested on its own). The compiled kernel is tested on tiny
matrices by lowering the size threshold that keeps it out of the other tests.
"""

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minivb
from minivb import checkpoint, compiling, converting, decode_attention, fast, llama, packing, quant
from minivb.__main__ import ASK_MAX_NEW_TOKENS, ASK_NUM_BEAMS
from minivb.llama import RMSNorm
from minivb.t5 import T5LayerNorm
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def compiled_rows(monkeypatch):
    """The compiled one-row kernels, whichever processor runs the tests (fast.compiled_rows_pay), compiled at first
    use (not rented until they pay: compiling.py)."""
    monkeypatch.setenv("MINIVB_FUSED", "1")
    monkeypatch.setenv("MINIVB_COMPILE", "1")
    monkeypatch.setenv("MINIVB_BLOCKS", "0")  # the kernels one by one (blocks compiled whole: test_decode_blocks.py)
    monkeypatch.setenv("MINIVB_NATIVE", "0")  # inductor's, not kernels.c's (test_native.py)


@pytest.fixture
def attention_calls(monkeypatch) -> list:
    """Records each call of the decode attention's compiled route (decode_attention._compiled_attention_rows)."""
    calls = []
    compiled = decode_attention._compiled_attention_rows
    monkeypatch.setattr(decode_attention, "_compiled_attention_rows", lambda *a: calls.append(1) or compiled(*a))
    return calls


@pytest.fixture
def fresh_kernel():
    """Forget the cached kernel (or its absence) before and after a test that changes how it is built."""
    compiling._compiled.cache_clear(), compiling._compiler_found.cache_clear()
    yield
    compiling._compiled.cache_clear(), compiling._compiler_found.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_compute_dtype_rule(native):
    bf16, fp32 = torch.bfloat16, torch.float32
    for phase in ("vision", "prefill"):
        assert fast.compute_dtype(bf16, phase, "cpu", native) == (bf16 if native else fp32)
    assert fast.compute_dtype(bf16, "decode", "cpu", native) == bf16  # bandwidth-bound: bf16 reads half the bytes
    for phase in fast.PHASES:
        assert fast.compute_dtype(fp32, phase, "cpu", native) == fp32  # fp32 weights: untouched
        assert fast.compute_dtype(bf16, phase, "cuda", native) == bf16  # GPUs multiply bf16 natively
    with pytest.raises(ValueError, match="phase"):
        fast.compute_dtype(bf16, "encode", "cpu", native)


def test_override_and_phase(monkeypatch):
    weight = torch.zeros(2, 2, dtype=torch.bfloat16)
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")
    assert not fast.has_native_bf16()
    with fast.phase("prefill", weight) as dtype:
        assert dtype == torch.float32
        assert F.linear(torch.ones(1, 2), weight).dtype == torch.float32  # the bf16 weight upcast at the call
    with fast.phase("decode", weight) as dtype:
        assert dtype == torch.bfloat16
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    assert fast.has_native_bf16()
    with fast.phase("prefill", weight) as dtype:
        assert dtype == torch.bfloat16
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match="MINIVB_NATIVE_BF16"):
        fast.has_native_bf16()


def test_a_decode_step_reads_each_switch_once(monkeypatch):
    """Inside compiling.settings (a decode step) a switch is read from the environment once, nested or not, and
    forgotten when the outermost ends: a switch set between steps counts from the next step on."""
    monkeypatch.setenv("MINIVB_FUSED", "0")
    with compiling.settings():
        assert not fast.compiled_rows_pay()
        monkeypatch.setenv("MINIVB_FUSED", "1")
        with compiling.settings():
            assert not fast.compiled_rows_pay()  # the step's first reading
        assert not fast.compiled_rows_pay() and compiling._switches == {"MINIVB_FUSED": False}
    assert compiling._switches == {} and fast.compiled_rows_pay()
    monkeypatch.setenv("MINIVB_FUSED", "2")
    with compiling.settings(), pytest.raises(ValueError, match="MINIVB_FUSED"):
        fast.compiled_rows_pay()


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = tiny.save(tiny.build(), tmp_path_factory.mktemp("tiny"))
    model = minivb.load_model(path).to(torch.bfloat16)
    return model, tiny.batch(tiny.build())


@torch.no_grad()
def test_fp32_compute_equals_an_fp32_model_with_the_same_weights(bf16_model, monkeypatch):
    """Without native bf16, each tower computes in fp32 from its bf16 weights: exactly what an fp32 copy of the
    rounded weights computes, rounded to bf16 once at the tower's output."""
    model, batch = bf16_model
    reference = copy.deepcopy(model).float()
    frames = batch["pixel_values"].flatten(0, 1)  # (N, 3, H, W)
    ids, mask = batch["qformer_input_ids"].repeat_interleave(4, 0), batch["qformer_attention_mask"].repeat_interleave(4, 0)
    queries = model.query_tokens.expand(frames.shape[0], -1, -1)
    embeds = torch.randn(2, 9, model.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    text_mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7])

    def towers():
        features = model.vision(frames)
        return dict(vision=features,
                    qformer=model.qformer(queries, ids, mask, features),
                    llama=model.language_model(embeds.bfloat16(), text_mask))

    monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")
    upcast = towers()
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    in_bf16 = towers()
    expected = dict(vision=reference.vision(frames))
    expected["qformer"] = reference.qformer(queries.float(), ids, mask, upcast["vision"].float())
    expected["llama"] = reference.language_model(embeds.bfloat16().float(), text_mask)
    for name, want in expected.items():
        got = upcast[name]
        assert got.dtype == torch.bfloat16  # storage dtype in, storage dtype out
        assert torch.equal(got, want.bfloat16()), name
        # and that is more than bf16 arithmetic gives: its error against the fp32 reference is larger
        assert (in_bf16[name].float() - want).abs().max() > (got.float() - want).abs().max(), name


def test_decode_routes(monkeypatch):
    big = torch.zeros(fast.MATRIX_MIN_WEIGHTS // 512, 512)
    small = torch.zeros(64, 64)
    row, rows = torch.zeros(1, 1, 512), torch.zeros(5, 1, 512)
    with torch.no_grad():
        assert fast.decode_route(row, big) == "fused"
        assert fast.decode_route(row, big.bfloat16()) == "plain"  # an fp32 row for a bf16 weight: not a decode step
        assert fast.decode_route(row.bfloat16(), big.bfloat16()) == "fused"
        assert fast.decode_route(row, small) == "plain"
        assert fast.decode_route(torch.zeros(9, 512), big) == "plain"  # prefill
        assert fast.decode_route(rows, big) == ("matrix" if fast._mkl_on_amd() else "plain")
        monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
        amx = "amx_bf16" in fast._cpu_flags()  # a few bf16 rows: weight @ x.T with AMX, F.linear without
        assert fast.decode_route(rows.bfloat16(), big.bfloat16()) == ("matrix" if amx else "plain")
        monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")  # without native bf16, a few rows take the few-row kernel
        assert fast.decode_route(rows.bfloat16(), big.bfloat16()) == "rows"
        assert fast.decode_route(torch.zeros(9, 512).bfloat16(), big.bfloat16()) == "plain"  # more than FEW_ROWS
        assert fast.decode_route(rows, big) == ("matrix" if fast._mkl_on_amd() else "plain")  # fp32: as before
        monkeypatch.delenv("MINIVB_NATIVE_BF16")
    assert fast.decode_route(row, big) == "plain"  # autograd: training never compiles
    monkeypatch.setenv("MINIVB_FUSED", "0")  # a processor where the library's one-row kernels are the faster
    with torch.no_grad():
        assert fast.decode_route(row, big) == "plain"  # fp32: MKL's matrix-vector product, through F.linear
        assert fast.decode_route(row.bfloat16(), big.bfloat16()) == "vector"  # bf16: torch.mv
        assert fast.decode_route(row.bfloat16(), small.bfloat16()) == "plain"
        assert not quant._fused_row(row.bfloat16(), big.to(torch.int8))  # int8: int8pack_mm
    assert fast.decode_route(row.bfloat16(), big.bfloat16()) == "plain"  # autograd


@pytest.mark.parametrize("bias", [False, True])
def test_vector_route_equals_linear(monkeypatch, bias):
    """One bf16 row through torch.mv: F.linear's product, within bf16's rounding of the same fp32 sums."""
    monkeypatch.setenv("MINIVB_FUSED", "0")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(384, 160, bias=bias).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(160, 384, generator=g))  # sums of ~20: differences visible
        if bias:
            layer.bias.copy_(torch.randn(160, generator=g) * 10)
        for shape in ((1, 1, 384), (1, 384), (384,)):
            x = torch.randn(shape, generator=g).bfloat16()
            assert fast.decode_route(x, layer.weight) == "vector"
            got, expected = layer(x), F.linear(x, layer.weight, layer.bias)
            assert got.shape == expected.shape == (*shape[:-1], 160) and got.dtype == torch.bfloat16
            exact = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
            # both round fp32 sums to bf16: at most one bf16 step apart, as far from the exact sums as F.linear
            torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=1e-2)
            assert (got.float() - exact).abs().max() <= 1.5 * (expected.float() - exact).abs().max() + 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_amx_matrix_route_equals_linear(monkeypatch, bias):
    """A few bf16 rows on a CPU with AMX: weight @ x.T, F.linear's products bit for bit, contiguous (as a transposed
    view, the attention after it summed in another order). Forced here on any CPU: the route is a choice of kernel."""
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    flags = fast._cpu_flags()
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(384, 160, bias=bias).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(160, 384, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(160, generator=g) * 10)
        monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"amx_bf16"})
        for shape in ((5, 1, 384), (2, 3, 384), (fast.AMX_MATRIX_MAX_ROWS, 384)):
            x = torch.randn(shape, generator=g).bfloat16()
            assert fast.decode_route(x, layer.weight) == "matrix"
            got = layer(x)
            assert got.is_contiguous() and torch.equal(got, F.linear(x, layer.weight, layer.bias))
        more = torch.randn(fast.AMX_MATRIX_MAX_ROWS + 1, 384, generator=g).bfloat16()
        assert fast.decode_route(more, layer.weight) == "plain"  # a prompt's rows: F.linear
        monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")  # AMX flags but bf16 emulated: the few-row kernel
        assert fast.decode_route(torch.zeros(5, 384).bfloat16(), layer.weight) == "rows"
        monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
        monkeypatch.setattr(fast, "_cpu_flags", lambda: flags - {"amx_bf16"})  # avx512_bf16 alone (the AMD EPYC)
        assert fast.decode_route(torch.zeros(5, 384).bfloat16(), layer.weight) == "plain"


def test_one_row_kernels_by_processor(monkeypatch):
    monkeypatch.delenv("MINIVB_FUSED")
    # (flags, vector width), whether one row takes the compiled kernels, whether the decode attention compiles
    machines = ((({"AuthenticAMD", "avx512f"}, 512), True, True), (({"AuthenticAMD", "avx2"}, 256), False, True),
                (({"GenuineIntel", "amx_bf16"}, 512), False, False), ((set(), 0), False, False))  # Zen 4, Zen 3
    for (words, width), pays, attention in machines:
        monkeypatch.setattr(fast, "_cpu_flags", lambda: frozenset(words))
        monkeypatch.setattr(compiling, "_vector_width", lambda: width)
        assert fast.compiled_rows_pay() == pays
        assert decode_attention.compiled_attention_pays() == attention
    monkeypatch.setenv("MINIVB_FUSED", "0")  # the decode attention too: PyTorch's own kernel, as it is
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1, 16, generator=g).bfloat16(), torch.randn(1, 4, 9, 16, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(decode_attention.attention(q, k, k), F.scaled_dot_product_attention(q, k, k))
    monkeypatch.setenv("MINIVB_FUSED", "1")
    assert fast.compiled_rows_pay()
    monkeypatch.setenv("MINIVB_FUSED", "yes")
    with pytest.raises(ValueError, match="MINIVB_FUSED must be 0 or 1"):
        fast.compiled_rows_pay()


def test_last_level_cache_from_sysfs(monkeypatch, tmp_path):
    sizes = {"index0": "48K", "index2": "2048K", "index3": "307200K", "index4": "odd"}  # L1, L2, L3, unreadable
    for name, size in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    monkeypatch.setattr(converting.glob, "glob", lambda pattern: sorted(str(p / "size") for p in tmp_path.iterdir()))
    converting.last_level_cache_bytes.cache_clear()
    try:
        assert converting.last_level_cache_bytes() == 300 * 2**20
        monkeypatch.setattr(converting.glob, "glob", lambda pattern: [])  # no sysfs (not Linux)
        converting.last_level_cache_bytes.cache_clear()
        assert converting.last_level_cache_bytes() == 0
    finally:
        converting.last_level_cache_bytes.cache_clear()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fast_products_equal_plain(monkeypatch, dtype, tol):
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(fast, "MATRIX_MIN_WEIGHTS", 0)
    monkeypatch.setattr(fast, "FUSED_CHUNK", 64)  # 192 inputs: three chunks, as a 7B down_proj has
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(192, 96).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 192, generator=g))
        for x in (torch.randn(1, 1, 192, generator=g), torch.randn(5, 1, 192, generator=g)):
            x = x.to(dtype)
            expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
            got = layer(x)
            assert got.shape == expected.shape and got.dtype == dtype
            # relative to the outputs' size (~14): bf16 rounds each output once, at ~0.4 % of it
            assert (got.float() - expected).abs().max() <= tol * expected.abs().max()


@torch.no_grad()
def test_few_row_products_equal_plain(monkeypatch):
    """The few-row kernel (bf16 without native bf16: beams) for every count of rows it takes, a width cut in chunks:
    within bf16's rounding of F.linear in fp32. Each count compiles once, and in two dtypes that is 14 compilations of
    one function, past dynamo's limit of 8, after which it would run op by op, ~50x slower (compiling._RECOMPILE_LIMIT)."""
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(fast, "FUSED_CHUNK", 64)  # 192 inputs: three chunks, as a 7B down_proj has
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(192, 96).to(torch.bfloat16)
    layer.weight.copy_(torch.randn(96, 192, generator=g))
    torch._dynamo.reset()  # (without native bf16, earlier tests' beams compiled some of these counts already)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for dtype in (torch.bfloat16, torch.float32):
        for rows in range(2, fast.FEW_ROWS + 1):
            x = torch.randn(rows, 1, 192, generator=g).to(dtype)
            assert fast.decode_route(x, layer.weight) == ("rows" if dtype == torch.bfloat16 else "plain")
            expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
            got = fast.rows_linear(x, layer.weight.to(dtype), layer.bias.to(dtype))
            assert got.shape == expected.shape and got.dtype == dtype
            assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    if compiling._compiler_found():
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2 * (fast.FEW_ROWS - 1)


@torch.no_grad()
def test_few_row_beams_generate_the_plain_tokens(bf16_model, monkeypatch):
    model, batch = bf16_model
    batch = {k: v for k, v in batch.items() if k != "labels"}
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")
    plain_routes = fast.decode_route
    monkeypatch.setattr(fast, "decode_route", lambda *args: "plain")
    plain = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3)
    monkeypatch.setattr(fast, "decode_route", plain_routes)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)  # every few-row product of the tiny model compiled
    calls = []
    plain_rows = fast.rows_linear
    monkeypatch.setattr(fast, "rows_linear", lambda x, w, b: calls.append(x.numel() // x.shape[-1]) or
                        plain_rows(x, w, b))
    assert torch.equal(model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3), plain)
    assert calls and set(calls) == {6}  # 2 videos x 3 beams, each decode step


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_products_equal_one_at_a_time(monkeypatch, dtype):
    """fast.linears: a layer's q, k and v (here three widths out, one with a bias) in one compiled call for one row,
    the same numbers as three calls; several rows go one layer at a time."""
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    g = torch.Generator().manual_seed(0)
    layers = [fast.Linear(128, out, bias=bias).to(dtype) for out, bias in ((96, False), (64, True), (32, False))]
    for layer in layers:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    kernels = []
    monkeypatch.setattr(fast, "fused_linears", lambda x, w, b, norm=None, act=None, plain=fast.fused_linears:
                        kernels.append(len(w)) or plain(x, w, b, norm, act))
    for rows in (1, 5):
        x = torch.randn(rows, 1, 128, generator=g).to(dtype)
        kernels.clear()
        grouped = fast.linears(x, *layers)
        assert kernels == ([3] if rows == 1 else [])  # one call for the three products of one row
        for got, layer in zip(grouped, layers):
            assert got.shape == (rows, 1, layer.out_features) and got.dtype == dtype
            assert torch.equal(got, layer(x))  # the same dot products, summed in the same order


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", [RMSNorm, T5LayerNorm])
def test_normed_products_equal_norm_then_products(monkeypatch, dtype, norm_class):
    """fast.linears(x, ..., norm=n) is [layer(n(x)) ...]; for one row, the norm runs inside the products' one call,
    computed once and rounded as op by op (compiling._NORMED_OPTIONS): the same numbers. A single layer (T5's
    cross-attention query) and a pair (gate, up) each take one call."""
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    g = torch.Generator().manual_seed(1)
    norm = norm_class(128, 1e-6).to(dtype)
    norm.weight.copy_(torch.rand(128, generator=g) + 0.5)
    layers = [fast.Linear(128, out, bias=False).to(dtype) for out in (96, 64)]
    for layer in layers:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    kernels = []
    monkeypatch.setattr(fast, "fused_linears", lambda x, w, b, norm=None, act=None, plain=fast.fused_linears:
                        kernels.append((len(w), norm is not None)) or plain(x, w, b, norm, act))
    for group in (layers[:1], layers):
        for rows in (1, 5):
            x = (torch.randn(rows, 1, 128, generator=g) * 3).to(dtype)
            kernels.clear()
            normed = fast.linears(x, *group, norm=norm)
            assert kernels == ([(len(group), True)] if rows == 1 else [])
            for got, layer in zip(normed, group):
                want = layer(norm(x))
                assert got.shape == want.shape and got.dtype == dtype
                # bf16: the norm rounds as op by op; the fp32 sums may be ordered otherwise (one bf16 rounding)
                assert (got.float() - want.float()).abs().max() <= (0 if rows > 1 else 1e-2) * want.abs().max()
    assert not compiling._compile_failed


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("act", [F.silu, F.gelu])
def test_a_gated_unit_equals_its_products_then_the_activation(monkeypatch, kind, act):
    """fast.gated(x, gate, up, act, norm) is act(gate(norm(x))) * up(norm(x)): for one row, the activation and the
    product inside the products' one compiled call, rounded as op by op (emulate_precision_casts; silu bit for bit);
    several rows, and a gated unit with biases, op by op after the products."""
    from minivb.quant import Int8Linear

    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 1)
    int8_kernel, bf16_kernel = quant.int8_rows_linears, fast.fused_linears
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(128, 1e-6).bfloat16()
    norm.weight.copy_(torch.rand(128, generator=g) + 0.5)
    for bias in (False, True):
        if kind == "int8":
            layers = [Int8Linear(128, 96, bias=bias, dtype=torch.bfloat16) for _ in range(2)]
            for layer in layers:
                layer.load_weight(torch.randn(96, 128, generator=g))
        else:
            layers = [fast.Linear(128, 96, bias=bias).bfloat16() for _ in range(2)]
            for layer in layers:
                layer.weight.copy_(torch.randn(96, 128, generator=g) * 0.1)
        for layer in layers:
            if bias:
                layer.bias.copy_(torch.randn(96, generator=g))
        calls = []  # the compiled kernels' calls, by the activation each was given
        if kind == "int8":
            monkeypatch.setattr(quant, "int8_rows_linears", lambda row, pairs, norm=None, act=None, k=int8_kernel:
                                calls.append(act) or k(row, pairs, norm, act))
        else:
            monkeypatch.setattr(fast, "fused_linears", lambda x, w, b, norm=None, act=None, k=bf16_kernel:
                                calls.append(act) or k(x, w, b, norm, act))
        for rows in (1, 5):
            x = (torch.randn(rows, 1, 128, generator=g) * 3).bfloat16()
            calls.clear()
            got, made = fast.gated(x, *layers, act, norm), list(calls)
            want = act(layers[0](norm(x))) * layers[1](norm(x))
            assert got.shape == want.shape == (rows, 1, 96) and got.dtype == torch.bfloat16
            assert made == ([] if rows > 1 else [None, None] if bias else [act])
            tolerance = 1e-4 if made == [act] else 0  # one call: GELU's erf is inductor's, ~1e-6 off ATen's
            assert (got.float() - want.float()).abs().max() <= tolerance * want.abs().max()
    assert not compiling._compile_failed


@torch.no_grad()
def test_grouped_int8_products_equal_one_at_a_time(monkeypatch):
    from minivb.quant import Int8Linear

    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 1)
    g = torch.Generator().manual_seed(0)
    layers = [Int8Linear(96, out, bias=bias, dtype=torch.bfloat16) for out, bias in ((100, True), (40, False))]
    for layer in layers:
        layer.load_weight(torch.randn(layer.out_features, 96, generator=g))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.out_features, generator=g))
    calls = []
    plain = quant.int8_rows_linears
    monkeypatch.setattr(quant, "int8_rows_linears", lambda row, pairs, norm=None, act=None:
                        calls.append(len(pairs)) or plain(row, pairs, norm, act))
    one = torch.randn(1, 1, 96, generator=g).bfloat16()
    grouped = fast.linears(one, *layers)
    assert calls == [2]
    for got, layer in zip(grouped, layers):
        assert got.shape == (1, 1, layer.out_features) and torch.equal(got, layer(one))
    norm = T5LayerNorm(96, 1e-6).bfloat16()
    norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    calls.clear()  # with the pre-norm in the same call: bit for bit the norm op by op, then the products
    normed = fast.linears(one, *layers, norm=norm)
    assert calls == [2]
    assert all(torch.equal(got, m(norm(one))) for got, m in zip(normed, layers))
    calls.clear()  # fp32 rows: the reference, one layer at a time
    assert all(torch.equal(got, m(one.float())) for got, m in zip(fast.linears(one.float(), *layers), layers))
    assert calls == [] and not compiling._compile_failed


@torch.no_grad()
def test_fast_decode_generates_the_plain_tokens(bf16_model, monkeypatch):
    model, batch = bf16_model
    batch = {k: v[:1] for k, v in batch.items() if k != "labels"}  # one row: greedy decoding's one-row products
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")  # the prompt in bf16 too, so its last row's lm_head counts below
    plain_routes, plain_fused = fast.decode_route, fast.fused_linears
    monkeypatch.setattr(fast, "decode_route", lambda *args: "plain")
    plain, plain_trace = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, return_trace=True)
    monkeypatch.setattr(fast, "decode_route", plain_routes)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)  # every one-row product of the tiny model compiled
    calls = []
    monkeypatch.setattr(fast, "fused_linears", lambda x, w, b, norm=None, act=None: calls.append(len(w)) or
                        plain_fused(x, w, b, norm, act))
    fused, fused_trace = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, return_trace=True)
    # 5 decode steps x (2 layers x 7 products + lm_head), the prompt's lm_head; a layer's q, k, v and gate, up in one
    # call each: 2 x 4 calls + lm_head a step
    assert sum(calls) == 5 * 15 + 1 and len(calls) == 5 * 9 + 1
    assert torch.equal(fused, plain)
    for got, want in zip(fused_trace.scores, plain_trace.scores):
        finite = want.isfinite()  # EOS is -inf until min_new_tokens
        assert torch.equal(finite, got.isfinite())
        assert (got[finite] - want[finite]).abs().max() <= 0.05 * want[finite].abs().max()


@pytest.fixture
def rent(monkeypatch):
    """compiling.py's rent as a fresh process has it: nothing paid, nothing compiled."""
    monkeypatch.delenv("MINIVB_COMPILE")
    monkeypatch.setattr(compiling.KERNELS, "paid", 0.0)
    monkeypatch.setattr(compiling.KERNELS, "bought", False)


def test_kernels_with_a_fast_plain_route_are_rented_until_they_pay(monkeypatch, rent):
    """A one-row product takes F.linear (its plain route) until what the compiled kernel would have saved adds up to
    COMPILE_SECONDS, then the kernel, and so do all rented kernels from then on; a kernel with no fast plain route
    (quantizing) compiles at once and leaves the rented ones rented; MINIVB_COMPILE=1 compiles at first use, 0 never."""
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    x, w = torch.randn(1, 32), torch.randn(64, 32)
    monkeypatch.setattr(compiling, "COMPILE_SECONDS", 2.5 * fast.FUSED_SAVES_PER_BYTE * compiling.bytes_of([w]))
    plain_calls, plain = [], fast._plain_rows_times_matrices
    monkeypatch.setattr(fast, "_plain_rows_times_matrices", lambda *args: plain_calls.append(1) or plain(*args))
    compiles = compiling._compiler_found()

    def products(n):
        plain_calls.clear()
        for _ in range(n):
            torch.testing.assert_close(fast.fused_linears(x, [w], [None])[0], F.linear(x, w))
        return len(plain_calls)

    assert products(4) == (2 if compiles else 4) and compiling.KERNELS.bought == compiles  # paid at the 3rd
    monkeypatch.setattr(compiling.KERNELS, "paid", 0.0)
    monkeypatch.setattr(compiling.KERNELS, "bought", False)
    monkeypatch.setenv("MINIVB_COMPILE", "0")
    assert products(4) == 4 and not compiling.KERNELS.bought  # never compiled, nothing counted
    assert torch.equal(quant.quantize_weight(w)[0], quant.quantize_rows(w)[0]) and not compiling.KERNELS.bought
    monkeypatch.setenv("MINIVB_COMPILE", "1")
    assert products(2) == (0 if compiles else 2)
    monkeypatch.setattr(compiling.KERNELS, "bought", False)
    monkeypatch.delenv("MINIVB_COMPILE")
    if compiles:
        monkeypatch.setattr(quant, "QUANTIZE_COMPILE_MIN", 0)
        quant.quantize_weight(w)  # compiled at once, buying nothing
        assert not compiling.KERNELS.bought and compiling.KERNELS.paid == 0 and products(1) == 1  # still rented
        assert products(2) == 1 and compiling.KERNELS.bought  # paid at the 3rd, as in a process that never quantized


@torch.no_grad()
def test_a_decode_rents_its_first_step_and_compiles_where_the_steps_to_come_pay(bf16_model, monkeypatch, rent):
    """compiling.py's rent in generate (generate.decode_step): the first decode step takes the plain routes, and what
    it paid tells what the steps to come would; where that covers COMPILE_SECONDS they compile from the second step
    on, with the same tokens; where it does not, the whole decode rents."""
    model, batch = bf16_model
    batch = {k: v[:1] for k, v in batch.items() if k != "labels"}  # one row: greedy decoding's one-row products
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")  # the prompt in bf16 too: its last row's lm_head is one row
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    plain_calls, plain, plain_normed = [], fast._plain_rows_times_matrices, fast._plain_normed_rows_times_matrices
    monkeypatch.setattr(fast, "_plain_rows_times_matrices", lambda *a: plain_calls.append(1) or plain(*a))
    monkeypatch.setattr(fast, "_plain_normed_rows_times_matrices", lambda *a: plain_calls.append(1) or plain_normed(*a))
    weights = [layer.weight for layer in model.language_model.modules() if isinstance(layer, fast.Linear)]
    step = fast.FUSED_SAVES_PER_BYTE * compiling.bytes_of(weights)  # what a step's products would save
    monkeypatch.setattr(compiling, "COMPILE_SECONDS", 4 * step)

    short = model.generate(**batch, max_new_tokens=3, min_new_tokens=3)  # the prompt's lm_head and 2 steps: ~2 steps
    assert not compiling.KERNELS.bought and len(plain_calls) == 1 + 2 * 9  # a step: 2 layers x 4 calls, and the lm_head
    routes = fast.decode_route
    monkeypatch.setattr(fast, "decode_route", lambda *args: "plain")  # the reference: F.linear throughout
    reference = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    monkeypatch.setattr(fast, "decode_route", routes)
    monkeypatch.setattr(compiling.KERNELS, "paid", 0.0)
    plain_calls.clear()
    long = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)  # step 1 paid ~1, the 4 to come ~4 more
    compiles = compiling._compiler_found()
    assert compiling.KERNELS.bought and len(plain_calls) == (1 + 9 if compiles else 1 + 5 * 9)
    assert torch.equal(long, reference) and torch.equal(short, reference[:, :3])


@torch.no_grad()
def test_a_decode_step_sets_dynamo_switches_once_for_its_compiled_calls(bf16_model, monkeypatch):
    """compiling.settings holds dynamo's two switches around a whole decode step (generate.decode_step), so its
    compiled calls (11 a step here) skip setting them each; nested, and restored on leaving; the same tokens."""
    duck, limit = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.recompile_limit
    with compiling.settings():
        with compiling.settings():
            assert not torch.fx.experimental._config.use_duck_shape and torch._dynamo.config.recompile_limit == 64
        assert not torch.fx.experimental._config.use_duck_shape and compiling._settled == 1
    assert (torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.recompile_limit) == (duck, limit)
    assert compiling._settled == 0

    model, batch = bf16_model
    batch = {k: v[:1] for k, v in batch.items() if k != "labels"}
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)  # every one-row product of the tiny model compiled
    routes = fast.decode_route
    monkeypatch.setattr(fast, "decode_route", lambda *args: "plain")
    reference = model.generate(**batch, max_new_tokens=7, min_new_tokens=7)
    monkeypatch.setattr(fast, "decode_route", routes)
    entered, switches = [], compiling._NO_DUCK_SIZING

    class Counted:
        def __enter__(self):
            entered.append(1)
            return switches.__enter__()

        def __exit__(self, *exc):
            return switches.__exit__(*exc)

    monkeypatch.setattr(compiling, "_NO_DUCK_SIZING", Counted())
    counts = {}
    for tokens in (3, 7):
        entered.clear()
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens)
        assert torch.equal(out, reference[:, :tokens])
        counts[tokens] = len(entered)
    if compiling._compiler_found():
        assert counts[7] - counts[3] == 4  # one a decode step, not one a compiled call


def test_no_compiler_falls_back_with_a_notice(monkeypatch, capsys, fresh_kernel):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 1)
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    assert torch.equal(fast.fused_linears(x, [w], [None])[0], F.linear(x, w))
    quantized, scales = quant.quantize_weight(w)  # one row of int8: int8pack_mm, as before the compiled kernel
    with torch.no_grad():
        assert torch.equal(quant.int8_linear(x.bfloat16(), quantized, scales.bfloat16()),
                           torch._weight_int8pack_mm(x.bfloat16(), quantized, scales.bfloat16()))
    q, k = torch.randn(1, 2, 1, 8).bfloat16(), torch.randn(1, 2, 5, 8).bfloat16()
    with torch.no_grad():
        assert torch.equal(decode_attention.attention(q, k, k, None, False),
                           decode_attention._explicit_attention(q, k, k, None))
    assert capsys.readouterr().err.count("no C++ compiler") == 1  # said once


def test_int8_products_equal_the_reference(monkeypatch):
    from minivb.quant import Int8Linear

    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 1)  # 1 row through the compiled kernel at this size too
    monkeypatch.setattr(quant, "INT8_MATMUL_ROWS", 4)  # 2 rows through int8pack_mm, 9 through a bf16 copy
    monkeypatch.setattr(converting, "BLOCK_BYTES", 2 * 96 * 64)  # ... converted 64 output rows at a time: 2 blocks
    monkeypatch.setenv("MINIVB_INT8_MM", "0")  # several rows: the paths of CPUs without integer products
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(96, 100, bias=True, dtype=torch.bfloat16)
    layer.load_weight(torch.randn(100, 96, generator=g))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(100, generator=g))
        for rows in (1, 2, 9):
            x = torch.randn(rows, 1, 96, generator=g)
            reference = layer.reference(x) + layer.bias  # fp32: the dequantized weight through F.linear
            got = layer(x.bfloat16())
            assert got.shape == (rows, 1, 100) and got.dtype == torch.bfloat16
            assert (got.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
        one = x[:1, 0].bfloat16()  # the compiled one-row kernel against int8pack_mm, its fallback
        packed = torch._weight_int8pack_mm(one, layer.weight, layer.weight_scale)
        assert (quant.int8_linear(one, layer.weight, layer.weight_scale).float() - packed.float()).abs().max() \
            <= 2**-7 * packed.float().abs().max()
    assert not compiling._compile_failed


@torch.no_grad()
def test_int8_row_kernel_sums_in_groups():
    """The one-row int8 kernel adds quant.GROUPS vectors of products before they join the running sums where the
    width allows (256 = 2 x 8 x 16): the same products as the exact sum, within fp32 rounding, alone and under a norm
    (the norm bit for bit as op by op); a width that does not allow it (96) takes one sum. int8_rows_linears is the
    kernel's own call (compiled at first use: the autouse fixture), so no size threshold is in the way."""
    g = torch.Generator().manual_seed(0)
    norm = T5LayerNorm(256, 1e-6).bfloat16()
    norm.weight.copy_(torch.rand(256, generator=g) + 0.5)
    for width in (256, 96):
        weight, scales = quant.quantize_rows(torch.randn(300, width, generator=g) * 3)
        scales = scales.bfloat16()
        row = torch.randn(1, width, generator=g).bfloat16()
        exact = (row.double() @ weight.double().T) * scales.double()  # (1, 300)
        got = quant.int8_rows_linears(row, [(weight, scales)])[0]
        assert got.shape == (1, 300) and got.dtype == torch.bfloat16
        assert (got.double() - exact).abs().max() <= 2**-8 * exact.abs().max()  # bf16's rounding of the result
        if width == 256:
            normed = norm(row)
            assert torch.equal(quant.int8_rows_linears(row, [(weight, scales)], norm)[0],
                               quant.int8_rows_linears(normed, [(weight, scales)])[0])
    assert not compiling._compile_failed


def test_int8_prompt_copies_reuse_one_buffer(monkeypatch):
    """A prompt's bf16 copies of int8 blocks are written into one buffer kept between calls: layers of other sizes
    after it get the products fresh copies give, bit for bit; under autograd each copy is fresh (a product keeps its
    weight for the backward pass, which a later write into the buffer would change)."""
    monkeypatch.setattr(converting, "BLOCK_BYTES", 2 * 96 * 64)  # 64 output rows at a time
    monkeypatch.setenv("MINIVB_INT8_MM", "0")  # 12 rows through the bf16 copies on every CPU
    monkeypatch.setattr(converting, "_conversions", threading.local())
    g = torch.Generator().manual_seed(0)
    layers = [quant.quantize_rows(torch.randn(out, 96, generator=g)) for out in (200, 70, 130)]  # 4, 2, 3 blocks
    layers = [(weight, scales.bfloat16()) for weight, scales in layers]
    x = torch.randn(12, 96, generator=g).bfloat16()
    with torch.no_grad():
        got = [quant.int8_linear(x, weight, scales) for weight, scales in layers]
        assert converting._conversions.buffer.shape == (64 * 96,)  # the largest block, kept
        with monkeypatch.context() as m:
            m.setattr(converting, "_converted", lambda block, dtype: block.to(dtype))
            fresh = [quant.int8_linear(x, weight, scales) for weight, scales in layers]
    assert all(torch.equal(a, b) for a, b in zip(got, fresh))

    monkeypatch.setattr(converting, "_conversions", threading.local())
    weight, scales = layers[0]
    x.requires_grad_(True)
    quant.int8_linear(x, weight, scales).float().sum().backward()
    assert getattr(converting._conversions, "buffer", None) is None
    expected = (weight.float() * scales.float()[:, None]).sum(0)  # d(sum of x @ W.T) / dx: W's column sums
    assert (x.grad.float() - expected).abs().max() <= 1e-2 * expected.abs().max()  # bf16's rounding of ~20


def test_fp32_compute_converts_large_weights_in_blocks(monkeypatch):
    """Without native bf16 a prompt computes in fp32: a bf16 weight larger than BLOCK_BYTES is upcast a block of rows
    at a time (converting.linear_in_blocks), into the kept buffer, with the products of the whole upcast; fp32 prompts on
    int8 layers without integer products take the same blocks, not Int8Linear.reference's whole fp32 copies."""
    monkeypatch.setattr(converting, "BLOCK_BYTES", 4 * 96 * 64)  # 64 fp32 rows of 96 at a time
    monkeypatch.setattr(converting, "_conversions", threading.local())
    monkeypatch.setenv("MINIVB_INT8_MM", "0")
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(150, 96, generator=g).bfloat16(), torch.randn(150, generator=g).bfloat16()
    x = torch.randn(2, 10, 96, generator=g)
    with torch.no_grad():
        with fast.computing_in(torch.float32):
            got = F.linear(x, weight, bias)
        assert converting._conversions.buffer.dtype == torch.float32 and converting._conversions.buffer.numel() == 64 * 96
        expected = F.linear(x, weight.float(), bias.float())
        assert got.shape == (2, 10, 150) and got.dtype == torch.float32
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        layer = quant.Int8Linear(96, 150, bias=False, dtype=torch.bfloat16)
        layer.load_weight(weight.float())
        converting._conversions.buffer = None
        assert quant._copied_rows(x) and not quant._copied_rows(x[:, :4])  # 20 rows copied in blocks; 8 not
        reference = layer.reference(x)
        assert (layer(x) - reference).abs().max() <= 1e-5 * reference.abs().max()
        assert converting._conversions.buffer is not None


def test_int8_halves_rebuild_each_row():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1, 30, 1e4, 0])[:, None]
    halves, step = quant._int8_halves(x)
    high, low = halves[:5].long(), halves[5:].long()
    assert halves.dtype == torch.int8 and high.min() >= -128 and high.max() <= 127 and low.min() >= 0
    rebuilt = (quant.HALF * high + low) * step
    largest = x.abs().amax(-1, keepdim=True)
    assert ((rebuilt - x).abs() <= largest / 32766 * 1.0001).all()  # half a step of the row's grid
    assert (rebuilt[4] == 0).all()  # an all-zero row stays zero, no division by zero


VNNI = bool(fast._cpu_flags() & quant.INT8_DOT_PRODUCT_FLAGS)


@pytest.mark.skipif(not quant.integer_products_pay(), reason="no int8 dot-product instructions (VNNI, AMX) here")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 2e-4)])
def test_integer_products_equal_the_reference(dtype, tol, monkeypatch):
    from minivb.quant import Int8Linear

    flags = fast._cpu_flags()
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags - {"AuthenticAMD"})  # where 2 bf16 rows take the route
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(300, 100, bias=True, dtype=torch.bfloat16)
    layer.load_weight(torch.randn(100, 300, generator=g))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(100, generator=g))
        for rows in (2, 5, 128 if dtype == torch.bfloat16 else 300):  # bf16 prompts keep their own path
            x = torch.randn(rows, 1, 300, generator=g).to(dtype)
            assert quant._integer_rows(x)
            reference = layer.reference(x.double()) + layer.bias.double()
            got = layer(x)
            assert got.shape == (rows, 1, 100) and got.dtype == dtype
            assert (got.double() - reference).abs().max() <= tol * reference.abs().max()
        assert not quant._integer_rows(x[:1])  # one row stays on int8pack_mm or the compiled kernel
        assert quant._integer_rows(torch.zeros(129, 300)) and not quant._integer_rows(torch.zeros(129, 300).bfloat16())
    x = torch.randn(3, 300, requires_grad=True)
    assert not quant._integer_rows(x)  # autograd: the grid's rounding has no gradient


@pytest.mark.skipif(not quant.integer_products_pay(), reason="no int8 dot-product instructions (VNNI, AMX) here")
def test_on_amd_few_bf16_rows_keep_int8pack_mm(monkeypatch):
    """On the AMD EPYC, int8pack_mm is the faster up to INT8_MATMUL_ROWS bf16 rows (quant.py's table); fp32 rows and
    more bf16 rows take the integer products, with the weight on the left."""
    flags = fast._cpu_flags()
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"AuthenticAMD"})
    few, more = quant.INT8_MATMUL_ROWS, quant.INT8_MATMUL_ROWS + 1
    assert not quant._integer_rows(torch.zeros(few, 64).bfloat16()) and quant._integer_rows(torch.zeros(few, 64))
    assert quant._integer_rows(torch.zeros(more, 64).bfloat16())
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags - {"AuthenticAMD"})
    assert quant._integer_rows(torch.zeros(2, 64).bfloat16())


@torch.no_grad()
def test_int8pack_mm_takes_four_rows_a_call(monkeypatch):
    """Several bf16 rows through int8pack_mm go 4 rows a call, so that each call spreads its outputs over the cores
    (quant.INT8PACK_ROWS): the same products, bit for bit, as one call of all the rows."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (96, 256), generator=g, dtype=torch.int8)
    scales = torch.rand(96, generator=g).bfloat16() / 100
    monkeypatch.setattr(quant, "_integer_rows", lambda x: False)  # every count of rows up to 8 takes int8pack_mm
    whole, calls = torch._weight_int8pack_mm, []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, *a: calls.append(x.shape[0]) or whole(x, *a))
    for rows, blocks in ((1, [1]), (2, [2]), (4, [4]), (5, [4, 1]), (7, [4, 3]), (8, [4, 4])):
        calls.clear()
        x = torch.randn(rows, 256, generator=g).bfloat16()
        assert torch.equal(quant.int8_linear(x, weight, scales), whole(x, weight, scales)) and calls == blocks


@pytest.mark.skipif(not quant.integer_products_pay(), reason="no int8 dot-product instructions (VNNI, AMX) here")
def test_integer_products_with_the_weight_on_the_left_are_the_same(monkeypatch):
    """With AMX and on AMD the int8 weight is _int_mm's left matrix: the same exact sums, and a contiguous result."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (96, 256), generator=g, dtype=torch.int8)
    scales = torch.rand(96, generator=g).bfloat16() / 100
    flags = fast._cpu_flags()
    for rows in (2, 5, 40):
        x = torch.randn(rows, 256, generator=g).bfloat16()
        monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"amx_int8"})
        left = quant.integer_linear(x, weight, scales)
        monkeypatch.setattr(fast, "_cpu_flags", lambda: flags - {"amx_int8", "AuthenticAMD"})
        right = quant.integer_linear(x, weight, scales)
        assert left.shape == (rows, 96) and left.is_contiguous() and torch.equal(left, right)


@pytest.mark.skipif(not VNNI, reason="the CPU has no int8 dot-product instructions: nothing to refuse")
def test_integer_products_are_refused_where_onednn_saturates():
    # oneDNN capped below VNNI sums pairs of int8 products in 16 bits: wrong sums, which the probe catches.
    code = "from minivb import quant; print(quant.integer_products_pay())"
    for isa, expected in (("AVX2", "False"), ("AVX512_CORE", "False"), ("AVX512_CORE_VNNI", "True")):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, isa


@torch.no_grad()
def test_int8pack_mm_never_takes_several_rows_of_a_width_it_crashes_on(monkeypatch):
    """torch._weight_int8pack_mm (PyTorch 2.13, AMD EPYC) crashed the process for 2-8 bf16 rows of a width not a
    multiple of 16, and gave NaN or 1e32 for one: those rows take the block copies (official widths: multiples of
    64)."""
    from minivb.quant import Int8Linear

    flags = fast._cpu_flags()
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"AuthenticAMD"})
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(100, 64, bias=False, dtype=torch.bfloat16)
    layer.load_weight(torch.randn(64, 100, generator=g))
    for rows in (1, 2, 4, 8):
        x = torch.randn(rows, 100, generator=g).bfloat16()
        reference = layer.reference(x.double())
        assert (layer(x).double() - reference).abs().max() <= 2e-2 * reference.abs().max()


@torch.no_grad()
@pytest.mark.skipif(not quant.integer_products_pay() or not packing.int8_products_exact(),
                    reason="no exact int8 dot products (VNNI, AMX) in oneDNN here")
def test_packed_int8_products_equal_the_integer_products(monkeypatch):
    """On AMD, int8 weights pack once for oneDNN at their PACK_AFTER-th product of several rows (packing.pack_int8):
    the same exact sums as torch._int_mm's (but for fp32's rounding of them); beams read the copy; a prompt and one
    row keep their kernels; autograd and a changed weight never read it."""
    from minivb.quant import Int8Linear

    flags = fast._cpu_flags()
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"AuthenticAMD"})
    monkeypatch.setattr(packing, "PACK_AFTER", 3)
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(300, 100, bias=True, dtype=torch.bfloat16)
    layer.load_weight(torch.randn(100, 300, generator=g))
    layer.bias.copy_(torch.randn(100, generator=g))
    packing.allow_packing(layer)
    beams = torch.randn(5, 1, 300, generator=g).bfloat16()
    for _ in range(3):  # packed at the 3rd product, which reads the copy
        assert layer.packed.copy is None
        got = layer(beams)
    assert layer.packed.copy is not None and got.dtype == torch.bfloat16 and got.shape == (5, 1, 100)
    reference = layer.reference(beams.double()) + layer.bias.double()
    assert (got.double() - reference).abs().max() <= 2e-2 * reference.abs().max()  # bf16's own rounding
    rows = beams.reshape(5, 300)
    exact = quant._sum_halves(quant._int8_products(quant._int8_halves(rows)[0], layer.weight).double(),
                              quant._int8_halves(rows)[1].double(), layer.weight_scale.double())
    assert (quant.packed_integer_linear(rows, layer.packed.copy[1], layer.weight_scale.float()) - exact).abs().max() \
        <= 1e-6 * exact.abs().max()  # the sums themselves: fp32 rounding only
    calls, original = [], quant.packed_integer_linear
    monkeypatch.setattr(quant, "packed_integer_linear", lambda *args: calls.append(len(args[0])) or original(*args))
    prompt = torch.randn(1, packing.PACK_MAX_ROWS + 20, 300, generator=g).bfloat16()
    reference = layer.reference(prompt.double()) + layer.bias.double()
    assert (layer(prompt).double() - reference).abs().max() <= 2e-2 * reference.abs().max()  # the block copies
    layer(beams[:1])  # one row: int8pack_mm or the compiled kernel
    with torch.enable_grad():
        layer(beams.clone().requires_grad_())  # autograd: the reference
    assert calls == []  # none of them read the copy
    layer(beams)
    assert calls == [5]
    layer.weight.mul_(-1)  # a changed weight: its stale copy is dropped and counted anew
    layer(beams)
    assert layer.packed.copy is None and layer.packed.products[1] == 1


@torch.no_grad()
@pytest.mark.skipif(not quant.integer_products_pay() or not packing.int8_products_exact(),
                    reason="no exact int8 dot products (VNNI, AMX) in oneDNN here")
def test_an_int8_copy_that_replaced_its_weight_serves_every_product(monkeypatch):
    """Where the packed int8 copy took the place of the checkpoint's int8 pages (memory.room_to_pack's "instead"),
    one row and a prompt read it too, never the weight (whose pages went to the OS); autograd still reads the weight.
    Beside the weight (test above), they keep their kernels."""
    from minivb.quant import Int8Linear

    flags = fast._cpu_flags()
    monkeypatch.setattr(fast, "_cpu_flags", lambda: flags | {"AuthenticAMD"})
    monkeypatch.setattr(packing, "PACK_AFTER", 3)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)  # one row would take the compiled kernel if it pays
    paged_out = []
    monkeypatch.setattr(packing, "page_out", paged_out.append)
    g = torch.Generator().manual_seed(0)
    layers = [Int8Linear(256, 96, bias=False, dtype=torch.bfloat16) for _ in range(2)]
    for layer in layers:
        layer.load_weight(torch.randn(96, 256, generator=g))
        packing.allow_packing(layer, replaces=True)
    row = torch.randn(1, 1, 256, generator=g).bfloat16()
    before = fast.linears(row, *layers)  # no copy yet: the int8 kernels
    for layer in layers:
        for _ in range(3):  # beam steps: packed at the 3rd
            layer(torch.randn(5, 1, 256, generator=g).bfloat16())
        assert layer.packed.copy is not None
    assert [w is layer.weight for w, layer in zip(paged_out, layers)] == [True, True]
    calls, original, int8_linear = [], quant.packed_integer_linear, quant.int8_linear
    monkeypatch.setattr(quant, "packed_integer_linear", lambda *args: calls.append(len(args[0])) or original(*args))
    for read in ("int8_rows_linears", "int8_linear"):  # the one-row kernels and the prompt's copies read the weight
        monkeypatch.setattr(quant, read, lambda *args, read=read: pytest.fail(f"{read} read the weight"))
    prompt = torch.randn(1, packing.PACK_MAX_ROWS + 20, 256, generator=g).bfloat16()
    for layer, got, expected in zip(layers, fast.linears(row, *layers), before):
        reference = layer.reference(row.double())
        assert (got.double() - reference).abs().max() <= 2e-2 * reference.abs().max()
        torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=2e-2)  # other kernels, the same products
        reference = layer.reference(prompt.double())
        assert (layer(prompt).double() - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert calls == [1, 1, packing.PACK_MAX_ROWS + 20, packing.PACK_MAX_ROWS + 20]  # every product read the copy
    monkeypatch.setattr(quant, "int8_linear", int8_linear)
    with torch.enable_grad():
        layers[0](row.clone().requires_grad_())  # autograd: from the weight (int8pack_mm), never the copy
    assert len(calls) == 4


@torch.no_grad()
@pytest.mark.skipif(not quant.integer_products_pay() or not packing.int8_products_exact(),
                    reason="no exact int8 dot products (VNNI, AMX) in oneDNN here")
def test_int8_weights_are_packed_by_writing_onednns_layout(monkeypatch):
    """packing.written_int8 writes oneDNN's packed int8 layout with torch's copies: after oneDNN packed the first
    weight of a shape and the write gave its bytes, later weights of that shape are written, byte for byte what
    oneDNN would make of them (an int8 checkpoint's weight at an odd address too), and multiply the same; a shape
    whose layout is not known (not in blocks of 64) is always packed by oneDNN."""
    monkeypatch.setattr(packing, "int8_layout_known", {})
    monkeypatch.setattr(packing, "_int8_templates", packing.weakref.WeakValueDictionary())
    written, original = [], packing.written_int8
    monkeypatch.setattr(packing, "written_int8", lambda *args: written.append(args[1].shape) or original(*args))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-127, 128, (192, 256), dtype=torch.int8, generator=g) for _ in range(2)]
    odd = torch.randint(-127, 128, (192 * 256 + 1,), dtype=torch.int8, generator=g)[1:].view(192, 256)  # unaligned
    first = packing.pack_int8(weights[0])  # oneDNN's, checked against the write (one call of written_int8); kept:
    # it is the template the shape's later weights are written into (packing holds it weakly)
    flags = fast._cpu_flags()
    if "avx512_vnni" in flags and not {"amx_int8", "amx_bf16"} & flags:  # the layout above: AVX-512 VNNI (AMD EPYC)
        assert packing.int8_layout_known == {(192, 256): True} and written == [(192, 256)]
    rows = torch.randint(-128, 128, (6, 256), dtype=torch.int8, generator=g)
    for weight in (weights[1], odd):
        packed = packing.pack_int8(weight)
        expected = torch.ops.onednn.qlinear_prepack(weight, None)
        assert torch.equal(packing._memory_of(packed), packing._memory_of(expected))
        assert torch.equal(packing.int8_products(rows, packed, 192).long(), rows.long() @ weight.long().t())
    if packing.int8_layout_known[(192, 256)]:
        assert written == [(192, 256)] * 3
    other, calls = torch.randint(-127, 128, (100, 300), dtype=torch.int8, generator=g), len(written)
    packed = packing.pack_int8(other)  # oneDNN's: 300 inputs are not in blocks of 64
    assert packing.int8_layout_known[(100, 300)] is False and len(written) == calls
    assert torch.equal(packing.int8_products(rows[:, :1].expand(6, 300).contiguous(), packed, 100).long(),
                       rows[:, :1].long().expand(6, 300) @ other.long().t())
    # A CPU whose layout the write does not give (here: a write that reverses the rows) packs with oneDNN.
    monkeypatch.setattr(packing, "written_int8", lambda template, weight: original(template, weight.flip(0).clone()))
    weight = torch.randint(-127, 128, (128, 128), dtype=torch.int8, generator=g)
    packed, expected = packing.pack_int8(weight), torch.ops.onednn.qlinear_prepack(weight, None)
    assert packing.int8_layout_known[(128, 128)] is False and (128, 128) not in packing._int8_templates
    assert torch.equal(packing._memory_of(packed), packing._memory_of(expected))


@pytest.mark.skipif(not VNNI, reason="the CPU has no int8 dot-product instructions: nothing to refuse")
def test_packed_int8_products_are_refused_where_onednn_saturates():
    code = "from minivb import packing; print(packing.int8_products_exact())"
    for isa, expected in (("AVX2", "False"), ("AVX512_CORE_VNNI", "True")):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, isa
    assert not quant.int8_packing_pays() or "AuthenticAMD" in fast._cpu_flags()  # measured on AMD only


@torch.no_grad()
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_decode_attention_equals_sdpa(num_kv_heads, attention_calls):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=g).bfloat16()  # one query a row: the explicit fp32 softmax
    k, v = (torch.randn(3, num_kv_heads, 9, 16, generator=g).bfloat16() for _ in range(2))
    keep = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., :4] = False  # a left-padded row
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep,
                                              enable_gqa=num_kv_heads != 4)
    got = decode_attention.attention(q, k, v, keep, enable_gqa=num_kv_heads != 4)
    assert len(attention_calls) == (num_kv_heads == 4)  # compiled for one query a key/value head; for two, written out
    assert got.dtype == torch.bfloat16
    plain = decode_attention._explicit_attention(q, k, v, keep)  # what runs where nothing compiles
    one_key = decode_attention.attention(q, k[:, :, 4:5], v[:, :, 4:5], keep[..., 4:5], enable_gqa=num_kv_heads != 4)
    assert torch.equal(one_key, v[:, :, 4:5].repeat_interleave(4 // num_kv_heads, dim=1))  # its value: written out
    assert len(attention_calls) == (num_kv_heads == 4)  # (not compiled again for one key)
    assert (got.float() - plain.float()).abs().max() <= 2**-8 * expected.abs().max()
    assert (got.float() - expected).abs().max() <= 2**-8 * expected.abs().max()  # one bf16 rounding
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=num_kv_heads != 4)
    assert (got.float() - fused.float()).abs().max() <= 2**-7 * expected.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("num_kv_heads", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_after_a_shared_prompt_equals_sdpa_over_copies(num_kv_heads, dtype):
    """Rows that share their example's prompt (beams) attend to it once, as extra queries, and to their own tokens
    apart, the two joined by their log-sum-exps: equal to F.scaled_dot_product_attention over the prompt copied to
    every row, in fp32; in bf16 within the rounding of the two parts (at most twice SDPA's own error against fp32).
    PyTorch's flash kernel on a CPU (which gives the log-sum-exps) and the fp32 path written out for other devices."""
    g = torch.Generator().manual_seed(0)
    B, copies, H, P, t, Dh = 2, 3, 4, 9, 5, 16
    R = B * copies
    q = torch.randn(R, H, 1, Dh, generator=g).to(dtype)
    prompt_k, prompt_v = (torch.randn(B, num_kv_heads, P, Dh, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(R, num_kv_heads, t, Dh, generator=g).to(dtype) for _ in range(2))
    keep = torch.ones(R, 1, 1, P + t, dtype=torch.bool)
    keep[copies:, ..., :3] = False  # example 1's prompt is left-padded by 3
    keep[1, ..., P + 2] = False  # and a row's own token masked (as a pad)
    all_k = torch.cat([prompt_k.repeat_interleave(copies, 0), k], dim=2)  # (R, Hkv, P + t, Dh): the copies
    all_v = torch.cat([prompt_v.repeat_interleave(copies, 0), v], dim=2)
    gqa = num_kv_heads != H
    exact = F.scaled_dot_product_attention(q.double(), all_k.double(), all_v.double(), keep, enable_gqa=gqa)
    sdpa_error = (F.scaled_dot_product_attention(q, all_k, all_v, keep, enable_gqa=gqa).double() - exact).abs().max()
    with torch.no_grad():
        got = decode_attention.attention_after_shared_prompt(q, prompt_k, prompt_v, k, v, keep)
    assert got.shape == (R, H, 1, Dh) and got.dtype == dtype
    error = (got.double() - exact).abs().max()
    assert error <= (1e-6 if dtype == torch.float32 else 2 * sdpa_error), (error, sdpa_error)
    # One part: on a CPU with several queries a head (G = 2 here), PyTorch's own kernel (SDPA's, bit for bit); with
    # one (G = 1) and on other devices written out in fp32, the same log-sum-exps and values no further from the
    # exact ones than the kernel's.
    queries, own_keep = q.view(R, num_kv_heads, -1, Dh), keep[..., P:]  # (R, Hkv, G, Dh), (R, 1, 1, t)
    out, lse = decode_attention._attention_and_logsumexp(queries, k, v, own_keep)
    written, written_lse = decode_attention._written_out_attention_and_logsumexp(queries, k, v, own_keep)
    additive = torch.zeros(own_keep.shape, dtype=dtype).masked_fill_(~own_keep, float("-inf"))
    kernel, kernel_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(queries, k, v, attn_mask=additive)[:2]
    assert torch.equal(kernel, F.scaled_dot_product_attention(queries, k, v, own_keep))
    assert torch.equal(out, kernel if queries.shape[2] > 1 else written)
    assert torch.equal(lse, kernel_lse if queries.shape[2] > 1 else written_lse)
    exact = F.scaled_dot_product_attention(queries.double(), k.double(), v.double(), own_keep)
    assert (kernel_lse - written_lse).abs().max() <= 1e-5 * kernel_lse.abs().max()
    assert (written.double() - exact).abs().max() <= (kernel.double() - exact).abs().max() + 1e-6


def test_decode_attention_with_a_position_bias_equals_sdpa():
    """T5's decode step: no score scaling, a bias per head added to the scores, masked keys at the lowest value."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 16, generator=g).bfloat16()
    k, v = (torch.randn(2, 4, 7, 16, generator=g).bfloat16() for _ in range(2))
    positions = torch.randn(1, 4, 1, 7, generator=g).bfloat16() * 4  # self-attention: a bias per head
    padding = torch.zeros(2, 1, 1, 7, dtype=torch.bfloat16)  # cross-attention: two padded keys
    padding[..., :2] = torch.finfo(torch.bfloat16).min
    for bias in (positions, padding):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=1.0)
        got = decode_attention.attention(q, k, v, bias, scale=1.0)  # compiled
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).abs().max() <= 2**-8 * expected.abs().max()  # one bf16 rounding
        plain = decode_attention._explicit_attention(q, k, v, bias, scale=1.0)
        assert (got.float() - plain.float()).abs().max() <= 2**-8 * expected.abs().max()
        unscaled = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
        assert (got.float() - unscaled).abs().max() > 0.05 * expected.abs().max()  # the scale is not the default


@torch.no_grad()
def test_beams_reuse_the_decode_attention_compiled_for_one_row(monkeypatch, attention_calls):
    """The attention compiled at a greedy step serves a 5-beam step too: no compile at the first beam step."""
    def step(batch, length, room, mask):
        cache = torch.zeros(batch, 8, room, 16, dtype=torch.bfloat16)  # (B, Hkv, max length, Dh), as KVCache holds
        q = torch.randn(batch, 1, 8, 16).bfloat16().transpose(1, 2)  # (B, H, 1, Dh) from (B, 1, H, Dh)
        keep = torch.ones(batch, 1, 1, length, dtype=torch.bool) if mask else None
        return decode_attention.attention(q, cache[:, :, :length], cache[:, :, :length], keep)

    for mask in (True, False):
        step(1, 40, 70, mask)  # greedy: compiled here (or earlier in this process)
    assert len(attention_calls) == 2
    monkeypatch.setattr(compiling, "_compile_failed", False)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a compile now fails: the plain path, and a notice
        steps = ((1, 41, 70, True), (5, 30, 90, True), (5, 31, 90, False), (3, 64, 64, True))  # beams, a batch
        for batch, length, room, mask in steps:
            assert step(batch, length, room, mask).shape == (batch, 8, 1, 16)
    assert not compiling._compile_failed


@torch.no_grad()
def test_t5_beams_compile_no_decode_attention_after_greedy_decoding(tmp_path, monkeypatch, attention_calls):
    """T5's decode attention, compiled in a greedy answer (its steps but the first as whole blocks, as in a process
    that decodes for long), serves a 5-beam answer: the self-attention's keys are spaced alike at every step (a slot
    to spare), the cross-attention's too (copied with one), its first step's one key and the beams' shared encoder
    output are written out (decode_attention.attention). Each compile there was 0.1-0.3 s of a process's first beam
    step."""
    monkeypatch.setenv("MINIVB_BLOCKS", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    reference = tiny.build("t5", text_overrides=dict(d_model=64, d_kv=16, d_ff=128))
    model = minivb.load_model(tiny.save(reference, tmp_path), dtype=torch.bfloat16)
    batch = {k: v[:1] for k, v in tiny.batch(reference).items() if k != "labels"}
    model.generate(**batch, max_new_tokens=4, min_new_tokens=4)  # compiles it (or found it compiled)
    greedy_calls = len(attention_calls)
    monkeypatch.setattr(compiling, "_compile_failed", False)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a compile now fails: the plain path, and a notice
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, num_beams=5)
    assert greedy_calls > 0 and len(attention_calls) > greedy_calls and not compiling._compile_failed


@pytest.mark.parametrize("piece_bytes", [1, 3 * (2 * 4 * 6 * 8 * 4), 2**30])  # a layer, a few, all at once
@pytest.mark.parametrize("index", [[2, 0, 0, 3], [1, 0, 2, 3], [0, 0, 1, 2], [3, 2, 1, 0], [0, 1, 2, 3]])
def test_cache_reorder_in_pieces_equals_index_select(monkeypatch, piece_bytes, index):
    """Only the rows that take another's place move (a swap, a chain, a row kept, none): as index_select would."""
    monkeypatch.setattr(llama, "REORDER_BYTES", piece_bytes)
    cache = llama.KVCache(7, 4, 4, 12, 8, torch.float32, "cpu")  # (layers, B, Hkv, max_length, Dh)
    cache.keys.normal_(), cache.values.normal_()
    cache.length, index, filled = 9, torch.tensor(index), slice(3, 9)
    expected = [tensor.clone() for tensor in (cache.keys, cache.values)]
    for tensor in expected:
        tensor[:, :, :, filled] = tensor[:, :, :, filled].index_select(1, index)
    cache.reorder(index, start=3)
    assert torch.equal(cache.keys, expected[0]) and torch.equal(cache.values, expected[1])  # prompt, empty slots kept


def test_compiled_quantization_equals_the_reference(monkeypatch):
    from minivb.quant import quantize_rows

    monkeypatch.setattr(quant, "QUANTIZE_COMPILE_MIN", 1)  # compiled at this size too
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 257, generator=generator) * torch.logspace(-4, 1, 300)[:, None]  # rows of every scale
    weight[7] = 0  # a zero row keeps its tiny scale
    for dtype in (torch.bfloat16, torch.float32):
        compiled, reference = quant.quantize_weight(weight.to(dtype)), quantize_rows(weight.to(dtype))
        assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1])
        assert compiled[0].dtype == torch.int8 and compiled[0].abs().amax(dim=1)[8:].eq(127).all()
    layer = quant.Int8Linear(257, 300, bias=False, dtype=torch.bfloat16)
    layer.load_weight(weight)  # the whole weight in one call: its int8 output becomes the layer's weight, as it is
    assert torch.equal(layer.weight, quantize_rows(weight)[0]) and layer.weight.is_contiguous()
    assert layer.weight.data_ptr() % checkpoint.ALIGN == 0  # int8pack_mm's aligned loads (checkpoint.ALIGN)
    assert torch.equal(layer.weight_scale, quantize_rows(weight)[1].bfloat16())
    assert not compiling._compile_failed and (compiling._compiled(quantize_rows) is not None) == compiling._compiler_found()



QUANTIZE_IN_A_PROCESS = """
import torch
from minivb import quant
weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # compiled: 1 M weights
compiled, reference = quant.quantize_weight(weight), quant.quantize_rows(weight)
print((compiled[0] != reference[0]).float().mean().item(), torch.equal(compiled[1], reference[1]))
"""


@pytest.mark.skipif(not {"avx512f", "avx2"} <= fast._cpu_flags() or not compiling._compiler_found(),
                    reason="needs a C++ compiler and a CPU with AVX-512 (to compile at 512 and 256 bits)")
def test_compiled_kernels_are_cached_per_vector_width(tmp_path):
    """Processes sharing inductor's disk cache at two vector widths each get their own kernel (compiling._vector_width):
    without it a process got another's, with wrong int8 weights (cached at 512 bits, run at 256) or killed (256, then
    512: "free(): invalid size")."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for width in ("avx512", "avx2", "avx512"):
        done = subprocess.run([sys.executable, "-c", QUANTIZE_IN_A_PROCESS], env={**env, "ATEN_CPU_CAPABILITY": width},
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-2:] == ["0.0", "True"], (width, done.stdout)  # no int8 weight differs; scales equal


# ----------------------------------------------------------------------------- weights packed for beams (packing.py)


def test_packed_routes(monkeypatch):
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    big = torch.zeros(fast.MATRIX_MIN_WEIGHTS // 512, 512)
    row, beams, prompt = torch.zeros(1, 1, 512), torch.zeros(5, 1, 512), torch.zeros(1, 150, 512)
    with torch.no_grad():
        for weight in (big, big.bfloat16()):
            cast = lambda x: x.to(weight.dtype)  # noqa: E731
            assert fast.decode_route(cast(beams), weight, packing=True) == "packed"
            assert fast.decode_route(cast(prompt), weight, packing=True) == "packed"
            assert fast.decode_route(cast(row), weight, packing=True) == "fused"  # one row: the fused kernel
            assert fast.decode_route(cast(beams), weight) != "packed"  # not allowed
        monkeypatch.setenv("MINIVB_FUSED", "0")  # where the compiled kernel does not pay: one bf16 row takes torch.mv
        assert fast.decode_route(row.bfloat16(), big.bfloat16(), packing=True) == "vector"  # (or the copy beams made)
        assert fast.decode_route(row, big, packing=True) == "plain"  # fp32's on F.linear (MKL)
        monkeypatch.setenv("MINIVB_NATIVE_BF16", "0")  # bf16 without native instructions: never packed
        assert fast.decode_route(beams.bfloat16(), big.bfloat16(), packing=True) == "rows"  # the few-row kernel
        assert fast.decode_route(row.bfloat16(), big.bfloat16(), packing=True) == "vector"
        assert fast.decode_route(beams, big, packing=True) == "packed"
    assert fast.decode_route(beams, big, packing=True) == "plain"  # autograd


# bf16 weights pack only where oneDNN multiplies bf16 (packing.can_pack; these tests say the CPU does, which on an AVX2
# machine oneDNN refuses)
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
packs_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN multiplies no bf16 here (AVX2): nothing packs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_products_equal_plain(monkeypatch, dtype):
    if dtype == torch.bfloat16 and not ONEDNN_BF16:
        pytest.skip("oneDNN multiplies no bf16 here (AVX2): nothing packs")
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(packing, "PACK_AFTER", 3)
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(192, 96).to(dtype)
    packing.allow_packing(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 192, generator=g))
        layer.bias.copy_(torch.randn(96, generator=g))
        prompt = torch.randn(2, 30, 192, generator=g).to(dtype)
        for _ in range(2):  # few-row products 1 and 2: fewer than PACK_AFTER, the plain product
            assert torch.equal(layer(prompt), F.linear(prompt, layer.weight, layer.bias))
            assert layer.packed.copy is None
        video = torch.randn(1, packing.PACK_MAX_ROWS + 1, 192, generator=g).to(dtype)
        for _ in range(5):  # a video's prompt never counts: it comes back once per generate call at most
            assert torch.equal(layer(video), F.linear(video, layer.weight, layer.bias))
        assert layer.packed.copy is None
        for x in (torch.randn(5, 1, 192, generator=g), prompt, video):  # beams, the 3rd: packed now; then prompts
            x = x.to(dtype)
            got, expected = layer(x), F.linear(x, layer.weight, layer.bias)
            assert layer.packed.copy is not None and got.shape == expected.shape and got.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(got, expected)  # the same oneDNN kernel, without its repacking
            else:
                assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # sums in another order
        twin = copy.deepcopy(layer)  # the opaque packed copy cannot be copied: left behind, packed again
        assert twin.packed.copy is None and torch.equal(twin(x), got)
        # A weight written in place (an optimizer step, load_state_dict) is not multiplied through its old copy
        layer.weight.mul_(-2)
        x = torch.randn(5, 192, generator=g).to(dtype)
        for i in range(3):  # the first product after the change drops the stale copy and counts anew
            assert torch.allclose(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(), rtol=1e-2,
                                  atol=1e-2)
            assert (layer.packed.copy is not None) == (i == 2)
        packing.allow_packing(layer, False)
        assert layer.packed is None  # stopped: the copy is freed


@packs_bf16
@torch.no_grad()
def test_one_bf16_row_never_packs_and_reads_the_copy_beams_made(monkeypatch):
    """Where the compiled kernel does not pay (the Intel Xeon), one bf16 row takes torch.mv, as fast as a packed copy:
    greedy steps never pack. Once beams packed the weight, a row reads that copy, not the plain weight (whose mapped
    pages the OS may then drop: memory.room_to_pack)."""
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setenv("MINIVB_FUSED", "0")  # the Intel Xeon's choice (fast.compiled_rows_pay)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(packing, "PACK_AFTER", 3)
    g = torch.Generator().manual_seed(0)
    layer = fast.Linear(192, 96).to(torch.bfloat16)
    packing.allow_packing(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 192, generator=g))
        layer.bias.copy_(torch.randn(96, generator=g))
        rows = [torch.randn(1, 1, 192, generator=g).bfloat16() for _ in range(5)]
        for row in rows:  # greedy decode steps: torch.mv, not counted
            torch.testing.assert_close(layer(row), F.linear(row, layer.weight, layer.bias), rtol=2 ** -7, atol=1e-2)
        assert layer.packed.copy is None and layer.packed.products[1] == 0
        for _ in range(3):  # beam steps: packed at the 3rd
            layer(torch.randn(5, 1, 192, generator=g).bfloat16())
        assert layer.packed.copy is not None
        monkeypatch.setattr(torch, "mv", lambda *args: pytest.fail("a row read the plain weight"))
        for row in rows:
            assert torch.equal(layer(row), packing.linear(row, layer.packed.copy[1], layer.bias))


@packs_bf16
@torch.no_grad()
@pytest.mark.parametrize("replaces", [False, True])
def test_on_amd_one_row_reads_the_copy_only_where_it_replaced_the_weight(monkeypatch, replaces):
    """On AMD one row takes the fused kernel, which reads the plain weight; where the copy took that weight's place
    (memory.room_to_pack's "instead"), the row reads the copy once made, and the weight's pages went to the OS."""
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setenv("MINIVB_FUSED", "1")  # AMD's choice (fast.compiled_rows_pay)
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(packing, "PACK_AFTER", 3)
    paged_out = []
    monkeypatch.setattr(packing, "page_out", paged_out.append)
    g = torch.Generator().manual_seed(0)
    layers = [fast.Linear(192, 96).to(torch.bfloat16) for _ in range(2)]
    for layer in layers:
        packing.allow_packing(layer, replaces=replaces)
        layer.weight.copy_(torch.randn(96, 192, generator=g))
        layer.bias.copy_(torch.randn(96, generator=g))
    row = torch.randn(1, 1, 192, generator=g).bfloat16()
    norm = RMSNorm(192, eps=1e-6).to(torch.bfloat16)
    fused = fast.linears(row, *layers, norm=norm)  # one compiled call for both, before any copy
    for layer in layers:
        for _ in range(3):  # beam steps: packed at the 3rd
            layer(torch.randn(5, 1, 192, generator=g).bfloat16())
        assert layer.packed.copy is not None
    assert [w is layer.weight for w, layer in zip(paged_out, layers)] == ([True, True] if replaces else [])
    spy = []
    monkeypatch.setattr(fast, "fused_linears", lambda *args: spy.append(args) or pytest.fail("the fused kernel ran"))
    if replaces:
        for got, layer in zip(fast.linears(row, *layers, norm=norm), layers):
            assert torch.equal(got, packing.linear(norm(row), layer.packed.copy[1], layer.bias))
        for got, expected in zip(fast.linears(row, *layers, norm=norm), fused):
            torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=2e-2)  # other kernels, the same products
    else:
        with pytest.raises(pytest.fail.Exception, match="the fused kernel ran"):
            layers[0](row)


@torch.no_grad()
def test_page_out_drops_a_mapped_weight_from_memory_and_keeps_its_values(tmp_path):
    """packing.page_out hands a mapped weight's pages back to the OS (where the file system is on a disk: tmpfs keeps
    them without swap); read again, they come back from the file with the same values."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weight = torch.randn(2048, 1024).bfloat16()
    safetensors_torch.save_file({"w": weight, "b": torch.ones(3)}, tmp_path / "w.safetensors")
    with open(tmp_path / "w.safetensors", "rb") as f:
        os.fsync(f.fileno())  # on the disk: pages still to be written could not be dropped
    mapped = safetensors_torch.load_file(tmp_path / "w.safetensors")["w"]  # the file's pages, mapped
    mapped.float().sum()  # read: resident
    before = _resident_pages(mapped)
    packing.page_out(mapped)
    after = _resident_pages(mapped)
    assert torch.equal(mapped, weight)
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()] if sys.platform == "linux" else []
    mount = max((m for m in mounts if str(tmp_path).startswith(m[1])), key=lambda m: len(m[1]), default=None)
    if mount is not None and mount[2] not in ("tmpfs", "overlay"):  # a disk's file system (measured on ext4)
        assert before > 0.9 * mapped.nbytes // 4096 and after < 0.1 * before, (mount, before, after)


def _resident_pages(tensor: torch.Tensor) -> int:
    """How many of a tensor's whole pages are in memory (mincore)."""
    import ctypes
    import mmap

    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = (tensor.data_ptr() + tensor.nbytes - start) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    if ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE),
                                                 vector) != 0:
        pytest.skip("mincore is not available here")
    return sum(v & 1 for v in vector)


@packs_bf16
@torch.no_grad()
def test_packed_beams_generate_the_plain_tokens(bf16_model, monkeypatch):
    model, batch = bf16_model
    batch = {k: v for k, v in batch.items() if k != "labels"}
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)  # every product of the tiny model takes the fast routes
    model = copy.deepcopy(model)
    plain, plain_trace = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3, return_trace=True)
    packing.allow_packing(model)
    layers = [m for m in model.modules() if isinstance(m, fast.Linear)]
    short = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3)
    assert torch.equal(short, plain)
    assert not any(m.packed.copy is not None for m in layers)  # 6 beam steps: fewer than PACK_AFTER, no packing
    monkeypatch.setattr(packing, "PACK_AFTER", 2)  # count anew: packed at the first beam step after the prompt
    for m in layers:
        m.packed.products = (None, 0)
    packed, packed_trace = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, num_beams=3,
                                          return_trace=True)
    assert all(m.packed.copy is not None for m in layers)  # every layer: the tiny ViT and Q-Former make few rows too
    assert torch.equal(packed, plain)
    for got, want in zip(packed_trace.scores, plain_trace.scores):
        assert torch.equal(got, want)  # bf16: bit for bit


@packs_bf16
@torch.no_grad()
@pytest.mark.parametrize("num_beams", [ASK_NUM_BEAMS, 1])
def test_an_answer_of_ask_never_packs_and_the_second_does(bf16_model, monkeypatch, num_beams):
    """`ask` makes one answer a process, of at most 30 new tokens by default: packing then could not pay for itself
    (packing.py: a full-size 7B packed at its 24th step, the rule before, had 6 steps left to repay 2.6-3.1 s). An
    evaluation's later answers with beams multiply the packed copy; greedy answers never pack (one row: torch.mv)."""
    model, batch = bf16_model
    batch = {k: v[:1] for k, v in batch.items() if k != "labels"}  # one video, as `ask` asks
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    monkeypatch.setenv("MINIVB_FUSED", "0")  # the Intel Xeon's choice: one bf16 row takes torch.mv
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    model = copy.deepcopy(model)
    packing.allow_packing(model)
    layers = [m for m in model.language_model.modules() if isinstance(m, fast.Linear)]
    answer = dict(max_new_tokens=ASK_MAX_NEW_TOKENS, min_new_tokens=ASK_MAX_NEW_TOKENS, num_beams=num_beams)  # all made
    model.generate(**batch, **answer)
    assert max(m.packed.products[1] for m in layers) < packing.PACK_AFTER
    assert not any(m.packed.copy is not None for m in layers)
    model.generate(**batch, **answer)
    assert all((m.packed.copy is not None) == (num_beams > 1) for m in layers)


def test_pack_refused_falls_back_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)

    def refuse(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    monkeypatch.setattr(packing, "refused", False)
    monkeypatch.setattr(packing, "PACK_AFTER", 2)
    layer = fast.Linear(64, 32)
    packing.allow_packing(layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        for _ in range(2):  # the second product of several rows tries to pack
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer.packed.copy is None and not packing.can_pack(torch.float32)
    assert "could not pack" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one row of a wide weight, split


@pytest.fixture
def wide(monkeypatch):
    """Thresholds lowered so that a 768-input layer (three chunks of 256, as a 7B's down_proj has four) splits."""
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(fast, "FUSED_CHUNK", 256)
    monkeypatch.setattr(packing, "SPLIT_MIN_INPUTS", 128)
    monkeypatch.setattr(packing, "SPLIT_MIN_BYTES", 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_one_row_of_a_wide_weight_reads_its_column_split_copy(wide, monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    layer, narrow = fast.Linear(768, 96).to(dtype), fast.Linear(96, 768).to(dtype)
    layer.weight.copy_(torch.randn(96, 768, generator=g))
    x = torch.randn(1, 1, 768, generator=g).to(dtype)
    fused = layer(x)  # no SplitWeight yet: the compiled kernel over the plain weight
    packing.allow_splitting(torch.nn.Sequential(layer, narrow))
    assert narrow.split is None and layer.split.copy is None  # 96 inputs: not wide; nothing made before a row comes
    got = layer(x)
    expected = layer.weight.view(96, 3, 256).transpose(0, 1)  # (chunks, out, in / chunks)
    assert torch.equal(layer.split.copy[1], expected) and layer.split.copy[1].is_contiguous()
    if dtype == torch.bfloat16:
        assert torch.equal(got, fused)  # the same sums in the same order
    else:  # fp32: the vectorized loop sums in another order
        torch.testing.assert_close(got, fused, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.float(), F.linear(x.float(), layer.weight.float(), layer.bias.float()),
                               rtol=2e-2, atol=2e-2 * fused.float().abs().max().item())
    layer.weight.mul_(-1)  # the weight changed in place: a new copy
    torch.testing.assert_close(layer(x), -got + 2 * layer.bias, rtol=1e-2, atol=1e-2)
    assert torch.equal(layer.split.copy[1], layer.weight.view(96, 3, 256).transpose(0, 1))
    assert copy.deepcopy(layer).split.copy is None  # copies of the layer make their own
    with torch.enable_grad():  # autograd reads the plain weight (the "plain" route)
        assert layer(x.requires_grad_()).grad_fn is not None


@torch.no_grad()
def test_no_split_copy_while_the_kernels_are_rented_or_where_a_packed_copy_replaced_the_weight(wide, monkeypatch):
    layer = fast.Linear(768, 96)
    packing.allow_splitting(torch.nn.Sequential(layer))
    x = torch.randn(1, 768)
    monkeypatch.setenv("MINIVB_COMPILE", "0")  # the plain routes (as while the rent runs): no copy to pay for
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.split.copy is None
    monkeypatch.setenv("MINIVB_COMPILE", "1")
    layer(x)
    assert layer.split.copy is not None
    if not packing.can_pack(torch.float32):
        return
    monkeypatch.setattr(packing, "PACK_AFTER", 1)
    layer.packed = packing.PackedWeight(replaces=True)
    layer(torch.randn(5, 768))  # beams pack a copy in the weight's place: one row reads it from then on
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert layer.split is None  # and the split copy is gone


@torch.no_grad()
def test_split_down_projections_generate_the_plain_tokens(bf16_model, monkeypatch):
    model, batch = bf16_model
    batch = {k: v[:1] for k, v in batch.items() if k != "labels"}
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    chunks = fast._chunks
    monkeypatch.setattr(fast, "_chunks", lambda size: 3 if size == 96 else chunks(size))  # the tiny down_proj's 96
    monkeypatch.setattr(packing, "SPLIT_MIN_INPUTS", 64)
    monkeypatch.setattr(packing, "SPLIT_MIN_BYTES", 0)
    plain = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    packing.allow_splitting(model)
    try:
        down = [block.mlp.down_proj for block in model.language_model.layers]
        assert all(layer.split is not None for layer in down)
        assert sum(getattr(m, "split", None) is not None for m in model.modules()) == len(down)  # only they are wide
        split = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
        assert all(layer.split.copy is not None for layer in down)
        assert torch.equal(split, plain)
    finally:
        packing.allow_splitting(model, allowed=False)
