"""What the notebooks share: setup, picture helpers and measuring harnesses, so that each cell shows one idea.

Nothing here is part of the model: these functions draw, load, measure or compare. Each notebook imports what it
needs (`from helpers import ...`); the notebooks run with notebooks/ as the working directory, so this file is
found there, and it puts the checkout's root on sys.path so that `import minivb` reads this checkout.

Sections: setup | attention pictures (02, 03) | the prompt layout (04) | beam search (05) | loading and memory
(06) | parity with transformers (07) | bandwidth (09) | frames and seeking (01) | training and evaluation (08, 10).
"""

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: notebooks/ sits in it
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import minivb  # noqa: E402

DPI = 100  # every figure: at least 100 dpi and 600 px wide (the notebooks' test checks the committed PNGs)

# ----------------------------------------------------------------------------- setup


def setup(seed: int = 0) -> None:
    """Seed, print options and figure style shared by every notebook."""
    torch.manual_seed(seed)
    torch.set_printoptions(precision=4, sci_mode=False)
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:  # outside Jupyter: nothing to configure
        pass
    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 10})


def toy_checkpoint() -> tuple[Path, bool]:
    """weights/toy-vicuna (trained on the clips of minivb/toy.py, so attention and answers mean something), or the
    random weights/vicuna-tiny when it is absent: every cell then runs the same way but draws noise.
    Returns (path, trained)."""
    path = ROOT / "weights" / "toy-vicuna"
    if (path / "config.json").is_file():
        return path, True
    print(f"{path.relative_to(ROOT)} is not here: using the random weights/vicuna-tiny instead")
    return ROOT / "weights" / "vicuna-tiny", False


# ----------------------------------------------------------------------------- attention pictures (02, 03)


def moving_pixels(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of a toy frame that differ from its background (the corner pixel)."""
    return np.abs(frame.astype(int) - frame[0, 0].astype(int)).sum(-1) > 60


def shape_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of the toy shape in `frame` (H, W, 3)."""
    ys, xs = np.nonzero(moving_pixels(frame))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def shape_patches(frame: np.ndarray, grid: int) -> torch.Tensor:
    """(grid * grid,) bool: the patches the toy shape covers at least a quarter of, row by row."""
    moving = moving_pixels(frame)
    cell = frame.shape[0] // grid
    cover = moving[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).mean(axis=(1, 3))
    return torch.from_numpy(cover.reshape(-1) >= 0.25)


def draw_map(ax, attention, size: int, box, title: str, vmin: float = 0.0, vmax: float | None = None):
    """A (grid, grid) attention map stretched over a size x size frame, the shape's box in cyan.
    Returns the image, for a colour bar; pass one vmin / vmax to maps that are compared."""
    image = ax.imshow(attention, cmap="magma", extent=(0, size, size, 0), interpolation="nearest",
                      vmin=vmin, vmax=vmax)
    x0, y0, x1, y1 = box
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="tab:cyan", lw=1.5))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return image


def show_frame(ax, frame: np.ndarray, title: str) -> None:
    ax.imshow(frame)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=8)


# ----------------------------------------------------------------------------- the prompt layout (04)

FRAME_COLORS = plt.cm.Set2(np.arange(8))


def layout_segments(ids, mask, placeholder: int, per_frame: int) -> list[tuple[str, int, int]]:
    """One row of input_ids as segments (kind, start, length) in order: kind is "frame i" for a frame's visual
    tokens, "pad" for padding (attention_mask 0) and "text" for a token the model reads."""
    segments, position, frame = [], 0, 0
    while position < len(ids):
        if int(ids[position]) == placeholder:
            segments.append((f"frame {frame}", position, per_frame))
            frame, position = frame + 1, position + per_frame
        else:
            segments.append(("pad" if int(mask[position]) == 0 else "text", position, 1))
            position += 1
    return segments


