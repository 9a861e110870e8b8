"""Full-size checkpoints with random weights: the official layout of the four InstructBLIP checkpoints, at their
real size, written without a download and without ever holding the model in memory.

What it is for: minivb promises to load the official checkpoints; this proves it at 7-13 billion parameters on a
machine with no internet, and gives `make bench-full` (tests/bench_full.py) something to load. The weights are
random, so the answers are noise, but every tensor has its official name, shape and dtype, the shards and
`model.safetensors.index.json` are laid out as on the Hub, and config.json is the official one. Both minivb and
transformers load the folder as it is.

    python -m minivb.fullsize --model vicuna-7b --out /tmp/minivb-fullsize/vicuna-7b [--layers V L] [--dtype bfloat16]

`--layers V L` keeps every width and cuts the depth: V vision layers, L language-model layers (T5: L encoder and L
decoder blocks); config.json says so. A quick benchmark at real widths fits in ~3 GB that way.

How the files are written: a safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. The shapes are known before any number is drawn (the model built on the meta
device), so the header is written first and each tensor is drawn, written and dropped in turn: memory holds one
tensor at a time (the largest, the 32k x 4096 embedding table, is 0.26 GB in bf16). Measured on 2 cores (AMD EPYC):
~170 M random numbers a second; the 7B (15.8 GB in bf16, 2 shards) written in 97 s with a peak RSS of 0.58 GB.
"""

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path

import torch

from .checkpoint import ALIASES, official_key
from .saving import PROCESSOR_FILES, copy_processor_files, write_json, write_safetensors
from .config import config_from_dict

# ----------------------------------------------------------------------------- the official configs

