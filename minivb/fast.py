"""Speed paths, all in one place: what runs faster than the plain code, on which machine, and the number measured.
(Seven live beside what they speed up and are listed here: weights packed for beams in packing.py, the int8 products
and quantizing in quant.py, the attention of a decode step in decode_attention.py, a greedy step's blocks compiled
whole in decode_blocks.py, a few rows' hand-written kernels in native.py, weights converted a block at a time in
converting.py, moving the KV cache of a beam step in llama.KVCache.reorder.)

The model files compute plainly: every product in the dtype the weights are stored in, through F.linear. Three
things about CPUs make that slow, and this file answers them without changing what the model files compute (measured
on the native-bf16 machine, AMD EPYC with avx512_bf16, 2 cores; the AVX2 numbers come from issue 12):

1. The compute dtype. bf16 weights halve memory and the bytes each decoded token reads, but only CPUs with
   native bf16 instructions (x86 `avx512_bf16` or `amx_bf16`, Arm `bf16`) multiply bf16 matrices fast. Prefill-sized
   products (150 x 4096 x 11008), 2 cores, PyTorch 2.13:
       native-bf16 machine (AMD EPYC, AVX-512 + avx512_bf16)   bf16 ~408 GFLOP/s   fp32 ~129 GFLOP/s
       AVX2, no native bf16 (issue 12's machine; a Zen 3 EPYC) bf16 16-20 GFLOP/s  fp32 69-77 GFLOP/s
   So without native bf16 the matrix-heavy phases (vision, Q-Former, prefill) compute in fp32 while the weights stay
   bf16 in memory: `computing_in(torch.float32)` upcasts each weight at the call that uses it (one layer at a time,
   never the whole model; a large one a block of rows at a time, into a buffer kept between calls:
   `converting.linear_in_blocks`, 1.4-1.5x faster for a prompt's 150 rows). Decoding, bound by memory bandwidth,
   stays in bf16 on both kinds of machine: an upcast would write and read an fp32 copy of each weight (one row x
   11008 x 4096, native-bf16 machine: bf16 F.linear 5.1 ms, upcast then fp32 62 ms; issue 12's AVX2 machine: bf16
   F.linear 6.0 ms). `compute_dtype` is that rule.

2. Few-row products (decode steps), one route each (`decode_route`, its table). One row (greedy): on AMD, bf16
   F.linear streams a matrix at about half the memory rate (fp32, MKL's: 0.6x), a compiled multiply-and-sum near it,
   native.py's kernels (AVX-512: BF16, VNNI, fp32; AVX2 ones without AVX-512) at it; on other AVX-512 processors
   the library's are as fast (`compiled_rows_pay`): torch.mv for bf16, F.linear for fp32. Several rows (beams, a
   batch): up to 6 through native.py's kernels, a weight packed once for oneDNN (packing.py), `weight @ x.T` with
   AMX, a compiled kernel (`rows_linear`) without native bf16 where native.py's are not taken.
   `linears` does a layer's q, k and v (gate and up) in one call with their pre-norm, `gated` a gated unit's
   activation and product too; int8 weights take kernels of their own (quant.int8_linear).

3. The attention of a decode step (LLaMA's and T5's): on AMD, PyTorch's CPU flash-attention kernel is slow for one
   bf16 query a row; `decode_attention.attention` writes the softmax out, compiled for one query a key/value head
   (the batch folded into the heads). Beams read their shared prompt once (attention_after_shared_prompt).

4. Quantizing while loading: quant.quantize_weight compiles int8 quantization's five passes over fp32 copies of a
   weight into two, the whole weight at once (a 7B's 6.6 G linear weights: 7-13 s -> ~3 s).

The kernels this file and the others compile are built, rented on their plain routes until compiling pays, and fall
back to plain PyTorch, in compiling.py. Switches (0 or 1) that override a choice, to test or where the flags mislead:
MINIVB_NATIVE_BF16 (`has_native_bf16`), MINIVB_PACK (load_model's packing: memory.room_to_pack), MINIVB_SPLIT
(memory.room_to_split), MINIVB_FUSED (`compiled_rows_pay`, decode_attention.compiled_attention_pays), MINIVB_COMPILE
(compiling.py: kernels compiled at first use, or never, where by default they are rented until they pay),
MINIVB_BLOCKS (decode_blocks.takes: the same for whole blocks), MINIVB_NATIVE (native.available: 1 to 6 rows).
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import compiling, converting, native, packing
from .compiling import compiled_or_plain, override
from .packing import can_pack  # by name: decode_route's argument `packing` hides the module there

# ----------------------------------------------------------------------------- 1. the compute dtype

PHASES = ("vision", "prefill", "decode")  # vision: ViT + Q-Former; prefill: the language model over the prompt


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (MINIVB_NATIVE_BF16=0/1 overrides the detection)."""
    forced = override("MINIVB_NATIVE_BF16")
    if forced is not None:
        return forced
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": Arm's Features line


