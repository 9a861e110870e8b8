"""int8 weight-only quantization of the language model, in the spirit of gpt-fast's quantize.py.

Why: the language model is most of the bytes (vicuna-13b: 26 of 28 GB in bf16), and decoding reads every one of
them per token. Stored as int8 with one scale per output row, each linear layer takes half the memory of bf16,
which is what lets vicuna-13b and flan-t5-xxl fit on a 24 GB machine.

How: for each row of a weight matrix W (out, in), scale = max |W[row]| / 127 and W_int8 = round(W / scale), so
W ~ W_int8 * scale with an error of at most scale / 2 per weight. The product x @ W.T becomes
(x @ W_int8.T) * scale, which a decode step computes without ever materialising W in bf16 (a compiled kernel for
one row, `torch._weight_int8pack_mm` for beams); a prompt's many rows go through a bf16 copy of 8 MB of W at a time
(fast.int8_linear).

The quantization happens while each shard is read (checkpoint.load_state hands an Int8Linear its tensor through
`load_weight`), so the bf16 model never exists in memory. Embeddings, norms, the vision encoder, the Q-Former and
the projection stay in the model's dtype: 2.6 GB of a 7B's 15.8 GB in bf16 (the linears: 6.6 B of 7.9 B weights).

Quantizing at every load costs time: reading all the bf16 bytes, quantizing, and allocating the int8 weights
(a 7B: 7.5-12 s, against 1.4 s to map it in bf16). `save_quantized` (CLI: `python -m minivb quantize`) does it
once, as gpt-fast's quantize.py and llama.cpp's llama-quantize do, and writes an int8 checkpoint that load_model then
maps like any other: the int8 weights are the file's pages, nothing quantized, nothing copied (the 7B: 1.3 s).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import fast

QUANTIZE_CHOICES = ("int8",)
QUANTIZE_ROWS = 1024  # rows quantized at a time while loading (see Int8Linear.load_weight)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (out, in) float -> int8 (out, in) and fp32 scales (out,)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): a zero row keeps a tiny, harmless scale
    quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return quantized, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output row (`weight_scale`, the name a quantized
    checkpoint stores it under: quant.save_quantized); bias (if any) stays in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @torch.no_grad()
    def load_weight(self, tensor: torch.Tensor) -> None:
        """Take a float weight (out, in) from the checkpoint and keep it quantized (called by the loader).

        A block of rows at a time: quantize_rows works in fp32, and the fp32 copies of a whole 32000 x 4096 lm_head
        would be 0.5 GB each, the transient that made the load peak (a few layers of a 7B) exceed its int8 weights
        plus 0.1x its bf16 weights; in blocks of QUANTIZE_ROWS they stay near 16 MB.
        """
        for start in range(0, self.out_features, QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            quantized, scales = fast.quantize_rows(tensor[rows])  # quantize_rows above, compiled where it pays
            self.weight[rows] = quantized
            self.weight_scale[rows] = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # The fast path (fast.py): int8 weights read as they are, scaled per row after the product; a prompt's
            # many rows through a bf16 copy of this matrix, a block of rows at a time.
            out = fast.int8_linear(x, self.weight, self.weight_scale)
        else:
            # The reference a reader checks the fast path against: dequantize, then an ordinary product
            # (fp32 activations, GPUs; int8pack_mm is slow in fp32 on CPUs: 25 ms against 2.2 ms a 4096 x 11008).
            out = F.linear(x, self.weight.to(x.dtype) * self.weight_scale[:, None].to(x.dtype))
        return out if self.bias is None else out + self.bias


def quantize_language_model(model: nn.Module) -> None:
    """Swap every linear layer of the language model for an Int8Linear (call it on the meta device, before loading).

    T5's lm_head is left as it is: checkpoints written tied (transformers 5) share it with the input embeddings.
    """
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
                quantized = Int8Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.float32)
                quantized.load_weight(tensor)  # in blocks of QUANTIZE_ROWS rows, as at load
                tensors[key], tensors[key + "_scale"] = quantized.weight, quantized.weight_scale
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
