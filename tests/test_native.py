"""minivb/native.py: 1 to 6 rows times an int8 matrix through kernels.c's int8 loop give quant.integer_linear's numbers
exactly, 1 to 6 bf16 or fp32 rows times a matrix of theirs through its vdpbf16ps or vfmadd loop the exact sums within
fp32's rounding (the AVX-512 build, or the AVX2 one where PyTorch's kernels are 256 bits wide, and that one in a
process of its own everywhere); all are taken where they should be, work inside torch.compile, and fall back when
they cannot be built."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from minivb import fast, native, packing, quant


def has(dtype: torch.dtype) -> bool:
    """Whether this process's build of kernels.c (native.ISA) has a loop for `dtype` and the CPU its instructions."""
    return dtype in native.NEEDS and native.NEEDS[dtype] <= fast._cpu_flags()


has_instructions, has_bf16, has_f32 = has(torch.int8), has(torch.bfloat16), has(torch.float32)
needs_kernel = pytest.mark.skipif(not has_instructions, reason="no int8 loop here (AVX-512 VNNI): it never runs")
needs_bf16_kernel = pytest.mark.skipif(not has_bf16, reason="no bf16 loop here (AVX-512 BF16 or AVX2): it never runs")
needs_f32_kernel = pytest.mark.skipif(not has_f32, reason="no fp32 loop here (AVX-512 or AVX2): it never runs")


@pytest.fixture
def built(monkeypatch):
    """The kernels switched on (MINIVB_NATIVE=1: whatever the processor's vendor) and built; skipped where they cannot
    be (no C compiler, no build for this vector width)."""
    monkeypatch.setenv("MINIVB_NATIVE", "1")
    if not any(native.available(dtype) for dtype in native.NEEDS):
        pytest.skip("kernels.c could not be built here")


def halves_product(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quant.integer_linear, its integer sums made exactly in int64 (no oneDNN)."""
    halves, step = quant._int8_halves(rows)  # (2R, in) int8, (R, 1)
    sums = (halves.long() @ weight.long().T).to(torch.int32)  # (2R, out)
    return quant._sum_halves(sums, step, scales)


def weights(out: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out, width), dtype=torch.int8, generator=generator)
    return weight, torch.rand(out, generator=generator) * 0.01 + 1e-3


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6])
@pytest.mark.parametrize("out, width", [(37, 128), (64, 320), (130, 1024), (5, 4096), (1, 64), (6, 96), (3, 8224)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_integer_products_exactly(built, rows, out, width, dtype):
    """Outputs that do not fill the last thread's share or the last tile (AVX-512 4 weight rows, AVX2 2; 1 and 3
    outputs: only that), widths of one and of many 64-byte lines, with a chunk after the last line (96, 8224) and more
    than one block of kernels.c's int32 sums (8224); rows of their own scale each, one with a large value (the
    grid's step is set by it) and values that fall halfway between two steps (rounded to even)."""
    weight, scales = weights(out, width)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1)) * 3
    x = x * torch.logspace(0, 2, rows)[:, None]  # each row on a grid of its own
    x[0, 7] = -41.0
    x[0, 9] = 41.0 / quant.GRID * 2.5  # 2.5 steps: rounds to 2
    x, scales = x.to(dtype), scales.to(dtype)
    got = native.int8_rows(x, weight, scales)
    assert got.dtype == dtype and got.shape == (rows, out)
    assert torch.equal(got, halves_product(x, weight, scales))
    exact = x.double() @ (weight.double() * scales.double()[:, None]).T
    # The grid rounds each value by half a step at most; then the output's own rounding (bf16: 2^-8 of it)
    half_steps = x.double().abs().amax(1, keepdim=True) / quant.GRID / 2  # (rows, 1)
    grid = half_steps * (weight.double().abs() * scales.double()[:, None]).sum(1)  # (rows, out)
    assert ((got.double() - exact).abs() <= 1.01 * grid + torch.finfo(dtype).eps * exact.abs()).all()
    assert torch.equal(native.int8_rows(x[-1:], weight, scales), got[-1:])  # each row's numbers are its own


@needs_kernel
def test_an_all_zero_row_gives_zeros(built):
    weight, scales = weights(8, 64)
    assert torch.equal(native.int8_rows(torch.zeros(1, 64), weight, scales), torch.zeros(1, 8))


