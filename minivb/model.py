"""InstructBLIP-Video: the wiring of the four parts, from frames and an instruction to next-token logits.

    frames (B, T, 3, H, W)            or one image a row (B, 3, H, W), which is T = 1
      -> ViT, frame by frame           frame_features (B*T, 1+P, C)          vit.py
      -> Q-Former with the instruction query_output   (B*T, Q, Hq)           qformer.py
      -> linear projection             visual_tokens  (B, T*Q, D)
      -> language model, the visual tokens in place of the placeholders of input_ids
                                       logits         (B, L, V)              llama.py / t5.py

B batch, T frames, P patches, C vision width, Q learned queries (32), Hq Q-Former width, D language-model width,
L text length, V vocabulary. Batches follow transformers' conventions, so a batch built for
`InstructBlipVideoForConditionalGeneration` works here unchanged.
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import InstructBlipVideoConfig, load_config
from .llama import Llama
from .qformer import QFormer
from .t5 import T5
from .vit import VisionTransformer


@dataclass
class Output:
    logits: torch.Tensor  # (B, L, V): for T5, over the decoder positions
    loss: torch.Tensor | None = None
    frame_features: torch.Tensor | None = None  # (B*T, 1+P, C) ViT output
    query_output: torch.Tensor | None = None  # (B*T, Q, Hq) Q-Former output at the query positions
    visual_tokens: torch.Tensor | None = None  # (B, T*Q, D) what the language model sees of the video


class InstructBlipVideo(nn.Module):
    def __init__(self, config: InstructBlipVideoConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.qformer = QFormer(config.qformer)
        self.projection = nn.Linear(config.qformer.hidden_size, config.text.hidden_size)
        self.language_model = T5(config.text) if config.is_encoder_decoder else Llama(config.text)

    # ------------------------------------------------------------------ vision side: pixels -> visual tokens

    def encode_video(self, pixel_values, qformer_input_ids, qformer_attention_mask=None,
                     interpolate_pos_encoding=False) -> Output:
        """Frames and instruction -> visual tokens for the language model (logits left empty)."""
        pixel_values = _as_video(pixel_values)
        B, T = pixel_values.shape[:2]
        _check_ids("qformer_input_ids", qformer_input_ids, B, self.config.qformer.vocab_size)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        _check_mask("qformer_attention_mask", qformer_attention_mask, qformer_input_ids)

        # Each tower reads its input in its own dtype: they are one dtype after load_model, but a fine-tune keeps
        # the frozen towers as loaded (bf16 for a 7B on 24 GB) and trains the bridge in float32 (finetune.py).
        frames = pixel_values.flatten(0, 1).to(self.vision.patch_embedding.weight.dtype)  # (B*T, 3, H, W)
        frame_features = self.vision(frames, interpolate_pos_encoding=interpolate_pos_encoding)  # (B*T, 1+P, C)
        frame_features = frame_features.to(self.query_tokens.dtype)

        # InstructBLIP's difference from BLIP-2: the instruction enters the Q-Former too, so the queries look
        # for what the question asks about. Every frame of a video reads the same instruction.
        instruction = qformer_input_ids.repeat_interleave(T, dim=0)  # (B*T, Lq)
        instruction_mask = qformer_attention_mask.repeat_interleave(T, dim=0)  # (B*T, Lq)
        queries = self.query_tokens.expand(B * T, -1, -1)  # (B*T, Q, Hq)
        query_output = self.qformer(queries, instruction, instruction_mask, frame_features)  # (B*T, Q, Hq)

        visual_tokens = self.projection(query_output)  # (B*T, Q, D)
        visual_tokens = visual_tokens.reshape(B, T * self.config.num_query_tokens, -1)  # (B, T*Q, D), frame-major
        return Output(logits=None, frame_features=frame_features, query_output=query_output,
                      visual_tokens=visual_tokens)

    def embed_inputs(self, visual_tokens, input_ids, attention_mask=None, labels=None):
        """Token embeddings of input_ids with the visual tokens in the placeholders' positions.

        Returns (inputs_embeds (B, L', D), attention_mask (B, L'), labels or None).
        """
        B, num_visual, D = visual_tokens.shape
        _check_ids("input_ids", input_ids, B, self.config.text.vocab_size, allowed=self.config.placeholder_token_id)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_mask("attention_mask", attention_mask, input_ids)
        if labels is not None and labels.shape != input_ids.shape and not self.config.is_encoder_decoder:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")

        placeholder = self.config.placeholder_token_id
        is_visual = (input_ids == placeholder) if placeholder is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        text_ids = input_ids.masked_fill(is_visual, 0)  # the placeholder id may lie past the embedding table
        lm = self.language_model
        embeds = (lm.shared if self.config.is_encoder_decoder else lm.embed_tokens)(text_ids)  # (B, L, D)
        visual_tokens = visual_tokens.to(embeds.dtype)

        counts = is_visual.sum(dim=1)
        if bool((counts == num_visual).all()):
            embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), visual_tokens)  # row by row, in order
            return embeds, attention_mask, labels
        if bool((counts == 0).all()):
            # No placeholders: prepend the visual tokens, the original LAVIS layout. This is minivb's own
            # convention; transformers 5 silently drops the visual features for such input_ids.
            embeds = torch.cat([visual_tokens, embeds], dim=1)  # (B, T*Q + L, D)
            ones = attention_mask.new_ones(B, num_visual)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, T*Q + L)
            if labels is not None and not self.config.is_encoder_decoder:
                labels = torch.cat([labels.new_full((B, num_visual), -100), labels], dim=1)
            return embeds, attention_mask, labels
        raise ValueError(
            f"input_ids must hold the placeholder token {placeholder} exactly T*num_query_tokens = {num_visual} times "
            f"in every row (or never), got {counts.tolist()}")

    # ------------------------------------------------------------------ the whole model

    def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask=None, input_ids=None,
                attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, labels=None,
                interpolate_pos_encoding=False, loss_only=False) -> Output:
        """The logits of every position (and the loss, given labels). loss_only=True (Vicuna, with labels) leaves
        logits None and runs lm_head only where a label is scored: the same loss, and with a 32k vocabulary half of
        a small model's training step saved. T5 ignores it: its decoder reads the answer only, scored everywhere."""
        if input_ids is None:
            raise ValueError("input_ids is required: the prompt for the language model (see minivb.load_processor)")
        out = self.encode_video(pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding)
        inputs_embeds, attention_mask, labels = self.embed_inputs(out.visual_tokens, input_ids, attention_mask, labels)

        if self.config.is_encoder_decoder:
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError("a T5 model needs decoder_input_ids or labels")
                decoder_input_ids = self._shift_right(labels)
            _check_ids("decoder_input_ids", decoder_input_ids, input_ids.shape[0], self.config.text.vocab_size)
            if decoder_attention_mask is not None:
                _check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
            out.logits = self.language_model(inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask)
            if labels is not None:
                out.loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        else:
            # Forward uses positions 0..L-1 on every row, left-padded or not, as transformers' forward does;
            # generation uses cumsum(attention_mask) - 1 instead (see generate.py).
            if loss_only and labels is not None:
                hidden = self.language_model(inputs_embeds, attention_mask, return_hidden=True)  # (B, L, D)
                targets = labels[:, 1:]  # (B, L-1): position t predicts token t+1
                scored = targets != -100
                logits = self.language_model.lm_head(hidden[:, :-1][scored])  # (N scored, V)
                out.loss = F.cross_entropy(logits.float(), targets[scored])
                return out
            out.logits = self.language_model(inputs_embeds, attention_mask)
            if labels is not None:
                # Causal LM loss: position t predicts token t+1; -100 (placeholders, prompt, padding) is ignored.
                shifted = out.logits[:, :-1].flatten(0, 1).float()
                out.loss = F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=-100)
        return out

    def _shift_right(self, labels):
        """T5's decoder input: the start token, then the labels moved one step right, -100 read as padding."""
        start = labels.new_full((labels.shape[0], 1), self.config.text.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.text.pad_token_id)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.LongTensor:
        """New tokens only, (B * num_return_sequences, L_new). See generate.py for the arguments."""
        from .generate import generate

        return generate(self, **kwargs)