def draw_layout(ax, ids, mask, tokenizer, placeholder: int, per_frame: int, y: float, times=None) -> float:
    """One row of a batch as boxes: a wide box per frame's visual tokens (its positions, and its time in the clip
    when `times` is given), a box per text token, padding in grey. Returns the width drawn."""
    x = 0.0
    for kind, start, length in layout_segments(ids, mask, placeholder, per_frame):
        if kind.startswith("frame"):
            frame = int(kind.split()[1])
            when = f", t={times[frame]:.1f}s" if times is not None else ""
            ax.add_patch(plt.Rectangle((x, y), 2.6, 0.8, color=FRAME_COLORS[frame % 8]))
            ax.text(x + 1.3, y + 0.4, f"{kind}{when}\npositions {start}-{start + length - 1}", ha="center",
                    va="center", fontsize=7)
            x += 2.7
            continue
        token = tokenizer.id_to_token(int(ids[start])).replace("\u2581", "_")
        ax.add_patch(plt.Rectangle((x, y), 0.9, 0.8, color="0.85" if kind == "pad" else "#9ecae1"))
        ax.text(x + 0.45, y + 0.4, token, ha="center", va="center", fontsize=7, rotation=90)
        x += 1.0
    return x


# ----------------------------------------------------------------------------- beam search (05)


def best_path(trace, best) -> set[tuple[int, int]]:
    """(step, beam) of every running beam the best hypothesis extended, back from where it finished."""
    path, beam = set(), best.parent
    for step in range(best.step - 1, -1, -1):
        path.add((step, beam))
        beam = trace.parents[step][0, beam].item()
    return path


def draw_beam_tree(ax, trace, token_text, num_beams: int) -> None:
    """The running beams of `trace` (row 0) as a tree: token and summed log-probability per node, the finished
    hypotheses below, the path of the best in blue."""
    hypotheses = trace.hypotheses[0]
    on_best_path = best_path(trace, hypotheses[0])
    steps_run = len(trace.tokens)
    for step in range(steps_run):
        for k in range(num_beams):
            token, score = trace.tokens[step][0, k].item(), trace.beam_scores[step][0, k].item()
            if score < -1e8:  # at the last step every candidate ends: no beam runs on
                continue
            parent = trace.parents[step][0, k].item() if step > 0 else 0
            highlight = (step, k) in on_best_path
            color = "tab:blue" if highlight else "0.6"
            ax.plot([step - 1, step], [parent, k], color=color, lw=2.2 if highlight else 0.8, zorder=1)
            ax.text(step, k, f"{token_text(token)}\n{score:.2f}", ha="center", va="center", fontsize=7,
                    bbox=dict(boxstyle="round", fc="white", ec=color), zorder=2)
    for rank, h in enumerate(hypotheses):
        y = num_beams + 0.4 + 0.6 * rank
        color = "tab:red" if rank == 0 else "tab:orange"
        ax.plot([h.step - 1, h.step], [h.parent, y], color=color, lw=1.5, ls="--", zorder=1)
        ax.text(h.step, y, f"{token_text(h.tokens[-1])}  {h.score:.3f}", ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc="mistyrose", ec=color), zorder=2)
    ax.text(-1, 0, "prompt", ha="center", va="center", fontsize=8, bbox=dict(boxstyle="round", fc="lightyellow"))
    ax.set_xlim(-1.6, steps_run - 0.4), ax.set_ylim(num_beams + 0.4 + 0.6 * len(hypotheses), -0.7)
    ax.set_xticks(range(steps_run)), ax.set_xlabel("step")
    ax.set_yticks(range(num_beams), [f"beam {k}" for k in range(num_beams)])


def crossing(costs_a, costs_b) -> int | None:
    """The first index where the order of two curves changes (a below b, then above, or the reverse), or None."""
    below = np.asarray(costs_a) < np.asarray(costs_b)
    changes = np.nonzero(below[1:] != below[:-1])[0]
    return int(changes[0]) + 1 if len(changes) else None


# ----------------------------------------------------------------------------- loading and memory (06)


def write_shards(tensors: dict, folder: Path, count: int, config_from: Path) -> list[str]:
    """Write `tensors` ({official key: tensor}) as `count` shards of about equal bytes and their index, in the
    layout of the Hub (model-0000i-of-0000n.safetensors + model.safetensors.index.json). Returns the file names."""
    import shutil

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_from / "config.json", folder / "config.json")
    keys = sorted(tensors)
    total = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
    shards, current, size = [], [], 0
    for key in keys:  # fill each shard up to 1/count of the bytes
        current.append(key)
        size += tensors[key].numel() * tensors[key].element_size()
        if size >= total / count or key == keys[-1]:
            shards.append(current)
            current, size = [], 0
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: tensors[key] for key in shard}, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sorted(p.name for p in folder.iterdir())


