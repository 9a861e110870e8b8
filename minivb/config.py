"""Configuration: one small dataclass per tower, filled from an official `config.json`.

The official InstructBLIP checkpoints (Salesforce/instructblip-vicuna-7b, -flan-t5-xl, ...) publish a
config.json that leaves most of `vision_config` and `qformer_config` out: only their `model_type` is
written. The architecture then comes from the defaults, so the defaults below ARE the official
architecture (EVA-CLIP ViT-g/14 at 224 px, a BERT-base Q-Former). The text configs are written in full
by the official checkpoints; where a field is missing we take the default transformers would take.
"""

import json
import os
from dataclasses import dataclass, field, fields

SUPPORTED_MODEL_TYPES = ("instructblipvideo", "instructblip")
SUPPORTED_TEXT_MODELS = ("llama", "t5")


@dataclass
class VisionConfig:
    """EVA-CLIP ViT-g/14, as in every official InstructBLIP checkpoint."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    # 1e-6 is the official value; 1e-5 (a bug of early ports) makes the 39-layer outputs drift.
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @property
    def tokens(self) -> int:
        """The tokens a frame becomes: its patches and the class token (257 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BERT-base with cross-attention every other layer and one extra token, [DEC] (vocab 30523)."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # always the vision hidden size: set from it below
    pad_token_id: int = 0
    hidden_act: str = "gelu"


@dataclass
class LlamaConfig:
    """Vicuna is LLaMA. Defaults are transformers' LlamaConfig defaults (LLaMA-7B)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}): each key/value head serves a group of query heads")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class T5Config:
    """Flan-T5 (T5 v1.1). Defaults are transformers' T5Config defaults (t5-small)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # The activation of the feed-forward. When config.json does not name it, transformers derives it from
    # feed_forward_proj, and "gated-gelu" gives the tanh approximation "gelu_new". The official InstructBLIP
    # T5 checkpoints name it: exact "gelu".
    dense_act_fn: str | None = None
    is_gated_act: bool = False
    # Multiply the decoder output by d_model**-0.5 before lm_head. This belongs to tied T5 (the original
    # t5 checkpoints); Flan-T5 is untied and unscaled. None: decide from tie_word_embeddings, as transformers does.
    scale_decoder_outputs: bool | None = None
    tie_word_embeddings: bool | None = None
    decoder_start_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = 1
    pad_token_id: int | None = 0
    model_type: str = "t5"

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        activation = self.feed_forward_proj.split("-")
        self.is_gated_act = activation[0] == "gated"
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else activation[-1]
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings is not False

    @property
    def hidden_size(self) -> int:
        return self.d_model


@dataclass
class InstructBlipVideoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: LlamaConfig | T5Config = field(default_factory=LlamaConfig)
    num_query_tokens: int = 32
    model_type: str = "instructblipvideo"
    # The placeholder id in input_ids that marks where the visual tokens go. Video checkpoints set
    # video_token_index, image checkpoints image_token_index; either may be absent (then the visual
    # tokens are prepended, see model.py).
    video_token_index: int | None = None
    image_token_index: int | None = None
    # "int8" for a checkpoint minivb wrote with its language model's linear weights already quantized
    # (quant.save_quantized; config.json's quantization_config), None for an official, unquantized one.
    quantization: str | None = None

    @property
    def placeholder_token_id(self) -> int | None:
        return self.video_token_index if self.video_token_index is not None else self.image_token_index

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text.model_type == "t5"


def _from_dict(cls, values: dict):
    """Fill a dataclass from the keys it knows; config.json carries many more (dropout, architectures, ...)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def _llama_config(values: dict) -> LlamaConfig:
    values = dict(values)
    # transformers 5 writes RoPE settings as `rope_parameters`, older versions as `rope_theta` / `rope_scaling`.
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"text_config: RoPE scaling {rope_type!r} is not supported; minivb implements plain RoPE")
    if "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    return _from_dict(LlamaConfig, values)


def config_from_dict(values: dict) -> InstructBlipVideoConfig:
    model_type = values.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    text_values = values.get("text_config") or {}
    text_type = text_values.get("model_type")
    if text_type == "llama":
        text = _llama_config(text_values)
    elif text_type == "t5":
        text = _from_dict(T5Config, text_values)
    else:
        raise ValueError(
            f"config.json: text model {text_type!r} is not supported; expected one of {SUPPORTED_TEXT_MODELS}"
        )
    vision = _from_dict(VisionConfig, values.get("vision_config") or {})
    qformer = _from_dict(QFormerConfig, values.get("qformer_config") or {})
    qformer.encoder_hidden_size = vision.hidden_size  # as transformers does: the Q-Former reads the ViT's features
    for name, cfg in (("vision_config", vision), ("qformer_config", qformer)):
        for size in ("image_size", "patch_size"):
            if isinstance(getattr(cfg, size, None), (list, tuple)):
                raise ValueError(f"config.json: {name}.{size} must be one integer (square images)")
    return InstructBlipVideoConfig(
        vision=vision,
        qformer=qformer,
        text=text,
        num_query_tokens=values.get("num_query_tokens", 32),
        model_type=model_type,
        video_token_index=values.get("video_token_index"),
        image_token_index=values.get("image_token_index"),
        quantization=_quantization(values.get("quantization_config")),
    )


# The quant_method minivb writes in config.json's quantization_config (quant.save_quantized), and what it means.
QUANT_METHOD = "minivb-int8"


def _quantization(values) -> str | None:
    if values is None:
        return None
    method = values.get("quant_method") if isinstance(values, dict) else None
    if method != QUANT_METHOD:
        raise ValueError(f"config.json: quantization_config with quant_method {method!r}: minivb reads unquantized "
                         f"checkpoints and its own int8 ones (quant_method {QUANT_METHOD!r}, written by "
                         f"`python -m minivb quantize`)")
    return "int8"


def checkpoint_dir(path) -> str:
    """`path` as a string, once it is known to be an existing directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"expected a checkpoint directory, got a file: {path}")
    return path


def load_config(path) -> InstructBlipVideoConfig:
    """Read `config.json` from a checkpoint directory."""
    path = checkpoint_dir(path)
    return config_from_dict(read_json(os.path.join(path, "config.json")))


def read_json(file: str, required: bool = True) -> dict:
    """A JSON object from a checkpoint's file; a missing optional file reads as {}."""
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"no {os.path.basename(file)} in checkpoint directory {os.path.dirname(file)}")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return values
