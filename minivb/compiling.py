"""How minivb compiles its kernels (fast.py's few-row products, quant.py's int8 ones and quantizing,
decode_attention.py's softmax, decode_blocks.py's whole blocks): torch.compile's inductor, C++ on the CPU, with the
plain PyTorch code as the fallback wherever no compiler is found or compiling fails (said once, on stderr); a kernel
with a fast plain route beside it is compiled only once it has paid for its compiling (`Rent`). The switches below are
each measured where they are set.
"""

import contextlib
import functools
import os
import shutil
import sys

import torch
import torch.fx.experimental._config  # dynamo's shape switches (use_duck_shape, below)

_compile_failed = False  # set when compiling failed on this machine: the plain paths from then on


def override(name: str) -> bool | None:
    """The switch environment variable `name` sets: True for 1, False for 0, None where it is unset. Inside `settings`
    (a decode step) each switch is read once and remembered until the step ends: the routes ask at every product,
    ~35 times a layer (os.environ costs ~1.5 us a read: make bench's medium model, 276 reads a step)."""
    if _settled and name in _switches:
        return _switches[name]
    value = os.environ.get(name)
    if value is not None and value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    forced = None if value is None else value == "1"
    if _settled:
        _switches[name] = forced
    return forced


def _plain_instead(reason: str) -> None:
    print(f"minivb: {reason}: decode steps use plain PyTorch (decoding ~1.5-2x slower at 7B sizes)", file=sys.stderr)


@functools.cache
def _compiler_found() -> bool:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        _plain_instead(f"no C++ compiler ({compiler} or clang++) found")  # said once
        return False
    return True


# A pre-norm in the products' compiled call (fast.linears' norm=) saves its ~8 ops run one by one. As written, inductor
# recomputes the normed row in each product's loop, at every weight (int8, one row x 3 x 2048 x 2048 with a
# T5LayerNorm: 0.63 ms, 0.49 op by op); these options compute each intermediate once (0.35 ms), rounded where the
# code rounds. flan-t5-xl cut to 8 decoder layers, greedy, ms a step: bf16 34.3-34.9 -> 30.7-30.9, int8 28.0-28.3 ->
# 27.3-27.5.
_NORMED_OPTIONS = {"realize_reads_threshold": 1, "realize_opcount_threshold": 1, "emulate_precision_casts": True}
# int8's kernels add their products in groups (quant.GROUPS), sums which the opcount threshold would store whole (fp32,
# an eighth of the weight: 3 x 4096 x 4096 int8 under an RMSNorm 1.9 -> 7.2 ms); the reads threshold alone computes the
# normed row once too (old int8 kernel 2.0 ms with both, 2.0 with it alone). bf16 keeps both: full flan-t5-xl greedy,
# fresh processes alternating, 98-104 ms with both against 137-151 with the reads threshold alone (level in 1 of 3).
_GROUPED_NORMED_OPTIONS = {"realize_reads_threshold": 1, "emulate_precision_casts": True}
# A bf16 decoder block compiled whole (decode_blocks.py) holds both: the products, which the opcount threshold of 1
# would store whole (flan-t5-xl's `wo`, 2048 x 5120 fp32 a layer: 400 ms a step), and a gated unit's activation,
# which without one is computed again for every weight row that reads it (inductor's CPU default realizes beyond 50
# ops: exact GELU, ~25, ran 2048 x 5120 times a layer, 285 ms a step). 20 stores the activation, not the products:
# 72-73 ms a step. Whole blocks of int8 take it where native.py's kernels are theirs (decode_blocks._grouped); through
# quant.py's grouped kernels they keep _GROUPED_NORMED_OPTIONS (30 stored their grouped sums, 66 -> 77-83 ms a step).
_BLOCK_OPTIONS = {"realize_reads_threshold": 1, "realize_opcount_threshold": 20, "emulate_precision_casts": True}