# Run in a fresh Python process: the peak of RssAnon (memory the process allocated: it must be kept) and of
# RssFile (file pages mapped: page cache, which the OS drops when it needs the memory) while one load runs,
# above what the process held before it.
_MEASURE = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch, minivb
from minivb.model import InstructBlipVideo

def resident_mib():
    values = {}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            values[name] = int(value.split()[0]) / 1024
    return values["RssAnon"], values["RssFile"]

path, how, pickle_path = sys.argv[2], sys.argv[3], sys.argv[4]
config = minivb.load_config(path)
with torch.device("meta"):  # warm-up: PyTorch's one-off costs of building a model, before the baseline
    InstructBlipVideo(config)
peak, loading = [0.0, 0.0], [True]
def watch():
    while loading[0]:
        peak[:] = [max(p, now) for p, now in zip(peak, resident_mib())]
        time.sleep(0.0005)

baseline = resident_mib()
watcher = threading.Thread(target=watch)
watcher.start()
if how == "pickle":
    state = torch.load(pickle_path)
    model = InstructBlipVideo(config)
    model.load_state_dict({minivb.map_key(key): value for key, value in state.items()})
else:
    model = minivb.load_model(path, dtype=getattr(torch, how), check_memory=False)
loading[0] = False
watcher.join()
peak[:] = [max(p, now) for p, now in zip(peak, resident_mib())]
print(peak[0] - baseline[0], peak[1] - baseline[1])
"""


def peak_load_memory(path: Path, how: str, pickle_path: Path | None = None) -> tuple[float, float]:
    """Peak (allocated, file pages mapped) in MiB while loading `path` in a fresh process, above its baseline.
    how: "pickle" (torch.load of `pickle_path`, build, load_state_dict), "float32" or "bfloat16" (load_model)."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT), str(path), how, str(pickle_path)],
                            capture_output=True, text=True, check=True)
    anonymous, mapped = result.stdout.split()[-2:]
    return float(anonymous), float(mapped)


def table_line(official_name: str) -> int | None:
    """The index of the line of minivb.KEY_TABLE that maps `official_name` (the loader's own compiled table)."""
    from minivb.checkpoint import _COMPILED  # the patterns exactly as the loader matches them

    return next((number for number, (regex, _) in enumerate(_COMPILED) if regex.match(official_name)), None)


def table_part(official_pattern: str) -> str:
    """Which part of the model a line of the key table belongs to, from its official name."""
    if official_pattern.startswith("vision_model"):
        return "vision"
    if official_pattern.startswith(("qformer", "query_tokens")):
        return "Q-Former"
    if official_pattern.startswith("language_projection"):
        return "projection"
    if official_pattern.startswith("language_model.lm_head"):
        return "lm_head (both)"
    if official_pattern.startswith("language_model.model"):
        return "Vicuna"
    return "Flan-T5"


# ----------------------------------------------------------------------------- parity with transformers (07)


def load_both(name: str, dtype: torch.dtype):
    """weights/<name> loaded by minivb and by transformers (the reference), and minivb's processor."""
    import transformers

    path = ROOT / "weights" / name
    ours = minivb.load_model(path, dtype=dtype)
    reference = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    return ours, reference, minivb.load_processor(path)