# ---------------------------------------------------------------------------- input checks
# The model's inputs, and what generate.py refuses before any work: its arguments, the special tokens, the context.


def _as_video(pixel_values) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError("pixel_values must be a float tensor (B, T, 3, H, W) or (B, 3, H, W)")
    if pixel_values.dim() == 4:
        pixel_values = pixel_values.unsqueeze(1)  # an image is a video of one frame: (B, 1, 3, H, W)
    if pixel_values.dim() != 5 or pixel_values.shape[2] != 3 or 0 in pixel_values.shape:
        raise ValueError(
            f"pixel_values must have shape (B, T, 3, H, W) or (B, 3, H, W) with no empty dimension, "
            f"got {tuple(pixel_values.shape)}")
    return pixel_values


def check_context(config: InstructBlipVideoConfig, pixel_values, input_ids, max_new_tokens: int) -> None:
    """Refuse a LLaMA prompt plus its new tokens longer than the model's positions (Vicuna: 2048), known from the
    shapes alone: T frames of num_query_tokens visual tokens each, in placeholders or prepended, and the text."""
    frames = pixel_values.shape[1] if pixel_values.dim() == 5 else 1
    visual = frames * config.num_query_tokens
    placeholders = config.placeholder_token_id is not None and bool((input_ids == config.placeholder_token_id).any())
    text = input_ids.shape[1] - (visual if placeholders else 0)
    positions = config.text.max_position_embeddings
    if visual + text + max_new_tokens > positions:
        fit = max(0, (positions - text - max_new_tokens) // config.num_query_tokens)
        raise ValueError(
            f"the prompt ({frames} frames x {config.num_query_tokens} visual tokens + {text} of text) and max_new_tokens "
            f"({max_new_tokens}) need {visual + text + max_new_tokens} positions, more than the language model's "
            f"{positions} (max_position_embeddings): at most {fit} frames fit with this text and max_new_tokens")


def check_arguments(args: dict) -> None:
    """generate()'s arguments: refuse, naming the argument, what transformers would refuse or silently misread."""
    for name, low in (("max_new_tokens", 0), ("min_new_tokens", 0), ("num_beams", 1), ("num_return_sequences", 1),
                      ("no_repeat_ngram_size", 0), ("top_k", 0)):
        if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {args[name]!r}")
    for name in ("do_sample", "return_trace", "use_cache", "interpolate_pos_encoding"):
        if not isinstance(args[name], bool):
            raise ValueError(f"{name} must be True or False, got {args[name]!r}")
    for name in ("length_penalty", "repetition_penalty", "temperature", "top_p"):
        value = args[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if args["min_new_tokens"] > args["max_new_tokens"]:
        raise ValueError(f"min_new_tokens ({args['min_new_tokens']}) must not exceed max_new_tokens "
                         f"({args['max_new_tokens']})")
    if not (args["early_stopping"] is True or args["early_stopping"] is False or args["early_stopping"] == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {args['early_stopping']!r}")
    if args["repetition_penalty"] <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 means none), got {args['repetition_penalty']}")
    if not 0 < args["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0 means no filtering), got {args['top_p']}")
    if args["do_sample"] and args["temperature"] <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {args['temperature']} (greedy: do_sample=False)")
    num_beams, num_return_sequences = args["num_beams"], args["num_return_sequences"]
    if num_return_sequences > num_beams and not (num_beams == 1 and args["do_sample"]):
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must not exceed num_beams ({num_beams}) "
                         "unless sampling: greedy decoding and beam search keep at most num_beams answers")
    if args["generator"] is not None and not isinstance(args["generator"], torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(args['generator']).__name__}")


def special_token(name, value, default, vocab_size):
    """generate()'s eos_token_id or pad_token_id: `value`, or `default` where None, a token id of the vocabulary."""
    value = default if value is None else value
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size):
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def _check_ids(name, ids, batch_size, vocab_size, allowed=None):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor of shape (B, L), got {shape}")
    if ids.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {ids.shape[0]} but pixel_values has {batch_size}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: expected at least one token per row")
    ordinary = ids if allowed is None else ids[ids != allowed]
    if ordinary.numel() and (int(ordinary.min()) < 0 or int(ordinary.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds token ids outside the vocabulary [0, {vocab_size}): "
            f"min {int(ordinary.min())}, max {int(ordinary.max())}")


def _check_mask(name, mask, ids):
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have the shape of its ids {tuple(ids.shape)}, got {shape}")


def load_model(path, dtype: torch.dtype | str = torch.float32, device="cpu", progress=None,
               quantize: str | None = None, check_memory: bool = True, workload=None) -> InstructBlipVideo:
    """Build minivb from an official checkpoint directory (config.json + safetensors) and load its weights.

    `progress(done, total, file)` is called before each safetensors file is read (the CLI prints it).
    `quantize="int8"`: the language model's linear layers in int8 with per-row scales, quantized as each shard is
    read (quant.py); everything else in `dtype`. A checkpoint already quantized (`python -m minivb quantize`) loads
    in int8 whatever `quantize` says, its int8 weights mapped from the file.
    `check_memory`: before allocating anything, refuse with memory.NotEnoughMemory (a ValueError naming what would
    fit) when the model would need more than the machine has available (see memory.py); False skips the check.
    `workload` (a minivb.Workload): what one generate call will ask, the activations the check counts beside the
    weights; the default is the CLI's `ask`, 4 frames with 5 beams (the CLI passes its --frames, beams, batch).
    `dtype="auto"` (the CLI's default): bfloat16 if it fits, else bfloat16 with quantize="int8" (said on stderr).
    Where a second copy of the language model's weights fits in memory (memory.room_to_pack), its layers pack their
    weights for oneDNN once they have made packing.PACK_AFTER products of 2-128 rows (beam steps, a batch's decode
    steps), which makes the steps after it 1.2-2x faster (packing.py). Where only one copy fits, the copies can take
    the place of the file's pages (bf16, or an int8 checkpoint's int8): every product reads them once made
    (memory.room_to_pack). Where the widest weights' copies fit too (memory.room_to_split: a 7B's down projections,
    2.9 GB in bf16), one row of them reads a copy split by columns, ~1.5x faster (packing.SplitWeight).
    """
    from . import fast, memory, packing
    from .checkpoint import load_state, stored_dtypes
    from .quant import check_quantize

    check_quantize(quantize)
    workload = memory.WORKLOAD if workload is None else workload
    if not isinstance(workload, memory.Workload):
        raise ValueError(f"workload must be a minivb.Workload (frames, beams, batch size), got {workload!r}")
    if dtype != "auto" and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be 'auto' or a floating torch.dtype such as torch.float32 or torch.bfloat16, "
                         f"got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device such as 'cpu' or 'cuda': {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU on this machine")
    config = load_config(path)
    if config.quantization is not None:  # written by quant.save_quantized: its int8 weights are mapped, as stored
        quantize = config.quantization
    if check_memory:  # what fits (dtype="auto": the fastest that fits), estimated before allocating anything
        asked = quantize
        dtype, quantize = memory.choose(config, dtype, quantize, device, str(path), workload)
        if quantize != asked:
            print("minivb: bfloat16 does not fit in the available memory: the language model is loaded in int8",
                  file=sys.stderr)
    elif dtype == "auto":
        dtype = torch.bfloat16
    # Build on the meta device (no memory, no random init), then give each parameter storage in the target dtype
    # (empty: untouched pages hold no memory). The loader swaps in the file's own tensor where it is stored in that
    # dtype and casts into the storage otherwise: peak memory stays near one copy of the weights.
    model = build_on_meta(config, dtype, quantize)
    if quantize == "int8" and config.quantization is None:
        _say_quantizing_costs(model, path)
    # mapped: every tensor stored as the model holds it (in `dtype`; an int8 checkpoint's int8 weights as int8), so
    # each becomes the file's own pages (load_state), and a layer's packed copy can take their place. int8 weights
    # quantized at load are copies of their own: those pack only beside them. (The int8 weights' scales, fp32 in the
    # file and cast to `dtype`, a few MB, do not count.)
    held = model.state_dict()
    mapped = all(held[name].dtype == stored for name, stored in stored_dtypes(str(path)).items()
                 if name in held and not name.endswith("weight_scale"))
    room = memory.room_to_pack(model, device, mapped, workload)
    if room:  # beams multiply a copy of each weight packed once for oneDNN (packing.py)
        packing.allow_packing(model, replaces=room == "instead")
    if memory.room_to_split(model, device, workload):  # one row of a wide weight reads a column-split copy
        packing.allow_splitting(model)
    model = model.to_empty(device=device)
    load_state(model, str(path), progress=progress)
    return model.eval()


