"""Tiny InstructBLIP(-Video) checkpoints written by transformers itself, with weights that make differences visible.

transformers' default init gives almost flat logits (the ViT is initialised with std 1e-10), on which any
implementation agrees with any other. `randomize` draws every weight at a scale that keeps activations of order
one, so that a wrong sign, a missing scale or a swapped projection shows up as a large difference.
"""

import math

import torch
import transformers

from minivb.checkpoint import map_key

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=100,
               max_position_embeddings=64, cross_attention_frequency=2)
LLAMA = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=130, bos_token_id=2, eos_token_id=2, pad_token_id=0,
             max_position_embeddings=256, tie_word_embeddings=False)
T5 = dict(model_type="t5", d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
          vocab_size=130, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
          relative_attention_max_distance=20)
NUM_QUERY_TOKENS = 4
PLACEHOLDER = 129  # the <video> / <image> id in these tiny vocabularies


def build(text="llama", video=True, seed=0, tied=False, text_overrides=None):
    """A transformers InstructBlip(Video)ForConditionalGeneration with randomized weights, in eval mode."""
    text_config = dict(LLAMA if text == "llama" else T5, **(text_overrides or {}))
    if text == "t5" and tied:
        text_config["tie_word_embeddings"] = True
    kwargs = dict(vision_config=VISION, qformer_config=QFORMER, text_config=text_config,
                  num_query_tokens=NUM_QUERY_TOKENS)
    if video:
        config = transformers.InstructBlipVideoConfig(video_token_index=PLACEHOLDER, **kwargs)
        cls = transformers.InstructBlipVideoForConditionalGeneration
    else:
        config = transformers.InstructBlipConfig(image_token_index=PLACEHOLDER, **kwargs)
        cls = transformers.InstructBlipForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed)
    return model.eval()


def randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if any(k in name for k in ("embed", "query_tokens", "class_embedding", "relative_attention_bias", "shared")):
                p.copy_(noise)  # embeddings: unit scale, like the inputs of a normalised network
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name.lower():
                p.copy_(1.0 + 0.2 * noise)  # LayerNorm / RMSNorm gains away from 1 so that a missing one shows
            else:
                p.copy_(0.1 * noise)  # biases


def save(model, path, sharded=False):
    """Write `model` as transformers does: one model.safetensors, or shards with an index."""
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    return path


def batch(model, num_frames=4, seed=0, video=True, batch_size=2):
    """A batch in transformers' layout: placeholders first, left-padded prompt (LLaMA) or right-padded (T5)."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    shape = (batch_size, num_frames, 3, size, size) if video else (batch_size, 3, size, size)
    pixel_values = torch.randn(shape, generator=g)
    qformer_input_ids = torch.randint(1, config.qformer_config.vocab_size, (batch_size, 7), generator=g)
    qformer_attention_mask = torch.ones_like(qformer_input_ids)
    qformer_attention_mask[1, :3] = 0  # a shorter instruction in row 1 (padding)
    num_visual = NUM_QUERY_TOKENS * (num_frames if video else 1)
    vocab = config.text_config.vocab_size
    prompt = torch.randint(3, PLACEHOLDER, (batch_size, 6), generator=g)
    prompt_mask = torch.ones_like(prompt)
    decoder_only = config.text_config.model_type == "llama"
    if decoder_only:
        prompt_mask[1, :2] = 0  # row 1 is two tokens shorter: left padding, as the Vicuna tokenizer pads
        prompt[1, :2] = 0
    else:
        prompt_mask[1, -2:] = 0  # T5 pads on the right
        prompt[1, -2:] = 0
    input_ids = torch.cat([torch.full((batch_size, num_visual), PLACEHOLDER), prompt], dim=1)
    attention_mask = torch.cat([torch.ones(batch_size, num_visual, dtype=torch.long), prompt_mask], dim=1)
    out = dict(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
               qformer_attention_mask=qformer_attention_mask, input_ids=input_ids, attention_mask=attention_mask)
    labels = torch.randint(3, vocab - 1, (batch_size, input_ids.shape[1] if decoder_only else 5), generator=g)
    if decoder_only:
        labels[:, : num_visual + 2] = -100  # the loss only on answer tokens
    else:
        labels[1, -1] = -100
    out["labels"] = labels
    return out


def add_own_lm_head(path, seed=1):
    """Give a saved T5 checkpoint its own `lm_head.weight`, as the official (untied) Flan-T5 checkpoints have."""
    from safetensors.torch import load_file, save_file

    from minivb.saving import replacing

    file = f"{path}/model.safetensors"
    tensors = load_file(file)
    shared = tensors["language_model.shared.weight"]
    generator = torch.Generator().manual_seed(seed)
    tensors["language_model.lm_head.weight"] = torch.randn(shared.shape, generator=generator) / math.sqrt(shared.shape[1])
    del shared  # load_file's tensors are copies, but a model may still map the file: replace it, never rewrite it
    with replacing(file) as temporary:
        save_file(tensors, temporary, metadata={"format": "pt"})
    return path


def copy_into(reference, ours, prefix):
    """Load a transformers submodule's weights into the minivb module, through the checkpoint key table.

    `prefix` is the submodule's place in InstructBLIP ("vision_model", "qformer", "language_model"): the table
    maps full official names, and a bare submodule's names lack it. Strict: every parameter filled, none left over.
    """
    ours_prefix = None
    state = {}
    for name, tensor in reference.state_dict().items():
        mapped = map_key(f"{prefix}.{name}")
        assert mapped is not None, f"no key-table entry for {prefix}.{name}"
        ours_prefix = ours_prefix or mapped.split(".")[0]
        state[mapped.removeprefix(ours_prefix + ".")] = tensor
    ours.load_state_dict(state, strict=True)
    return ours