@functools.cache
def _compiled(function, normed: bool = False, grouped: bool = False, block: bool = False):
    """`function` compiled by inductor (with _NORMED_OPTIONS where `normed`, _GROUPED_NORMED_OPTIONS where `grouped`
    too, _BLOCK_OPTIONS for a `block`), or None where it cannot build C++ here.

    dynamic=True: one kernel for every shape (and a few size-1 specialisations), not one per matrix or cache length.
    Compiling takes 1-3 s at the first use in a process (inductor caches it on disk); each call costs ~40-80 us of
    dynamo's guards and wrappers beside the kernel (see fast.linears). cpp.vec_isa_ok: the vector instructions PyTorch
    detects (AVX-512, AVX2) are taken as usable, where inductor would build and load a probe for each in a child
    Python, 0.6-1.4 s of every cold start (a 7B's 4 + 4 cut, load then a first token: 5.0-5.2 s, 4.1 without); a
    compiler that cannot target them fails the compile, which falls back below. No duck sizing: dynamo would give
    equal sizes one symbol and guard on it (the decode attention of 1 x 32 heads compiled again for 5 beams x 32,
    0.3-0.9 s); read at tracing, the switch is set around each call (with the recompile limit: 10-15 us a call), or
    once around a whole decode step (`settings`)."""
    if _compile_failed or not _compiler_found():
        return None
    norm_options = {}
    if normed:
        norm_options = _GROUPED_NORMED_OPTIONS if grouped else _BLOCK_OPTIONS if block else _NORMED_OPTIONS
    options = {"cpp.vec_isa_ok": True, "cpp.simdlen": _vector_width(), **norm_options}
    kernel = torch.compile(function, dynamic=True, options=options)

    def run(*args):
        if _settled:  # inside a decode step: the switches are set
            return kernel(*args)
        with settings():
            return kernel(*args)

    return run


@functools.cache
def _vector_width() -> int:
    """The vector width, in bits, inductor builds its C++ kernels for here: ATEN_CPU_CAPABILITY's where it is set
    (avx2: 256), else the widest the CPU has (AVX-512: 512).

    `_compiled` passes it as cpp.simdlen, which picks the same instructions inductor would pick, and puts the width in
    the key of inductor's on-disk cache, which (PyTorch 2.13) has no other trace of it: a kernel cached by a process
    at one width is handed to a process at another. Measured, Intel Xeon, one cache folder, quantize_weight of a
    1024 x 1024 weight: cached at 512 bits, then run with ATEN_CPU_CAPABILITY=avx2, 84 % of the int8 weights wrong
    and scales off by up to 126x, silently; cached at 256, then run at 512: "free(): invalid size", the process killed.
    """
    from torch._inductor import config, cpu_vec_isa

    with config.patch({"cpp.vec_isa_ok": True}):  # no probe builds (see `_compiled`)
        return cpu_vec_isa.pick_vec_isa().bit_width()  # 0 where it has no vector instructions: scalar code


_NO_DUCK_SIZING = torch.fx.experimental._config.patch(use_duck_shape=False)  # reused: entering a new one costs 21 us
# Past dynamo's 8 compilations of one function, it runs that function op by op instead, silently: _rows_times_matrix
# compiles once for each count of rows (2-8; again for widths cut in chunks after one that is not), and op by op it
# is ~50x slower (5 bf16 rows x 11008 x 4096: 989 ms against 19, seen past the limit).
_RECOMPILE_LIMIT = torch._dynamo.config.patch(recompile_limit=64)
_settled = 0  # > 0 inside `settings`: the switches are set already
_switches = {}  # the environment's switches read inside `settings`, forgotten when it ends (`override`)


@contextlib.contextmanager
def settings():
    """Set the two switches above once around many compiled calls (a decode step: generate.decode_step), rather
    than around each: a tiny kernel's call 37 -> 25 us (AMD). A decode step makes ~5 compiled calls a layer (LLaMA),
    ~7 (T5's decoder): make bench's bf16 greedy token, old and new code alternating in fresh processes, best of 5,
    11.6-14.1 -> 11.2-12.2 ms."""
    global _settled
    with _NO_DUCK_SIZING, _RECOMPILE_LIMIT:
        _settled += 1
        try:
            yield
        finally:
            _settled -= 1
            if not _settled:
                _switches.clear()