def stages(ours, reference) -> list[tuple[str, torch.nn.Module, torch.nn.Module, str]]:
    """(label, minivb module, transformers module, "input" or "output") for every stage, in pipeline order."""
    pairs = [("vit embed", ours.vision.blocks[0], reference.vision_model.encoder.layers[0], "input")]
    pairs += [(f"vit {i}", block, reference.vision_model.encoder.layers[i], "output")
              for i, block in enumerate(ours.vision.blocks)]
    pairs += [("vit norm", ours.vision.post_norm, reference.vision_model.post_layernorm, "output"),
              ("qf embed", ours.qformer.embed_norm, reference.qformer.embeddings, "output")]
    pairs += [(f"qf {i}", layer, reference.qformer.encoder.layer[i], "output")
              for i, layer in enumerate(ours.qformer.layers)]
    pairs += [("project", ours.projection, reference.language_projection, "output")]
    lm, ref_lm = ours.language_model, reference.language_model
    if ours.config.is_encoder_decoder:
        for stack in ("encoder", "decoder"):
            ours_stack, ref_stack = getattr(lm, stack), getattr(ref_lm, stack)
            short = stack[:3]
            pairs += [(f"{short} embed", ours_stack.blocks[0], ref_stack.block[0], "input")]
            pairs += [(f"{short} {i}", b, ref_stack.block[i], "output") for i, b in enumerate(ours_stack.blocks)]
            pairs += [(f"{short} norm", ours_stack.final_norm, ref_stack.final_layer_norm, "output")]
    else:
        pairs += [("lm embed", lm.layers[0], ref_lm.model.layers[0], "input")]
        pairs += [(f"lm {i}", layer, ref_lm.model.layers[i], "output") for i, layer in enumerate(lm.layers)]
        pairs += [("lm norm", lm.norm, ref_lm.model.norm, "output")]
    return pairs


def run_and_catch(model, modules: dict, batch: dict):
    """Run model(**batch) with a forward hook on each of `modules` ({label: (module, "input" | "output")});
    return the logits and what each hook caught (its first call: transformers calls post_layernorm twice)."""
    caught, hooks = {}, []
    for label, (module, where) in modules.items():
        def hook(module, args, output, label=label, where=where):
            value = args if where == "input" else output
            while isinstance(value, (tuple, list)):
                value = value[0]
            caught.setdefault(label, value.detach().float())
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(**batch).logits.float()
    for hook in hooks:
        hook.remove()
    return logits, caught


def compare(name: str, dtype: torch.dtype, clip, questions, plant=None) -> dict[str, float]:
    """Largest |minivb - transformers| at every stage and at the logits, padding left out (nothing reads it).
    plant(minivb_model), if given, plants a bug in minivb's copy first."""
    ours, reference, processor = load_both(name, dtype)
    if plant is not None:
        plant(ours)
    batch = processor(text=questions, videos=[clip] * len(questions))
    if ours.config.is_encoder_decoder:
        answer = processor.tokenizer.encode("a clock is ticking").ids
        batch["decoder_input_ids"] = torch.tensor([[ours.config.text.decoder_start_token_id] + answer] * len(questions))
    pairs = stages(ours, reference)
    our_logits, our_caught = run_and_catch(ours, {label: (m, where) for label, m, _, where in pairs}, batch)
    ref_logits, ref_caught = run_and_catch(reference, {label: (m, where) for label, _, m, where in pairs}, batch)
    text_mask = batch["attention_mask"].bool()  # the language model's (or T5 encoder's) real positions
    differences = {}
    for label, *_ in pairs:
        a, b = our_caught[label], ref_caught[label]
        assert a.shape == b.shape, (label, a.shape, b.shape)
        if label.startswith(("lm", "enc")):
            a, b = a[text_mask], b[text_mask]
        differences[label] = (a - b).abs().max().item()
    real = ... if ours.config.is_encoder_decoder else text_mask  # T5's logits are the decoder's: no padding
    differences["logits"] = (our_logits - ref_logits)[real].abs().max().item()
    return differences


# ----------------------------------------------------------------------------- bandwidth (09)


def read_rate(gigabytes: float = 0.5, repeats: int = 5) -> float:
    """This machine's memory read rate in GB/s: the best of `repeats` sums of a `gigabytes` fp32 tensor (a sum
    reads every byte once and computes almost nothing). Larger than the caches, so it streams from memory."""
    data = torch.ones(int(gigabytes * 1e9 / 4))
    data.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def decode_bytes(model) -> int:
    """Bytes of the weights one decoded token reads (minivb.memory.decode_bytes of the model's language model)."""
    from minivb.memory import decode_bytes as language_model_bytes

    return language_model_bytes(model.language_model)


