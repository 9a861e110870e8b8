"""A few rows times a matrix at the memory rate: minivb's hand-written kernels (kernels.c), for decoding.

Why kernels of its own. Decoding one row reads every weight once, so its time is the weights' bytes over the memory
rate, and int8 weights should take half the time of bf16 ones. The kernels PyTorch can build or has do not get there
on 2 cores: inductor's compiled multiply-and-sum (quant._int8_row_times_matrix, fast._row_times_matrix) converts each
weight to fp32 before multiplying it, 3 instructions for 16 weights, ~30 G weights/s at best and ~15-24 at widths
whose fp32 row leaves the first-level cache (5120 inputs and more); `torch._weight_int8pack_mm` does the same work
at ~22-28; oneDNN's integer products (packing.pack_int8), one row cut in two halves, ~22. x86 has instructions that
multiply and add without converting to fp32: VNNI's vpdpbusd, 64 int8 weights by 64 bytes of the row (one of its
two int8 halves on the integer grid) into 16 exact int32 sums, and vpdpwssd, 32 pairs of int16 (int8 weights widened
against the grid's values whole: a beam step's few rows), and AVX-512 BF16's vdpbf16ps, 32 bf16 weights by 32 bf16
values of the row into 16 fp32 sums. kernels.c's loops use them (and fp32's, below, vfmadd), and read the
weights at the rate memory delivers them. AMD EPYC (Zen 4), 2 threads, one row, GB/s read, best of 3 rounds
alternating in one process (the 1 GB sum beside each shape, which drifts 29-47 GB/s; "one row": this file's loops
until they took a tile of weight rows for beams, below, one weight row at a time):
                  int8:  int8_rows  one row   inductor's  int8pack_mm   bf16: bf16_rows  one row  inductor's
    11008 x 4096          29.9       32.7       23.9        21.1               33.7       32.2      29.9
    4096 x 11008          38.9       22.0        -          26.4               37.8       31.7      25.6
    4096 x 4096           40.7       44.8       24.1        24.9               44.7       48.3      41.0
    13824 x 5120          31.7       33.5        -          23.5               32.4       32.8      31.1
    5120 x 13824          30.7       24.0        -          27.1               33.1       29.1      23.5
    32000 x 4096          30.0       31.9       25.5        21.5               30.5       32.7      31.8
(the 1 GB sum 29.7 / 44.9 / 47.0 / 31.0 / 29.9 / 30.5; inductor's int8 kernel takes rows of up to 4096 inputs:
quant.INT8_FUSED_MAX_IN). The int8 numbers are those of quant.integer_linear, exactly (the row on a grid of 2^15
steps, kernels.c says how); the bf16 ones those of a compiled kernel but for the order of the fp32 sums.

A few rows (a beam search's 5) take the same loops, which read each weight once for all the rows (kernels.c: a tile
of weight rows against every row), where F.linear hands bf16 rows to oneDNN, which repacks the whole weight at every
call, and int8pack_mm's cost grows with each row. Up to MAX_ROWS rows (the tile's sums stay in registers). 5 rows, ms
a matrix, best of 3 alternating, the 1 GB sum at 29-40 GB/s:
                  int8:  int8_rows  int8pack_mm  packed  packing   bf16: bf16_rows  F.linear  packed  packing
    11008 x 4096          2.58       5.27       2.19    70.6              3.13       4.72     2.82    59.1
    4096 x 11008          2.48       4.73       2.38    65.3              3.20       4.68     2.84    32.5
    4096 x 4096           1.00       2.02       0.95    26.8              1.23       1.79     1.12    21.1
    2048 x 5120           0.63       1.40       0.77    19.3              0.73       1.20     0.56    12.8
    13824 x 5120          3.86       8.81       3.50   113.7              4.66       8.38     3.64    36.3
    5120 x 13824          3.80       7.55       3.63    82.3              5.21       7.05     4.55    19.5
    32000 x 4096          7.41      16.60       6.12   178.9              7.98      14.70     6.62   164.2
("packed": oneDNN's packed copy, packing.py, and what packing it costs.) int8 2.0-2.3x int8pack_mm, bf16 1.4-1.8x
F.linear, and both within 0-25 % of the packed copy without making one: the weights pack for beams only after
PACK_AFTER_NATIVE such products there. The int8 loop then took the row's two int8 halves, two vpdpbusd a row for 64
weights and a third for the weights' own sum, in tiles of 2 weight rows; it now takes q whole with vpdpwssd (as many
instructions a row, none for the weights' sum) in tiles of 4 (kernels.c says why), the same integers. 5 rows, G
weights/s read from memory, 2 threads, best of 4 alternating (the memory ~35 GB/s): 11008 x 4096 / 4096 x 11008 /
4096 x 4096 17.9 / 19.1 / 18.5 -> 28.0 / 34.6 / 28.2 (bf16's 16.7 / 16.7 / 16.8); 6 rows 14.0-15.0 -> 28.5-33.0; 2
rows the same (34-36). One row keeps the halves (rows of a multiple of 64 inputs): through q whole it read the same
at ~35 GB/s but 42-48 against 50-54 in the minutes the memory reads 50-70 GB/s (the 7B's 225 mapped matrices, 150-200
passes alternating: the median pass 1.08-1.11x the time). Full-size vicuna-7b int8 (separate processes, medians of
12 steps): a 5-beam step 427-438 -> 289-297 ms.

fp32 rows times fp32 weights (load_model's default dtype) take the bf16 loop's twin, vfmadd for vdpbf16ps: on AMD,
F.linear hands one fp32 row to MKL, whose generic path there reads at about 0.6x the memory rate, and 5 rows to a
product 4-6x slower than one row. ms a matrix, best of 3 alternating, the 1 GB sum at 32-33 GB/s, f32_rows / F.linear /
oneDNN's packed copy / inductor's compiled kernel (fast._row_times_matrix):
                  one row                               5 rows
    11008 x 4096   5.15 /  8.36 /  6.92 /  5.81          5.52 / 28.13 /  5.50
    4096 x 11008   5.19 /  7.84 /  6.99 /  6.29          5.64 / 21.69 /  5.59
    32000 x 4096  14.88 / 23.95 / 19.21 / 16.05         16.03 / 94.75 / 16.15
    2048 x 768     0.20 /  0.48 /  0.26 /  0.22          0.21 /  0.54 /  0.23
    32002 x 768    2.98 /  7.19 /  3.89 /  3.09          3.11 / 14.06 /  3.34
(one row of the 180 MB matrices at 35 GB/s: the memory rate). `make bench`'s medium model in fp32, a process whose
compiled kernels are still rented (compiling.py), a greedy token 31.0 -> 14.9 ms (transformers 30), a 5-beam step
23.8 -> 18.8 ms.

Machines without AVX-512 (most laptops; AMD before Zen 4) take a second build of the same file, 256 bits wide: the
bf16 and fp32 loops with vfmadd, 16 bf16 at a time read as 8 fp32 twice (AVX2 has no bf16 arithmetic), and the int8
loop with vpmaddwd (int16 pairs), its numbers still quant.integer_linear's exactly. There PyTorch's own kernels are
slower still: its bf16 row read ~15 GB/s on issue 12's AVX2 machine and on an Intel Xeon emulating one, a few bf16
rows cost F.linear about one pass each, MKL's fp32 on AMD takes its generic path, int8pack_mm read 11-16 GB/s.
Emulated on the AMD EPYC (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2,
MINIVB_NATIVE_BF16=0), 2 threads, ms a matrix, best of 3 rounds alternating, the 1 GB sum 21-46 GB/s beside: what
minivb took there before (bf16 one row torch.mv, a few fast.rows_linear; fp32 F.linear, a few `weight @ x.T`; int8
int8pack_mm) / this build:
                  bf16: one row     5 rows          fp32: one row     5 rows          int8: one row     5 rows
    11008 x 4096        2.31 / 2.12   13.03 / 4.25        8.96 / 4.52   15.55 / 6.22        2.55 / 1.73   7.09 / 5.66
    4096 x 11008        4.18 / 3.15   11.30 / 3.24        9.08 / 6.17   17.26 / 6.42        2.33 / 1.72   5.80 / 5.41
    32000 x 4096        8.28 / 8.19   32.72 / 8.35       25.13 / 17.15  49.21 / 14.72       7.01 / 4.24  19.05 / 13.53
    2048 x 5120         0.98 / 0.60    3.18 / 0.97        1.85 / 1.18    3.61 / 1.35        0.73 / 0.38   1.31 / 1.09
Again after the float loop's prefetch moved a tile further (kernels.c), every shape faster, e.g. 11008 x 4096 bf16
1.95 / 1.72 and 11.04 / 3.70, fp32 8.48 / 4.03 and 14.70 / 4.45 (the 1 GB sum 31-52 GB/s). One row reads at about
the memory rate in each dtype. The int8 loop was bound by instructions (2 vpmaddwd and 2 additions a row for 16
weights, on the two halves of q: 5 rows 8-10 G weights/s, slower than 5 bf16 rows); it now takes q whole, 16 bits
(kernels.c: one vpmaddwd a row, exact int32 sums a block of inputs at a time, then int64), with the 4 chunks of a
64-byte line unrolled. Weights in the caches, G weights/s, before / now: one row 35-43 / 64-81, 5 rows 8.4-9.2 / 17-19
(bf16's ~10). vicuna-7b cut to 4 + 4 layers, steps alternated in one process (medians of 10 and 4 rounds, the 1 GB
sum 26-46 GB/s): greedy int8 34.5 / 33.6 ms (bf16 63.3: bound by memory either way), 5 beams 136 / 74 ms (bf16 133).

Built at first use with the system's C compiler (CC, else gcc, cc or clang: the ~1 s it takes is paid once a
machine; the library is kept in ~/.cache/minivb, or $MINIVB_CACHE, named by a hash of its source and flags), for the
vector width PyTorch's kernels use (`ISA`), and called through ctypes, wrapped as PyTorch operators
(`torch.library.Library`) so that a decode block compiled whole (decode_blocks.py) calls them as it calls any op. Their
threads are OpenMP's, the same runtime (libgomp.so.1) PyTorch loaded, told torch.get_num_threads(). Taken for 1 to
MAX_ROWS rows where the CPU has the instructions (AVX-512 VNNI for int8, AVX-512 BF16 for bf16, AVX-512F for fp32;
AVX2 and FMA for the other build) and they were measured to pay (`_pays`: with AVX-512, on AMD, where one row takes
minivb's compiled kernels too; with AVX2, bf16 and int8 anywhere, fp32 with MKL on AMD); MINIVB_NATIVE=0 turns them
off, 1 on wherever the CPU has them. Where nothing builds them, said once on stderr, the compiled kernels and F.linear
stay.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import compiling, fast  # (fast imports this file: its names are read at calls only)

SOURCE = Path(__file__).with_name("kernels.c")
# kernels.c is built for the vector width PyTorch's own kernels use here: the widest the CPU has, or
# ATEN_CPU_CAPABILITY's where it is set (README: "A machine without native bf16, emulated"). For each width, its
# compiler flags, and for each loop, /proc/cpuinfo's names of the instructions it runs and the inputs it reads at a
# time.
ISA = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT" (no build), ...
BUILDS = {
    "AVX512": (["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512bf16"],
               {torch.int8: frozenset({"avx512f", "avx512bw", "avx512_vnni"}),
                torch.bfloat16: frozenset({"avx512f", "avx512bw", "avx512_bf16"}),
                torch.float32: frozenset({"avx512f"})},
               {torch.int8: 32, torch.bfloat16: 32, torch.float32: 16}),
    "AVX2": (["-mavx2", "-mfma"],
             {torch.int8: frozenset({"avx2", "fma"}), torch.bfloat16: frozenset({"avx2", "fma"}),
              torch.float32: frozenset({"avx2", "fma"})},
             {torch.int8: 16, torch.bfloat16: 16, torch.float32: 8}),
}
_WIDTH_FLAGS, NEEDS, WIDTH_STEP = BUILDS.get(ISA, ([], {}, {}))
FLAGS = ["-O3", *_WIDTH_FLAGS, "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
MAX_ROWS = 6  # the rows the loops multiply at once (kernels.c)
MAX_INPUTS = 65536  # the int8 loop's int32 sums are exact up to this many inputs (kernels.c)
ready = frozenset()  # the weight dtypes whose kernel is loaded, set by `available`: what code traced by torch.compile
# reads (no call that builds anything)
_decided = None  # the switches `ready` was set for


def available(dtype: torch.dtype) -> bool:
    """Whether one row of a matrix of `dtype` takes its kernel here (the module docstring); builds the library at the
    first call."""
    global ready, _decided
    forced, flags = compiling.override("MINIVB_NATIVE"), fast._cpu_flags()
    switches = (forced, fast.compiled_rows_pay(), flags)  # what can change between calls (tests, a user's setenv)
    if switches != _decided:  # (decided once per setting: `takes` asks at every product)
        wanted = frozenset(kind for kind, needs in NEEDS.items()
                           if needs <= flags and forced is not False and (forced or _pays(kind)))
        ready = wanted if wanted and _library() is not None else frozenset()
        _decided = switches
    return dtype in ready


def _pays(dtype: torch.dtype) -> bool:
    """Where a loop of kernels.c was measured faster than what PyTorch gives: with AVX-512, on AMD (where one row
    takes the compiled kernels: fast.compiled_rows_pay); with AVX2, bf16 and int8 anywhere (PyTorch's own bf16 row
    reads ~15 GB/s: issue 12's AVX2 machine, an Intel Xeon emulating one; int8pack_mm 11-16 there) and fp32 with MKL
    on AMD (its generic path)."""
    if ISA != "AVX2":
        return fast.compiled_rows_pay()
    return dtype != torch.float32 or fast._mkl_on_amd()


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x (..., in) is rows that a kernel multiplies by `weight` here: 1 to MAX_ROWS rows, outside autograd
    (int8: a row's grid has no gradient), rows of the weight's dtype where it is a float one; builds the library at
    the first call."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    few = 0 < rows <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
    matching = weight.dtype == torch.int8 or x.dtype == weight.dtype
    return few and matching and available(weight.dtype) and fits(weight)


def fits(weight: torch.Tensor) -> bool:
    """Whether `weight` is a matrix a kernel multiplies, where its kernel is `ready`."""
    width = weight.shape[-1]
    return (weight.dtype in ready and weight.dim() == 2 and weight.device.type == "cpu" and weight.is_contiguous()
            and width % WIDTH_STEP[weight.dtype] == 0 and width <= MAX_INPUTS)


def int8_rows(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows (R, in), R up to MAX_ROWS, times weight (out, in) int8, scaled per output by scales (out,) -> (R, out) in
    scales' dtype: quant.integer_linear's numbers. Only where `fits(weight)`."""
    product = torch.ops.minivb.int8_rows if torch.compiler.is_compiling() else _int8_call  # (operator: +3 us)
    return product(rows, weight, scales.float()).to(scales.dtype)


def float_rows(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows (R, in), R up to MAX_ROWS, times weight (out, in) bf16 or fp32 -> (R, out) in the weight's dtype, the sums
    in fp32; bf16 rows may come in fp32 (bf16 values). Only where `fits(weight)`."""
    if weight.dtype == torch.float32:
        product = torch.ops.minivb.f32_rows if torch.compiler.is_compiling() else _f32_call
        return product(rows.float(), weight)
    product = torch.ops.minivb.bf16_rows if torch.compiler.is_compiling() else _bf16_call
    return product(rows.to(torch.bfloat16), weight).to(torch.bfloat16)


def _int8_call(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """kernels.c's int8_rows: rows (R, in), weight (out, in) int8, scales (out,) fp32 -> (R, out) fp32."""
    (out, width), count = weight.shape, rows.shape[0]
    rows, scales, y = rows.float().contiguous(), scales.contiguous(), torch.empty(count, out)
    status = _library().int8_rows(rows.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), count, out,
                                  width, torch.get_num_threads())
    _check(status, count, width)
    return y


def _bf16_call(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """kernels.c's bf16_rows: rows (R, in) bf16, weight (out, in) bf16 -> (R, out) fp32."""
    return _float_call(_library().bf16_rows, rows, weight)


def _f32_call(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """kernels.c's f32_rows: rows (R, in) fp32, weight (out, in) fp32 -> (R, out) fp32."""
    return _float_call(_library().f32_rows, rows, weight)


def _float_call(kernel, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    (out, width), count = weight.shape, rows.shape[0]
    rows, y = rows.contiguous(), torch.empty(count, out)
    _check(kernel(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), count, out, width, torch.get_num_threads()),
           count, width)
    return y


def _check(status: int, count: int, width: int) -> None:
    """kernels.c's status: 0 done, -1 no memory for the int8 rows' grid, -2 a count of rows it does not take."""
    if status == -1:
        raise MemoryError(f"minivb's kernels could not allocate the grid of {count} int8 rows of {width} inputs")
    if status == -2:
        raise ValueError(f"minivb's kernels multiply 1 to {MAX_ROWS} rows at once, got {count}")


# The three calls as PyTorch operators, what code traced by torch.compile calls (decode_blocks.py). Defined through
# torch.library.Library, not the custom_op decorator, whose wrappers cost a call 21 us against 10 (a 64 x 64 int8
# matrix; ctypes alone 3, _int8_call 7): a whole decoder block makes 7-9 calls a step.
_OPERATORS = torch.library.Library("minivb", "DEF")
_OPERATORS.define("int8_rows(Tensor rows, Tensor weight, Tensor scales) -> Tensor")
_OPERATORS.define("bf16_rows(Tensor rows, Tensor weight) -> Tensor")
_OPERATORS.define("f32_rows(Tensor rows, Tensor weight) -> Tensor")
_OPERATORS.impl("int8_rows", _int8_call, "CPU")
_OPERATORS.impl("bf16_rows", _bf16_call, "CPU")
_OPERATORS.impl("f32_rows", _f32_call, "CPU")


@torch.library.register_fake("minivb::int8_rows", lib=_OPERATORS)
def _(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.register_fake("minivb::bf16_rows", lib=_OPERATORS)
@torch.library.register_fake("minivb::f32_rows", lib=_OPERATORS)
def _(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], weight.shape[0]), dtype=torch.float32)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """kernels.c, compiled once a machine into the cache folder and loaded; None (said once) where it cannot be."""
    compiler = next((c for c in (os.environ.get("CC"), "gcc", "cc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        return _without("no C compiler (CC, gcc, cc or clang) found")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MINIVB_CACHE") or Path.home() / ".cache" / "minivb")
    path = folder / f"kernels-{key}.so"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:  # built aside, then moved: other processes
                built = Path(scratch) / path.name  # see a whole library or none
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True)
                built.replace(path)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or str(error).encode()
            return _without(f"{compiler} could not build kernels.c ({detail.decode(errors='replace').strip()[:200]})")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:  # a library left broken in the cache folder: delete it to build it again
        return _without(f"{path} could not be loaded ({error})")
    library.int8_rows.restype = ctypes.c_int
    library.int8_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    for kernel in (library.bf16_rows, library.f32_rows):
        kernel.restype = ctypes.c_int
        kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return library


def _without(reason: str) -> None:
    print(f"minivb: {reason}: decode steps keep the compiled kernels and F.linear (slower: minivb/native.py)",
          file=sys.stderr)
    return None
