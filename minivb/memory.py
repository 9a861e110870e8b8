"""How much memory a model will need, known before anything is allocated; a refusal instead of the OS's kill.

A 7B checkpoint is 15.8 GB in bf16 and 31.6 GB in fp32; vicuna-13b is 28.4 GB in bf16. On a 24 GB machine the last
two do not fit, and a process that asks for more than the machine has is killed by the OS's out-of-memory killer
with no message at all, minutes into loading. So `load_model` first adds up what the model will need:

    weights      every parameter and buffer of the model built on the meta device (no memory yet), in the dtype
                 and the quantization asked for: exact, not a guess from the file sizes. Loading adds nothing: a
                 tensor stored in the dtype asked for stays the file's pages, mapped; any other is cast as it is
                 copied in (checkpoint.py). Mapped weights are page cache, counted here all the same: the model
                 reads every page of them at each token, so they must stay in memory as much as allocated ones;
    activations  one generation of the default workload (WORKLOAD): the vision encoder on all its frames, the
                 language model's prompt, and the KV cache of every beam;
    packed       where the model is allowed to pack its language model's weights for beam steps (packing.py), a
                 second copy of them. It is never part of a refusal: `room_to_pack` allows it only where it fits;
                 nor are the column-split copies of the widest weights for one row (packing.SplitWeight, a 7B's
                 down projections): `room_to_split`;

and compares the sum with what the OS says is available (`MemAvailable` in /proc/meminfo: free memory plus the
page cache it can drop, which includes the checkpoint's own pages: they count once, as the weights). If it does
not fit, NotEnoughMemory says how much is needed, how much is available, and which dtype or quantization would fit.
`load_model(..., check_memory=False)` skips the check for users who know better (e.g. with swap);
`load_model(..., dtype="auto")` (the CLI's default) takes the fastest that fits (`choose`).

A fine-tune (finetune.py) needs more than an answer: `training_estimate` adds the gradients and AdamW moments of
the trained bridge and the activations autograd keeps for the backward pass, for the examples a process runs at once.

Letters in comments: F frames through the vision encoder (B*T), N patches + class token, C vision width,
R rows of the language model (B * beams), L prompt length, D language-model width.
"""

import os
from dataclasses import dataclass

import torch

GB = 1e9
# What the allocator holds beside the tensors counted: a phase of many large tensors (the ViT's blocks over the
# frames; a training step) peaks 5-25 % above them, varying between identical runs (glibc reusing freed memory or
# not: the medium model of tests/test_memory.py at 32 frames, 906-1120 MB; a cut full-width 7B's training step).
SLACK = 1.25


@dataclass
class Workload:
    """What one call of generate asks of memory: the default is the CLI's `ask` (one video, 4 frames, 5 beams).

    `load_model(..., workload=Workload(num_frames=48))` checks for that instead: the activations grow with the frames
    (a 7B's KV caches for 5 beams: 0.2 GB at 4 frames, 0.9 GB at 48), and the CLI passes what it was asked for."""

    batch_size: int = 1
    num_frames: int = 4
    num_beams: int = 5
    prompt_tokens: int = 64  # the question and the prompt around it, besides the visual tokens
    max_new_tokens: int = 30


WORKLOAD = Workload()


@dataclass
class Estimate:
    weights: int  # bytes
    activations: int
    packed: int = 0  # the copies of weights packed for beam steps (packing.py), where load_model allowed them
    optimizer: int = 0  # training: the gradients and AdamW's two moments of the trained weights (fp32)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.packed + self.optimizer


class NotEnoughMemory(ValueError):
    """The model would need more memory than the machine has available."""


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, as they will be allocated (works on a meta-device model)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_bytes(language_model: torch.nn.Module) -> int:
    """Bytes of the weights one decoded token reads: every weight of the language model (T5: its decoder and lm_head;
    the encoder ran once, over the prompt) but the input embedding table, of which a step looks up one row. Over
    the memory read rate, the floor of a decode step. Works on a meta-device model, quantized or not."""
    from .t5 import T5

    lm = language_model
    parts = [lm.decoder, lm.lm_head] if isinstance(lm, T5) else [lm.layers, lm.norm, lm.lm_head]
    return sum(weight_bytes(part) for part in parts)