# Run in a fresh process, so that environment variables read at start-up (oneDNN's ISA limit) take effect.
_GFLOPS = """
import sys, time, torch
rows, inner, outer = (int(v) for v in sys.argv[1:4])
x, w = torch.randn(rows, inner), torch.randn(outer, inner) * 0.02
for dtype in (torch.bfloat16, torch.float32):
    a, b = x.to(dtype), w.to(dtype)
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - start)
    print(2 * rows * inner * outer / best / 1e9)
"""


def matmul_gflops(rows: int = 64, inner: int = 4096, outer: int = 11008, env: dict | None = None) -> dict:
    """GFLOP/s of a (rows, inner) x (inner, outer) product in bf16 and in fp32 (best of 3 each), in a fresh
    process with `env` added to the environment. Returns {torch.bfloat16: ..., torch.float32: ...}."""
    import os

    result = subprocess.run([sys.executable, "-c", _GFLOPS, str(rows), str(inner), str(outer)], capture_output=True,
                            text=True, check=True, env={**os.environ, **(env or {})})
    bf16, fp32 = (float(v) for v in result.stdout.split())
    return {torch.bfloat16: bf16, torch.float32: fp32}


def best_time(function, repeats: int = 5) -> float:
    """The best of `repeats` wall-clock times of function(), in seconds (after one untimed warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------- frames and seeking (01)


def write_clip(path: Path, seconds: int, rate: int = 30, keyframe_every_s: int = 2, size=(160, 90)) -> Path:
    """Encode an H.264 mp4 of a ball bouncing across a gradient, with a keyframe every `keyframe_every_s` seconds
    (as a phone records) and no other: scene-cut detection is off, so the keyframes are exactly where asked."""
    import av
    from fractions import Fraction

    width, height = size
    every = keyframe_every_s * rate
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "x264-params": f"keyint={every}:min-keyint={every}:scenecut=0"}
        for index in range(seconds * rate):
            left = abs((index * 3) % (2 * (width - 20)) - (width - 20))  # bounces between the two sides
            frame = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
            frame[(x - left - 10) ** 2 + (y - height // 2) ** 2 < 100] = 255
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = index, Fraction(1, rate)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class DecodingLog:
    """What `read_video` asked of PyAV while `record_decoding()` was on: for each container it opened, the seeks
    and the frames decoded, as frame indices (a frame's time in seconds x rate)."""

    def __init__(self):
        self.containers = []  # one dict per av.open: {"seeks": [...], "decoded": [...]}

    @property
    def decoder(self) -> dict:
        """The container that decoded frames (read_video opens a second one only to ask where seeks land)."""
        return next(c for c in self.containers if c["decoded"])


@contextlib.contextmanager
def record_decoding(rate: int):
    """Within the `with`, every av.open gives a container that logs its seeks and decoded frames."""
    import av

    log, real_open = DecodingLog(), av.open

    class Recording:
        def __init__(self, container):
            self._container, self.entry = container, {"seeks": [], "decoded": []}
            log.containers.append(self.entry)

        def __getattr__(self, name):
            return getattr(self._container, name)

        def __enter__(self):
            return self

        def __exit__(self, *error):
            return self._container.__exit__(*error)

        def seek(self, offset, stream, **options):
            self.entry["seeks"].append(round(float(offset * stream.time_base) * rate))
            return self._container.seek(offset, stream=stream, **options)

        def decode(self, *streams, **kind):
            for frame in self._container.decode(*streams, **kind):
                self.entry["decoded"].append(round(frame.time * rate))
                yield frame

    av.open = lambda *args, **kwargs: Recording(real_open(*args, **kwargs))
    try:
        yield log
    finally:
        av.open = real_open


def draw_stream(ax, total: int, keyframes: list[int], wanted: list[int], decoded: list[int], seeks: list[int],
                title: str, legend: bool = False) -> None:
    """One row: the stream as a line of frames, keyframes as black bars, the decoded frames in blue, the sampled
    frames as red triangles, and each seek as a green jump from the last frame decoded to the keyframe it lands on
    (the keyframe at or before the seek's target)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.broken_barh([(0, total)], (0, 1), color="0.9")
    ax.broken_barh([(index, 1) for index in decoded], (0, 1), color="tab:blue")
    ax.vlines(keyframes, -0.15, 1.15, color="black", lw=1.5)
    ax.scatter([index + 0.5 for index in wanted], [1.45] * len(wanted), marker="v", color="tab:red", s=40, zorder=3)
    for target in seeks:
        landing = max(k for k in keyframes if k <= target)
        source = max([index for index in decoded if index < landing], default=0)
        ax.annotate("", xy=(landing, 1.15), xytext=(source + 1, 1.15), arrowprops={
            "arrowstyle": "->", "color": "tab:green", "lw": 1.5, "connectionstyle": "arc3,rad=-0.35"})
    ax.set_xlim(-2, total + 2), ax.set_ylim(-0.4, 2.4), ax.set_yticks([])
    ax.set_title(title, fontsize=9, loc="left")
    if legend:
        ax.legend(handles=[Line2D([], [], color="black", lw=1.5, label="keyframe"),
                           Patch(color="tab:blue", label="decoded"), Patch(color="0.9", label="not decoded"),
                           Line2D([], [], marker="v", color="tab:red", ls="", label="sampled"),
                           Line2D([], [], color="tab:green", label="seek")],
                  ncol=5, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1.12), frameon=False)


# ----------------------------------------------------------------------------- training and evaluation (08, 10)

TOKEN_COLORS = {"visual": "0.72", "prompt": "#9ecae1", "answer": "#74c476", "pad": "white"}  # a token's role


def token_roles(ids, labels, mask, placeholder: int) -> list[str]:
    """The role of each position of one training row: 'visual' (a placeholder), 'pad' (mask 0), 'answer' (a
    scored label) or 'prompt' (everything else: the bos and the question)."""
    roles = []
    for token, label, keep in zip(ids.tolist(), labels.tolist(), mask.tolist()):
        roles.append("visual" if token == placeholder else "pad" if not keep else
                     "answer" if label != -100 else "prompt")
    return roles


def draw_token_row(ax, texts: list[str], roles: list[str], labels: list[int], y: float, title: str) -> None:
    """One row of a batch as coloured boxes, the token's text inside and its label (-100 or the id) below."""
    for x, (text, role, label) in enumerate(zip(texts, roles, labels)):
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.8, facecolor=TOKEN_COLORS[role], edgecolor="0.4", lw=0.6))
        ax.text(x + 0.47, y + 0.4, text, ha="center", va="center", fontsize=6.5, rotation=90)
        ax.text(x + 0.47, y - 0.12, str(label), ha="center", va="top", fontsize=5.5, rotation=90,
                color="black" if label != -100 else "0.55")
    ax.text(-0.3, y + 0.4, title, ha="right", va="center", fontsize=8)