# Salesforce/instructblip-vicuna-7b's config.json (revision 92cb457) as published, less two fields its converter
# left behind (`_name_or_path`, `_attn_implementation_autoset`). The vision and Q-Former configs name only their
# type: the defaults are the official architecture (config.py).
VICUNA_7B = {
    "architectures": ["InstructBlipForConditionalGeneration"],
    "image_token_index": 32001,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "instructblip",
    "num_query_tokens": 32,
    "qformer_config": {"model_type": "instructblip_qformer", "vocab_size": 30523},
    "text_config": {
        "architectures": ["LLaMAForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_sequence_length": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pad_token_id": 32000,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0",
    "use_decoder_only_language_model": True,
    "vision_config": {"model_type": "instructblip_vision_model"},
}

# Salesforce/instructblip-flan-t5-xl: google/flan-t5-xl's text config with InstructBLIP's exact GELU.
FLAN_T5_XL = {
    **{k: v for k, v in VICUNA_7B.items() if k not in ("text_config", "transformers_version")},
    "image_token_index": 32100,
    "use_decoder_only_language_model": False,
    "text_config": {
        "_name_or_path": "google/flan-t5-xl",
        "architectures": ["T5ForConditionalGeneration"],
        "d_ff": 5120,
        "d_kv": 64,
        "d_model": 2048,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "n_positions": 512,
        "num_decoder_layers": 24,
        "num_heads": 32,
        "num_layers": 24,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32128,
    },
}

# The two larger checkpoints differ from these only in the language model's sizes (their vision encoder, Q-Former,
# vocabularies and special tokens are the same), so their configs are derived, not transcribed:
#   vicuna-13b   hidden 5120, 40 layers, 40 heads (head_dim 5120 / 40 = 128), intermediate 13824 (LLaMA-13B)
#   flan-t5-xxl  d_model 4096, d_ff 10240, 24 + 24 blocks, 64 heads of d_kv 64 (google/flan-t5-xxl)
VICUNA_13B = {**VICUNA_7B, "text_config": {**VICUNA_7B["text_config"], "hidden_size": 5120, "num_hidden_layers": 40,
                                           "num_attention_heads": 40, "num_key_value_heads": 40,
                                           "intermediate_size": 13824}}
FLAN_T5_XXL = {**FLAN_T5_XL, "text_config": {**FLAN_T5_XL["text_config"], "_name_or_path": "google/flan-t5-xxl",
                                             "d_model": 4096, "d_ff": 10240, "num_heads": 64}}

OFFICIAL = {"vicuna-7b": VICUNA_7B, "vicuna-13b": VICUNA_13B, "flan-t5-xl": FLAN_T5_XL, "flan-t5-xxl": FLAN_T5_XXL}

REPO = Path(__file__).resolve().parent.parent
# The official tokenizer and processor files, shipped with the small checkpoints of weights/ (see weights/NOTICE.md).
PROCESSOR_FROM = {"vicuna": REPO / "weights" / "vicuna-tiny", "flan-t5": REPO / "weights" / "flan-t5-tiny"}
# The `<video>` token of each official tokenizer (the image checkpoints mark frames with `<image>`, 32001 / 32100).
VIDEO_TOKEN = {"vicuna": 32002, "flan-t5": 32101}

# transformers 4.x wrote the official checkpoints in shards of at most 10 GB ("10GB": 10**10 bytes): the 7B's 31.6
# GB of float32 are 4 shards. The writer streams, so a shard's size costs disk, never memory.
SHARD_BYTES = 10 * 10**9
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def official_config(name: str, layers: tuple[int, int] | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json of checkpoint `name` as InstructBLIP-Video, its depth cut to `layers` = (V, L) if given.

    The official checkpoints are image models (`instructblip`); minivb and transformers' video model read the same
    weights under the video config, which names the `<video>` placeholder instead of `<image>`. Nothing else changes.
    """
    if name not in OFFICIAL:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(OFFICIAL)}")
    values = json.loads(json.dumps(OFFICIAL[name]))  # a deep copy
    family = "flan-t5" if name.startswith("flan-t5") else "vicuna"
    del values["image_token_index"]
    values.update(architectures=["InstructBlipVideoForConditionalGeneration"], model_type="instructblipvideo",
                  video_token_index=VIDEO_TOKEN[family], torch_dtype=str(dtype).removeprefix("torch."))
    values["vision_config"]["model_type"] = "instructblipvideo_vision_model"
    values["qformer_config"]["model_type"] = "instructblipvideo_qformer"
    if layers is not None:
        vision_layers, text_layers = layers
        if vision_layers < 1 or text_layers < 1:
            raise ValueError(f"--layers takes two positive numbers (vision, language model), got {layers}")
        values["vision_config"]["num_hidden_layers"] = vision_layers
        text = values["text_config"]
        if family == "flan-t5":
            text["num_layers"] = text["num_decoder_layers"] = text_layers
        else:
            text["num_hidden_layers"] = text_layers
    return values


# ----------------------------------------------------------------------------- the tensors: names, shapes, values


def checkpoint_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(official key, shape) of every tensor the checkpoint holds, in minivb's parameter order.

    The names come from minivb's parameters on the meta device read backwards through the key table, plus the
    aliases the official T5 files carry besides `shared` (the encoder's and decoder's embed_tokens).
    """
    from .model import InstructBlipVideo

    with torch.device("meta"):
        model = InstructBlipVideo(config_from_dict(config))
    tensors = []
    for name, param in model.named_parameters():
        key = official_key(name)
        tensors.append((key, tuple(param.shape)))
        tensors += [(alias, tuple(param.shape)) for alias, target in ALIASES.items() if target == key]
    return tensors


# T5 scales no attention score by 1/sqrt(d_kv): its checkpoints fold that factor into the query weights (transformers
# initialises them with std (d_model * d_kv)^-0.5). At std 0.02 the scores of 64-dim heads were 8x too large, the
# softmax near one-hot, and the random flan-t5-xl chaotic: any perturbation grew with depth (int8 against bf16
# logits, cosine 0.9994 with 1 + 1 layers, 0.974 with 4 + 4, 0.57 with the full 24 + 24; the dequantized bf16
# reference the same). 0.02 / sqrt(64), d_kv of every official T5 checkpoint.
T5_QUERY_STD = 0.02 / 64**0.5


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The values of one tensor, at the scale of a trained checkpoint, so activations stay finite and varied
    through 32 layers in bf16 and the logits are neither flat nor NaN.

    Norm weights (every 1-D `.weight`) are ones, biases small, everything else (matrices, embeddings, the learned
    queries) normal with std 0.02, the initializer_range of the official configs; but T5's attention queries,
    T5_QUERY_STD. Each tensor has its own seed, from its name: a layer holds the same numbers whatever the depth
    cut, and an alias the numbers of its target.
    """
    if len(shape) == 1 and key.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(ALIASES.get(key, key).encode()))
    std = 0.002 if key.endswith(".bias") else T5_QUERY_STD if key.endswith("Attention.q.weight") else 0.02
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


# ----------------------------------------------------------------------------- the files


def plan_shards(tensors, element_size: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors in order into shards, as transformers does: a new shard when the next tensor would not fit."""
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = element_size * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    return shards + [current] if current else shards


def write_checkpoint(config: dict, out, dtype: torch.dtype = torch.bfloat16, processor_from=None, seed: int = 0,
                     shard_bytes: int = SHARD_BYTES, progress=print) -> dict:
    """Write a checkpoint directory for `config` (a config.json dict): shards, index, config, processor files.

    The index is written last: a folder with an index is complete (tests/bench_full.py reuses it then).
    Returns the index.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    tensors = checkpoint_tensors(config)
    element_size = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensors, element_size, shard_bytes)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        start = time.perf_counter()
        shapes = dict(shard)  # each tensor drawn as it is written: memory holds one at a time
        total += write_safetensors(out / name, [(key, dtype, shape) for key, shape in shard],
                                   lambda key: random_tensor(key, shapes[key], dtype, seed))
        weight_map.update({key: name for key, _ in shard})
        if progress is not None:
            progress(f"wrote {name}: {len(shard)} tensors, {(out / name).stat().st_size / 1e9:.2f} GB "
                     f"in {time.perf_counter() - start:.1f} s")
    write_json(out / "config.json", config, sort_keys=True)
    if processor_from is not None:
        copy_processor_files(processor_from, out, names=PROCESSOR_FILES + ("generation_config.json",))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / "model.safetensors.index.json", index)
    return index


def build(name: str, out, layers: tuple[int, int] | None = None, dtype: torch.dtype = torch.bfloat16,
          progress=print) -> dict:
    """`python -m minivb.fullsize`: the checkpoint `name` (see OFFICIAL) written to `out`."""
    family = "flan-t5" if name.startswith("flan-t5") else "vicuna"
    processor_from = PROCESSOR_FROM[family]
    if not (processor_from / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the official tokenizer files are missing from {processor_from}: "
                                "minivb.fullsize runs from a checkout of the minivb repository")
    return write_checkpoint(official_config(name, layers, dtype), out, dtype, processor_from, progress=progress)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minivb.fullsize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(OFFICIAL))
    parser.add_argument("--out", required=True, help="the checkpoint folder to write (large: keep it out of the repo)")
    parser.add_argument("--layers", type=int, nargs=2, metavar=("V", "L"),
                        help="cut the depth to V vision and L language-model layers, every width kept")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        index = build(args.model, args.out, tuple(args.layers) if args.layers else None, DTYPES[args.dtype])
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.out}: {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 1e9:.2f} GB "
          f"of {args.dtype} weights in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
