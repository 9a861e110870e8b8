"""One row times an int8 matrix at the memory rate: minivb's one hand-written kernel (kernels.c), for greedy decoding.

Why a kernel of its own. Decoding one row reads every weight once, so int8 weights should take half the time of
bf16 ones. The kernels PyTorch can build or has do not get there on 2 cores: inductor's compiled multiply-and-sum
(quant._int8_row_times_matrix) converts each int8 weight to fp32 before multiplying, 3 instructions for 16 weights,
~30 G weights/s at best and ~15-24 at widths whose fp32 row leaves the first-level cache (5120 inputs and more);
`torch._weight_int8pack_mm` does the same work at ~22-28; oneDNN's integer products (packing.pack_int8), one row cut
in two halves, ~22. x86 VNNI's vpdpbusd multiplies 64 int8 weights by 64 bytes of the row and adds them into 16 int32
sums in one instruction, so kernels.c reads the weight at the rate memory delivers it. Its numbers are those of
quant.integer_linear, exactly (kernels.c says how). AMD EPYC (Zen 4), 2 threads, one row, GB/s read, best of 3
rounds alternating in one process (the 1 GB sum beside each shape, which drifts 30-54 GB/s within the run):
    matrix           this kernel   inductor's kernel   int8pack_mm   bf16: a hand-written vdpbf16ps kernel / inductor's
    11008 x 4096         39.2            38.8              25.2           44.0 / 45.7   (1 GB sum: 50.7)
    4096 x 11008         41.4            15.6              28.2           45.4 / 18.4   (54.1)
    2048 x 5120          29.7            21.5              23.0           32.3 / 20.3   (32.0)
    13824 x 5120         28.9            22.0              21.7           30.7 / 18.9   (30.7)
    32000 x 4096         33.7            28.3              22.9           30.5 / 28.1   (30.1)
(bf16 rows in the table only to show the same instruction count question: minivb's bf16 rows keep inductor's kernel,
split copies for the wide ones: packing.SplitWeight.)

Built at first use with the system's C compiler (CC, else gcc, cc or clang: the ~1 s it takes is paid once a
machine; the library is kept in ~/.cache/minivb, or $MINIVB_CACHE, named by a hash of its source and flags), and
called through ctypes, wrapped as a PyTorch operator (`torch.library.custom_op`) so that a decode block compiled whole
(decode_blocks.py) calls it as it calls any op. Its threads are OpenMP's, the same runtime (libgomp.so.1) PyTorch
loaded, told torch.get_num_threads(). Taken where one row takes minivb's compiled kernels (fast.compiled_rows_pay:
AMD with AVX-512, where it was measured) and the CPU has AVX-512 VNNI and BW; MINIVB_NATIVE=0 turns it off, 1 on
wherever the CPU has the instructions. Where nothing builds it, said once on stderr, the compiled kernels stay.
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

from . import compiling, fast

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
NEEDS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})  # /proc/cpuinfo's names of what FLAGS compile for
WIDTH_STEP = 64  # the kernel reads 64 inputs at a time
MAX_INPUTS = 65536  # its int32 sums are exact up to this many inputs (kernels.c)
ready = False  # set by `available` once the library is loaded: what code traced by torch.compile reads


def available() -> bool:
    """Whether one row of an int8 matrix takes this kernel here (the module docstring); builds it at the first call."""
    global ready
    forced = compiling.override("MINIVB_NATIVE")
    if forced is False or not NEEDS <= fast._cpu_flags():
        ready = False
    else:
        ready = (forced or fast.compiled_rows_pay()) and _library() is not None
    return ready


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x (..., in) is one row that the kernel multiplies by `weight` here: outside autograd (the row's grid
    has no gradient), building the kernel at the first call."""
    one_row = x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)
    return one_row and available() and fits(weight)


def fits(weight: torch.Tensor) -> bool:
    """Whether `weight` is an int8 matrix the kernel multiplies, where it is `ready` (readable inside a traced
    function: no call that builds anything)."""
    width = weight.shape[-1]
    return (ready and weight.dtype == torch.int8 and weight.dim() == 2 and weight.device.type == "cpu"
            and weight.is_contiguous() and width % WIDTH_STEP == 0 and width <= MAX_INPUTS)


def int8_row(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """row (1, in) times weight (out, in) int8, scaled per output by scales (out,) -> (1, out) in scales' dtype:
    quant.integer_linear's numbers for one row. Only where `fits(weight)`."""
    product = _int8_row if torch.compiler.is_compiling() else _call  # the operator costs ~15 us more a call
    return product(row, weight, scales.float()).to(scales.dtype)


@torch.library.custom_op("minivb::int8_row", mutates_args=())
def _int8_row(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """_call as an operator: what code traced by torch.compile calls (decode_blocks.py)."""
    return _call(row, weight, scales)


def _call(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """kernels.c's int8_row: row (1, in), weight (out, in) int8, scales (out,) fp32 -> (1, out) fp32."""
    out, width = weight.shape
    row, scales = row.float().contiguous(), scales.contiguous()
    y = torch.empty(1, out)
    pointer = ctypes.c_void_p
    status = _library().int8_row(pointer(row.data_ptr()), pointer(weight.data_ptr()), pointer(scales.data_ptr()),
                                 pointer(y.data_ptr()), out, width, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"minivb's int8 kernel could not allocate 2 x {width} bytes for a row's halves")
    return y


@_int8_row.register_fake
def _(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return row.new_empty((1, weight.shape[0]), dtype=torch.float32)


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
    library = ctypes.CDLL(str(path))
    library.int8_row.restype = ctypes.c_int
    library.int8_row.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return library


def _without(reason: str) -> None:
    print(f"minivb: {reason}: one row of an int8 matrix keeps the compiled kernels (~1.3-1.6x slower)", file=sys.stderr)
    return None