@needs_kernel
@pytest.mark.parametrize("rows, width", [(2, 16416), (1, 16416), (1, 16448)])
def test_the_largest_products_stay_exact(built, rows, width):
    """q = -16383 (the grid's end) by -128 over two blocks of kernels.c's int32 sums and a chunk of a third: a lane's
    sum comes to its largest at a block's end. One row of a multiple of 64 inputs (16448) takes the AVX-512 build's
    loop on the row's two halves instead, whose int32 sums hold 65536 inputs."""
    weight, x = torch.full((5, width), -128, dtype=torch.int8), torch.full((rows, width), -1.0)
    got = native.int8_rows(x, weight, torch.ones(5))
    assert torch.equal(got, halves_product(x, weight, torch.ones(5)))
    assert got[0, 0].item() == 16383 * 128 * width * (1 / quant.GRID)  # (the integer sum, exact, times the step)


@needs_kernel
def test_what_it_fits(built, monkeypatch):
    weight, _ = weights(16, 128)
    assert native.fits(weight)
    assert not native.fits(weight[:, :96])  # not contiguous
    assert not native.fits(weight[:, :72].contiguous())  # 72 inputs: not a multiple of a chunk (AVX-512 32, AVX2 16)
    assert native.fits(weight.float()) == has_f32 and not native.fits(weight.double())
    monkeypatch.setenv("MINIVB_NATIVE", "0")
    assert not native.available(torch.int8) and not native.fits(weight)


def test_switched_on_only_where_the_cpu_has_the_instructions(monkeypatch):
    monkeypatch.setenv("MINIVB_NATIVE", "1")
    monkeypatch.setattr(fast, "_cpu_flags", lambda: frozenset({"avx512f", "avx512bw"}))  # no VNNI, no BF16
    monkeypatch.setattr(native, "ready", frozenset())
    assert not native.available(torch.int8) and not native.available(torch.bfloat16)


@needs_kernel
def test_a_few_rows_of_an_int8_layer_take_it(built, monkeypatch):
    """Int8Linear: 1 to 6 bf16 rows take the kernel, with its numbers, and pack only after PACK_AFTER_NATIVE such
    products (packing.py); 7 rows and autograd do not take it."""
    monkeypatch.setattr(packing, "PACK_AFTER", 1)
    monkeypatch.setattr(packing, "PACK_AFTER_NATIVE", 4)
    monkeypatch.setattr(quant, "int8_packing_pays", lambda: True)  # (AMD's choice, measured there)
    calls = []
    call = native._int8_call
    monkeypatch.setattr(native, "_int8_call", lambda *args: calls.append(1) or call(*args))
    layer = quant.Int8Linear(256, 48, bias=False, dtype=torch.bfloat16)
    layer.weight, scales = weights(48, 256)
    layer.weight_scale.copy_(scales)
    packing.allow_packing(layer)
    beams = torch.randn(7, 1, 256, dtype=torch.bfloat16)  # (beams, 1, in)
    with torch.no_grad():
        for count in (1, 5, 6):
            got = layer(beams[:count])
            assert torch.equal(got[:, 0], halves_product(beams[:count, 0], layer.weight, layer.weight_scale))
            assert len(calls) == 1 and layer.packed.copy is None
            calls.clear()
        five = layer(beams[:5])  # the 3rd few-row product (2 to 6 rows: one row does not count), the kernel's
        assert layer.packed.copy is None and len(calls) == 1
        calls.clear()
        if not packing.int8_products_exact():  # (oneDNN's int8 products with AVX2 saturate: int8_packing_pays)
            return
        assert torch.equal(layer(beams[:5]), five)  # the 4th: packed, the same exact sums from the copy
        assert layer.packed.copy is not None and calls == []
        layer.weight = layer.weight.clone()  # a new weight: counted anew
        layer(beams)  # 7 rows: not the kernel's, packed at once (PACK_AFTER)
        assert layer.packed.copy is not None and calls == []
    layer(beams[:1].requires_grad_())
    assert calls == []


@needs_kernel
def test_inside_a_compiled_function(built):
    """decode_blocks' whole blocks call it from code torch.compile traced: the operator, with the same numbers."""
    weight, scales = weights(64, 256)
    row = torch.randn(1, 256)
    compiled = torch.compile(lambda x, w, s: native.int8_rows(x * 2, w, s) + 1, dynamic=True)
    assert torch.equal(compiled(row, weight, scales), native.int8_rows(row * 2, weight, scales) + 1)
    beams = torch.randn(5, 256)  # a beam step's rows: the operator's shape
    assert torch.equal(compiled(beams, weight, scales), native.int8_rows(beams * 2, weight, scales) + 1)


