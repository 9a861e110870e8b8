"""`make bench-full`: minivb against transformers at real size, each figure beside the floor the machine allows.

The checkpoints are the official layouts at full size with random weights (minivb.fullsize), written once to
$TMPDIR/minivb-fullsize/<model> and reused while complete. Each run is a separate process, so its memory is its own;
runs alternate (transformers, minivb, minivb int8 quantized as it loads, minivb int8 from the checkpoint
`python -m minivb quantize` wrote once beside it, again) and each figure is the best of --repeat runs.

    load           seconds to a model ready to generate, its files in the page cache (read once before each run,
                   where they fit), and the peak anonymous memory meanwhile (RssAnon from
                   /proc/self/status every 20 ms: the process's own pages, not the page cache the checkpoint is
                   read through or mapped from), beside the bf16 weights; and from cold, load then the first
                   token, which reads the mapped weights
    answer         generate(max_new_tokens=30, num_beams=5), all 30 made, the first generate after the cold first
                   token: one answer of `python -m minivb ask` at its defaults, with whatever it does once (minivb
                   rents its compiled kernels until they pay: compiling.py); from here minivb's compile at first use
    first token    generate(max_new_tokens=1) on one video of 4 frames: vision, Q-Former, prefill. Its floor: the
                   FLOPs of that call (counted by torch.utils.flop_counter on a last, untimed call) over the best
                   matrix-product rate this machine reaches, bf16 or fp32, measured in the same process
    decode         seconds per new token, greedy and 5 beams: the median time between consecutive steps of one
                   generate call of 1 + K tokens (EOS forbidden, so every run decodes them all). Its floor: the
                   language model's bytes one step reads (every weight but the embedding table) over the memory
                   read rate measured right before (a 1 GB sum). Then the first beam step of the process, and the
                   median of the last K steps of a beam search of 1 + 192 + K tokens: minivb packs its weights
                   for beams once they have made 32 few-row products (packing.PACK_AFTER), 192 where its
                   hand-written kernels multiply them before (PACK_AFTER_NATIVE), where memory allows
    logits         cosine of the first token's logits to transformers bf16 (int8: also to minivb bf16)

vicuna-13b and flan-t5-xxl do not fit a 24 GB machine in bf16: minivb runs them in int8, after asking for bf16 to
show the refusal. transformers is run on the models that fit in bf16: vicuna-7b and flan-t5-xl (not in the
default list: `--models flan-t5-xl`).

    python tests/bench_full.py [--models vicuna-7b,vicuna-13b,flan-t5-xxl,flan-t5-xl] [--layers V L] [--repeat 2]
                               [--tokens 8]
                               [--delete]
"""

import argparse
import contextlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VIDEO = ROOT / "tests" / "data" / "clock_cc0_1bpp.gif"
QUESTION = "What is happening in the video?"
NUM_FRAMES = 4
GB = 1e9
PACK_AFTER = 192  # the most of minivb.packing's PACK_AFTER and PACK_AFTER_NATIVE (a transformers worker: no minivb)
ASK_TOKENS = 30  # minivb.__main__.ASK_MAX_NEW_TOKENS, `python -m minivb ask`'s default (with 5 beams)
FIT_IN_BF16 = ("vicuna-7b", "flan-t5-xl")  # on a 24 GB machine; vicuna-13b and flan-t5-xxl run in int8 only


# ----------------------------------------------------------------------------- measuring, inside each run


class Memory:
    """Peaks of the process's resident memory, sampled by a thread every 20 ms (torch releases the GIL in its
    kernels): `anon`, RssAnon, its own pages; `mapped`, RssAnon + RssFile, adding the pages of files it maps.

    The second matters because both libraries map the safetensors files (copy-on-write) and use the mapped pages as
    weights where the file stores the dtype asked for (minivb bf16: all of them; int8: all but the quantized
    linears): they count as file pages, read from the page cache or the disk when first touched, not as anonymous
    memory, and loading reads none of them.
    """

    def __init__(self, interval=0.02):
        self.anon = self.mapped = 0
        self.interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> tuple[int, int]:
        values = {}
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    values[line.split(":")[0]] = int(line.split()[1]) * 1024
        return values["RssAnon"], values["RssAnon"] + values["RssFile"]

    def _sample(self):
        while True:
            anon, mapped = self.now()
            self.anon, self.mapped = max(self.anon, anon), max(self.mapped, mapped)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def sparse(self, interval=1.0):
        """Sample once a second while timing: a thread waking every 20 ms (presumably preempting one of the two
        compute threads, which each parallel kernel then waits for) made the full-size 7B's decode steps ~20 % slower
        (minivb bf16, one process: 400-510 ms a step without the sampler, 550-630 ms with it). The memory a
        generate call adds (its KV cache) lives for the whole call, so one sample a second still sees it."""
        previous, self.interval = self.interval, interval
        try:
            yield
        finally:
            self.interval = previous

    def reset(self) -> None:
        self.anon, self.mapped = self.now()


