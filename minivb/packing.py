"""Weights packed once into oneDNN's blocked layout, for the products that come back at every decode step (beams, a
batch): `fast.Linear` and `quant.Int8Linear` keep a `PackedWeight` where `load_model` allowed it
(memory.room_to_pack); int8 weights pack for oneDNN's integer products (`pack_int8`, below `linear`).

F.linear on a CPU hands a few-row product to oneDNN (bf16) or MKL (fp32) with the weight in its plain (out, in)
layout. oneDNN's bf16 kernel repacks that weight into its blocked layout at every call (ONEDNN_VERBOSE=1 shows
`brg_matmul` reading `wei:bf16::blocked:ba`), and MKL's fp32 kernel takes a generic, slow path on AMD. A weight
packed once into oneDNN's layout (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's freezing pass
uses; AB16b64a2b for bf16) and multiplied by `torch.ops.mkldnn._linear_pointwise` gives, native-bf16 machine
(AMD EPYC, 2 threads, best of 5, ms a matrix):
    5 rows                    bf16 F.linear  packed     fp32 F.linear  weight @ x.T  packed
    11008 x 4096                   5.9        3.8            36.2          16.8        7.0
    4096 x 4096                    1.8        1.2             9.3           6.2        2.0
    2048 x 768                     0.44       0.21            0.88          0.64       0.32
    32002 x 768 (an lm_head)       4.7        2.1            21.2          10.3        3.8
    150 rows, 11008 x 4096        38.0       35.6           113            -          66.0
Packed is faster at any number of rows (16 / 80 rows x 11008 x 4096: bf16 6.7 -> 4.7 / 19.8 -> 17.5 ms; fp32
28.5 -> 8.8 / 66 -> 34 ms). bf16 products are bit-identical to F.linear's; fp32 ones differ in the order of the
sums (~1e-7 relative). On AMD, one row stays on the fused kernel (faster for 4096 columns: 11008 x 4096 3.5 against
packed 4.7 ms), except where the copy took the plain weight's place (below); where that kernel does not pay
(fast.compiled_rows_pay: the Intel Xeon measured), a bf16 row takes torch.mv, as fast as the packed copy without
one (fast.decode_route's "vector"), and reads the copy where beams made one; an fp32 row stays on MKL's F.linear.
The price: the packed copy is memory of its own, the size of the weight, and packing reads and writes every weight
once. Whether that pays depends on how often the product comes back, which no layer knows in advance: an `ask` with
5 beams makes 10-30 beam steps once, an evaluation makes thousands. Measured (same machine, bf16, 5 rows, ms):
    matrix               F.linear  packed  gain a product  packing it  products to pay for it
    11008 x 4096            4.44     2.92       1.52          50.5             33
    4096 x 4096             1.68     1.03       0.66          19.2             29
    2048 x 2048             0.44     0.23       0.21           4.8             23
    5120 x 2048             1.16     0.53       0.63           8.5             13
    32128 x 2048            7.20     2.95       4.25          75.2             18
On the Intel Xeon (AMX), 2 threads, bf16, ms a matrix (400 MB of each shape: read from memory, not its cache; one
row there now takes torch.mv, as fast as packed, and never packs):
    matrix               pack   1 row: F.linear  packed  to pay    5 rows: F.linear  packed  to pay
    4096 x 4096           8.3           1.30      1.08      36              1.33     1.03      27
    11008 x 4096         23.3           3.40      2.64      30              3.48     2.62      27
    4096 x 11008         20.3           3.29      2.68      33              3.25     2.64      33
    32000 x 4096         64.7          10.15      8.03      30             10.49     7.99      25
and a whole full-size vicuna-7b there (bf16, 30 new tokens a generate call; packing, 2.6-3.1 s, against a gain of
0.073 s a 5-beam step): 29-42 products.
So a layer packs its weight at its PACK_AFTER-th product of up to PACK_MAX_ROWS rows without a copy: the rule of
renting skis until the rent paid equals the price, which never costs more than twice the best choice made knowing
the future. (At 24, the rule until the 7B was measured, an `ask` of 30 tokens, one answer a process, packed at its
24th step and had 6 left to repay it. Full vicuna-7b, Intel Xeon, 5 beams, the first answer of a process, two
alternating pairs with the machine drifting between them: 28.0 and 34.9 s at 24, 24.3 and 31.3 s at 32, where it
does not pack; once packed, the later answers of an evaluation take 2.2-3.1 s less each.) A beam search of
fewer than PACK_AFTER steps, which could not pay for it, never packs; a long one, and the later questions of an
evaluation, multiply the packed copy from then on. (Packing at the first beam step, the rule before, made the first
5-beam step of full-size flan-t5-xl take 9.1 s, against transformers' 0.24 s: 2.9 GB packed at once, with the page
cache filling the rest of the memory.) A video's prompt (4 frames: 128 visual tokens and
the text, more than PACK_MAX_ROWS rows) never counts towards packing, but uses the copy once it exists (5-10 %
faster in bf16, 1.7x in fp32). Never in autograd (training reads the plain weight, and a weight that changes
counts its products anew).
Only where `load_model` found room (memory.room_to_pack): for a second copy of every packed weight beside the plain
one, or, for bf16 weights (and an int8 checkpoint's int8 weights) mapped from the file, in the plain weight's place
(`PackedWeight.replaces`: from then on every product reads the copy, one row too, and the weight's pages go back to
the OS, `page_out`). Full-size
vicuna-7b in bf16, AMD EPYC, 24 GB (where one row read the plain weights through the fused kernel, it never packed):
5-beam steps 757-828 ms unpacked, 361-425 once packed (one step of 13.5 s packing 13 GB); greedy 396-598 before,
452-547 reading the copy; resident pages of the file 15.3 GB before, 2.4 after. Without `page_out` (another run,
in a phase of the machine 1.2x slower): the OS kept 8.7 GB of them, which it must find and drop when memory runs
short, as it did, slowly, on the Intel Xeon (README).
"""