# Quantizing at load reads every bf16 weight of the language model at every load (a 7B: 6-12 s, against 1.3-1.5 s
# to map its int8 checkpoint; flan-t5-xl 5.2 against 1.7 s): from this many int8 weights, load_model says so.
QUANTIZE_NOTICE_WEIGHTS = 10**9


def _say_quantizing_costs(model: nn.Module, path) -> None:
    from .quant import Int8Linear

    count = sum(m.weight.numel() for m in model.language_model.modules() if isinstance(m, Int8Linear))
    if count >= QUANTIZE_NOTICE_WEIGHTS:
        print(f"minivb: quantizing {count / 1e9:.1f} G weights to int8 while loading, as at every load of a bf16 "
              f"checkpoint; `python -m minivb quantize --model {path} --out DIR` does it once, and DIR loads in "
              f"seconds", file=sys.stderr)


def build_on_meta(config: InstructBlipVideoConfig, dtype: torch.dtype, quantize: str | None = None) -> InstructBlipVideo:
    """The model with its parameters on the meta device, in `dtype` (and quantized): shapes and dtypes, no memory."""
    from .quant import quantize_language_model

    with torch.device("meta"):
        model = InstructBlipVideo(config)
        if quantize == "int8":
            quantize_language_model(model)
    return model.to(dtype=dtype)
