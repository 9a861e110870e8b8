"""int8 weight-only quantization of the language model, in the spirit of gpt-fast's quantize.py.

Why: the language model is most of the bytes (vicuna-13b: 26 of 28 GB in bf16), and decoding reads every one of
them per token. Stored as int8 with one scale per output row, each linear layer takes half the memory of bf16,
which is what lets vicuna-13b and flan-t5-xxl fit on a 24 GB machine.

How: for each row of a weight matrix W (out, in), scale = max |W[row]| / 127 and W_int8 = round(W / scale), so
W ~ W_int8 * scale with an error of at most scale / 2 per weight. The product x @ W.T becomes
(x @ W_int8.T) * scale, which a decode step computes without ever materialising W in bf16 (one row: native.py's
VNNI kernel, a compiled one or `torch._weight_int8pack_mm`; beams: integer products with int8 dot-product
instructions, on AMD through a copy packed for oneDNN); a prompt's rows take copies of W a block at a time, or integer
products (`int8_linear`).

The quantization happens while each shard is read (checkpoint.load_state hands an Int8Linear its tensor through
`load_weight`), so the bf16 model never exists in memory. Embeddings, norms, the vision encoder (257 rows a frame,
bound by arithmetic: int8 makes it slower, README), the Q-Former and the projection stay in the model's dtype: 2.6 GB
of a 7B's 15.8 GB in bf16 (the linears: 6.6 B of 7.9 B weights).

Quantizing at every load reads all the bf16 bytes (a 7B: 6-12 s, against 1.4 s to map it in bf16). `save_quantized`
(CLI: `python -m minivb quantize`) does it once, as gpt-fast's quantize.py and llama.cpp's llama-quantize do:
load_model maps its int8 checkpoint like any other, nothing quantized or copied (the 7B: 1.3 s).
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import compiling, converting, fast, native, packing
from .compiling import compiled_or_plain

QUANTIZE_CHOICES = ("int8",)
QUANTIZE_ROWS = 1024  # rows quantized at a time op by op (see quantize_weight)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (out, in) float -> int8 (out, in) and fp32 scales (out,)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): a zero row keeps a tiny, harmless scale
    quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return quantized, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output row (`weight_scale`, the name a quantized
    checkpoint stores it under: quant.save_quantized); bias (if any) stays in the model's dtype."""

    packed = None  # a packing.PackedWeight where packing.allow_packing let it pack its weight (packing.pack_int8)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @torch.no_grad()
    def load_weight(self, tensor: torch.Tensor) -> None:
        """Take a float weight (out, in) from the checkpoint and keep it quantized (called by the loader): the int8
        weight `quantize_weight` returns becomes the layer's own (the empty one it replaces was never touched)."""
        quantized, scales = quantize_weight(tensor)
        self.weight = quantized.to(self.weight.device)
        self.weight_scale.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = self.packed_copy(x)
        if copy is not None:
            rows = x.reshape(-1, x.shape[-1])  # (R, in)
            out = packed_integer_linear(rows, copy, self.weight_scale.to(x.dtype)).reshape(*x.shape[:-1], -1)
        elif x.device.type == "cpu" and (x.dtype == torch.bfloat16 or _integer_rows(x) or _copied_rows(x)):
            # The fast paths (below): int8 weights read as they are, scaled per row after the product.
            out = int8_linear(x, self.weight, self.weight_scale)
        else:
            out = self.reference(x)
        return out if self.bias is None else out + self.bias

    def packed_copy(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of the weight that x (..., in) is multiplied by, if any (packing.py): several rows (beams)
        make it and read it; where it took the weight's place (packing.PackedWeight.replaces: an int8 checkpoint with
        no room for both), one row and a prompt read it too, so that the weight's pages are never read again (AMD,
        vicuna-13b's 5120 x 5120, 13824 x 5120 and 5120 x 13824, ms int8_linear / the copy: one row 1.2-3.0 / 1.4-3.9,
        150 rows 24-60 / 22-61, 5 rows 3.6-9.2 / 1.6-4.2)."""
        if self.packed is None:
            return None
        if _packed_rows(x):  # later where native.py's kernel multiplies the rows meanwhile (packing.py)
            native_rows = native.takes(x, self.weight)
            return self.packed.get(self.weight, x.numel() // x.shape[-1], packing.pack_int8, native_rows)
        if self.packed.replaces and x.device.type == "cpu" and _without_autograd(x):
            return self.packed.current(self.weight)
        return None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the fast paths are checked against: dequantize, then an ordinary product, without the bias (GPUs; a few
        fp32 rows on a CPU without integer products, where int8pack_mm is slow: 25 against 2.2 ms a 4096 x 11008)."""
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale[:, None].to(x.dtype))

    @staticmethod
    def products(x: torch.Tensor, layers, norm: nn.Module | None = None, act=None) -> list[torch.Tensor] | None:
        """fast.linears' and fast.gated's fast path: one bf16 row (normed by `norm`) times several int8 layers in one
        compiled call, or None where a layer takes another route."""
        if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and all(_fused_row(x, m.weight) for m in layers)):
            return None
        if all(native.takes(x, m.weight) for m in layers):
            return None  # each layer's own forward: the norm, then the native kernel, which reads the row as it is
        if packing.copy_replaced_a_weight(layers) or (act is not None and any(m.bias is not None for m in layers)):
            return None  # the row reads the copy (forward); a gated unit with biases: its products, then act
        pairs = [(m.weight, m.weight_scale.to(x.dtype)) for m in layers]
        outs = int8_rows_linears(x.reshape(1, -1), pairs, norm, act)  # gated (act): one, the gate's width
        return [(out if m.bias is None else out + m.bias).reshape(*x.shape[:-1], m.out_features)
                for out, m in zip(outs, layers)]