def vision_bytes(config, element_size: int, num_frames: int) -> int:
    """The vision encoder's largest working set over `num_frames` frames (F), computing in `element_size` bytes."""
    v, F = config.vision, num_frames
    N = v.tokens
    # A ViT block holds its input, the normed input, q/k/v and the MLP's hidden layer twice (fc1 out, GELU out);
    # scaled_dot_product_attention's CPU kernel works in blocks and never holds the (N, N) scores whole.
    vision = F * N * (2 * v.hidden_size + 3 * v.hidden_size + 2 * v.intermediate_size) * element_size
    return vision + F * N * v.hidden_size * element_size  # the frame features, kept for the Q-Former


def activation_bytes(config, element_size: int, workload: Workload = WORKLOAD) -> int:
    """The largest working set of one generation: the vision side, or the language model with its KV cache.

    Only the big tensors are counted, each as the layer that holds most of them at once; small ones (norms,
    the Q-Former's 32 queries) are left out.
    """
    e, w = element_size, workload
    vision = int(vision_bytes(config, e, w.batch_size * w.num_frames) * SLACK)
    t = config.text
    R = w.batch_size * w.num_beams
    L = w.num_frames * config.num_query_tokens + w.prompt_tokens
    if config.is_encoder_decoder:
        D, I, H, Dh = t.d_model, t.d_ff, t.num_heads, t.d_kv
        # Decoder caches: self-attention over each beam's new tokens, cross-attention over the whole prompt once per
        # example (its beams share it: t5.T5Attention.attend).
        cache = t.num_decoder_layers * 2 * H * (R * w.max_new_tokens + w.batch_size * L) * Dh * e
        encoder = w.batch_size * L * (4 * D + 3 * I) * e + w.batch_size * H * L * L * 4  # scores in fp32
        language = cache + w.batch_size * L * D * e + encoder
    else:
        D, I, B, new = t.hidden_size, t.intermediate_size, w.batch_size, w.max_new_tokens
        token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * e  # a token's keys and values
        # Prefill runs each prompt once (generate.prefill), holding the residual stream and the normed copy, q/k/v,
        # and the MLP's gate, up and their product; its beams share its keys and values (KVCache.share_prompt)
        # and keep their own for the tokens they generate.
        prefill = B * L * (5 * D + 3 * I) * e
        if w.num_beams == 1:
            language = B * (L + new) * token + prefill
        else:
            language = B * L * token + max(prefill, R * new * token)
    logits = R * t.vocab_size * 4 * 2  # the last position's logits in fp32, and their log-softmax
    return max(vision, language) + logits


# bf16 decoding on a CPU compiles its attention (fast.py): inductor, what it imports and its kernels hold ~60-150 MB
# (measured, 5-beam generate, peak above the baseline: weights/vicuna-tiny 28 MB plain, 88 MB compiled; the medium
# models of tests/test_memory.py 90-150 MB more than their activations, varying from run to run).
COMPILE_BYTES = 120 * 10**6


def packable_bytes(model: torch.nn.Module, allowed_only: bool = False) -> int:
    """Bytes the packed copies of `model`'s fast.Linear weights would take (packing.py; of those allowed to pack beside
    their weight, with `allowed_only`: a copy that replaces it takes no room of its own). Works on a meta model."""
    from .fast import FUSED_MIN_WEIGHTS, Linear
    from .packing import can_pack
    from .quant import Int8Linear, int8_packing_pays

    def packs(weight: torch.Tensor) -> bool:
        return can_pack(weight.dtype) or weight.dtype == torch.int8 and int8_packing_pays()

    weights = [m.weight for m in model.modules() if isinstance(m, (Linear, Int8Linear))
               and (m.packed is not None and not m.packed.replaces or not allowed_only)]
    return sum(w.numel() * w.element_size() for w in weights if w.numel() >= FUSED_MIN_WEIGHTS and packs(w))


def estimate(model: torch.nn.Module, workload: Workload = WORKLOAD, device="cpu") -> Estimate:
    """What `model` (on the meta device, already in its dtype and quantization, its layers allowed to pack or not)
    will need once loaded on `device`."""
    from .fast import compute_dtype

    # Activations run in the compute dtype: fp32 for bf16 weights on a CPU without native bf16 (fast.py).
    dtype = model.projection.weight.dtype
    activations = activation_bytes(model.config, compute_dtype(dtype, "prefill", device).itemsize, workload)
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        activations += COMPILE_BYTES
    return Estimate(weight_bytes(model), activations, packable_bytes(model, allowed_only=True))


