"""`make bench`: decode speed of minivb against transformers on one medium checkpoint, and how close to the floor.

The checkpoint is written by transformers itself (random weights, fp32): vision 4 layers x 384 at 112 px, Q-Former
4 x 384, LLaMA 8 layers x 768 with 12 heads and intermediate size 2048, vocabulary 32002, 32 queries, 4 frames.
One video, one prompt of 12 tokens after its 128 placeholders.

Per-token decode time is the slope of total time against the number of new tokens (two lengths, the best of a few
runs each), so the vision encoder, the Q-Former and the prefill cancel out. EOS is forbidden until the last step
(min_new_tokens = max_new_tokens), so every run decodes exactly as many tokens as asked.

Two floors for one greedy token, measured in the same run:
  physical   bytes of language-model weights a token reads / the bandwidth of one large matrix-vector product
  practical  the time to stream those same weight matrices, in order, through torch.mv
Decoding one token must read every weight once; at batch 1 that is all it does, so it cannot beat these.

    python tests/bench_generate.py [--device cuda] [--threads N]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minivb  # noqa: E402
from tests import tiny  # noqa: E402

VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, image_size=112,
              patch_size=14, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
               vocab_size=30523, cross_attention_frequency=2)
LLAMA = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             vocab_size=32002, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
             tie_word_embeddings=False)
NUM_QUERY_TOKENS, NUM_FRAMES, PLACEHOLDER, EOS, PAD = 32, 4, 32001, 2, 0


def medium_checkpoint(path):
    config = transformers.InstructBlipVideoConfig(vision_config=VISION, qformer_config=QFORMER, text_config=LLAMA,
                                                  num_query_tokens=NUM_QUERY_TOKENS, video_token_index=PLACEHOLDER)
    torch.manual_seed(0)
    model = transformers.InstructBlipVideoForConditionalGeneration(config).eval()
    tiny.randomize(model)  # weights at a scale that gives varied answers, so both sides decode the same real text
    model.save_pretrained(path)
    return model


def medium_batch(device):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 32000, (1, 12), generator=g)
    input_ids = torch.cat([torch.full((1, NUM_FRAMES * NUM_QUERY_TOKENS), PLACEHOLDER), prompt], dim=1)
    batch = dict(pixel_values=torch.randn(1, NUM_FRAMES, 3, 112, 112, generator=g),
                 qformer_input_ids=torch.randint(1, 30000, (1, 10), generator=g),
                 qformer_attention_mask=torch.ones(1, 10, dtype=torch.long),
                 input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return {k: v.to(device) for k, v in batch.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(run, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), out


def per_token(generate, device, short, long, repeats):
    """Seconds per decode step: (best time for `long` new tokens - best for `short`) / (long - short)."""
    generate(short)  # warm-up: allocator, thread pools, lazy initialisation
    t_short, _ = best_time(lambda: generate(short), device, repeats)
    t_long, out = best_time(lambda: generate(long), device, repeats)
    return (t_long - t_short) / (long - short), out


def weight_matrices(model):
    """The language-model weights one decode step reads, in the order it reads them (embedding rows aside)."""
    lm = model.language_model
    matrices = []
    for layer in lm.layers:
        attn, mlp = layer.attn, layer.mlp
        matrices += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                     mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return matrices + [lm.lm_head.weight]


def floors(model, device, repeats=10):
    """(bytes per token, bandwidth of one large mv in bytes/s, physical floor s, practical floor s)."""
    matrices = weight_matrices(model)
    vectors = [torch.randn(w.shape[1], device=device) for w in matrices]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    weight_bytes -= model.language_model.embed_tokens.weight.numel() * 4  # a token reads one row of it, not all
    big = torch.randn(weight_bytes // 4 // 8192, 8192, device=device)  # as many bytes as the weights: no cache helps
    x = torch.randn(8192, device=device)
    torch.mv(big, x)
    t_big, _ = best_time(lambda: torch.mv(big, x), device, repeats)
    bandwidth = big.numel() * 4 / t_big
    del big

    def stream():
        for w, v in zip(matrices, vectors):
            torch.mv(w, v)

    stream()
    t_stream, _ = best_time(stream, device, repeats)
    return weight_bytes, bandwidth, weight_bytes / bandwidth, t_stream


def processor_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device} "
          f"({processor_name(device)}), {torch.get_num_threads()} threads")
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f} before starting: other processes share the cores, "
              "and threads that wait on each other can make the numbers meaningless")

    with tempfile.TemporaryDirectory() as path, torch.no_grad():
        hf_model = medium_checkpoint(path).to(device)
        model = minivb.load_model(path, device=device)
        batch = medium_batch(device)
        prompt_length = batch["input_ids"].shape[1]

        def ours(num_beams):
            return lambda n: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams,
                                            eos_token_id=EOS, pad_token_id=PAD)

        def theirs(num_beams):
            return lambda n: hf_model.generate(**batch, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams,
                                               do_sample=False, eos_token_id=EOS, pad_token_id=PAD)[:, prompt_length:]

        rows = []
        for name, num_beams, short, long in (("greedy, per token", 1, 4, 24), ("5 beams, per step", 5, 4, 16)):
            t_ours, ids_ours = per_token(ours(num_beams), device, short, long, args.repeats)
            t_theirs, ids_theirs = per_token(theirs(num_beams), device, short, long, args.repeats)
            same = ids_ours.shape == ids_theirs.shape and bool((ids_ours == ids_theirs).all())
            rows.append((name, t_theirs, t_ours, same))
        weight_bytes, bandwidth, physical, practical = floors(model, device)

    t_greedy = rows[0][2]
    print(f"\nlanguage-model weights read per token: {weight_bytes / 1e6:.1f} MB; one large mv streams "
          f"{bandwidth / 1e9:.1f} GB/s\n")
    print(f"{'decode time':<22}{'transformers':>14}{'minivb':>10}{'speed-up':>10}{'target':>8}  same tokens")
    for (name, t_theirs, t_ours, same), target in zip(rows, (1.25, 1.5)):
        speedup = t_theirs / t_ours
        print(f"{name:<22}{t_theirs * 1e3:>11.1f} ms{t_ours * 1e3:>7.1f} ms{speedup:>9.2f}x{target:>7.2f}x  "
              f"{'yes' if same else 'NO'}{'' if speedup >= target else '  (below target)'}")
    print(f"\n{'greedy floors':<22}{'per token':>14}{'minivb at':>20}")
    for name, floor in (("physical", physical), ("practical (torch.mv)", practical)):
        print(f"{name:<22}{floor * 1e3:>11.1f} ms{floor / t_greedy:>19.0%}")
    print(f"\ntarget: minivb at >= 50% of the physical floor; "
          f"{'reached' if physical / t_greedy >= 0.5 else 'NOT reached'}")


if __name__ == "__main__":
    main()