@pytest.mark.skipif(not native.NEEDS, reason="no build of kernels.c for this vector width")
def test_a_compiler_that_fails_is_said_and_left(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CC", "false")  # a command that exists and fails
    monkeypatch.setenv("MINIVB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "SOURCE", tmp_path / "kernels.c")  # another source: a library of its own
    (tmp_path / "kernels.c").write_text("/* nothing */\n")
    assert native._library.__wrapped__() is None
    assert "could not build kernels.c" in capsys.readouterr().err


@needs_bf16_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6])
@pytest.mark.parametrize("out, steps", [(37, 1), (64, 3), (130, 32), (5, 129), (3, 2)])
def test_bf16_rows_give_the_exact_sums_within_fp32_rounding(built, rows, out, steps):
    """Widths of one step of the loop (AVX-512: 32 values, AVX2: 8), of an odd number of them, of many; outputs that
    fill whole tiles (of 4; 2) and ones that leave some over (fewer than a tile: only those); then rounded to bf16 as
    a compiled kernel's."""
    width = steps * native.WIDTH_STEP[torch.bfloat16]
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(out, width, generator=generator).bfloat16()
    x = torch.randn(rows, width, generator=generator).bfloat16()
    got = native.float_rows(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
    exact = x.double() @ weight.double().T  # (rows, out)
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs()).all()  # bf16's rounding of each result
    sums = native._bf16_call(x, weight).double()  # before that rounding: fp32 sums in another order
    assert ((sums - exact).abs() <= 1e-6 * (x.double().abs() @ weight.double().abs().T)).all()
    assert torch.equal(native.float_rows(x.float(), weight), got)  # rows of bf16 values held in fp32
    assert torch.equal(native.float_rows(x[-1:], weight), got[-1:])  # each row's sums are its own


@needs_f32_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6])
@pytest.mark.parametrize("out, steps", [(37, 1), (64, 3), (130, 64), (5, 257), (3, 4)])
def test_f32_rows_give_the_exact_sums_within_fp32_rounding(built, rows, out, steps):
    """The fp32 loop, as the bf16 one above: widths of one step (AVX-512: 16 values, AVX2: 8), an odd number of them,
    many; outputs that fill whole tiles and ones that leave some over."""
    width = steps * native.WIDTH_STEP[torch.float32]
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(out, width, generator=generator)
    x = torch.randn(rows, width, generator=generator) * torch.logspace(0, 3, rows)[:, None]
    got = native.float_rows(x, weight)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    exact = x.double() @ weight.double().T  # (rows, out)
    assert ((got.double() - exact).abs() <= 1e-6 * (x.double().abs() @ weight.double().abs().T)).all()
    assert torch.equal(native.float_rows(x[-1:], weight), got[-1:])  # each row's sums are its own


