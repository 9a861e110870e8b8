"""Writing checkpoints: the official layout that checkpoint.py reads, written back.

Everything minivb writes goes through here: a trained or fine-tuned model (`save_checkpoint`), an int8 checkpoint
(quant.save_quantized), a full-size checkpoint of random weights (fullsize.py), and a fine-tune's state for
--resume (`save_training_state`). They share three rules:

- One safetensors writer (`write_safetensors`): the header is built from the shapes alone, then each tensor is
  asked for, written and dropped in turn, so a writer never needs the whole model in memory. The data starts on a
  64-byte boundary (checkpoint.ALIGN): that is where torch._weight_int8pack_mm can read a mapped int8 weight.
- Never rewrite a file in place (`replacing`): a model may be mapping it (checkpoint.py) and a file truncated under
  a mapping kills the process with SIGBUS. Each file is written beside its target and renamed over it.
- The file that makes a folder a checkpoint (config.json; fullsize.py's index) is written last: a folder cut
  short is not mistaken for a checkpoint.
"""

import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import asdict

import torch

from .checkpoint import ALIGN, DTYPE_NAMES, official_key, stored_tensors

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json", "qformer_tokenizer")


@contextlib.contextmanager
def replacing(file):
    """`with replacing(file) as temporary:` write `temporary`; on success it is renamed over `file` in one step.

    A model that maps the old file keeps reading the old pages, which live on until it is gone; writing `file` in
    place would pull them from under it. A failed write leaves `file` untouched."""
    temporary = f"{file}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, file)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def safetensors_header(entries) -> bytes:
    """The start of a safetensors file that stores `entries`, [(key, dtype, shape)], in that order: the header's
    length (an 8-byte little-endian integer), then the JSON header naming each tensor's dtype, shape and byte range,
    padded with spaces so that the data starts ALIGN-byte aligned (safetensors' own writer pads to 8)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without format "pt"
    for key, dtype, shape in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGN)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(file, entries, tensor) -> int:
    """Write one safetensors file storing `entries`, [(key, dtype, shape)], in that order; `tensor(key)` gives each
    tensor as it is written (drawn, quantized, or mapped and read from its own file). Returns the data bytes."""
    total = 0
    with replacing(file) as temporary, open(temporary, "wb") as f:
        f.write(safetensors_header(entries))
        for key, dtype, shape in entries:
            value = tensor(key).detach().cpu().contiguous()
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise ValueError(f"tensor {key!r} is {value.dtype} {tuple(value.shape)}; its header entry says "
                                 f"{dtype} {tuple(shape)}")
            f.write(value.reshape(-1).view(torch.uint8).numpy().data)  # the raw little-endian bytes, no copy
            total += value.nbytes
    return total


def write_tensors(file, tensors: dict[str, torch.Tensor]) -> int:
    """`write_safetensors` for tensors already at hand: {key: tensor}, written in the order given."""
    return write_safetensors(file, [(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()], tensors.__getitem__)


def write_json(file, values: dict, sort_keys: bool = False) -> None:
    """A JSON file the way the Hub's are written: indented, one trailing newline."""
    with open(file, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=sort_keys)
        f.write("\n")


def copy_processor_files(source_dir, target_dir, names=PROCESSOR_FILES) -> None:
    """Copy the tokenizer and preprocessor files (and qformer_tokenizer/) that `source_dir` has."""
    for name in names:
        source, target = os.path.join(source_dir, name), os.path.join(target_dir, name)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif os.path.isfile(source):
            shutil.copyfile(source, target)


# ----------------------------------------------------------------------------- a model, as an official checkpoint

