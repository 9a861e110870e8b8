"""Loading official Hugging Face checkpoints: config.json + safetensors, mapped by an explicit key table.

An official checkpoint directory (e.g. Salesforce/instructblip-vicuna-7b) holds `config.json` and either one
`model.safetensors` or `model.safetensors.index.json` naming its shards. Every tensor name in those files is one
of the patterns in KEY_TABLE below; grep any checkpoint key there to see where it lands in minivb.

The loader is strict, in the spirit of nanoGPT's `from_pretrained`: every tensor of the checkpoint is used once,
every parameter of minivb is filled, every shape is checked. Tensors are read lazily, one at a time, shard by
shard. safetensors maps each file into memory (a private, copy-on-write mapping): a tensor stored in the dtype
asked for becomes the parameter as it is, the file's own pages, nothing copied (`_mappable`), as llama.cpp and
transformers do; any other is cast into a parameter as it is copied in. Either way memory stays at one copy of the
weights. safetensors only: minivb never unpickles (`pytorch_model.bin` can run code when loaded).

A mapped model reads its weights from the file while it runs, so a checkpoint must never be rewritten in place
while a model uses it (a file truncated under a mapping kills the process with SIGBUS): minivb writes every
checkpoint file beside its target and renames it over (`saving.replacing`); the old file lives on while it is mapped.
Writing checkpoints (a trained model, an int8 checkpoint) is saving.py's.
"""

import json
import mmap
import os
import re
import struct

import torch
from safetensors import SafetensorError, safe_open