def quantize_language_model(model: nn.Module) -> None:
    """Swap every linear layer of the language model for an Int8Linear (call it on the meta device, before loading).
    T5's lm_head is left as it is: checkpoints written tied (transformers 5) share it with the input embeddings."""
    lm = model.language_model
    swaps = [(name, module) for name, module in lm.named_modules() if isinstance(module, nn.Linear)
             and not (model.config.is_encoder_decoder and name == "lm_head")]
    for name, linear in swaps:
        parent = lm.get_submodule(name.rpartition(".")[0]) if "." in name else lm
        quantized = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        setattr(parent, name.rpartition(".")[2], quantized)


def check_quantize(quantize) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_CHOICES}, got {quantize!r}")


# ----------------------------------------------------------------------------- the fast paths of int8 (as fast.py's)

# int8 weights (quant.Int8Linear), bf16 rows on a CPU. torch._weight_int8pack_mm reads the int8 matrix as it is,
# which is what decoding wants, but its cost grows with the rows where a bf16 matrix product's does not. Above
# INT8_MATMUL_ROWS rows the int8 matrix is converted to bf16 (exactly: -127..127 are bf16 integers) and multiplied by
# F.linear's matrix kernel, the scales applied to the (rows, out) product. 11008 x 4096, 2 threads, AMD, ms (best of 5):
#     rows                         1     5     8    10    12    16    32    64   100
#     int8pack_mm                2.3   5.7   5.7   8.4   8.9  11.1  22.9  46.3  73.6
#     bf16 copy (8 MB blocks)   10.4   7.5   8.5   7.5   8.2  11.0  13.0  21.5  28.9
#     bf16 F.linear              6.1   5.4   5.9   5.8   8.5   7.4  10.0  17.1  26.3   (bf16 weights, for comparison)
INT8_MATMUL_ROWS = 8
# One row (greedy decoding) of an int8 matrix, on AMD with AVX-512 where native.py's VNNI kernel is not taken (no
# VNNI, MINIVB_NATIVE=0; elsewhere int8pack_mm: fast.compiled_rows_pay). int8pack_mm and a plain compiled multiply-and-
# sum are bound by converting weights to fp32 (~27 G weights/s: one vector of sums an output, each add waiting for the
# one before); adding GROUPS vectors of products first leaves one waiting add a GROUPS x LANES. GB/s, int8pack_mm / one
# sum / 8 groups: 11008 x 4096 25.8 / 27.8 / 34.6, 2048 x 2048 16.8 / 22.8 / 27.7; 4096 x 11008 (the fp32 row out of
# the first-level cache) 25-27 / 15 / 15, 5120 (13B) 22 / 13.5 / 22: wider rows stay on int8pack_mm.
INT8_FUSED_MAX_IN = 4096
INT8_FUSED_SAVES_PER_BYTE = 5e-12  # s a byte over int8pack_mm (the rent: compiling.py); alone, AMD: -10 to 21 us a MB
# int8pack_mm (PyTorch 2.13, AMD EPYC) takes widths (in) that are multiples of 16 only (others: crashes, NaN, 1e32).
# The official widths are multiples of 64; any other takes the block copies (one row: no compiled kernel either).
INT8PACK_WIDTHS = 16
# int8pack_mm gives each thread blocks of 4 rows x 4 outputs, rows outermost: 5 rows (5 beams) on 2 cores are 4 rows on
# one core and 1 on the other, which then waits. 4 rows a call spread each call's outputs over the cores: 5 x 5120 x
# 2048 1.05-1.35 -> 0.84-1.02 ms; full flan-t5-xl int8, 5-beam steps 203-280 ms (two modes) -> 194-215.
INT8PACK_ROWS = 4
LANES, GROUPS = 16, 8  # fp32 sums in one AVX-512 vector; vectors of products added before they join them