def config_dict(config) -> dict:
    """config.json for an InstructBlipVideoConfig, in the official nesting (vision / qformer / text)."""
    def clean(values):
        return {k: v for k, v in values.items() if v is not None}

    video = config.model_type == "instructblipvideo"
    values = {
        "architectures": ["InstructBlipVideoForConditionalGeneration" if video else "InstructBlipForConditionalGeneration"],
        "model_type": config.model_type,
        "num_query_tokens": config.num_query_tokens,
        "use_decoder_only_language_model": not config.is_encoder_decoder,
        "vision_config": dict(asdict(config.vision), model_type=f"{config.model_type}_vision_model"),
        "qformer_config": dict(asdict(config.qformer), model_type=f"{config.model_type}_qformer"),
        "text_config": clean(asdict(config.text)),
    }
    values.update(clean({"video_token_index": config.video_token_index, "image_token_index": config.image_token_index}))
    return values


def save_checkpoint(model, path, processor_from=None,
                    dtype: torch.dtype | dict[str, torch.dtype] | None = None, copy_from=None) -> None:
    """Write `model` as an official checkpoint directory: config.json and model.safetensors with the official key
    names, plus the tokenizer and preprocessor files copied from `processor_from` (a checkpoint directory).

    dtype: one dtype for every tensor; or {minivb parameter name: dtype}, each tensor its own; None keeps each
    parameter's. One tensor is converted at a time, as it is written.
    copy_from: (a checkpoint directory, parameter names): those are written as that checkpoint stores them, read
    from its files, not from the model (a fine-tune's frozen towers, bit for bit, whatever dtype it trained with).
    """
    if any(hasattr(m, "load_weight") for m in model.modules()):  # quant.Int8Linear: int8 weights, not parameters
        raise ValueError("save_checkpoint writes float models; an int8 model is written from its source checkpoint by "
                         "minivb.quant.save_quantized (`python -m minivb quantize`)")
    os.makedirs(path, exist_ok=True)
    source, copied = copy_from or (None, ())
    stored, read_stored = stored_tensors(source) if source is not None else ({}, None)  # dtypes, and a reader
    params, entries = {}, []
    for name, param in model.named_parameters():  # a tied lm_head is the same Parameter as `shared`: listed once
        if name in copied:
            target = stored[name]
        else:
            target = dtype.get(name, param.dtype) if isinstance(dtype, dict) else dtype or param.dtype
        params[official_key(name)] = (name, param, target)
        entries.append((official_key(name), target, tuple(param.shape)))

    def tensor(key):
        name, param, target = params[key]
        return read_stored(name) if name in copied else param.detach().to(target)

    write_safetensors(os.path.join(path, "model.safetensors"), entries, tensor)
    if processor_from is not None:
        copy_processor_files(processor_from, path)
    write_json(os.path.join(path, "config.json"), config_dict(model.config), sort_keys=True)


# ----------------------------------------------------------------------------- a fine-tune's resumable state


def save_training_state(path: str, model, optimizer, step: int, losses: list, settings: dict) -> None:
    """Everything --resume needs to reach the weights an uninterrupted run reaches: the trainable weights (in
    float32, as trained), the optimizer's moments, the step (with the seed in `settings` it fixes the data order
    and the learning rate), the RNG and the losses so far. Written to a temporary file and renamed, so that a crash
    while saving leaves the previous state whole."""
    state = {"step": step, "settings": settings, "losses": losses, "rng": torch.get_rng_state(),
             "trainable": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with replacing(path) as temporary:
        torch.save(state, temporary)


def load_training_state(path: str, model, optimizer, settings: dict) -> tuple[int, list]:
    """Restore what save_training_state wrote; refuse a state from a run with other settings. Returns (step,
    losses)."""
    # weights_only: the restricted unpickler that builds tensors, numbers and containers only, never runs code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = {"dtype": str(torch.float32), **state["settings"]}  # states older than --dtype: the towers in float32
    differ = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
    if differ:
        listed = ", ".join(f"{key} was {old!r}, now {new!r}" for key, (old, new) in differ.items())
        raise ValueError(f"{path} is the state of another run ({listed}): resume with the same settings")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["losses"]