# {i} stands for a layer number. Each line maps an official module (or parameter) name to minivb's; the suffix
# `.weight` / `.bias` carries over unchanged (and `.weight_scale`, the scales of an int8 checkpoint: quant.py).
KEY_TABLE = [
    # --- learned queries and the projection into the language model
    ("query_tokens", "query_tokens"),
    ("language_projection", "projection"),
    # --- vision encoder (vit.py)
    ("vision_model.embeddings.class_embedding", "vision.class_token"),
    ("vision_model.embeddings.position_embedding", "vision.position_embedding"),
    ("vision_model.embeddings.patch_embedding", "vision.patch_embedding"),
    ("vision_model.encoder.layers.{i}.layer_norm1", "vision.blocks.{i}.attn_norm"),
    ("vision_model.encoder.layers.{i}.self_attn.qkv", "vision.blocks.{i}.attn.qkv"),
    ("vision_model.encoder.layers.{i}.self_attn.projection", "vision.blocks.{i}.attn.proj"),
    ("vision_model.encoder.layers.{i}.layer_norm2", "vision.blocks.{i}.mlp_norm"),
    ("vision_model.encoder.layers.{i}.mlp.fc1", "vision.blocks.{i}.mlp.fc1"),
    ("vision_model.encoder.layers.{i}.mlp.fc2", "vision.blocks.{i}.mlp.fc2"),
    ("vision_model.post_layernorm", "vision.post_norm"),
    # --- Q-Former (qformer.py)
    ("qformer.embeddings.word_embeddings", "qformer.word_embeddings"),
    ("qformer.embeddings.position_embeddings", "qformer.position_embeddings"),
    ("qformer.embeddings.layernorm", "qformer.embed_norm"),
    ("qformer.encoder.layer.{i}.attention.attention.query", "qformer.layers.{i}.self_attn.query"),
    ("qformer.encoder.layer.{i}.attention.attention.key", "qformer.layers.{i}.self_attn.key"),
    ("qformer.encoder.layer.{i}.attention.attention.value", "qformer.layers.{i}.self_attn.value"),
    ("qformer.encoder.layer.{i}.attention.output.dense", "qformer.layers.{i}.self_attn.out"),
    ("qformer.encoder.layer.{i}.attention.output.LayerNorm", "qformer.layers.{i}.self_attn.norm"),
    ("qformer.encoder.layer.{i}.crossattention.attention.query", "qformer.layers.{i}.cross_attn.query"),
    ("qformer.encoder.layer.{i}.crossattention.attention.key", "qformer.layers.{i}.cross_attn.key"),
    ("qformer.encoder.layer.{i}.crossattention.attention.value", "qformer.layers.{i}.cross_attn.value"),
    ("qformer.encoder.layer.{i}.crossattention.output.dense", "qformer.layers.{i}.cross_attn.out"),
    ("qformer.encoder.layer.{i}.crossattention.output.LayerNorm", "qformer.layers.{i}.cross_attn.norm"),
    ("qformer.encoder.layer.{i}.intermediate.dense", "qformer.layers.{i}.text_ffn.fc1"),
    ("qformer.encoder.layer.{i}.output.dense", "qformer.layers.{i}.text_ffn.fc2"),
    ("qformer.encoder.layer.{i}.output.LayerNorm", "qformer.layers.{i}.text_ffn.norm"),
    ("qformer.encoder.layer.{i}.intermediate_query.dense", "qformer.layers.{i}.query_ffn.fc1"),
    ("qformer.encoder.layer.{i}.output_query.dense", "qformer.layers.{i}.query_ffn.fc2"),
    ("qformer.encoder.layer.{i}.output_query.LayerNorm", "qformer.layers.{i}.query_ffn.norm"),
    # --- Vicuna / LLaMA (llama.py)
    ("language_model.model.embed_tokens", "language_model.embed_tokens"),
    ("language_model.model.layers.{i}.input_layernorm", "language_model.layers.{i}.attn_norm"),
    ("language_model.model.layers.{i}.self_attn.q_proj", "language_model.layers.{i}.attn.q_proj"),
    ("language_model.model.layers.{i}.self_attn.k_proj", "language_model.layers.{i}.attn.k_proj"),
    ("language_model.model.layers.{i}.self_attn.v_proj", "language_model.layers.{i}.attn.v_proj"),
    ("language_model.model.layers.{i}.self_attn.o_proj", "language_model.layers.{i}.attn.o_proj"),
    ("language_model.model.layers.{i}.post_attention_layernorm", "language_model.layers.{i}.mlp_norm"),
    ("language_model.model.layers.{i}.mlp.gate_proj", "language_model.layers.{i}.mlp.gate_proj"),
    ("language_model.model.layers.{i}.mlp.up_proj", "language_model.layers.{i}.mlp.up_proj"),
    ("language_model.model.layers.{i}.mlp.down_proj", "language_model.layers.{i}.mlp.down_proj"),
    ("language_model.model.norm", "language_model.norm"),
    ("language_model.lm_head", "language_model.lm_head"),  # LLaMA: always its own; T5: may be absent (tied)
    # --- Flan-T5 (t5.py). Block 0 alone stores the relative position table; the whole stack shares it.
    ("language_model.shared", "language_model.shared"),
    ("language_model.{stack}.block.0.layer.0.SelfAttention.relative_attention_bias",
     "language_model.{stack}.relative_attention_bias"),
    ("language_model.{stack}.block.{i}.layer.0.layer_norm", "language_model.{stack}.blocks.{i}.attn_norm"),
    ("language_model.{stack}.block.{i}.layer.0.SelfAttention.{proj}", "language_model.{stack}.blocks.{i}.attn.{proj}"),
    ("language_model.encoder.block.{i}.layer.1.layer_norm", "language_model.encoder.blocks.{i}.ffn_norm"),
    ("language_model.encoder.block.{i}.layer.1.DenseReluDense.{ffn}", "language_model.encoder.blocks.{i}.ffn.{ffn}"),
    ("language_model.decoder.block.{i}.layer.1.layer_norm", "language_model.decoder.blocks.{i}.cross_attn_norm"),
    ("language_model.decoder.block.{i}.layer.1.EncDecAttention.{proj}", "language_model.decoder.blocks.{i}.cross_attn.{proj}"),
    ("language_model.decoder.block.{i}.layer.2.layer_norm", "language_model.decoder.blocks.{i}.ffn_norm"),
    ("language_model.decoder.block.{i}.layer.2.DenseReluDense.{ffn}", "language_model.decoder.blocks.{i}.ffn.{ffn}"),
    ("language_model.{stack}.final_layer_norm", "language_model.{stack}.final_norm"),
]

# Names the official T5 checkpoints (and transformers) write for the very same tensor as `shared`: the input
# embeddings of the encoder and of the decoder. They are aliases: read once, checked equal, never loaded twice.
ALIASES = {
    "language_model.encoder.embed_tokens.weight": "language_model.shared.weight",
    "language_model.decoder.embed_tokens.weight": "language_model.shared.weight",
}