def best_seconds(run, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rates(rows, width, inner):
    """The best FLOP/s of a matrix product, in bf16 and in fp32: rows x width times a weight stored as a linear
    layer's (inner x width), as both libraries multiply it (`x @ weight.T`), with the prompt's rows and with 1024
    (about a video's 4 frames of 257 patches, as the vision tower multiplies them): fp32 on a Zen 3 EPYC reached
    70-77 GFLOP/s with 150 rows at 7B widths and 110-113 with 1024, and its first token ran at ~113.
    The other layout, (width x inner) row-major, is no measure of the machine: there bf16 takes a path of 0.2-0.3
    GFLOP/s (this one 16-20), and measuring it took 400 s a run at 7B widths."""
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        for m in (rows, 1024):
            x, weight = torch.randn(m, width, dtype=dtype), torch.randn(inner, width, dtype=dtype)
            x @ weight.T
            rate = 2 * m * width * inner / best_seconds(lambda: x @ weight.T, repeats=3)
            rates[str(dtype)] = max(rates.get(str(dtype), 0), rate)
    return rates


def read_rate(nbytes=10**9):
    """Bytes/s the machine streams from memory: the sum of a tensor far larger than the caches."""
    big = torch.ones(nbytes // 4)
    big.sum()
    return nbytes / best_seconds(big.sum, repeats=5)


def step_seconds(model, run, new_tokens) -> list[float]:
    """The times between consecutive next-token logits in one generate call: its decode steps, prefill excluded.
    The steps are seen by a hook on lm_head, which both libraries call once a step."""
    stamps = []
    handle = model.language_model.lm_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        run()
    finally:
        handle.remove()
    if len(stamps) != new_tokens:
        raise RuntimeError(f"lm_head ran {len(stamps)} times for {new_tokens} new tokens: no per-step times")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def decode_bytes(model) -> int:
    """Bytes of the language model one decode step reads: every weight but the embedding table (one row of it is
    read) and, for T5, the encoder (it ran once, in the first token). Works for minivb and for transformers."""
    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        skip = "embed_tokens" in name or name.endswith("shared.weight") or ".encoder." in name
        if not name.startswith("language_model.") or skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def count_minivb_products() -> None:
    """Teach torch's FLOP counter the ops minivb multiplies with beside F.linear: its packed weights (packing.py:
    after the first beam search, a prompt's products use them too), x (..., in) times a weight (out, in), 2 * rows *
    out * in; and int8 weights' integer products (quant.integer_linear, a prompt computed in fp32; and their packed
    copies, packing.int8_products, which a prompt reads where they replaced the int8 weights), whose two int8 halves
    of each row count as the one row they stand for: (2R, in) @ (in, out) is 2 * R * in * out."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    formulas = {torch.ops.mkldnn._linear_pointwise: lambda x, w, *a, out_shape=None, **k: 2 * math.prod(x) * w[0],
                torch.ops.aten._int_mm: lambda a, b, *args, out_shape=None, **kwargs: a[0] * a[1] * b[1],
                # qlinear_pointwise(x, x_scale, x_zero_point, packed (in, out), ...): the halves, as _int_mm's
                torch.ops.onednn.qlinear_pointwise:
                    lambda x, x_scale, x_zero_point, w, *a, out_shape=None, **k: math.prod(x) * w[1]}
    for op, formula in formulas.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)


def begin_steady_state(model) -> None:
    """minivb's layers drop their packed copies and count their few-row products from zero (packing.py); its kernels
    that were rented until they paid for compiling compile from now on (compiling.py): the figures after it are
    those of a process that made no answer yet but compiled, as any process does that decodes for long."""
    from minivb import compiling

    compiling.buy()
    for module in model.modules():
        if getattr(module, "packed", None) is not None:
            module.packed = type(module.packed)(module.packed.replaces)


def worker(args) -> None:
    """One run: load, first token, decode; the figures go to args.result (JSON) and args.result + '.pt' (logits)."""
    from torch.utils.flop_counter import FlopCounterMode

    memory = Memory()
    result = {"impl": args.impl, "quantize": args.quantize, "baseline_anon": Memory.now()[0]}
    batch = torch.load(args.batch)
    memory.reset()
    start = time.perf_counter()
    if args.impl == "transformers":
        import transformers

        model = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(args.path, dtype=torch.bfloat16)
        model.eval()

        def generate(new_tokens, beams=1, **extra):
            return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams,
                                  do_sample=False, **extra)

        def first_logits():
            out = generate(1, output_logits=True, return_dict_in_generate=True)
            return out.logits[0][0]
    else:
        import minivb

        options = {"quantize": args.quantize} if args.quantize else {}
        try:
            model = minivb.load_model(args.path, dtype=torch.bfloat16, **options)
        except ValueError as e:  # the memory check refuses before allocating
            result.update(refused=str(e), load_s=time.perf_counter() - start)
            Path(args.result).write_text(json.dumps(result))
            return

        def generate(new_tokens, beams=1):
            return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)

        def first_logits():
            _, trace = model.generate(**batch, max_new_tokens=1, return_trace=True)
            return trace.scores[0][0]  # greedy with no rule set: the raw logits, in fp32
    result["load_s"] = time.perf_counter() - start
    result["load_peak_anon"], result["load_peak_mapped"] = memory.anon, memory.mapped
    # FlopCounterMode's module tracker asserts on inputs that require grad but have no grad function, which is what
    # a view of a parameter taken under no_grad is (minivb's query_tokens.expand): inference needs no grad anyway.
    model.requires_grad_(False)
    result["decode_bytes"] = decode_bytes(model)
    text = json.loads((Path(args.path) / "config.json").read_text())["text_config"]
    width, inner = text.get("hidden_size") or text["d_model"], text.get("intermediate_size") or text["d_ff"]
    rows = batch["input_ids"].shape[1]
    result["matmul_rates"] = matmul_rates(rows, width, inner)

    with torch.no_grad():
        start = time.perf_counter()
        logits = first_logits()  # from cold: the warm-up of everything lazy (minivb: the rented kernels)
        result["cold_first_token_s"] = time.perf_counter() - start
        torch.save(logits.float(), args.result + ".pt")
        K = args.tokens
        with memory.sparse():
            # An answer as `ask` gives it at its defaults (5 beams, up to ASK_TOKENS new tokens; here all made), the
            # first of its process: what one answer costs, with whatever it does once (minivb: packing, were the
            # search long enough; renting its kernels). Then minivb's layers count their products anew and its
            # kernels compile (begin_steady_state): the figures below are those of a process that made no answer yet
            # and decodes for long.
            start = time.perf_counter()
            generate(ASK_TOKENS, beams=5)
            result["answer_s"] = time.perf_counter() - start
            begin_steady_state(model)
            result["first_token_s"] = best_seconds(lambda: generate(1), repeats=2)
            result["read_rate_greedy"] = read_rate()
            result["greedy_s"] = median(step_seconds(model, lambda: generate(1 + K), 1 + K))
            result["read_rate_beam"] = read_rate()
            beams = step_seconds(model, lambda: generate(1 + K, beams=5), 1 + K)
            result["beam_s"], result["first_beam_s"] = median(beams), beams[0]
            # A long beam search: minivb's weights pack once they have made PACK_AFTER few-row products (the K
            # beam steps above count), where memory allows (packing.py); its last K steps.
            long = 1 + PACK_AFTER + K
            result["long_beam_s"] = median(step_seconds(model, lambda: generate(long, beams=5), long)[-K:])
        # Counted last: after FlopCounterMode has run, minivb's compiled kernel runs ~10x slower in this process.
        count_minivb_products()
        counter = FlopCounterMode(display=False)
        with counter:
            generate(1)
        result["first_token_flops"] = counter.get_total_flops()
    result["peak_anon"], result["peak_mapped"] = memory.anon, memory.mapped
    result["loadavg"] = os.getloadavg()
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the driver


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    bf16 = "yes" if {"avx512_bf16", "amx_bf16"} & set(flags) else "no"
    import transformers

    limits = [f"{name}={os.environ[name]}" for name in EMULATION if name in os.environ]  # README: AVX2 emulated
    return (f"{model}, {os.cpu_count()} cores, native bf16 (avx512_bf16/amx_bf16): {bf16}, "
            f"{total / 2**30:.1f} GiB memory; torch {torch.__version__}, transformers {transformers.__version__}"
            + (f"; limited by {' '.join(limits)}" if limits else ""))


# What emulates a CPU without native bf16 on one with it (README, "A machine without native bf16, emulated")
EMULATION = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MINIVB_NATIVE_BF16")


def checkpoint(name, layers, folder: Path) -> Path:
    """The checkpoint folder, written unless a complete one (its index present, the same config) is there."""
    from minivb import fullsize, memory
    from minivb.model import build_on_meta
    from minivb.config import config_from_dict

    path = folder / (name + (f"-{layers[0]}-{layers[1]}" if layers else ""))
    config = fullsize.official_config(name, layers)
    index = path / "model.safetensors.index.json"
    if index.is_file() and json.loads((path / "config.json").read_text()) == config:
        print(f"reusing {path}")
        return path
    need = memory.weight_bytes(build_on_meta(config_from_dict(config), torch.bfloat16))
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need * 1.1 + GB:
        raise SystemExit(f"{name} needs {need / GB:.1f} GB of disk in {folder}; {free / GB:.1f} GB is free")
    print(f"writing {path} ({need / GB:.1f} GB)")
    start = time.perf_counter()
    fullsize.build(name, path, layers, progress=lambda line: print("  " + line))
    print(f"  written in {time.perf_counter() - start:.0f} s")
    return path


def quantized_checkpoint(path: Path) -> tuple[Path, float | None]:
    """The int8 checkpoint of `path` (`python -m minivb quantize`), written beside it unless one is there already;
    with the seconds the writing took (None when reused)."""
    from minivb.quant import save_quantized

    out = path.parent / (path.name + "-int8")
    source = json.loads((path / "config.json").read_text())
    if (out / "config.json").is_file():
        written = json.loads((out / "config.json").read_text())
        if written.pop("quantization_config", None) and written == source:
            print(f"reusing {out}")
            return out, None
    start = time.perf_counter()
    save_quantized(path, out)
    seconds = time.perf_counter() - start
    print(f"  quantized into {out} in {seconds:.1f} s")
    return out, seconds


def warm(path: Path) -> None:
    """Read the checkpoint's files once, so that the run starts with them in the page cache, as on a machine that has
    used this checkpoint before. Without it, each run starts with what the one before left there: after the bf16
    runs, the int8 checkpoint's 7 GB were gone, and its mapped load read them from disk (5.5 s, not ~1.5).
    Skipped where the files cannot all stay cached (vicuna-13b's 28 GB)."""
    from minivb.memory import available_bytes

    files = sorted(path.glob("*.safetensors"))
    if sum(f.stat().st_size for f in files) > 0.8 * available_bytes(torch.device("cpu")):
        return
    buffer = bytearray(64 * 2**20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def run(path, impl, quantize, batch_file, tokens, workdir) -> dict:
    warm(Path(path))
    result = os.path.join(workdir, f"{impl}-{quantize or 'bf16'}-{time.monotonic_ns()}.json")
    command = [sys.executable, __file__, "--worker", impl, "--path", str(path), "--batch", batch_file,
               "--tokens", str(tokens), "--result", result] + (["--quantize", quantize] if quantize else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.isfile(result):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "quantize": quantize, "failed": f"exit {done.returncode}: " + " | ".join(tail)}
    values = json.loads(Path(result).read_text())
    if os.path.isfile(result + ".pt"):
        values["logits"] = torch.load(result + ".pt")
    return values


def best(runs: list[dict]) -> dict:
    """The best of the repeats, figure by figure (times and memory: the least)."""
    ok = [r for r in runs if "failed" not in r and "refused" not in r]
    if not ok:
        return runs[-1]
    merged = dict(ok[0])
    for key in ("load_s", "load_peak_anon", "load_peak_mapped", "cold_first_token_s", "answer_s", "first_token_s",
                "greedy_s", "beam_s", "first_beam_s", "long_beam_s", "peak_anon", "peak_mapped"):
        merged[key] = min(r[key] for r in ok)
    merged["read_rates"] = [r[key] for r in ok for key in ("read_rate_greedy", "read_rate_beam")]
    merged["matmul_rate"] = max(max(r["matmul_rates"].values()) for r in ok)
    merged["loadavg"] = [round(max(r["loadavg"][0] for r in ok), 2)]
    return merged


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def table(title, columns: dict[str, dict], weights_bf16: int) -> str:
    """The markdown table. Every column is held to the same floors: the best matrix-product rate measured in any
    run of the table (another helper's load on a shared machine only ever lowers it) and the median of the memory
    read rates measured before each decode (one 1 GB sum now and then reads at an implausible 50+ GB/s where
    the machine streams 33-35)."""
    names = list(columns)
    measured = [r for r in columns.values() if "matmul_rate" in r]
    reads = sorted(rate for r in measured for rate in r["read_rates"])
    for r in measured:
        r["matmul_rate"] = max(m["matmul_rate"] for m in measured)
        r["read_rate_greedy"] = r["read_rate_beam"] = reads[len(reads) // 2]
    lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label, cell):
        cells = []
        for name in names:
            r = columns[name]
            if "failed" in r:
                cells.append("failed: " + r["failed"][-120:])
            elif "refused" in r:
                cells.append(f"refused up front in {r['load_s']:.1f} s" if label == "load" else "—")
            else:
                cells.append(cell(r))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("load", lambda r: f"{r['load_s']:.1f} s")
    row("peak anonymous memory, load", lambda r: f"{r['load_peak_anon'] / GB:.2f} GB "
                                                  f"({r['load_peak_anon'] / weights_bf16:.2f}× the bf16 weights)")
    row("peak resident memory with mapped files, load", lambda r: f"{r['load_peak_mapped'] / GB:.2f} GB")
    row("load, then a first token from cold", lambda r: f"{r['load_s'] + r['cold_first_token_s']:.1f} s")
    row(f"an answer as `ask` gives it: 5 beams, {ASK_TOKENS} new tokens", lambda r: f"{r['answer_s']:.1f} s")
    row("first token (4 frames)", lambda r: f"{r['first_token_s']:.2f} s = "
        f"{100 * r['first_token_flops'] / r['matmul_rate'] / r['first_token_s']:.0f} % of the "
        f"{r['first_token_flops'] / r['matmul_rate']:.2f} s floor ({r['first_token_flops'] / 1e12:.2f} TFLOP "
        f"at {r['matmul_rate'] / 1e9:.0f} GFLOP/s)")
    for label, key, rate in (("decode, greedy", "greedy_s", "read_rate_greedy"),
                             ("decode, 5 beams", "beam_s", "read_rate_beam"),
                             ("decode, 5 beams, late in a long search", "long_beam_s", "read_rate_beam")):
        row(label, lambda r, key=key, rate=rate: f"{1000 * r[key]:.0f} ms/token = "
            f"{100 * r['decode_bytes'] / r[rate] / r[key]:.0f} % of the {1000 * r['decode_bytes'] / r[rate]:.0f} ms "
            f"floor ({r['decode_bytes'] / GB:.2f} GB at {r[rate] / GB:.1f} GB/s)")
    row("decode, the first 5-beam step of the process", lambda r: f"{1000 * r['first_beam_s']:.0f} ms")
    row("peak anonymous memory, whole run", lambda r: f"{r['peak_anon'] / GB:.2f} GB "
                                                       f"({r['peak_mapped'] / GB:.2f} GB with mapped files)")
    reference = columns.get("transformers bf16", {}).get("logits")
    bf16 = columns.get("minivb bf16", {}).get("logits")
    def agreement(r):
        parts = [f"std {float(r['logits'].std()):.2f}, finite: {bool(r['logits'].isfinite().all())}"]
        if reference is not None:
            parts.append(f"cosine {cosine(r['logits'], reference):.4f} to transformers bf16")
        if bf16 is not None and r.get("quantize"):
            parts.append(f"cosine {cosine(r['logits'], bf16):.4f} to minivb bf16")
        return "; ".join(parts)

    row("last-token logits", agreement)
    row("load average", lambda r: f"{r['loadavg'][0]:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vicuna-7b,vicuna-13b,flan-t5-xxl")
    parser.add_argument("--layers", type=int, nargs=2, metavar=("V", "L"), help="cut depths for a quick run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternating; the best is kept")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens decoded for the per-token figures")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "minivb-fullsize"))
    parser.add_argument("--delete", action="store_true", help="delete each checkpoint after its runs")
    parser.add_argument("--runs", default="transformers bf16,minivb bf16,minivb int8,minivb int8 file",
                        help="which runs of the models that fit in bf16 (the larger ones run minivb only); "
                             "int8: quantized as it loads; int8 file: from the checkpoint `minivb quantize` wrote")
    parser.add_argument("--worker", choices=["minivb", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.worker
        return worker(args)

    import minivb
    from minivb.config import load_config
    from minivb.memory import weight_bytes
    from minivb.model import build_on_meta

    from minivb import packing
    from minivb.__main__ import ASK_MAX_NEW_TOKENS

    if max(packing.PACK_AFTER, packing.PACK_AFTER_NATIVE) != PACK_AFTER:
        raise SystemExit(f"PACK_AFTER here is {PACK_AFTER}; the most of minivb.packing's PACK_AFTER and "
                         f"PACK_AFTER_NATIVE is {max(packing.PACK_AFTER, packing.PACK_AFTER_NATIVE)}: make them agree")
    if ASK_MAX_NEW_TOKENS != ASK_TOKENS:
        raise SystemExit(f"ASK_TOKENS here is {ASK_TOKENS}; ask's default is {ASK_MAX_NEW_TOKENS}: make them agree")
    print(machine())
    has_int8 = "quantize" in inspect.signature(minivb.load_model).parameters
    if not has_int8:
        print("minivb.load_model has no quantize= yet: int8 runs skipped")
    for name in args.models.split(","):
        path = checkpoint(name, args.layers, Path(args.folder))
        weights = weight_bytes(build_on_meta(load_config(path), torch.bfloat16))
        with tempfile.TemporaryDirectory(prefix="minivb-bench-full-") as workdir:
            batch_file = os.path.join(workdir, "batch.pt")
            torch.save(minivb.load_processor(path)([QUESTION], videos=[VIDEO], num_frames=NUM_FRAMES), batch_file)
            columns = {}
            # (label, implementation, checkpoint, quantize)
            int8_runs = [("minivb int8", "minivb", path, "int8")] * has_int8
            if has_int8 and "minivb int8 file" in args.runs.split(","):
                quantized, seconds = quantized_checkpoint(path)
                int8_runs.append(("minivb int8 file", "minivb", quantized, "int8"))
                if seconds is not None:
                    print(f"  python -m minivb quantize: {seconds:.1f} s", flush=True)
            if name in FIT_IN_BF16:
                plan = [("transformers bf16", "transformers", path, None), ("minivb bf16", "minivb", path, None),
                        *int8_runs]
                plan = [entry for entry in plan if entry[0] in args.runs.split(",")]
            else:  # transformers cannot hold them in 24 GB; minivb is asked for bf16 once, to show the refusal
                plan = int8_runs
                columns["minivb bf16"] = best([run(path, "minivb", None, batch_file, args.tokens, workdir)])
                print(f"  minivb bf16: {_summary(columns['minivb bf16'])}", flush=True)
            runs = {}
            for _ in range(args.repeat):
                for label, impl, checkpoint_path, quantize in plan:
                    runs.setdefault(label, []).append(
                        run(checkpoint_path, impl, quantize, batch_file, args.tokens, workdir))
                    print(f"  {label}: {_summary(runs[label][-1])}", flush=True)
            columns.update({label: best(r) for label, r in runs.items()})
            raw = Path(args.folder) / f"results-{path.name}.json"  # every run's figures, to recompute the table
            raw.write_text(json.dumps({label: [{k: v for k, v in r.items() if k != "logits"} for r in rs]
                                       for label, rs in runs.items()}, indent=1))
            depth = f" ({args.layers[0]} + {args.layers[1]} layers, all widths)" if args.layers else " (full size)"
            print(f"\n{table(name + depth, columns, weights)}\n\nbf16 weights {weights / GB:.2f} GB; best of "
                  f"{args.repeat} runs each, alternating; {args.tokens} new tokens per decode figure.\n", flush=True)
        if args.delete:
            shutil.rmtree(path)
            shutil.rmtree(path.parent / (path.name + "-int8"), ignore_errors=True)


def _summary(r: dict) -> str:
    if "failed" in r or "refused" in r:
        return r.get("failed") or "refused: " + r["refused"]
    return (f"load {r['load_s']:.1f} s, peak {r['load_peak_anon'] / GB:.2f} GB, first token {r['first_token_s']:.2f} s"
            f", greedy {1000 * r['greedy_s']:.0f} ms, beams {1000 * r['beam_s']:.0f} ms (read rates "
            f"{r['read_rate_greedy'] / GB:.1f}, {r['read_rate_beam'] / GB:.1f} GB/s; matmul "
            f"{max(r['matmul_rates'].values()) / 1e9:.0f} GFLOP/s), load avg {r['loadavg'][0]:.2f}")


if __name__ == "__main__":
    main()