@needs_f32_kernel
def test_a_few_f32_rows_of_a_linear_layer_take_it(built, monkeypatch):
    """fast.Linear in fp32 (on AMD, MKL's few-row products take a slow path: native.py): 1 to 6 rows take the kernel,
    7 rows and rows in autograd do not; and inside a compiled function (a decode block), the operator."""
    calls = []
    call = native._f32_call
    monkeypatch.setattr(native, "_f32_call", lambda *args: calls.append(1) or call(*args))
    monkeypatch.setenv("MINIVB_FUSED", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    layer = fast.Linear(256, 48)
    beams = torch.randn(7, 1, 256)
    with torch.no_grad():
        assert [fast.decode_route(beams[:n], layer.weight) for n in (1, 2, 6, 7)] == ["fused", *["native"] * 2, "plain"]
        for count in (1, 5, 7):
            got = layer(beams[:count])
            want = torch.nn.functional.linear(beams[:count].double(), layer.weight.double(), layer.bias.double())
            assert len(calls) == (count < 7) and ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all()
            calls.clear()
    layer(beams[:5].requires_grad_())
    assert calls == []
    compiled = torch.compile(lambda x, w: native.float_rows(x * 2, w), dynamic=True)
    with torch.no_grad():  # as a decode block runs (the operators have no gradient)
        assert torch.equal(compiled(beams[:5, 0], layer.weight), native.float_rows(beams[:5, 0] * 2, layer.weight))


@needs_bf16_kernel
def test_more_bf16_rows_than_its_sums_hold_are_refused(built):
    weight = torch.randn(8, 64).bfloat16()
    many = torch.randn(native.MAX_ROWS + 1, 64).bfloat16()
    assert native.takes(many[:-1], weight) and not native.takes(many, weight)
    products = [lambda: native.float_rows(many, weight)]
    if has_instructions:
        integers, scales = weights(8, 64)
        assert native.takes(many[:-1].float(), integers) and not native.takes(many.float(), integers)
        products.append(lambda: native.int8_rows(many, integers, scales))
    for product in products:
        with pytest.raises(ValueError, match="1 to 6 rows at once, got 7"):
            product()


@needs_bf16_kernel
def test_bf16_rows_inside_a_compiled_function(built):
    """The operator's shape for code torch.compile traced (several rows), with the same numbers."""
    weight = torch.randn(36, 128).bfloat16()
    x = torch.randn(5, 128).bfloat16()
    compiled = torch.compile(lambda x, w: native.float_rows(x * 2, w), dynamic=True)  # (an op after it would fuse
    assert torch.equal(compiled(x, weight), native.float_rows(x * 2, weight))  # with its rounding to bf16)


@needs_bf16_kernel
def test_a_few_bf16_rows_of_a_linear_layer_take_it(built, monkeypatch):
    """fast.Linear: one bf16 row on the compiled route takes the kernel (bias added after), so do 2 to 6 rows
    (beams), 7 rows and rows in autograd do not."""
    calls = []
    call = native._bf16_call
    monkeypatch.setattr(native, "_bf16_call", lambda *args: calls.append(1) or call(*args))
    monkeypatch.setenv("MINIVB_FUSED", "1")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    layer = fast.Linear(256, 48, dtype=torch.bfloat16)
    beams = torch.randn(7, 1, 256, dtype=torch.bfloat16)  # (beams, 1, in): a beam step's rows
    with torch.no_grad():
        routes = [fast.decode_route(beams[:n], layer.weight) for n in (1, 2, 6, 7)]
        assert routes[:3] == ["fused", "native", "native"] and routes[3] != "native"  # 7 rows: F.linear or `rows`
        assert not native.takes(beams[:5].float(), layer.weight)  # fp32 rows, bf16 weight: not through fast.Linear
        for count in (1, 5):
            got = layer(beams[:count])
            assert len(calls) == 1 and got.shape == (count, 1, 48)
            want = torch.nn.functional.linear(beams[:count].double(), layer.weight.double(), layer.bias.double())
            assert ((got.double() - want).abs() <= 2**-7 * want.abs().max()).all()
            calls.clear()
        layer(beams)  # 7 rows: F.linear
    layer(beams[:5].requires_grad_())
    assert calls == []
    monkeypatch.setenv("MINIVB_NATIVE", "0")
    with torch.no_grad():
        layer(beams[:1])
        layer(beams[:5])
    assert calls == []


@needs_bf16_kernel
def test_beams_take_it_until_the_weight_packs_later(built, monkeypatch):
    """Where the kernel multiplies a beam step's rows, a layer allowed to pack waits PACK_AFTER_NATIVE few-row
    products, not PACK_AFTER (the copy saves less there: packing.py), then reads its packed copy."""
    monkeypatch.setenv("MINIVB_FUSED", "1")
    monkeypatch.setenv("MINIVB_NATIVE_BF16", "1")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN multiplies no bf16 here (AVX2): nothing to pack")
    monkeypatch.setattr(fast, "FUSED_MIN_WEIGHTS", 0)
    monkeypatch.setattr(packing, "PACK_AFTER", 2)
    monkeypatch.setattr(packing, "PACK_AFTER_NATIVE", 4)
    calls = []
    call = native._bf16_call
    monkeypatch.setattr(native, "_bf16_call", lambda *args: calls.append(1) or call(*args))
    layer = fast.Linear(256, 48, dtype=torch.bfloat16)
    packing.allow_packing(layer)
    beams = torch.randn(5, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        for step in range(1, 6):
            got = layer(beams)
            assert (layer.packed.copy is not None) == (step >= 4) and len(calls) == min(step, 3)
            if step >= 4:
                assert torch.equal(got, torch.nn.functional.linear(beams, layer.weight, layer.bias))  # oneDNN's
        layer.weight.mul_(-1)  # a weight changed in place: its products counted anew; 7 rows: the plain count
        for step in range(1, 3):
            layer(torch.randn(7, 1, 256, dtype=torch.bfloat16))
            assert (layer.packed.copy is not None) == (step >= 2) and len(calls) == 3


# The AVX2 build in a process of its own (ATEN_CPU_CAPABILITY=avx2: PyTorch's kernels, and so native.ISA, 256 bits
# wide), so that a machine with AVX-512 tests the loops AVX2 machines take too.
AVX2_PROCESS = """
import json, torch
from minivb import fast, native, quant
""" + inspect.getsource(halves_product) + """
worst, exact = 0.0, True
for rows in (1, 2, 5, 6):  # int8: quant.integer_linear's numbers, bit for bit (halves_product: in int64)
    for out, steps in ((37, 1), (130, 3), (5, 257)):
        generator = torch.Generator().manual_seed(rows)
        weight = torch.randint(-128, 128, (out, steps * 16), dtype=torch.int8, generator=generator)
        x = torch.randn(rows, steps * 16, generator=generator) * torch.logspace(0, 3, rows)[:, None]
        x[0, 0] = -x.abs().max()  # the grid's largest step down: high = -128
        scales = torch.rand(out, generator=generator) + 1e-3
        exact &= torch.equal(native.int8_rows(x, weight, scales), halves_product(x, weight, scales))
# The largest products, q = -16383 by -128, over two blocks of kernels.c's int32 sums and a part of a third: each
# lane's sum reaches 2^31 - 131071 at a block's end (a longer block would wrap around)
weight, x = torch.full((3, 16400), -128, dtype=torch.int8), torch.full((2, 16400), -1.0)
exact &= torch.equal(native.int8_rows(x, weight, torch.ones(3)), halves_product(x, weight, torch.ones(3)))
for dtype, call in ((torch.bfloat16, native._bf16_call), (torch.float32, native._f32_call)):
    for rows in (1, 2, 5, 6):
        for out, steps in ((37, 1), (130, 3), (5, 513)):
            generator = torch.Generator().manual_seed(rows)
            width = steps * native.WIDTH_STEP[dtype]
            weight = torch.randn(out, width, generator=generator).to(dtype)
            x = (torch.randn(rows, width, generator=generator) * torch.logspace(0, 3, rows)[:, None]).to(dtype)
            error = (call(x, weight).double() - x.double() @ weight.double().T).abs()
            worst = max(worst, (error / (x.double().abs() @ weight.double().abs().T)).max().item())
layer = fast.Linear(512, 1024, dtype=torch.bfloat16)
with torch.no_grad():
    routes = [fast.decode_route(torch.randn(1, n, 512, dtype=torch.bfloat16), layer.weight) for n in (1, 5)]
    row = torch.randn(1, 1, 512, dtype=torch.bfloat16)
    matches = torch.equal(layer(row), native.float_rows(row[0], layer.weight)[None] + layer.bias)
print(json.dumps({"isa": native.ISA, "ready": sorted(map(str, native.ready)), "exact": exact, "worst": worst,
                  "routes": routes, "matches": matches}))
"""


@pytest.mark.skipif(not {"avx2", "fma"} <= fast._cpu_flags(), reason="this CPU has no AVX2 and FMA")
def test_the_avx2_build_gives_the_exact_sums_and_takes_one_row(tmp_path):
    """The AVX2 build: int8 rows give quant.integer_linear's numbers exactly (the grid's ends too), bf16 and fp32 ones
    the exact sums within fp32's rounding (1 to 6 rows, widths of 1, 3 and 257 or 513 steps); one bf16 row of a
    fast.Linear takes it there (no compiled kernels: MINIVB_FUSED=0)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MINIVB_NATIVE": "1", "MINIVB_FUSED": "0",
           "MINIVB_NATIVE_BF16": "0", "MINIVB_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", AVX2_PROCESS], env=env, capture_output=True, text=True, timeout=300)
    if "could not build kernels.c" in done.stderr or "no C compiler" in done.stderr:
        pytest.skip("kernels.c could not be built here")
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == "AVX2" and got["ready"] == ["torch.bfloat16", "torch.float32", "torch.int8"]
    assert got["exact"] and got["worst"] <= 1e-6 and got["routes"] == ["native", "native"] and got["matches"]


def test_where_each_build_pays(monkeypatch):
    """AVX-512: where the compiled kernels pay (AMD); AVX2: bf16 and int8 everywhere, fp32 only with MKL on AMD."""
    for mkl_on_amd in (False, True):
        monkeypatch.setattr(fast, "_mkl_on_amd", lambda: mkl_on_amd)
        monkeypatch.setattr(native, "ISA", "AVX2")
        assert native._pays(torch.bfloat16) and native._pays(torch.int8)
        assert native._pays(torch.float32) == mkl_on_amd
        monkeypatch.setattr(native, "ISA", "AVX512")
        for pays in ("0", "1"):
            monkeypatch.setenv("MINIVB_FUSED", pays)
            assert {native._pays(dtype) for dtype in (torch.int8, torch.bfloat16, torch.float32)} == {pays == "1"}