_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{stack}": r"(?P<stack>encoder|decoder)", "{proj}": r"(?P<proj>[qkvo])",
                 "{ffn}": r"(?P<ffn>wi_0|wi_1|wi|wo)"}


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for placeholder, group in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape(placeholder), group)  # each placeholder appears at most once a pattern
    return re.compile(rf"^{regex}(?P<suffix>\.weight|\.bias|\.weight_scale)?$")


_COMPILED = [(_compile(official), ours) for official, ours in KEY_TABLE]
_REVERSED = [(_compile(ours), official) for official, ours in KEY_TABLE]


def _translate(name: str, table) -> str | None:
    """Match `name` against one side of the table and fill the other side's placeholders from it."""
    for regex, target in table:
        match = regex.match(name)
        if match:
            groups = match.groupdict()
            for key in ("i", "stack", "proj", "ffn"):
                if groups.get(key) is not None:
                    target = target.replace("{" + key + "}", groups[key])
            return target + (groups["suffix"] or "")
    return None


def map_key(official_name: str) -> str | None:
    """The minivb parameter name for an official checkpoint key, or None if the table has no such pattern."""
    return _translate(official_name, _COMPILED)


def official_key(name: str) -> str:
    """The official checkpoint key of a minivb parameter name: `map_key` read backwards."""
    official = _translate(name, _REVERSED)
    if official is None:
        raise ValueError(f"minivb parameter {name!r} has no entry in the key table")
    return official


# ----------------------------------------------------------------------------- reading safetensors files

# The dtype names safetensors headers use (read here; written by saving.safetensors_header). I8: the weights of an
# int8 checkpoint (quant.save_quantized).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I8": torch.int8}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch.bfloat16 -> "BF16"
# torch._weight_int8pack_mm reads an int8 weight with aligned vector loads: one that starts 8 bytes past a 64-byte
# boundary (where safetensors' own writer may put it) crashes the process (SIGSEGV, torch 2.13). minivb's files
# start their data, and their int8 weights, on 64-byte boundaries; the loader copies an int8 weight that does not.
ALIGN = 64


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory: the single file, or the shards its index names."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (expected a JSON object with 'weight_map'): {e}") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"shard {shard!r} named in {index} is missing from {path}")
        return [os.path.join(path, shard) for shard in shards]
    if os.path.isfile(single):
        return [single]
    found = sorted(os.listdir(path))
    hint = ""
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in found):
        hint = (" It holds pickled PyTorch weights, which minivb never loads (unpickling can run arbitrary code):"
                " convert them to safetensors first.")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}.{hint}")


def _open(file: str):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors file {file}: it is truncated or corrupt ({e})") from None