def _int8_row_times_matrix(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, groups=None) -> torch.Tensor:
    """row (1, in) fp32 x weight (out, in) int8, scaled per output -> (1, out) in the scales' dtype: one vectorized
    pass over the weight, GROUPS vectors of products added at a time where `in` allows (above), or `groups`."""
    out, width = weight.shape
    groups = groups or (GROUPS if width % (GROUPS * LANES) == 0 else 1)
    weight, row = weight.reshape(out, -1, groups, LANES), row.reshape(-1, groups, LANES)  # (out, n, groups, 16)
    sums = weight[:, :, 0].float() * row[:, 0]  # (out, n, 16)
    for group in range(1, groups):  # each group's products apart: none is read twice (see compiling._NORMED_OPTIONS)
        sums = sums + weight[:, :, group].float() * row[:, group]  # pointwise: adds that do not wait for each other
    return (sums.sum((1, 2))[None] * scales).to(scales.dtype)


def _int8_row_times_matrices(row: torch.Tensor, *weights_and_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """_int8_row_times_matrix for several (weight, scales) of the same width in one compiled call (fast.linears)."""
    pairs = zip(weights_and_scales[0::2], weights_and_scales[1::2])
    return tuple(_int8_row_times_matrix(row, weight, scales) for weight, scales in pairs)


def _int8pack_rows(row: torch.Tensor, *weights_and_scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same products through int8pack_mm where nothing compiles, the row back in the scales' dtype (exact)."""
    pairs = zip(weights_and_scales[0::2], weights_and_scales[1::2])
    return tuple(torch._weight_int8pack_mm(row.to(scales.dtype), weight, scales) for weight, scales in pairs)


def _int8_normed_row_times_matrices(norm: nn.Module, row: torch.Tensor, *weights_and_scales: torch.Tensor):
    """norm(row) (1, in) times each int8 (weight, scales), the norm in the same compiled call (fast.linears)."""
    return _int8_row_times_matrices(norm(row).float(), *weights_and_scales)


def _plain_int8_normed_rows(norm: nn.Module, row: torch.Tensor, *weights_and_scales: torch.Tensor):
    return _int8pack_rows(norm(row), *weights_and_scales)


def _fused_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x (..., in) is one row that the compiled int8 kernel multiplies faster than int8pack_mm (above)."""
    return (x.numel() == x.shape[-1] and fast.compiled_rows_pay() and weight.shape[1] <= INT8_FUSED_MAX_IN
            and weight.numel() >= fast.FUSED_MIN_WEIGHTS and weight.shape[1] % INT8PACK_WIDTHS == 0
            and not torch.is_grad_enabled())


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) on a CPU (bf16; fp32 where integer products or the copies take it), weight (out, in) int8, scales
    (out,) -> x @ (weight * scales).T, (..., out) in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (R, in)
    scales = scales.to(x.dtype)
    if native.takes(x, weight):
        out = native.int8_rows(rows, weight, scales)  # (R, out): VNNI, at the memory rate (native.py)
    elif _fused_row(x, weight):
        out = int8_rows_linears(rows, [(weight, scales)])[0]  # (1, out)
    elif _integer_rows(x):
        out = integer_linear(rows, weight, scales)  # (R, out)
    elif rows.shape[0] <= INT8_MATMUL_ROWS and weight.shape[1] % INT8PACK_WIDTHS == 0:
        out = (torch._weight_int8pack_mm(rows, weight, scales) if rows.shape[0] <= INT8PACK_ROWS else  # (R, out)
               torch.cat([torch._weight_int8pack_mm(block, weight, scales) for block in rows.split(INT8PACK_ROWS)]))
    else:
        out = converting.linear_in_blocks(rows, weight) * scales  # (R, out): the weight converted a block at a time
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _copied_rows(x: torch.Tensor) -> bool:
    """Whether fp32 rows x (..., in) take int8_linear's copies of the weight a block at a time: a prompt computed in
    fp32 (no native bf16) on a CPU without integer products (no VNNI: AMD's Zen 2 and 3, Intel before Ice Lake).
    Emulated (AVX2 on the Intel Xeon), 150 rows, ms a matrix: 11008 x 4096 195 -> 99, 4096 x 11008 204 -> 101, 4096 x
    4096 82 -> 42, against `reference`'s two fp32 copies of the whole matrix."""
    return x.dtype == torch.float32 and x.numel() // x.shape[-1] > INT8_MATMUL_ROWS


def int8_rows_linears(row: torch.Tensor, weights_and_scales: list, norm: nn.Module | None = None, act=None) -> list:
    """One bf16 row (1, in), normed by `norm` where given, times several int8 (weight, scales) of the same width ->
    [(1, out)], in one call of the compiled kernel (int8pack_mm where none compiles); act: a gated unit (fast.gated)."""
    flat = [tensor for pair in weights_and_scales for tensor in pair]
    saves = INT8_FUSED_SAVES_PER_BYTE * compiling.bytes_of(flat[0::2])
    if act is not None:  # [act(gate) * up]
        return [fast.gated_products(_int8_normed_row_times_matrices, _plain_int8_normed_rows, norm, act, row, *flat,
                                    grouped=True, saves=saves)]
    if norm is not None:
        return list(compiled_or_plain(_int8_normed_row_times_matrices, norm, row, *flat,
                                      plain=_plain_int8_normed_rows, normed=True, grouped=True, saves=saves))
    return list(compiled_or_plain(_int8_row_times_matrices, row.float(), *flat, plain=_int8pack_rows, saves=saves))


# Several rows (beams, a batch's decode steps) on a CPU with int8 dot-product instructions (x86 VNNI, AMX):
# torch._int_mm multiplies int8 by int8 into exact int32 sums with them (oneDNN), reading the int8 weight as it is.
# The activations are not int8, so each row is cut in two int8 halves (`_int8_halves`) that go through one product as
# 2R rows. Intel Xeon with AMX, 2 threads, 11008 x 4096, ms a matrix, best of 3 (the machine drifts ~2x):
#     rows                         5        8       16       32       64      128      150
#     this                       3.5      3.8-4.0  5.5      7.3-7.7  8.7-9.2  16-23    26
#     int8pack_mm                5.7-6.6  8.0-8.2  14-16    24-27    44       94-98    101
#     bf16 copy (8 MB blocks)      -       39-40   12-13    13-15    15-17    28-34    18-30
#     bf16 weights: F.linear     4.4-5.2   -        -        -        -        -       11-22   (packed, 5 rows: 3.25)
# So bf16 rows take it up to INTEGER_MAX_ROWS (5 beams x 25 videos); a prompt's more rows keep the bf16 copy. A CPU
# without native bf16 computes a prompt in fp32 (fast.compute_dtype): there every count of rows takes this (capped to
# AVX-512 VNNI without AMX or bf16, as a Cascade Lake: 5 rows 5.0 against int8pack_mm's 6.6; 150 rows 36 against 139
# for the fp32 product). Without VNNI oneDNN's int8 kernels saturate 16-bit pair sums and the products come out wrong
# (off by 19295 in sums of 120472), so `integer_products_pay` checks the CPU's flags and then one product at the
# limits of int8 against exact sums. With AMX, the weight goes in as the left matrix (`_int_mm(weight, halves.T)`),
# which oneDNN multiplies without repacking it: whole integer_linear, 11008 x 4096, rows 2 / 5 / 16 / 64: 3.14 / 3.30
# / 3.82 / 7.95 -> 2.72 / 2.60 / 3.20 / 6.39 ms; with VNNI alone slower (5 rows 5.2 -> 7.5): there it stays right.
# The AMD EPYC (Zen 4: VNNI, no AMX): a 7B layer's seven matrices, ms, rows 2 / 5 / 8 / 12: weight on the right 33.4 /
# 36.4 / 41.0 / 44.8, on the left 19.4 / 26.6 / 21.2 / 28.5, int8pack_mm 9.8 / 22.0 / 25.6 / 36.7 (11008 x 4096, 128
# rows: left 27.8, bf16 copy 33.1): int8pack_mm up to INT8_MATMUL_ROWS, then the left. MINIVB_INT8_MM=0: off.
INTEGER_MAX_ROWS = 128
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # x86 VNNI (AVX-512, AVX) and AMX
HALF = 128  # q = HALF * high + low
GRID = HALF * HALF - 1  # 16383: |q| <= GRID, so high = floor(q / HALF) lies in [-128, 127] and low in [0, 127]


def _int8_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, in) float -> int8 halves (2R, in): rows [high; low], and step (R, 1) fp32, with
    x ~ (HALF * high + low) * step: each row on a grid of 2 x GRID + 1 steps of its largest magnitude.

    The grid costs at most step / 2 = 1/32766 of the row's largest value, less than bf16's own rounding of every
    value above 1/64 of it; a product's error stays that of its bf16 result (1.7e-3 relative, as int8pack_mm's)."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / GRID  # (R, 1); an all-zero row stays zero
    q = torch.round(x / step)  # integers in [-GRID, GRID], exact in fp32
    high = torch.floor(q / HALF)
    return torch.cat([high, q - HALF * high]).to(torch.int8), step


def _sum_halves(products: torch.Tensor, step: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int32 products of `_int8_halves`' rows (2R, out) -> x @ (weight * scales).T (R, out) in scales' dtype: the
    integer sum(q * w) = HALF x high + low made exactly (fp64), rounded once, as kernels.c does (q whole or not)."""
    high, low = products.double().chunk(2)  # (R, out) each: |sums| <= 128 x 127 x in, exact in int32 up to in ~132k
    return (torch.add(low, high, alpha=HALF).float() * step * scales.float()).to(scales.dtype)


def integer_linear(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows (R, in) float, weight (out, in) int8, scales (out,) -> (R, out) in scales' dtype, through torch._int_mm."""
    halves, step = _int8_halves(rows)  # (2R, in) int8, (R, 1)
    return _sum_halves(_int8_products(halves, weight), step, scales)  # (2R, out) int32 -> (R, out)


def _int8_products(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a (M, in) int8 @ weight (out, in) int8 .T -> (M, out) exact int32 sums through torch._int_mm; with AMX and on
    AMD the weight is the left matrix (above), the result made contiguous, as fast.Linear's "matrix" route."""
    if fast._cpu_flags() & {"amx_int8", "AuthenticAMD"}:
        return torch._int_mm(weight, a.t()).t().contiguous()  # (out, M) -> (M, out)
    return torch._int_mm(a, weight.t())


def integer_products_pay() -> bool:
    """Whether several rows times an int8 weight take torch._int_mm (above): x86 CPUs with VNNI or AMX on which
    oneDNN's int8 products are exact (`_int8_products_exact`). MINIVB_INT8_MM=0 turns it off."""
    if compiling.override("MINIVB_INT8_MM") is False:
        return False
    has_instructions = bool(fast._cpu_flags() & INT8_DOT_PRODUCT_FLAGS)
    return has_instructions and torch.backends.mkldnn.is_available() and _int8_products_exact()


@functools.cache
def _int8_products_exact() -> bool:
    """Whether torch._int_mm's products, in integer_linear's order, are exact here (packing.exact_at_int8_limits)."""
    return packing.exact_at_int8_limits(_int8_products)


def _without_autograd(x: torch.Tensor) -> bool:
    """Whether nothing differentiates through x's product: the integer and packed routes round x, with no gradient."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def _integer_rows(x: torch.Tensor) -> bool:
    """Whether x (..., in) takes integer_linear: on a CPU where it pays, several rows, up to INTEGER_MAX_ROWS of bf16
    (on AMD, more than INT8_MATMUL_ROWS) or any number of fp32 (above); outside autograd (the grid's rounding has no
    gradient)."""
    rows = x.numel() // x.shape[-1]
    fewest = INT8_MATMUL_ROWS + 1 if x.dtype != torch.float32 and "AuthenticAMD" in fast._cpu_flags() else 2
    return (fewest <= rows and (rows <= INTEGER_MAX_ROWS or x.dtype == torch.float32) and x.device.type == "cpu"
            and _without_autograd(x) and integer_products_pay())


# ----------------------------------------------------------------------------- int8 weights packed once, for beams

# Several rows by an int8 weight packed once for oneDNN (packing.pack_int8; its table): the same exact sums as
# integer_linear's, 2-3x faster; against native.py's kernel, 5 rows, two runs: 6-29 % slower up to 2048 x 5120, from 5 %
# slower to 20 % faster at 7B widths. Packed by bf16's rule (packing.py). Measured on AMD.


def int8_packing_pays() -> bool:
    """Whether int8 weights pack for several rows: on AMD with integer products (above), where oneDNN's packed
    products are exact too (packing.int8_products_exact)."""
    return ("AuthenticAMD" in fast._cpu_flags() and not packing.int8_refused and integer_products_pay()
            and packing.int8_products_exact())


def packed_integer_linear(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """integer_linear with the weight as packing.pack_int8 left it: rows (R, in) float -> (R, out) in scales' dtype."""
    halves, step = _int8_halves(rows)  # (2R, in) int8
    return _sum_halves(packing.int8_products(halves, packed, scales.shape[0]), step, scales)


def _packed_rows(x: torch.Tensor) -> bool:
    """Whether x (..., in) may take (and count towards) a packed copy: 2 to packing.PACK_MAX_ROWS rows on a CPU,
    outside autograd. A prompt's rows keep the block copies, which are as fast or faster (packing.py's table)."""
    return (1 < x.numel() // x.shape[-1] <= packing.PACK_MAX_ROWS and x.device.type == "cpu" and x.is_floating_point()
            and _without_autograd(x) and int8_packing_pays())


# quantize_rows op by op makes five passes over fp32 copies (float, abs, divide, round, clamp), so it goes a block of
# QUANTIZE_ROWS at a time (a whole 32000 x 4096 lm_head's would be 0.5 GB each). Compiled it is two passes, one for the
# scales, one to quantize, the same bit for bit and no fp32 copy: the whole weight at once, its output the int8 weight
# itself. 11008 x 4096 bf16, 2 threads: 0.5-1.0 G weights/s plain, 1.6-1.8 compiled, most of it writing fresh pages.
# Full vicuna-7b's load quantizing it, fresh processes alternating, 6 pairs: compiled blocks copied into the weight 6.4-
# 7.8 s, whole 6.0-6.8 (compiling: ~4 s the first time on a machine, ~1 s from inductor's disk cache). Weights under
# QUANTIZE_COMPILE_MIN (the test models) stay plain: compiling would cost more than it saves.
QUANTIZE_COMPILE_MIN = 1024 * 1024


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows (the reference, above) of a whole weight: compiled on a CPU if large, else a block at a time."""
    if weight.numel() < QUANTIZE_COMPILE_MIN or weight.device.type != "cpu":
        return _quantize_in_blocks(weight)
    return compiled_or_plain(quantize_rows, weight, plain=_quantize_in_blocks)


def _quantize_in_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)  # quantize_rows' scales: fp32
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        quantized[rows], scales[rows] = quantize_rows(weight[rows])
    return quantized, scales


# ----------------------------------------------------------------------------- quantize once: an int8 checkpoint

def save_quantized(source, out, progress=None) -> None:
    """Write the checkpoint in `source` to the directory `out` with its language model's linear weights in int8,
    exactly as load_model(source, quantize="int8") holds them; load_model(out) maps them instead of quantizing.

    The layout stays the official one, shard for shard and key for key: a quantized weight keeps its key, stored as
    int8 (out, in), and its scales go beside it as `<key>_scale`, fp32 (out,) (`...q_proj.weight` ->
    `...q_proj.weight_scale`, the name compressed-tensors int8 checkpoints use). Every other tensor is copied as the
    source stores it. config.json is the source's plus a `quantization_config` ({"quant_method": "minivb-int8", ...}):
    transformers cannot load the result; minivb loads it in any dtype with the same numbers, bit for bit, as
    quantizing at load. One shard is held at a time (its int8 weights), never the whole model.
    `progress(done, total, file)`, if given, is called before each safetensors file is read.
    """
    from .checkpoint import ALIGN, _open, _read, checkpoint_files, official_key
    from .config import QUANT_METHOD, checkpoint_dir, load_config, read_json
    from .model import build_on_meta
    from .saving import copy_processor_files, write_json, write_tensors

    source, out = checkpoint_dir(source), os.fspath(out)
    config = load_config(source)
    if config.quantization is not None:
        raise ValueError(f"{source} is already quantized ({config.quantization}); quantize its unquantized source")
    if os.path.isdir(out) and os.path.samefile(source, out):
        raise ValueError(f"the output folder must not be the source checkpoint {source}: write the int8 one beside it")
    # Which weights: the layers load_model would quantize (quantize_language_model, on a meta model: no memory).
    layers = {official_key(f"{name}.weight"): module for name, module in build_on_meta(config, torch.float32, "int8")
              .named_modules() if isinstance(module, Int8Linear)}
    os.makedirs(out, exist_ok=True)
    files, weight_map, total_size = checkpoint_files(source), {}, 0
    for done, file in enumerate(files):
        if progress is not None:
            progress(done, len(files), file)
        tensors = {}
        with _open(file) as handle:
            for key in handle.keys():
                tensor = _read(handle, file, key)  # mapped: read from the file as it is written or quantized
                layer = layers.get(key)
                if layer is None:
                    tensors[key] = tensor
                    continue
                if tuple(tensor.shape) != (layer.out_features, layer.in_features):
                    raise ValueError(f"shape mismatch for {key!r}: checkpoint has {tuple(tensor.shape)}, the model "
                                     f"built from config.json expects {(layer.out_features, layer.in_features)}")
                tensors[key], tensors[key + "_scale"] = quantize_weight(tensor)  # as load_weight does: fp32 scales
            # The int8 weights first, those whose size is a multiple of 64 bytes (all, at the official sizes) first
            # of all, the data 64-byte aligned: each of those starts on a 64-byte boundary, where
            # torch._weight_int8pack_mm can read it mapped (checkpoint.ALIGN; the loader copies any other).
            name = os.path.basename(file)
            first = sorted(tensors, key=lambda key: (tensors[key].dtype != torch.int8, tensors[key].nbytes % ALIGN != 0,
                                                     -tensors[key].element_size()))
            total_size += write_tensors(os.path.join(out, name), {key: tensors[key] for key in first})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    missing = sorted(set(layers) - set(weight_map))
    if missing:
        raise ValueError(f"checkpoint {source} lacks weights the model needs: {', '.join(missing[:10])}")
    if os.path.isfile(os.path.join(source, "model.safetensors.index.json")):
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(out, "model.safetensors.index.json"), index)
    values = read_json(os.path.join(source, "config.json"))
    values["quantization_config"] = {
        "quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "one scale per output row",
        "scales": "<weight key>_scale, float32", "modules": "the language model's linear layers (not T5's lm_head)"}
    copy_processor_files(source, out)
    write_json(os.path.join(out, "config.json"), values)  # last: a folder cut short of it is no checkpoint