# ----------------------------------------------------------------------------- training (finetune.py)


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights that train (requires_grad: the bridge, after train.train_bridge_in_float32), in fp32."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


# A training example's text: the prompt around the question, the question and the answer (MSRVTT-QA's, with eval's
# prompt: about 20-25 Vicuna tokens; the Q-Former reads the same without the answer).
TRAINING_TEXT_TOKENS = 32


def training_activation_bytes(config, element_size: int, vision_element_size: int, batch_size: int,
                              num_frames: int, text_tokens: int = TRAINING_TEXT_TOKENS) -> int:
    """The largest working set of one training step of the InstructBLIP recipe, `batch_size` examples of
    `num_frames` frames each, the frozen language model computing in `element_size` bytes, the vision encoder in
    `vision_element_size`.

    What autograd keeps for the backward pass: the vision encoder nothing (frozen, its input needs no gradient: it
    runs as in generation, its peak counted as there); the Q-Former, trained in fp32, every layer's inputs; the
    frozen language model, which gradients cross to reach the projection, what each operation needs to pass them
    back: not its inputs to the products (only a trained weight needs those) but its norms' fp32 inputs, attention's
    queries, keys, values and output, and the MLP's gate, up and their product. The backward pass adds the
    gradients of one layer's activations at a time.
    """
    e, B, T = element_size, batch_size, num_frames
    vision = vision_bytes(config, vision_element_size, B * T)
    v, q = config.vision, config.qformer
    P, Q = v.tokens, config.num_query_tokens
    S = Q + text_tokens  # the Q-Former reads its queries and the instruction (fewer tokens: its own tokenizer)
    crosses = len(range(0, q.num_hidden_layers, q.cross_attention_frequency))
    # A Q-Former layer keeps, per token: its input, q, k, v, attention's output and its copy for the output
    # product, the sum before each LayerNorm (x2), the MLP's input, hidden layer and GELU; a cross-attention layer
    # its keys and values over the frame's P features, and five tensors of the queries; the frame features once.
    qformer = B * T * 4 * (q.num_hidden_layers * S * (9 * q.hidden_size + 2 * q.intermediate_size)
                           + crosses * (2 * P * q.hidden_size + 5 * Q * q.hidden_size) + P * v.hidden_size)
    t, L = config.text, T * Q + text_tokens
    if config.is_encoder_decoder:
        D, I, H = t.d_model, t.d_ff, t.num_heads
        inner = H * t.d_kv
        # Encoder over the prompt: two norms' fp32 inputs, q, k, v, attention out, the (H, L, L) scores attention
        # with a position bias keeps, the gated MLP's three; the decoder over the short answer, plus the keys and
        # values of cross-attention over the whole prompt in each layer.
        layer = L * (8 * D + e * (4 * inner + 3 * I)) + e * H * L * L
        language = t.num_layers * layer + t.num_decoder_layers * 2 * L * inner * e
        largest = e * L * (3 * I + 4 * D) + e * H * L * L
    else:
        D, I = t.hidden_size, t.intermediate_size
        layer = L * (8 * D + e * (4 * D + 3 * I))
        language = t.num_hidden_layers * layer
        largest = e * L * (3 * I + 4 * D)  # the backward pass's gradients, one layer at a time
    logits = B * text_tokens * t.vocab_size * (e + 4 + 4)  # scored positions' logits, in fp32, and their gradient
    return max(vision, qformer + B * (language + largest) + logits)


def training_estimate(model: torch.nn.Module, batch_size: int, num_frames: int, device="cpu") -> Estimate:
    """What one process of a fine-tune (finetune.py) will need: `model` on the meta device as finetune trains it
    (train.train_bridge_in_float32: the frozen towers in their dtype, the bridge in fp32 and requiring gradients),
    running `batch_size` examples at once (its micro-batch), with the bridge's fp32 gradients and AdamW moments."""
    from .fast import compute_dtype

    dtype = model.language_model.lm_head.weight.dtype
    vision = compute_dtype(dtype, "vision", device).itemsize  # no gradient crosses it: as in generation
    language = compute_dtype(dtype, "prefill", device).itemsize  # fp32 without native bf16 (converting.FrozenLinear)
    activations = training_activation_bytes(model.config, language, vision, batch_size, num_frames)
    # What autograd keeps is counted exactly (its saved tensors, summed over a step: as above to a few percent); the
    # peak lies above it by the gradients of the backward pass and the allocator's SLACK.
    activations = int(activations * SLACK)
    # The gradients and AdamW's two moments stay; the one temporary of their size its step makes (the square root
    # of the second moment) comes once backward has freed the activations.
    trained = trainable_bytes(model)
    return Estimate(weight_bytes(model), max(activations, trained), optimizer=3 * trained)