@functools.cache
def _cpu_flags() -> frozenset:
    """The words of /proc/cpuinfo: its feature flags (avx512_bf16, ...) and vendor id (AuthenticAMD, GenuineIntel)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()  # unknown: fp32 compute is never slow, where bf16 compute may be 4x slow


def compute_dtype(weight_dtype: torch.dtype, phase: str, device, native_bf16: bool | None = None) -> torch.dtype:
    """The dtype the matrices of `phase` are multiplied in, for weights stored in `weight_dtype` on `device`.

    fp32 weights and GPUs: the weights' own dtype (so parity with transformers is untouched). bf16 weights on a
    CPU: bf16 where the CPU has native bf16 or the phase is decode (bandwidth-bound), fp32 otherwise.
    native_bf16 defaults to `has_native_bf16()`."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if torch.device(device).type != "cpu" or weight_dtype != torch.bfloat16 or phase == "decode":
        return weight_dtype
    native = has_native_bf16() if native_bf16 is None else native_bf16
    return weight_dtype if native else torch.float32


class computing_in(TorchFunctionMode):
    """Inside `with computing_in(dtype):`, the weight-bearing functions compute in `dtype`.

    Their floating arguments (activations, weights, biases, attention masks) are cast to `dtype` at the call, so a
    bf16 weight is upcast only while its layer runs and freed right after (a large one, outside autograd, a block of
    rows at a time: `converting.linear_in_blocks`). Embedding lookups cast the rows they return, not the table; other
    operations keep PyTorch's type promotion (fp32 activation * bf16 norm weight = fp32). Native-bf16 machine,
    150 x 4096 x 11008: bf16 weights upcast at each call 87 GFLOP/s, fp32 weights 129: the upcast costs a third at
    150 rows, less with more (the ViT's 1028 for 4 frames); on the AVX2 machine it still wins ~3-4x over its 16
    GFLOP/s bf16. Where gradients cross a frozen weight (a fine-tune's language model): `converting.FrozenLinear`."""

    UPCAST = {F.linear, F.conv2d, F.layer_norm, F.scaled_dot_product_attention}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __enter__(self) -> torch.dtype:
        super().__enter__()
        return self.dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            return func(*args, **kwargs).to(self.dtype)
        if func is F.linear and torch.is_grad_enabled():  # a fine-tune: gradients may cross a frozen weight
            x, weight, bias = _linear_arguments(*args, **kwargs)
            frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
            if x.requires_grad and frozen and weight.dtype != self.dtype:
                return converting.FrozenLinear.apply(self._cast(x), weight, bias)
        elif func is F.linear:  # inference: a large weight is converted a block at a time (converting.py)
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if weight.dtype != self.dtype and weight.numel() * self.dtype.itemsize > converting.BLOCK_BYTES:
                out = converting.linear_in_blocks(self._cast(x), weight)
                return out if bias is None else out + self._cast(bias)
        if func in self.UPCAST:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.dtype:
            return value.to(self.dtype)
        return value


def _linear_arguments(input, weight, bias=None):
    return input, weight, bias


def phase(name: str, weight: torch.Tensor):
    """`with phase("vision" | "prefill" | "decode", a_weight) as dtype:` that phase computes in `compute_dtype`."""
    dtype = compute_dtype(weight.dtype, name, weight.device)
    return contextlib.nullcontext(weight.dtype) if dtype == weight.dtype else computing_in(dtype)


# ----------------------------------------------------------------------------- 2. few-row products while decoding

