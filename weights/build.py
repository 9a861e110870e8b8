"""Rebuild the small random checkpoints shipped in weights/ (run by `make weights`).

Each is written by transformers itself from a fixed seed, in the exact layout of the official Salesforce
checkpoints: config.json with official-style fields, model.safetensors (bf16), preprocessor and processor
configs, the language model's tokenizer at the top level and the Q-Former's in qformer_tokenizer/. The tokenizer
files are the real ones of the official models (see NOTICE.md) and are kept as they are; this script writes only
config.json, generation_config.json and model.safetensors.

The architecture is the official one shrunk (2 layers, narrow), with the official vocabularies, image size (224),
patch size (14) and 32 queries, so the processor, the placeholders and every key name are exactly official. The
weights are random: the answers are noise until real weights are used.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from tests.tiny import randomize  # noqa: E402  (one weight recipe for tests and shipped checkpoints)

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
              patch_size=14)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=30523,
               cross_attention_frequency=2)
VICUNA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=32064, bos_token_id=0, eos_token_id=1, pad_token_id=32000, rms_norm_eps=1e-6,
              max_position_embeddings=2048, tie_word_embeddings=False)
FLAN_T5 = dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build(name, text_config, video_token_index, seed):
    folder = ROOT / name
    config = transformers.InstructBlipVideoConfig(vision_config=VISION, qformer_config=QFORMER,
                                                  text_config=text_config, num_query_tokens=32,
                                                  video_token_index=video_token_index)
    torch.manual_seed(seed)
    model = transformers.InstructBlipVideoForConditionalGeneration(config)
    randomize(model, seed)
    model.to(torch.bfloat16).save_pretrained(folder)

    if text_config["model_type"] == "t5":
        # The official Flan-T5 checkpoints are untied: lm_head.weight is a tensor of its own, and config.json
        # says tie_word_embeddings false. transformers 5 writes T5 tied; restore the official layout.
        tensors = load_file(folder / "model.safetensors")
        generator = torch.Generator().manual_seed(seed + 1)
        shared = tensors["language_model.shared.weight"]
        lm_head = torch.randn(shared.shape, generator=generator) / shared.shape[1] ** 0.5
        tensors["language_model.lm_head.weight"] = lm_head.to(torch.bfloat16)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        values = json.loads((folder / "config.json").read_text())
        values["text_config"]["tie_word_embeddings"] = False
        values["text_config"].pop("scale_decoder_outputs", None)
        (folder / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    print(f"wrote {folder} ({(folder / 'model.safetensors').stat().st_size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    build("vicuna-tiny", VICUNA, video_token_index=32002, seed=0)
    build("flan-t5-tiny", FLAN_T5, video_token_index=32101, seed=1)