def processes_sharing(device) -> int:
    """How many processes of one torchrun job draw on this memory: on a CPU, the job's processes on this machine
    (LOCAL_WORLD_SIZE, which torchrun sets), all of which see the one MemAvailable; on a GPU 1, since each process
    checks its own device."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if torch.device(device).type != "cpu" or not value.isdigit():
        return 1
    return max(1, int(value))


def for_processes(need: Estimate, processes: int, shared: int = 0) -> Estimate:
    """What `processes` processes that each need `need` take of one machine together: `processes` times everything,
    except `shared` bytes of weights that every process maps from the same checkpoint files (one page cache, counted
    once)."""
    return Estimate(shared + processes * (need.weights - shared), processes * need.activations,
                    processes * need.packed, processes * need.optimizer)


def available_bytes(device: torch.device) -> int:
    """Memory the OS can give this process now: MemAvailable on Linux, free memory on a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # macOS and other Unix systems
    except (ValueError, OSError, AttributeError):
        return -1  # unknown: the check is skipped


def room_to_pack(model: torch.nn.Module, device="cpu", mapped: bool = False,
                 workload: Workload = WORKLOAD) -> str | None:
    """Whether and how `model` (on the meta device, in its dtype and quantization) may pack its weights for beam
    steps (packing.py), whose copies are memory of their own on top of everything `estimate` counts:

    "beside"   the copies fit beside the plain weights, which one row may still read (on AMD it takes the fused
               kernel): flan-t5-xl (8.4 + 5.6 GB), a 7B in int8 (on AMD: 9.5 + 6.6 GB), a 7B's cut to 4 + 4
               layers and the smaller models on 24 GB;
    "instead"  they fit only in the plain weights' place (a 7B in bf16 on 24 GB: 16.6 + 13.2 GB; vicuna-13b's int8
               checkpoint: 15.9 + 12.9), where those are the checkpoint's own pages (`mapped`: every tensor stored as
               the model holds it) and one row can read the copy (bf16, where it packs, and int8, which packs where
               quant.int8_packing_pays; an fp32 row stays on MKL's F.linear). Once a weight is packed, every product
               reads the copy and the weight's pages go back to the OS (packing.PackedWeight.replaces).
               Full-size vicuna-7b in bf16, AMD EPYC, 24 GB: 5-beam steps 757-828 ms, 361-425 once packed (before,
               its greedy steps read the plain weights, so it never packed); the file's resident pages 15.3 -> 2.4 GB.
               vicuna-13b's int8 checkpoint: 1613-1854 -> 752-952 ms (its greedy steps 607-685 -> 698-779);
    None       otherwise (GPUs, weights that never pack, no room). MINIVB_PACK=0 (None) or 1 ("beside")
               overrides the choice."""
    from .compiling import override
    from .packing import can_pack

    forced = override("MINIVB_PACK")
    if forced is not None:
        return "beside" if forced else None
    packed = packable_bytes(model)
    if packed == 0 or torch.device(device).type != "cpu":
        return None
    available, need = available_bytes(torch.device(device)), estimate(model, workload, device).total
    if available >= 0 and need + packed <= available:
        return "beside"
    dtype = model.projection.weight.dtype
    if mapped and dtype == torch.bfloat16 and can_pack(dtype) and 0 <= need <= available:
        return "instead"
    return None


def split_bytes(model: torch.nn.Module) -> int:
    """Bytes the column-split copies of `model`'s wide fast.Linear weights would take (packing.SplitWeight; a 7B's
    down projections). Works on a meta model."""
    from .packing import wide_layers

    return sum(layer.weight.numel() * layer.weight.element_size() for layer in wide_layers(model))