# One row times a bf16 11008 x 4096 matrix (a 128 MB sum reads ~34 GB/s): F.linear 4.8 ms (19 GB/s), weight @
# row.repeat(2, 1).T and torch.mv 8.2 ms, the fused kernel below 2.3-2.8 ms (32-39 GB/s). Medium matrices streamed one
# after the other, as a decode step reads them (1 thread): bf16 2048 x 768 F.linear 418 us, fused 215 us; fp32 533 us,
# fused 331 us. Below FUSED_MIN_WEIGHTS (a 1 MB bf16 matrix) a model's matrices fit in cache and F.linear is as fast.
FUSED_MIN_WEIGHTS = 512 * 1024
# 5 rows x fp32 matrices (1 thread): 2048 x 768 F.linear 419 us, weight @ x.T 531 us; 32002 x 768 (a lm_head) F.linear
# 17.3 ms, weight @ x.T 10.1 ms: the matrix route pays only for large matrices.
MATRIX_MIN_WEIGHTS = 4 * 1024 * 1024
# What it saves over F.linear, its plain route (compiling.py rents it until that pays), a byte of weights read: full
# vicuna-7b's greedy steps, weights mapped, AMD: 0.86-0.89 s through F.linear, 0.37-0.42 compiled, 37 us a MB (alone,
# weights in memory of their own, 2048 x 2048 to 32128 x 2048 matrices: 8.5-25 us a MB).
FUSED_SAVES_PER_BYTE = 37e-12  # s
# inductor sums reductions longer than 4096 through a slower, more precise "cascade" helper; rows cut into equal chunks
# of at most this many keep the plain vectorized sum (11008-long rows: 7.2 ms, not 10.2; wider: packing.SplitWeight).
FUSED_CHUNK = 4096