import ctypes
import functools
import mmap
import sys
import weakref

import torch

from . import compiling

PACK_ROWS = 5  # the rows oneDNN is told to expect (a beam search's); any number of rows works with the same copy
PACK_MAX_ROWS = 128  # the most rows of a product that packs: a decode step of 5 beams x 25 videos
PACK_AFTER = 32  # the few-row products a weight makes unpacked before it packs: about what packing costs (above)
# The same where native.py's kernels multiply those products (AMD with AVX-512): they read the plain
# weight near the memory rate, so a packed copy saves less a product (5-20 %) and takes longer to pay for (native.py's
# table: a vicuna-7b layer's seven weights, bf16 165 products, 88 and 277 in other runs; int8 290; fp32 copies save
# nothing there, 5 rows of 11008 x 4096 5.50 ms against the kernel's 5.52).
PACK_AFTER_NATIVE = 192
refused = False  # set when oneDNN refused to pack on this machine: F.linear from then on


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight (out, in) in oneDNN's blocked layout (an opaque tensor) for `linear`; None (said once) where
    oneDNN refuses it."""
    global refused
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    except (RuntimeError, AttributeError) as error:  # AttributeError: a build of PyTorch without the op
        print(f"minivb: oneDNN could not pack a weight ({type(error).__name__}: {str(error).splitlines()[0][:100]}):"
              f" beam steps use F.linear (about 1.5-2x slower)", file=sys.stderr)
        refused = True
        return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight as `pack` left it: x (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# int8 weights (quant.Int8Linear) pack too. torch._int_mm repacks an int8 weight for oneDNN at every call, as F.linear
# does a bf16 one; packed once (`torch.ops.onednn.qlinear_prepack`, the op inductor's int8 graphs use) and multiplied
# by `qlinear_pointwise`, the same exact sums are 2-3x faster. AMD EPYC, 2 threads, ms a matrix, best of 5, bf16 rows
# cut in two int8 halves each (quant.integer_linear; 5 beams: 10 rows):
#     matrix          rows   packed   _int_mm (weight left)   int8pack_mm   bf16 F.linear / packed   packing it
#     11008 x 4096      10     2.19           5.70                 5.7            5.0 / 2.9              112
#     4096 x 11008      10     1.78           5.06                 5.6            5.3 / -                117
#     4096 x 4096       10     0.73           1.87                 2.2            1.9 / 1.0               48
# One row (2 halves) 2.10 against int8pack_mm's 1.7, so one row keeps its kernels, and a prompt's 150 rows its bf16
# copies (quant.int8_linear), packed 34.9 / 13.7 ms against 35.9 / 13.5 at a 7B's 11008 / 4096 x 4096, but at
# flan-t5-xl's widths 5.3 / 15.5 against 3.6 / 8.4 (2048 x 2048 / 2048 x 5120); where the copy replaced an int8
# checkpoint's weight, both read it (quant.Int8Linear.packed_copy). Packing costs what ~35 products save, as bf16's
# does (through oneDNN's reorder; `written_int8` below cuts it by 2-5x): the same rule (PACK_AFTER). The packed product
# takes the same time for 1 to 10 rows (11008 x 4096: 1.97-2.14 ms, ~22 GB/s; 1 thread 3.6 ms): bound by the kernel's
# work per weight, not by its rows or by memory, which is why int8 beams gain ~1.5x over bf16's packed product a
# matrix (2.1 against 3.1 ms), not the 2x of bytes. Full-size vicuna-7b's int8 checkpoint, 5-beam steps 868-926 ms,
# 388-443 once packed; flan-t5-xl's, 200-215 -> 140-167 ms. Measured on AMD only (quant.int8_packing_pays).
int8_refused = False  # set when oneDNN refused to pack an int8 weight here: the unpacked int8 products from then on


def pack_int8(weight: torch.Tensor) -> torch.Tensor | None:
    """An int8 weight (out, in) packed for oneDNN (an opaque tensor) for `int8_products`: written by `written_int8`
    where a weight of its shape showed that gives oneDNN's bytes, else by oneDNN; None (said once) where oneDNN
    refuses it."""
    global int8_refused
    shape = tuple(weight.shape)
    template = _int8_templates.get(shape)
    if template is not None and weight.is_contiguous():
        return written_int8(template, weight)
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
    except (RuntimeError, AttributeError) as error:  # AttributeError: a build of PyTorch without the op
        print(f"minivb: oneDNN could not pack an int8 weight ({type(error).__name__}: "
              f"{str(error).splitlines()[0][:100]}): beam steps keep the unpacked int8 products", file=sys.stderr)
        int8_refused = True
        return None
    if shape not in int8_layout_known:
        int8_layout_known[shape] = _written_as_onednn_packs(packed, weight)
    if int8_layout_known[shape]:
        _int8_templates[shape] = packed
    return packed


# oneDNN packs int8 through its generic reorder ("simple:any" in ONEDNN_VERBOSE, ~0.4 GB/s), where the layout it
# makes is a permutation that torch's copy writes at memory speed. For these products (AVX-512 VNNI: ONEDNN_VERBOSE's
# `BA16a64b4a`) the weight (out, in) is cut into blocks of 64 rows x 64 inputs, row blocks outermost, and each block
# holds 16 groups of 4 inputs, each group for the block's 64 rows in turn (the 4 bytes one VNNI instruction multiplies
# and sums); then one int32 per row, minus the row's sum (what oneDNN adds, times the activations' zero point, to undo
# it). Written into a copy (`clone`) of a packed weight of the same shape (oneDNN's opaque tensors have no
# `empty_like`): byte for byte oneDNN's. AMD EPYC, 2 threads, ms a matrix, oneDNN / written: 4096 x 4096 43.5 / 11.6,
# 11008 x 4096 108 / 30.8, 4096 x 11008 115 / 21.4, 5120 x 13824 169 / 33.3, 32000 x 4096 312 / 91.6; in a full-size
# vicuna-7b's int8 checkpoint, the step that packs all its weights 21.6-22.6 s / 9.1-10.0 s, where most of what is left
# is new memory (with the page cache full, 45 MB allocated and filled in ~30 ms, as oneDNN's own copy is). The first
# weight of each shape is packed by oneDNN and written too, and the shape is written from then on only where the bytes
# are the same (another CPU's layout, another version of oneDNN: oneDNN packs every weight). bf16's reorder (`pack`) is
# a fast one already: written the same way, no faster.
int8_layout_known: dict[tuple, bool] = {}  # (out, in) -> whether written_int8 gives oneDNN's bytes for the shape
_int8_templates = weakref.WeakValueDictionary()  # (out, in) -> a packed weight of the shape (a layer's copy)


def written_int8(template: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The int8 weight (out, in) packed as oneDNN packs it (above), written into a clone of `template`, a packed
    weight of the same shape."""
    out, size = weight.shape
    packed = template.clone()
    data = _memory_of(packed)  # (out * size + 4 * out,) int8: the packed tensor's memory, while `packed` lives
    blocks, sums = data[:weight.numel()], data[weight.numel():].view(torch.int32)
    if weight.data_ptr() % 4 == 0:  # 4 inputs as one int32: a 2x faster copy
        blocks, groups = blocks.view(torch.int32), weight.view(torch.int32)  # (out, in / 4)
        blocks.view(out // 64, size // 64, 16, 64).copy_(groups.view(out // 64, 64, size // 64, 16).permute(0, 2, 3, 1))
    else:
        blocks.view(out // 64, size // 64, 16, 64, 4).copy_(weight.view(out // 64, 64, size // 64, 16, 4)
                                                             .permute(0, 2, 3, 1, 4))
    sums.zero_()
    # With a zero point of 0, a row of ones times the packed weight is each row's sum, exact (|sum| <= 127 x in < 2^24)
    ones = torch.ones(1, size, dtype=torch.uint8)
    sums.copy_(_unsigned_products(ones, 0, packed, out).view(-1).neg())
    return packed


def _written_as_onednn_packs(packed: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether written_int8 gives the bytes of `packed`, oneDNN's packing of `weight`."""
    out, size = weight.shape
    readable = hasattr(torch.ops.mkldnn, "data_ptr") and hasattr(torch.ops.mkldnn, "_nbytes")  # (older PyTorch: not)
    if out % 64 or size % 64 or not readable or torch.ops.mkldnn._nbytes(packed) != weight.numel() + 4 * out:
        return False
    written = written_int8(packed, weight)  # kept alive while its bytes are read
    return torch.equal(_memory_of(written), _memory_of(packed))


def _memory_of(packed: torch.Tensor) -> torch.Tensor:
    """The memory of an opaque oneDNN tensor as int8 (which does not keep `packed` alive: the caller does)."""
    size = torch.ops.mkldnn._nbytes(packed)
    return torch.frombuffer((ctypes.c_char * size).from_address(torch.ops.mkldnn.data_ptr(packed)), dtype=torch.int8)


def int8_products(a: torch.Tensor, packed: torch.Tensor, out: int) -> torch.Tensor:
    """a (M, in) int8 @ the weight (out, in) as `pack_int8` left it .T -> (M, out): oneDNN's int32 sums, as fp32."""
    unsigned = (a.short() + 128).to(torch.uint8)  # oneDNN takes unsigned activations: a zero point of 128
    return _unsigned_products(unsigned, 128, packed, out)


def _unsigned_products(unsigned: torch.Tensor, zero_point: int, packed: torch.Tensor, out: int) -> torch.Tensor:
    """(unsigned (M, in) uint8 - zero_point) @ the packed weight .T -> (M, out), oneDNN's int32 sums as fp32."""
    ones, zeros = _unit_scales(out)  # the weight's scales and zero points
    return torch.ops.onednn.qlinear_pointwise(unsigned, 1.0, zero_point, packed, ones, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def _unit_scales(out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales of 1 and zero points of 0 for `out` output rows, kept for the whole process: PyTorch caches oneDNN's
    primitive with their addresses (a second product after the first's tensors were freed crashed the process)."""
    return torch.ones(out), torch.zeros(out, dtype=torch.long)


def exact_at_int8_limits(product) -> bool:
    """One 2 x 64 x 64 product of int8 extremes, `product(a, w)` -> the sums of a @ w.T, against exact sums: False
    where oneDNN's kernel saturates (a CPU without VNNI, or ONEDNN_MAX_CPU_ISA capping it below: pairs of products
    summed in 16 bits, which int8 extremes overflow) or the ops are missing. Both int8 routes are checked with it
    (`int8_products_exact`, quant's torch._int_mm)."""
    a = torch.tensor([[127] * 64, [-128, 127] * 32], dtype=torch.int8)  # (2, 64)
    w = torch.tensor([[127] * 64, [-127] * 64] * 32, dtype=torch.int8)  # (64, 64)
    try:
        sums = product(a, w)
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(sums.long(), a.long() @ w.long().t())


@functools.cache
def int8_products_exact() -> bool:
    """Whether `int8_products` is exact here (exact_at_int8_limits; |sums| < 2^24: exact in its fp32 output)."""
    return exact_at_int8_limits(lambda a, w: int8_products(a, torch.ops.onednn.qlinear_prepack(w, None), w.shape[0]))


def _identity(weight: torch.Tensor) -> tuple:
    """What changes when the weight does: its storage (a new tensor, `.to()`) and its version (an in-place write:
    an optimizer step, load_state_dict)."""
    return weight.data_ptr(), weight._version, weight.dtype


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (a clean page of a file is dropped; never changes content)


def page_out(tensor: torch.Tensor) -> None:
    """Tell the OS a tensor's whole pages will not be read for a while (madvise MADV_PAGEOUT; Linux, else nothing).
    For a weight mapped from its file, the OS drops them from memory at once, where it would otherwise keep them
    until memory runs short and then choose what to drop by itself, the pages still read among them. The content never
    changes: a page read again comes back from the file (anonymous pages, without swap, stay where they are)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages only: a neighbour's bytes share the edge pages
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page  # its own bytes, not the file's
    if tensor.is_contiguous() and end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)  # an error: ignored


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class PackedWeight:
    """One layer's packed copy of its weight, made at its PACK_AFTER-th product of 2 to PACK_MAX_ROWS rows (beam
    steps, a batch's decode steps, an image's prompt) without one, and counted anew after the weight changes.

    `replaces`: the copy takes the place of the plain weight (memory.room_to_pack's "instead": no room for both),
    so once it is made every product reads it, one row too (fast.Linear), and the plain weight's pages go back to
    the OS (`page_out`). Copies and pickles of the layer (copy.deepcopy, torch.save of a module) get an empty
    PackedWeight: the copy is an opaque oneDNN tensor that neither can read, and packs again."""

    def __init__(self, replaces: bool = False):
        self.replaces = replaces
        self.copy = None  # (the weight's _identity when it was packed, the packed tensor)
        self.products = (None, 0)  # (the weight's _identity, its few-row products since, made without a copy)

    def __reduce__(self):
        return PackedWeight, (self.replaces,)

    def current(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of `weight` where one was made (and the weight has not changed since), without counting a
        product: one bf16 row reads it where beams made it (fast.decode_route's "vector")."""
        return self.copy[1] if self.copy is not None and self.copy[0] == _identity(weight) else None

    def for_one_row(self, weight: torch.Tensor, fused: bool = True) -> torch.Tensor | None:
        """The copy one row reads rather than `weight`, where beams made one: a row that would take torch.mv always
        (as fast); one that would take the fused kernel (AMD: 11008 x 4096 in 3.5 ms, the copy 4.7) only where the
        copy `replaces` the weight."""
        return None if fused and not self.replaces else self.current(weight)

    def get(self, weight: torch.Tensor, rows: int, make=pack, native_rows: bool = False) -> torch.Tensor | None:
        """The packed copy for a product of `rows` rows by `weight`; None while there is none to use (fewer than
        PACK_AFTER such products so far, PACK_AFTER_NATIVE where native.py's kernels multiply them meanwhile:
        `native_rows`) and where oneDNN refuses to pack. `make`: the function that packs (int8 weights: pack_int8)."""
        identity = _identity(weight)
        if self.copy is not None and self.copy[0] == identity:
            return self.copy[1]
        self.copy = None  # a stale copy (the weight changed) is freed before its successor is made
        if rows > PACK_MAX_ROWS:
            return None  # a video's prompt: comes back once per generate call at most
        seen, count = self.products
        count = count + 1 if seen == identity else 1
        self.products = (identity, count)
        if count < (PACK_AFTER_NATIVE if native_rows else PACK_AFTER):
            return None
        packed = make(weight)
        if packed is not None:
            self.copy = (identity, packed)
            if self.replaces:
                page_out(weight)
        return packed


def copy_replaced_a_weight(layers) -> bool:
    """Whether one row times any of `layers` (fast.Linear, quant.Int8Linear) reads a packed copy in place of its
    weight (PackedWeight.for_one_row): then fast.linears' one call for several layers steps aside, each layer reading
    its own copy."""
    return any(layer.packed is not None and layer.packed.for_one_row(layer.weight) is not None for layer in layers)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` are packed: fp32, and bf16 where the CPU multiplies it natively (elsewhere oneDNN's
    bf16 is emulated: nothing measured there, nothing packed)."""
    from .fast import has_native_bf16  # (fast imports this file)

    usable = not refused and torch.backends.mkldnn.is_available()
    return usable and (dtype == torch.float32 or (dtype == torch.bfloat16 and has_native_bf16()))


def allow_packing(model: torch.nn.Module, allowed: bool = True, replaces: bool = False) -> None:
    """Let (or stop) every fast.Linear and int8 layer of `model` pack its weight; stopping frees the copies.
    `replaces`: each copy takes the place of its plain weight (PackedWeight). Allowed anew, counts anew."""
    from .fast import Linear  # (fast and quant import this file)
    from .quant import Int8Linear

    for module in model.modules():
        if isinstance(module, (Linear, Int8Linear)):  # the layers memory.packable_bytes counts
            module.packed = PackedWeight(replaces) if allowed else None


# ----------------------------------------------------------------------------- one row of a wide matrix, split

# One row times a weight of many inputs (LLaMA's down projections: 11008, 13824; flan-t5-xxl's wo: 10240) through
# fast.py's compiled kernel streams it at ~25 GB/s on AMD, where a weight of 4096 inputs streams at ~40: each output's
# dot product runs over the whole row, and the row (22-28 KB in bf16; fp32 twice that) does not stay in the first-level
# cache (32 KB) beside the weight streaming past it. A copy of the weight split by columns into the kernel's chunks
# (fast.FUSED_CHUNK), (chunks, out, in / chunks), is read in order, one chunk of the row serving every output before
# the next: the same sums in the same order (bf16: bit for bit; fp32: ~1e-7 apart, the loop vectorized otherwise).
# AMD EPYC, 2 threads, one row, GB/s, median of 10-12 rounds alternating in one process (copying: ms, bf16):
#     matrix                       bf16: fused      split   fp32: fused   split   copying
#     4096 x 11008                        24.0  37.0-42.7          33.6    51.7        25
#     5120 x 13824                        25.5  42.5-42.7
#     4096 x 10240                   24.5-26.0  34.8-42.8          32.0    49.0        29
#     2048 x 5120 (2 chunks)              41.8       41.3   (no gain: not split)
#     768 x 9216 (14 MB: cached)          33.8       30.8   (slower: not split)
# A full-width 7B cut to 8 layers, bf16 greedy, 6 rounds alternating in one process, medians: 117.8 -> 97.4 ms a token;
# full-size vicuna-7b, 7 rounds in two processes (1 GB sum 32-52 GB/s): 489 -> 457 ms (each round 423-539 -> 356-489),
# the same tokens. The copies are memory of their own (a 7B's down projections 2.9 GB in bf16, vicuna-13b's 5.7), so
# a layer has one only where load_model found room for all of them (memory.room_to_split), made at its first one-row
# product through the compiled kernel; where beams made a packed copy that took the weight's place, one row reads
# that instead, and the split copy goes (fast.Linear). int8 weights are not split (their one-row routes: quant.py).
# Where native.py's bf16 kernel takes one row (AVX-512 BF16), it reads the plain weight at the memory rate and no copy
# is made: the copies serve where it is not taken (MINIVB_NATIVE=0, a compiler that cannot build it).
SPLIT_MIN_INPUTS = 8192  # more inputs than this (two chunks or fewer: no gain measured)
SPLIT_MIN_BYTES = 32 * 2**20  # larger than the last-level cache (a smaller matrix is read from it: no gain)


def splits(weight: torch.Tensor) -> bool:
    """Whether one row times `weight` (out, in) reads a column-split copy of it, where one is allowed (above): wide,
    large, and cut in chunks by the compiled kernel (fast._chunks: not a width of awkward factors)."""
    from .fast import _chunks  # (fast imports this file)

    wide = weight.shape[1] > SPLIT_MIN_INPUTS and weight.numel() * weight.element_size() > SPLIT_MIN_BYTES
    return wide and _chunks(weight.shape[1]) > 1


class SplitWeight:
    """One layer's column-split copy of its weight (above), made at its first one-row product and again after the
    weight changes. Copies and pickles of the layer get an empty one."""

    def __init__(self):
        self.copy = None  # (the weight's _identity when it was split, the copy)

    def __reduce__(self):
        return SplitWeight, ()

    def get(self, weight: torch.Tensor, chunks: int) -> torch.Tensor:
        """The weight (out, in) as (chunks, out, in / chunks), made where there is none for it yet."""
        identity = _identity(weight)
        if self.copy is None or self.copy[0] != identity:
            self.copy = None  # a stale copy is freed before its successor is made
            out, size = weight.shape
            self.copy = (identity, weight.detach().reshape(out, chunks, size // chunks).transpose(0, 1).contiguous())
        return self.copy[1]


def _row_times_split(row: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """row (chunks, 1, c) x split (chunks, out, c) -> (1, out), accumulated in fp32, chunk by chunk."""
    return (split.float() * row.float()).sum(-1).sum(0)[None].to(row.dtype)


def split_linear(x: torch.Tensor, split: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x (..., in), `split` the weight's column-split copy (SplitWeight)."""
    out = compiling.compiled_or_plain(_row_times_split, x.reshape(split.shape[0], 1, -1), split)  # (1, out)
    return (out if bias is None else out + bias).reshape(*x.shape[:-1], -1)


def wide_layers(model: torch.nn.Module) -> list:
    """The fast.Linear layers of `model` whose weight `splits`: those a SplitWeight serves (memory.split_bytes counts
    them). Works on a meta model."""
    from .fast import Linear  # (fast imports this file)

    return [module for module in model.modules() if isinstance(module, Linear) and splits(module.weight)]


def allow_splitting(model: torch.nn.Module, allowed: bool = True) -> None:
    """Give (or take back) a SplitWeight to each of `model`'s wide_layers."""
    for layer in wide_layers(model):
        layer.split = SplitWeight() if allowed else None