def room_to_split(model: torch.nn.Module, device="cpu", workload: Workload = WORKLOAD) -> bool:
    """Whether `model` (on the meta device, after packing.allow_packing) may keep column-split copies of its wide
    weights for one row (packing.SplitWeight): where one row takes the compiled kernels (fast.compiled_rows_pay) and the
    copies fit beside everything else (`estimate`, and the packed copies allowed beside their weights). A full-size
    7B in bf16 on 24 GB: 16.6 + 2.9 GB. MINIVB_SPLIT=0 or 1 overrides the choice."""
    from .compiling import override
    from .fast import compiled_rows_pay

    forced = override("MINIVB_SPLIT")
    if forced is not None:
        return forced
    split = split_bytes(model)
    if split == 0 or torch.device(device).type != "cpu" or not compiled_rows_pay():
        return False
    available = available_bytes(torch.device(device))
    need = estimate(model, workload, device).total + packable_bytes(model, allowed_only=True) + split
    return 0 <= need <= available


# What dtype="auto" loads, fastest first: bf16 (half the bytes of fp32 to read per decoded token), then bf16 with
# the language model in int8 where bf16 does not fit (vicuna-13b, flan-t5-xxl on 24 GB).
AUTO = ((torch.bfloat16, None), (torch.bfloat16, "int8"))


def auto_options(config) -> list[tuple[torch.dtype, str | None]]:
    """What dtype="auto" tries, fastest first: AUTO, less bf16 alone for a checkpoint already in int8."""
    return [option for option in AUTO if config.quantization in (None, option[1])]


def choose(config, dtype, quantize: str | None, device: torch.device, path: str,
           workload: Workload = WORKLOAD) -> tuple[torch.dtype, str | None]:
    """The dtype and quantization to load `config` in: the asked ones if they fit in the memory available now, the
    first of AUTO that fits for dtype="auto" (with `quantize` given, bf16 with it); else NotEnoughMemory.

    Each option is estimated once and MemAvailable read once, so the choice and the refusal see the same numbers.
    """
    from .model import build_on_meta

    auto = auto_options(config)
    if dtype == "auto":
        asked = [(torch.bfloat16, quantize)] if quantize else auto
    else:
        asked = [(dtype, quantize)]
    options = dict.fromkeys([*asked, *auto])  # the asked ones first, then the alternatives a refusal can name
    estimates = {option: estimate(build_on_meta(config, *option), workload, device) for option in options}
    available = available_bytes(device)
    for option in asked:
        if fits(estimates[option], available):
            return option
    dtype, quantize = asked[-1]  # for auto, the refusal speaks of the smallest of its options
    alternatives = {_option_text(*option): estimates[option] for option in options if option not in asked}
    raise refusal(estimates[asked[-1]], available, path, dtype, quantize, device, alternatives, workload)


def fits(need: Estimate, available: int) -> bool:
    return available < 0 or need.total <= available  # available < 0: unknown, the check is skipped


def workload_text(w: Workload) -> str:
    examples = f"{w.batch_size} examples of " if w.batch_size > 1 else ""
    return f"{examples}{w.num_frames} frame{'s' * (w.num_frames > 1)} with {w.num_beams} beam{'s' * (w.num_beams > 1)}"


def _option_text(dtype, quantize) -> str:
    return f"dtype={dtype}" + (f", quantize={quantize!r}" if quantize else "")


def refusal(need: Estimate, available: int, path: str, dtype: torch.dtype, quantize: str | None,
            device: torch.device, alternatives: dict[str, Estimate], workload: Workload = WORKLOAD) -> NotEnoughMemory:
    """The error that says what is needed, what is available, and which of `alternatives` would fit."""
    fitting = [f"{option} (about {other.total / GB:.1f} GB)" for option, other in alternatives.items()
               if fits(other, available)]
    advice = ("load it with " + " or ".join(fitting)) if fitting else "no dtype or quantization of minivb fits"
    if not fitting and need.activations > need.weights / 4:  # it is the frames, beams or batch that do not fit
        advice += " with this many frames, beams and examples: ask for fewer"
    return NotEnoughMemory(
        f"{path} with {_option_text(dtype, quantize)} needs about {need.total / GB:.1f} GB ({need.weights / GB:.1f} "
        f"GB of weights, {need.activations / GB:.1f} GB to answer about {workload_text(workload)}), but only "
        f"{available / GB:.1f} GB is available on {device.type}: "
        f"{advice}; or pass check_memory=False (CLI: --no-memory-check) to try anyway, at the risk of the OS "
        f"killing the process")