def _compile_failure(error: Exception) -> None:
    """A compiler inductor cannot use: say so once, then stay on the plain paths."""
    global _compile_failed
    _plain_instead(f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
    _compile_failed = True
    _compiled.cache_clear()


# ----------------------------------------------------------------------------- compiling where it pays

# Compiling costs seconds in every process, even with each kernel in inductor's disk cache: ~1.4 s at the first
# kernel (dynamo and inductor starting), then 0.1-0.9 s for each kernel and each shape it specialises. Most kernels
# here have a fast plain route beside them (F.linear, int8pack_mm, the attention's matrix products), which they beat
# by some microseconds for each MB they read (their callers' `saves`), so a short job never earns its compiling back.
# So those kernels are rented, as packing.py rents packed weights: their plain routes run until what the compiled
# kernels would have saved adds up to COMPILE_SECONDS (what compiling costs), then everything compiles at its next
# call; a decode whose first step shows that its steps to come will pay compiles at once (`first_of`). The kernel with
# no plain route to rent (quantizing at load) buys nothing: when it did (dynamo's start paid), a load that quantized
# full vicuna-7b compiled the prompt's last-row kernel in its first token (1.2 s of compiling for a ~1 ms product).
# Fresh processes alternating, first token then a 5-beam answer: 7B 12.7-13.0 -> 11.7-12.6 s, 35-37 s either way;
# flan-t5-xl 13.9-14.0 -> 8.0-8.1 s, 15.0-15.5 -> 14.1-14.5 s. Full-size flan-t5-xl, AMD EPYC, fresh processes from
# their start, two rounds, compiled at first use / rented: an answer as `ask` gives it (5 beams, 30 tokens) 18.8-21.3
# / 16.4-17.2 s, a first token 12.6-14.2 / 10.7-11.4 s (more in the README, "How minivb computes on a CPU").
# MINIVB_COMPILE=1 compiles at first use, 0 never.
COMPILE_SECONDS = 2.0
# A decoder block compiled whole (decode_blocks.py) costs more, cold (inductor's disk cache empty), AMD EPYC, with a
# greedy answer's first 3 tokens: flan-t5-xl int8 16.2 s against 34.5 for its kernels one by one, bf16 12.1 / 28.2;
# vicuna-7b's widths int8 7.9 / 23.7, bf16 6.6 / 14.7 (that is, ~5-15 s more). For ~0.4 ms saved a block a step, a
# process compiles blocks once it has decoded ~37 000 blocks (flan-t5-xl: ~1500 tokens, an evaluation's first 50
# answers), or at a decode's first step where that decode alone will (`first_of`).
BLOCK_COMPILE_SECONDS = 15.0


class Rent:
    """What a kind of compiled code would have saved so far in this process (`paid`), against what compiling it
    costs: compiled from the call where `paid` reaches `cost` (`bought`) on."""

    def __init__(self, name: str):
        self.name = name  # the module constant its cost is read from: COMPILE_SECONDS, BLOCK_COMPILE_SECONDS
        self.paid = 0.0
        self.bought = False

    @property
    def cost(self) -> float:
        return globals()[self.name]  # read at each call: tests and benchmarks set the constant

    def renting(self, saves: float) -> bool:
        """Whether code that would save `saves` seconds in this call takes its plain route (the rent above)."""
        if not self.bought:
            self.paid += saves
            self.bought = self.paid >= self.cost
        return not self.bought


KERNELS = Rent("COMPILE_SECONDS")  # fast.py's, quant.py's and decode_attention.py's rented kernels
BLOCKS = Rent("BLOCK_COMPILE_SECONDS")  # decode_blocks.py's whole blocks
RENTS = (KERNELS, BLOCKS)


def first_of(steps: int, run, *args):
    """run(*args), the first of `steps` alike (a decode's steps: generate.decode_step). Where what its rented code
    would have saved, as much again at each step to come, covers compiling it, compile from the next call on rather
    than rent until then."""
    before = [rent.paid for rent in RENTS]
    out = run(*args)
    for rent, paid in zip(RENTS, before):
        if rent.paid + (rent.paid - paid) * (steps - 1) >= rent.cost:
            rent.bought = True
    return out


def buy() -> None:
    """Compile from the next call on, as the rents do once they have paid (and a benchmark measuring the steady
    state)."""
    for rent in RENTS:
        rent.bought = True


def compiles() -> bool:
    """Whether the rented kernels compile at their next call (bought, or MINIVB_COMPILE=1) where a compiler works: a
    layer makes a copy of its weight for a compiled kernel only then (packing.SplitWeight)."""
    forced = override("MINIVB_COMPILE")
    return (KERNELS.bought if forced is None else forced) and not _compile_failed and _compiler_found()


def bytes_of(tensors) -> int:
    """The bytes `tensors` hold: what a product or an attention reads, which its `saves` are counted by."""
    return sum(t.numel() * t.element_size() for t in tensors)


def compiled_or_plain(function, *args, plain=None, normed: bool = False, grouped: bool = False, block: bool = False,
                      saves: float | None = None, rent: Rent = KERNELS):
    """`function(*args)` through its compiled kernel; where there is none or compiling fails, `plain(*args)`: by
    default `function` itself, run op by op. normed: a kernel that starts with a pre-norm (_NORMED_OPTIONS); grouped:
    one that sums in groups (_GROUPED_NORMED_OPTIONS); block: a decoder block compiled whole (_BLOCK_OPTIONS).
    saves: the seconds the kernel would save in this call over `plain`, a fast route of its own: `plain` until they
    have paid for compiling (`rent`: KERNELS, or BLOCKS for whole blocks)."""
    forced = override("MINIVB_COMPILE")
    if forced is False or (forced is None and saves is not None and rent.renting(saves)):
        return (plain or function)(*args)
    kernel = _compiled(function, normed, grouped, block)
    if kernel is not None:
        try:
            out = kernel(*args)
            rent.bought = rent.bought or saves is not None  # a rented kernel compiled: all do from now on (above)
            return out
        except Exception as error:
            _compile_failure(error)
    return (plain or function)(*args)