def draw_steps_table(ax, forms: list[str], names: list[str], table: list[list[str]]) -> None:
    """A text table, one row per answer form and one column per normalisation step; a cell that the step changed is
    shaded orange, so that the picture shows which step does what."""
    for row, steps in enumerate(table):
        for column, text in enumerate(steps):
            changed = column > 0 and text != steps[column - 1]
            ax.add_patch(plt.Rectangle((column, -row), 1, -1, facecolor="#fdd0a2" if changed else "white",
                                       edgecolor="0.8", lw=0.5))
            ax.text(column + 0.5, -row - 0.5, repr(text), ha="center", va="center", fontsize=7.5)
    for column, name in enumerate(names):
        ax.text(column + 0.5, 0.15, name, ha="center", va="bottom", fontsize=8, weight="bold")
    ax.set_xlim(0, len(names)), ax.set_ylim(-len(forms), 0.9)
    ax.axis("off")


def draw_confusion(ax, matrix: np.ndarray, truths: list[str], predictions: list[str], vmax: float, title: str):
    """A confusion matrix (truth down, prediction across) with its counts written in; returns the image, for one
    colour bar shared by several matrices."""
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            ax.text(column, row, int(count), ha="center", va="center", fontsize=7,
                    color="white" if count > vmax / 2 else "black")
    ax.set_xticks(range(len(predictions)), predictions, rotation=60, fontsize=7)
    ax.set_yticks(range(len(truths)), truths, fontsize=7)
    ax.set_xlabel("prediction (normalised)"), ax.set_ylabel("truth (normalised)")
    ax.set_title(title, fontsize=9)
    return image