def _row_times_matrix(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """row (1, n, c) x weight (out, n, c) -> (1, out), accumulated in fp32: one multiply-and-sum, which inductor
    fuses into a single vectorized pass over the weight, split over the cores. Only for one row: each output is one
    dot product, so R rows would convert and multiply each weight row R times (5 rows x 11008 x 4096 bf16, AMD with
    native bf16: 33 ms against F.linear's 16); without native bf16, R sums in one loop pay: `_rows_times_matrix`."""
    return (weight[None].float() * row[:, None].float()).sum(-1).sum(-1).to(row.dtype)


# A few bf16 rows without native bf16 (beams), where native.py's AVX2 build is not taken: F.linear's cost grows with
# each row, a pass converting each weight once for all rows less. 11008 x 4096, ms, AVX2 emulated on the Intel Xeon,
# rows 1 / 2 / 3 / 5 / 8: F.linear 7.7 / 11.3 / 14.4 / 21.5 / 34.5, this 8.1 / 9.2 / 10.6 / 12.7 / 22.8.
FEW_ROWS = 8
ROWS_SAVES_PER_BYTE = 98e-12  # s a byte of weights, 5 rows (the table: 2 rows 23 us a MB, 8 rows 130)


def _rows_times_matrix(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows (R, n, c) x weight (out, n, c) -> (R, out), accumulated in fp32: R dot products per weight row, in one
    pass that converts each weight once (FEW_ROWS above). The loop over the rows makes R part of the compiled code:
    each count of rows compiles once."""
    weight = weight.float()
    return torch.stack([(weight * row.float()).sum(-1).sum(-1) for row in rows]).to(rows.dtype)


def _row_times_matrices(row: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """_row_times_matrix for several matrices of the same width in one compiled call (see `linears`)."""
    return tuple(_row_times_matrix(row, weight) for weight in weights)


def _plain_rows_times_matrices(row: torch.Tensor, *weights: torch.Tensor):
    """The same products through F.linear, where nothing compiles."""
    outs = tuple(F.linear(row.flatten(1), weight.flatten(1)) for weight in weights)
    return outs[0] if len(outs) == 1 else outs


def _normed_row_times_matrices(norm: nn.Module, row: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """norm(row) (1, in) times each matrix (out, n, c), the norm in the same compiled call (see `linears`)."""
    return _row_times_matrices(norm(row).reshape(1, *weights[0].shape[1:]), *weights)


def _plain_normed_rows_times_matrices(norm: nn.Module, row: torch.Tensor, *weights: torch.Tensor):  # no compiler
    normed = norm(row)  # once for the layer's q, k and v (gate and up)
    return tuple(F.linear(normed, weight.flatten(1)) for weight in weights)


def gated_products(products, plain_products, norm: nn.Module, act, row: torch.Tensor, *tensors: torch.Tensor,
                   grouped: bool = False, saves: float | None = None) -> torch.Tensor:
    """act(gate) * up, of (gate, up) = products(norm, row, *tensors) for one row (this file's normed kernel or
    quant's), in one compiled call: a gated unit's activation and product join its products (`gated`); where the
    kernel is rented or nothing compiles, the same of plain_products (F.linear's, int8pack_mm's)."""
    return compiled_or_plain(_gated_row, products, norm, act, row, *tensors, normed=True, grouped=grouped,
                             saves=saves, plain=lambda _, *rest: _gated_row(plain_products, *rest))


def _gated_row(products, norm: nn.Module, act, row: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    gate, up = products(norm, row, *tensors)  # (1, out) each
    return act(gate) * up


def _chunks(in_features: int) -> int:
    """In how many equal chunks the compiled kernels cut rows of `in_features` (at most FUSED_CHUNK each)."""
    chunks = next(n for n in range(1, in_features + 1) if in_features % n == 0 and in_features // n <= FUSED_CHUNK)
    return 1 if in_features // chunks < 256 else chunks  # awkward (prime-like) widths: the cascade sum, not tiny chunks


def fused_linears(x: torch.Tensor, weights: list, biases: list, norm: nn.Module | None = None, act=None) -> list:
    """[F.linear(norm(x), w, b) for w, b in zip(weights, biases)] for one row (..., in) and weights of the same width,
    through one call of the compiled kernel (plain F.linear where there is none); norm None: x as it is. act: the
    weights are a gated unit's gate and up, without biases (`gated`): [act(gate product) * up product]."""
    chunks = _chunks(weights[0].shape[1])
    matrices = [w.reshape(w.shape[0], chunks, -1) for w in weights]  # (out, chunks, in / chunks)
    saves = FUSED_SAVES_PER_BYTE * compiling.bytes_of(weights)
    if act is not None:
        outs = [gated_products(_normed_row_times_matrices, _plain_normed_rows_times_matrices, norm, act,
                               x.reshape(1, -1), *matrices, saves=saves)]  # [(1, out)]
    elif norm is not None:
        outs = compiled_or_plain(_normed_row_times_matrices, norm, x.reshape(1, -1), *matrices,
                                 plain=_plain_normed_rows_times_matrices, normed=True, saves=saves)
    else:
        function = _row_times_matrix if len(weights) == 1 else _row_times_matrices
        outs = compiled_or_plain(function, x.reshape(1, chunks, -1), *matrices, plain=_plain_rows_times_matrices,
                                 saves=saves)
        outs = [outs] if len(weights) == 1 else outs  # (1, out) each
    return [(out if bias is None else out + bias).reshape(*x.shape[:-1], out.shape[-1])
            for out, bias in zip(outs, biases)]


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows (..., in), through the compiled few-row kernel where there is one."""
    chunks = _chunks(weight.shape[1])
    rows = x.reshape(-1, chunks, weight.shape[1] // chunks)  # (R, chunks, in / chunks)
    saves = ROWS_SAVES_PER_BYTE * compiling.bytes_of([weight])
    out = compiled_or_plain(_rows_times_matrix, rows, weight.reshape(weight.shape[0], chunks, -1),
                            plain=_plain_rows_times_matrices, saves=saves)  # (R, out)
    out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _mkl_on_amd() -> bool:
    """MKL takes a generic, slow code path for fp32 matrix-vector products on AMD processors."""
    return torch.backends.mkl.is_available() and "AuthenticAMD" in _cpu_flags()


# Whose kernels multiply one row: this file's compiled ones, or the library's (torch.mv, int8pack_mm)? It depends on
# the processor. Two machines of the same size (2 cores, 24 GB, AVX-512 with native bf16), 2 threads, ms:
#                                           AMD EPYC (Zen 4)                   Intel Xeon (AMX)
#     one row x bf16 11008 x 4096           F.linear 4.8, compiled 2.3-2.8     F.linear 3.1-8.8, compiled 2.3-7.0,
#                                                                              torch.mv 3.5-6.7 (drift)
#     LLaMA at 7B widths, 4 layers and      bf16 compiled 56.5                 bf16 F.linear 133-150, compiled 150-159
#       the lm_head, a greedy step          int8 int8pack_mm 40.8, comp. 37.1  int8 int8pack_mm 63-67, comp. 86-102
# On AMD a compiled multiply-and-sum streams near the memory rate, where oneDNN's bf16 reads at about half and MKL's
# fp32 takes a generic path. On the Intel Xeon, converting bf16 or int8 to fp32 costs more than reading it (a
# compiled sum of each row of a 1 GB matrix: fp32 28 GB/s, bf16 15, int8 13): the library's kernels are as fast or
# faster there, and so they are on processors nothing was measured on. So are AMD processors without AVX-512 (Zen 2
# and 3), where inductor builds 256-bit kernels: emulated on the Intel Xeon (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2, MINIVB_NATIVE_BF16=0), one row, GB/s, int8 11008 x 4096 compiled 1.2-1.3 against
# int8pack_mm's 11.4-16.4 (each 8 int8 weights loaded as a partial 32-byte vector, through a copy); bf16 compiled
# 5-15 % behind F.linear (4096 x 4096 9.8 / 11.1, 32000 x 4096 9.6 / 11.5). MINIVB_FUSED=0 or 1 overrides the choice.
def compiled_rows_pay() -> bool:
    """Whether one row's products (greedy decoding) take the compiled kernels of this file and quant.py: on AMD
    processors whose compiled kernels are 512 bits wide (AVX-512)."""
    forced = override("MINIVB_FUSED")
    if forced is not None:
        return forced
    return "AuthenticAMD" in _cpu_flags() and compiling._vector_width() >= 512


def decode_route(x: torch.Tensor, weight: torch.Tensor, packing: bool = False) -> str:
    """Which product `Linear` uses: "fused", "vector", "packed", "native", "rows", "matrix" or "plain" (F.linear).

    fused   one row (greedy decoding) of a large CPU matrix, outside autograd, both dtypes, on processors where the
            compiled kernel pays (compiled_rows_pay, AMD): measured above.
    vector  one bf16 row of a large CPU matrix elsewhere: torch.mv, PyTorch's own bf16 matrix-vector kernel (fp32
            sums), where F.linear hands the row to oneDNN's matrix product. Intel Xeon (AMX), 2 threads, ~1 GB of each
            shape cycled, ms a matrix, two runs, F.linear / torch.mv / packed (packing.py): 11008 x 4096 8.7-8.8 /
            3.5-6.7 / 3.4-6.9; 4096 x 11008 4.8-6.1 / 4.2 / 3.6-5.7; 4096 x 4096 1.7-2.3 / 1.3-1.4 / 1.3-1.9; 32000 x
            4096 12.4-18.4 / 9.9-14.7 / 13.2-13.7: as fast as a packed copy without one, the same sums as F.linear's
            (bit for bit in 5 of 6 shapes). Full-size vicuna-7b, a greedy token, three rounds in one process: F.linear
            906 / 655 / 1421 ms, torch.mv 498 / 539 / 541 (98-121 % of the floor beside each), the same tokens;
            fp32 on F.linear. Where beams made a packed copy, one row reads it (as fast), the plain weight's pages not.
    packed  several rows of a large CPU matrix in a layer allowed to pack (`packing`): beams, a batch's decode
            steps, and prompts once the copy exists, through the weight packed once for oneDNN (packing.py).
    native  2-6 rows of a large bf16 or fp32 matrix where native.py's kernels take them (beams before packing, on AMD
            with AVX-512: bf16 1.4-1.8x F.linear's oneDNN, which repacks the weight at every call; native.py's tables),
            and one row too where they are built for AVX2 (faster than `vector` and `rows` there: native.py's table).
    rows    2-8 rows (FEW_ROWS) of a large bf16 matrix without native bf16 (beams there), through the compiled
            few-row kernel (`_rows_times_matrix`), where native.py's are not taken: F.linear's grows with each row.
    matrix  `weight @ x.T`, where nothing is packed (yet): 2-8 rows of a large fp32 matrix with MKL on AMD, where
            F.linear takes MKL's slow path and this its matrix-matrix kernel (MATRIX_MIN_WEIGHTS; in bf16 there,
            F.linear is the faster: 5 rows x 11008 x 4096, 4.8 ms against 7.9); and 2-32 rows of a large bf16 matrix
            on a CPU with AMX (`_amx_matrix_rows`), where oneDNN multiplies the weight as the left matrix without
            repacking it as F.linear's right one. Intel Xeon (AMX), 2 threads, ~1 GB of each shape cycled, ms a
            matrix, F.linear / weight @ x.T, the same products bit for bit:
                rows            2             5             10            32            150 (a prompt: F.linear)
                11008 x 4096    4.19 / 3.18   4.18 / 3.06   4.37 / 3.06   4.84 / 3.63   17.5 / 11.9
                4096 x 11008    5.14 / 4.49   5.06 / 4.45   5.25 / 3.40   5.05 / 3.61    9.6 / 11.5
                4096 x 4096     1.83 / 1.49   1.85 / 1.59   2.03 / 1.66   2.91 / 1.96    3.9 / 4.1
                32000 x 4096   14.4 / 12.5   15.9 / 12.0   15.7 / 10.6   15.0 / 12.4    34.3 / 35.1
                2048 x 768      0.27 / 0.16   0.26 / 0.21   0.26 / 0.17   0.32 / 0.23    0.76 / 0.43
            (packed, once made: 5 rows x 11008 x 4096 2.6-3.0.) Full vicuna-7b, 5-beam steps, three rounds in one
            process: F.linear 874 / 967 / 964 ms, this 820 / 810 / 841, the same tokens. The (rows, out) result is
            made contiguous: as a transposed view, the attention after it summed in another order (scores differed).
    plain   everything else: prefill, training, GPUs, small matrices.
    """
    rows = x.numel() // x.shape[-1]
    if (weight.numel() < FUSED_MIN_WEIGHTS or weight.device.type != "cpu" or x.dtype != weight.dtype
            or torch.is_grad_enabled()):
        return "plain"
    if rows == 1 and compiled_rows_pay():
        return "fused"
    if rows == 1 and native.takes(x, weight):  # AVX2 (native.py)
        return "native"
    if rows == 1 and weight.dtype == torch.bfloat16:
        return "vector"
    if packing and can_pack(weight.dtype) and rows > 1:
        return "packed"
    if rows > 1 and native.takes(x, weight):
        return "native"
    if 1 < rows <= FEW_ROWS and weight.dtype == torch.bfloat16 and not has_native_bf16():
        return "rows"
    if 1 < rows <= 8 and weight.dtype == torch.float32 and weight.numel() >= MATRIX_MIN_WEIGHTS and _mkl_on_amd():
        return "matrix"
    if 1 < rows <= AMX_MATRIX_MAX_ROWS and weight.dtype == torch.bfloat16 and _amx_matrix_rows():
        return "matrix"
    return "plain"


AMX_MATRIX_MAX_ROWS = 32  # measured up to 32 rows (decode_route's table); a prompt's 150 gain nothing


def _amx_matrix_rows() -> bool:
    """Whether a few bf16 rows take `weight @ x.T`: on CPUs with AMX that multiply bf16 natively (on the AMD EPYC,
    avx512_bf16 without AMX, F.linear was the faster)."""
    return "amx_bf16" in _cpu_flags() and has_native_bf16()


class Linear(nn.Linear):
    """nn.Linear whose few-row products take the faster route of `decode_route`; the same product otherwise.
    `packed`: a packing.PackedWeight where packing.allow_packing let this layer keep a packed copy of its weight;
    `split`: a packing.SplitWeight where load_model let a wide weight keep a column-split copy for one row."""

    packed = split = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = decode_route(x, self.weight, self.packed is not None)
        if route == "packed":
            native_rows = native.takes(x, self.weight)  # what multiplies the rows until the weight packs (packing.py)
            copy = self.packed.get(self.weight, rows=x.numel() // x.shape[-1], native_rows=native_rows)
            if copy is not None:
                return packing.linear(x, copy, self.bias)
            route = "native" if native_rows else decode_route(x, self.weight)  # the best route without a copy (yet)
        if route in ("fused", "vector") and self.packed is not None:
            copy = self.packed.for_one_row(self.weight, fused=route == "fused")  # made by beams, if any
            if copy is not None:
                self.split = None  # the packed copy took the weight's place: one row reads it, not a split copy
                return packing.linear(x, copy, self.bias)
        if route == "native" or (route == "fused" and native.takes(x, self.weight)):  # kernels.c (native.py)
            out = native.float_rows(x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        if route == "fused" and self.split is not None and compiling.compiles():  # a wide weight (packing.py)
            return packing.split_linear(x, self.split.get(self.weight, _chunks(self.weight.shape[1])), self.bias)
        if route == "fused":
            return fused_linears(x, [self.weight], [self.bias])[0]
        if route == "vector":
            row = x.reshape(-1)  # (in,)
            # (out,); with a bias, addmv adds it to the fp32 sums before rounding, as F.linear does
            out = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if route == "rows":
            return rows_linear(x, self.weight, self.bias)
        if route == "matrix":
            rows = x.reshape(-1, x.shape[-1])  # (rows, in)
            # (out, rows) -> (rows, out); addmm adds a bias to the sums before rounding, as F.linear does
            out = self.weight @ rows.T if self.bias is None else torch.addmm(self.bias[:, None], self.weight, rows.T)
            return out.T.contiguous().reshape(*x.shape[:-1], out.shape[0])
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def products(x: torch.Tensor, layers, norm: nn.Module | None = None, act=None) -> list[torch.Tensor] | None:
        """`linears`' and `gated`'s fast path: the products of one row (normed by `norm`) with several layers' weights
        in one compiled call, or None where a layer takes another route than "fused" (or reads its packed copy)."""
        if any(decode_route(x, layer.weight) != "fused" for layer in layers):
            return None
        if all(native.takes(x, layer.weight) for layer in layers):  # the norm, then each layer's native kernel
            return None
        if packing.copy_replaced_a_weight(layers) or (act is not None and any(m.bias is not None for m in layers)):
            return None  # the row reads the copy (forward); a gated unit with biases: its products, then act
        return fused_linears(x, [layer.weight for layer in layers], [layer.bias for layer in layers], norm, act)


# One compiled call a group of products of the same input (a flan-t5-xl decoder layer made ten a token) saves calls,
# and the dot products interleave (int8, ms a matrix, one a call / three: 2048 x 2048 0.168 / 0.149; 11008 x 4096 1.55
# / 1.46): flan-t5-xl cut to 8 decoder layers, greedy int8 29.3-29.9 -> 28.4-28.9 ms a step; a 7B's 4 + 4 cut: same.
def linears(x: torch.Tensor, *layers: nn.Module, norm: nn.Module | None = None) -> list[torch.Tensor]:
    """[layer(norm(x)) for layer in layers]: the products of one input with several layers (a layer's q, k, v), after
    the pre-norm that feeds them (none: x as it is); in one compiled call where `_in_one_call` takes them."""
    outs = _in_one_call(x, layers, norm)
    if outs is not None:
        return outs
    x = x if norm is None else norm(x)
    return [layer(x) for layer in layers]


def gated(x: torch.Tensor, gate: nn.Module, up: nn.Module, act, norm: nn.Module) -> torch.Tensor:
    """act(gate(norm(x))) * up(norm(x)): a gated unit (SwiGLU, T5's gated GELU), act and product in `linears`' one
    call where it makes one (full flan-t5-xl greedy steps alternated: int8 1.02x, bf16 1.01-1.03x; 7B widths ~1.0x)."""
    outs = _in_one_call(x, (gate, up), norm, act)
    if outs is not None:
        return outs[0]
    x = norm(x)
    return act(gate(x)) * up(x)


def _in_one_call(x: torch.Tensor, layers, norm: nn.Module | None, act=None) -> list[torch.Tensor] | None:
    """`linears`' and `gated`'s one compiled call: where the layers are of one class with a `products(x, layers, norm,
    act)` (Linear, quant.Int8Linear) that takes them (one row of large matrices), its outputs; else None."""
    kind = type(layers[0])
    if hasattr(kind, "products") and all(type(layer) is kind for layer in layers):
        return kind.products(x, layers, norm, act=act)
    return None