def _read(handle, file: str, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(key, file, e) from None


def _unreadable(key: str, file: str, error: Exception) -> ValueError:
    return ValueError(f"cannot read tensor {key!r} from {file}: the file is truncated or corrupt ({error})")


def _header(f) -> tuple[dict, int]:
    """A safetensors file's header ({key: {"dtype", "shape", "data_offsets"}}) and where its data starts: an 8-byte
    little-endian length, then that many bytes of JSON, then the tensors' bytes. `f`: the file, opened binary."""
    f.seek(0)
    length = struct.unpack("<Q", f.read(8))[0]
    return json.loads(f.read(length)), 8 + length


def _read_once(f, file: str, entry: dict, data_start: int, key: str) -> torch.Tensor:
    """One tensor through a mapping of its own bytes, unmapped as soon as the tensor is freed: for a tensor cast or
    quantized as it is read. Through safetensors' mapping of the whole file, the pages read would stay mapped, and
    resident, until the last tensor of the file is freed: a 7B's int8 load held 13 GB of them beside its 7 GB of
    weights, and the kernel, short of memory, spent the load reclaiming them (36-67 s). `f`: `file`, opened binary."""
    start, end = (data_start + offset for offset in entry["data_offsets"])
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if end == start:
        return torch.empty(entry["shape"], dtype=dtype)
    page = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
    try:  # ACCESS_COPY: private and writable, as safetensors maps (torch wants writable)
        mapped = mmap.mmap(f.fileno(), end - page, offset=page, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise _unreadable(key, file, e) from None
    count = (end - start) // dtype.itemsize
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start - page).view(entry["shape"])


def _drop_pages(f, entry: dict, data_start: int) -> None:
    """Drop a tensor's bytes from the page cache (Linux; elsewhere nothing): pages mapped, or shared with a
    neighbouring tensor, stay. `f`: the file, opened binary."""
    if hasattr(os, "posix_fadvise"):
        start, end = entry["data_offsets"]
        os.posix_fadvise(f.fileno(), data_start + start, end - start, os.POSIX_FADV_DONTNEED)


def _mappable(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether the parameter can be the file's tensor itself: same dtype, on the CPU, contiguous, and aligned to
    its element size (safetensors aligns only the data block, to 8 bytes; a file that mixes dtypes unsorted can
    leave an fp32 tensor on an odd address), int8 weights to ALIGN. Alignment beyond that does not matter for
    floats: the fused decode kernel reads an 11008 x 4096 bf16 matrix in 2.3 ms at any 8-byte offset, as from a
    64-byte aligned copy."""
    return (param.device.type == "cpu" and tensor.dtype == param.dtype and tensor.is_contiguous()
            and tensor.data_ptr() % (ALIGN if tensor.dtype == torch.int8 else tensor.element_size()) == 0)


def _format_list(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:10])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def load_state(model: torch.nn.Module, path: str, progress=None) -> None:
    """Fill every parameter of `model` from the checkpoint in `path`, strictly, one tensor at a time: mapped from
    the file where its dtype is the parameter's, else cast to it as it is copied in.

    `progress(done, total, file)`, if given, is called before each safetensors file is read.
    """
    params = dict(model.named_parameters())
    # Modules that keep their weight in another form (quant.Int8Linear: int8 + scales) take a float weight through
    # load_weight, which quantizes it. A checkpoint written already quantized (quant.save_quantized, its config
    # says so) stores the int8 weight and its `weight_scale`: those are loaded as any other tensor, mapped.
    takers = {f"{name}.weight": module for name, module in model.named_modules() if hasattr(module, "load_weight")}
    targets = {**params, **{name: module.weight for name, module in takers.items()}}
    quantized_file = model.config.quantization is not None
    if quantized_file:
        targets.update({f"{name[:-len('.weight')]}.weight_scale": m.weight_scale for name, m in takers.items()})
    filled, unexpected, shared_values = set(), [], {}
    has_lm_head = False
    files = checkpoint_files(path)
    # Reading a file leaves its pages in the page cache. Where the files cannot stay there beside the model (a 7B in
    # int8 on 24 GB: 15.8 GB of files and 7 GB of model), the OS must take those pages back to give the model its
    # memory, and that reclaim is slow: 6 GB allocated took 9.7 s against 2.0 s, most of an int8 load. Then the pages
    # of each tensor cast or quantized are dropped once it is done with (10 GB in 1 s); where all fits, they stay,
    # and the next load reads no disk.
    from .memory import available_bytes, weight_bytes

    available = available_bytes(torch.device("cpu"))  # -1 where unknown: nothing dropped
    short_of_memory = 0 <= available < sum(map(os.path.getsize, files)) + weight_bytes(model)
    for done, file in enumerate(files):
        if progress is not None:
            progress(done, len(files), file)
        with _open(file) as handle, open(file, "rb") as raw:  # safetensors checks the whole header here
            header, data_start = _header(raw)
            for key in handle.keys():
                if key in ALIASES:
                    shared_values.setdefault(key, (file, handle.get_slice(key).get_shape()))
                    continue
                ours = map_key(key)
                if ours is None or ours not in targets:
                    unexpected.append(key)
                    continue
                if ours in filled:
                    raise ValueError(f"checkpoint tensor {key!r} appears twice in {path}")
                param = targets[ours]
                stored = SAFETENSORS_DTYPES.get(header[key]["dtype"])  # None: a dtype only safetensors reads
                if (stored == torch.int8) != (param.dtype == torch.int8 and quantized_file):
                    raise ValueError(_int8_mismatch(key, path, stored == torch.int8, quantized_file))
                quantize = ours in takers and not quantized_file
                read_once = stored is not None and (quantize or stored != param.dtype)
                if read_once:
                    tensor = _read_once(raw, file, header[key], data_start, key)  # to be cast or quantized, then let go
                else:
                    tensor = _read(handle, file, key)  # to become the parameter: kept mapped with the file
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"shape mismatch for {key!r}: checkpoint has {tuple(tensor.shape)}, the model built from "
                        f"config.json expects {tuple(param.shape)}")
                if quantize:
                    takers[ours].load_weight(tensor)  # quantized as read: the float weight never stays in memory
                elif _mappable(tensor, param):
                    # The file's pages become the parameter: nothing read now, each page comes from the page cache
                    # (or the disk) when first used; written to (training), a page is copied first, never the file.
                    # The empty storage to_empty gave the parameter was never touched, so it held no memory.
                    param.data = tensor
                else:
                    with torch.no_grad():
                        # copy_ casts element by element as it writes: no cast copy of the tensor is ever made.
                        param.copy_(tensor)
                if read_once and short_of_memory:
                    del tensor  # unmapped: the pages can go
                    _drop_pages(raw, header[key], data_start)
                filled.add(ours)
                has_lm_head |= key == "language_model.lm_head.weight"
    # transformers 5 writes T5 with lm_head tied to `shared` and leaves lm_head.weight out of the file.
    if "language_model.lm_head.weight" in params and not has_lm_head and hasattr(model.language_model, "tie_lm_head"):
        model.language_model.tie_lm_head()
        filled.add("language_model.lm_head.weight")
    for alias, (file, shape) in shared_values.items():
        target = params.get(ALIASES[alias])
        if target is None or tuple(shape) != tuple(target.shape):
            unexpected.append(alias)
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors minivb does not expect: {_format_list(unexpected)}")
    # Named by their official keys, the names a user can grep in the checkpoint's index or in KEY_TABLE.
    missing = [official_key(name) for name in targets if name not in filled]
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors the model needs: {_format_list(missing)}")


def _int8_mismatch(key: str, path: str, stored_int8: bool, quantized_file: bool) -> str:
    if stored_int8 and not quantized_file:
        return (f"checkpoint tensor {key!r} is stored as int8, but {path}/config.json has no quantization_config "
                f"saying the checkpoint is quantized (minivb writes one with `python -m minivb quantize`)")
    if stored_int8:
        return (f"checkpoint tensor {key!r} is stored as int8, but minivb quantizes only the language model's "
                f"linear weights: this one must be a float")
    return (f"checkpoint tensor {key!r} should be int8: {path}/config.json says the checkpoint is quantized, but the "
            f"file stores it as a float")


def _stored_entries(path: str) -> dict[str, tuple[str, str, torch.dtype]]:
    """{minivb parameter name: (file, official key, dtype)} of every tensor in the checkpoint's files, from their
    headers alone. A tied embedding's aliases (T5's encoder and decoder embed_tokens) name the tensor of `shared`:
    the first key read counts."""
    entries = {}
    for file in checkpoint_files(path):
        with _open(file) as handle:
            for key in handle.keys():
                ours = map_key(ALIASES.get(key, key))
                stored = handle.get_slice(key).get_dtype()
                if ours is not None and stored in SAFETENSORS_DTYPES:
                    entries.setdefault(ours, (file, key, SAFETENSORS_DTYPES[stored]))
    return entries


def stored_dtypes(path: str) -> dict[str, torch.dtype]:
    """{minivb parameter name: the dtype its tensor has in the checkpoint files}, read from the headers alone.

    A model loaded in float32 from bfloat16 (or float16) files holds the exact values of the file: written back in
    these dtypes, every tensor that was not changed is the same bytes again.
    """
    return stored_tensors(path)[0]


def stored_tensors(path: str):
    """(stored_dtypes(path), `read(name)`): `read` gives minivb parameter `name` as the checkpoint's files store it
    (their dtype, their bytes), read from its file when asked, one tensor at a time. A fine-tune writes its frozen
    towers back with it (saving.py): bit for bit as they came in, whichever dtype it held them in while training."""
    entries = _stored_entries(path)

    def read(name: str) -> torch.Tensor:
        if name not in entries:
            raise ValueError(f"{path} has no tensor {official_key(name)!r} to copy")
        file, key, _ = entries[name]
        with _open(file) as handle:
            return _read(handle, file, key)

    return {name: dtype for name, (file, key, dtype) in entries.items()}, read
