"""`make bench`: decode speed of minivb against transformers, per step, beside the bandwidth floor.

Medium model (default). The checkpoint is written by transformers itself (random weights): vision 4 layers x 384 at
112 px, Q-Former 4 x 384, LLaMA 8 layers x 768 with 12 heads and intermediate size 2048, vocabulary 32002,
32 queries, 4 frames. One video, one prompt of 12 tokens after its 128 placeholders. Both sides run it in fp32 and
in bf16, greedy and with 5 beams.

minivb's compiled kernels are rented until they pay for compiling (minivb/compiling.py): a short process, such as
one `ask`, runs their plain routes (F.linear, as transformers), a process that decodes for long compiles them. Both
are timed: the speed-up row is the long process (compiling bought before timing), the row below it the short one
(MINIVB_COMPILE=0, the plain routes the rent runs).

Per-step decode time is the slope of total time against the number of new tokens (two lengths, the best of a few
runs each, minivb and transformers alternating round by round), so the vision encoder, the Q-Former and the
prefill cancel out. EOS is forbidden until the last step (min_new_tokens = max_new_tokens), so every run decodes
exactly as many tokens as asked.

The floor of one greedy token: the bytes of language-model weights it reads / the memory read rate (a sum over
a tensor larger than the caches, measured in the same run). Decoding one token must read every weight once.

--full-width N: the language model alone at LLaMA-7B widths (hidden 4096, intermediate 11008, 32 heads,
vocabulary 32000), N layers, random bf16 weights shared by both sides; greedy ms per token against the floor
measured right before, minivb and transformers alternating, best of --repeats rounds.

    python tests/bench_generate.py [--device cuda] [--threads N] [--dtypes float32 bfloat16] [--full-width 2]
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minivb  # noqa: E402
from minivb import compiling  # noqa: E402
from minivb.checkpoint import map_key  # noqa: E402
from minivb.config import LlamaConfig  # noqa: E402
from minivb.llama import Llama  # noqa: E402
from minivb.memory import decode_bytes  # noqa: E402
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


def per_token(runs, device, short, long, repeats):
    """Seconds per decode step of each run: (best time for `long` new tokens - best for `short`) / (long - short).

    `runs` maps a name to generate(n). The runs alternate round by round (a, b, a, b, ...), so a slow minute of a
    shared machine lands on both sides rather than on one; returns {name: (seconds per step, ids of the long run)}.
    """
    best = {name: {short: math.inf, long: math.inf} for name in runs}
    out = {}
    for generate in runs.values():
        generate(short)  # warm-up: allocator, thread pools, compiled kernels
    for _ in range(repeats):
        for name, generate in runs.items():
            for n in (short, long):
                t, ids = best_time(lambda: generate(n), device, 1)
                best[name][n] = min(best[name][n], t)
                out[name] = ids
    return {name: ((b[long] - b[short]) / (long - short), out[name]) for name, b in best.items()}


def read_rate(device, megabytes=384, repeats=5):
    """Bytes per second the device reads: the best sum over a bf16 tensor larger than the caches."""
    big = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    t, _ = best_time(big.sum, device, repeats + 1)
    return big.numel() * 2 / t


@contextlib.contextmanager
def plain_routes():
    """minivb's compiled kernels take their plain routes, as in a process whose rent has not paid (compiling.py)."""
    before = os.environ.get("MINIVB_COMPILE")
    os.environ["MINIVB_COMPILE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINIVB_COMPILE"]
        else:
            os.environ["MINIVB_COMPILE"] = before  # the user's own setting, which the long-process rows then follow


def processor_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def medium(args, device):
    with tempfile.TemporaryDirectory() as path, torch.no_grad():
        medium_checkpoint(path)
        batch = medium_batch(device)
        prompt_length = batch["input_ids"].shape[1]
        print(f"\n{'medium model':<26}{'transformers':>14}{'minivb':>10}{'speed-up':>10}{'target':>8}  same tokens  load")
        compiling.buy()  # the steady state of a process that decodes for long; plain_routes() times a short one
        for dtype in args.dtypes:
            dtype = getattr(torch, dtype)
            hf_model = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(path, dtype=dtype)
            hf_model = hf_model.to(device).eval()
            model = minivb.load_model(path, dtype=dtype, device=device)

            def ours(num_beams):
                return lambda n: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams,
                                                eos_token_id=EOS, pad_token_id=PAD)

            def ours_plain(num_beams):
                def run(n):
                    with plain_routes():
                        return ours(num_beams)(n)
                return run

            def theirs(num_beams):
                return lambda n: hf_model.generate(**batch, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams,
                                                   do_sample=False, eos_token_id=EOS,
                                                   pad_token_id=PAD)[:, prompt_length:]

            name = str(dtype).removeprefix("torch.")
            for label, num_beams, short, long, target in (("greedy, per token", 1, 4, 24, 1.25),
                                                          ("5 beams, per step", 5, 4, 16, 1.5)):
                times = per_token({"ours": ours(num_beams), "plain": ours_plain(num_beams),
                                   "theirs": theirs(num_beams)}, device, short, long, args.repeats)
                (t_ours, ids_ours), (t_theirs, ids_theirs) = times["ours"], times["theirs"]
                t_plain = times["plain"][0]
                # bf16 sums in another order than transformers' kernels (fast.py): near-ties can then flip a token
                agree = 0
                if ids_ours.shape == ids_theirs.shape:
                    agree = (ids_ours == ids_theirs).long().cumprod(-1).sum(-1).min()  # leading tokens in common
                same = "yes" if agree == long else f"first {int(agree)}/{long}"
                speedup = t_theirs / t_ours
                print(f"{name + ' ' + label:<26}{t_theirs * 1e3:>11.1f} ms{t_ours * 1e3:>7.1f} ms{speedup:>9.2f}x"
                      f"{target:>7.2f}x  {same:<11}  {os.getloadavg()[0]:.1f}"
                      f"{'' if speedup >= target else '  (below target)'}")
                plain_speedup = t_theirs / t_plain
                print(f"{'  a short process (rented)':<26}{'':>14}{t_plain * 1e3:>7.1f} ms{plain_speedup:>9.2f}x"
                      f"{target:>7.2f}x{'' if plain_speedup >= target else '  (below target)'}")
                if num_beams == 1:
                    floor = decode_bytes(model.language_model) / read_rate(device)
                    print(f"{'  floor (bytes / read rate)':<26}{'':>14}{floor * 1e3:>7.1f} ms  minivb at "
                          f"{floor / t_ours:.0%} of it")
            del hf_model, model


FULL_WIDTH = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


def full_width_models(num_layers):
    """transformers' LlamaForCausalLM at 7B widths with random bf16 weights, and minivb's Llama on the same tensors."""
    config = transformers.LlamaConfig(num_hidden_layers=num_layers, tie_word_embeddings=False, **FULL_WIDTH)
    with torch.device("meta"):  # no fp32 random init: allocate once, in bf16
        reference = transformers.LlamaForCausalLM(config)
    reference = reference.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            scale = 1.0 if "embed" in name else 1 / math.sqrt(p.shape[-1])
            p.copy_(1.0 if "norm" in name else torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * scale)
    rope = reference.model.rotary_emb  # a buffer that to_empty left uninitialised
    rope.inv_freq = rope.original_inv_freq = rope.compute_default_rope_parameters(reference.config)[0]
    with torch.device("meta"):
        ours = Llama(LlamaConfig(num_hidden_layers=num_layers, **FULL_WIDTH))
    state = {map_key(f"language_model.{k}").removeprefix("language_model."): v
             for k, v in reference.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)  # the same tensors: no second copy in memory
    return reference, ours.eval()


@torch.no_grad()
def greedy_step_times(step, first_logits, steps):
    times, logits = [], first_logits
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]  # (1, 1)
        start = time.perf_counter()
        logits = step(token)
        times.append(time.perf_counter() - start)
    return times


def full_width(args):
    reference, ours = full_width_models(args.full_width)
    prompt = torch.randn(1, 150, FULL_WIDTH["hidden_size"], generator=torch.Generator().manual_seed(1)).bfloat16()
    token_bytes = decode_bytes(ours)
    print(f"\nLLaMA at 7B widths, {args.full_width} layers, bf16, prompt 150 tokens: a token reads "
          f"{token_bytes / 1e9:.2f} GB")

    def ours_run(steps):
        cache = ours.new_cache(1, prompt.shape[1] + steps + 1)
        return greedy_step_times(lambda t: ours(ours.embed_tokens(t), cache=cache),
                                 ours(prompt, cache=cache, only_last_logits=True), steps)

    def theirs_run(steps):
        out = reference(inputs_embeds=prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        return greedy_step_times(lambda t: reference(input_ids=t, past_key_values=cache, use_cache=True).logits,
                                 out.logits, steps)

    with torch.no_grad():
        a, b = ours(prompt)[0, -1].float(), reference(inputs_embeds=prompt).logits[0, -1].float()
    print(f"last-token logits cosine to transformers: {torch.nn.functional.cosine_similarity(a, b, dim=0):.5f}")
    compiling.buy()  # a process that decodes for long: its kernels compile (compiling.py)
    ours_run(3), theirs_run(3)  # warm-up: the fused kernel compiles here
    best = {}
    for _ in range(args.repeats):
        floor = token_bytes / read_rate(torch.device("cpu"))
        t_ours, t_theirs = min(ours_run(8)), min(theirs_run(8))
        print(f"  round: floor {floor * 1e3:.1f} ms, minivb {t_ours * 1e3:.1f} ms, transformers {t_theirs * 1e3:.1f} ms, "
              f"load {os.getloadavg()[0]:.1f}")
        for key, value in (("floor", floor), ("ours", t_ours), ("theirs", t_theirs)):
            best[key] = min(best.get(key, math.inf), value)
    print(f"greedy decode, best rounds: floor {best['floor'] * 1e3:.1f} ms | minivb {best['ours'] * 1e3:.1f} ms "
          f"({best['floor'] / best['ours']:.0%} of the floor) | transformers {best['theirs'] * 1e3:.1f} ms "
          f"({best['floor'] / best['theirs']:.0%}) | speed-up {best['theirs'] / best['ours']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--full-width", type=int, default=0, metavar="LAYERS",
                        help="time the language model alone at 7B widths with this many layers, instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device} "
          f"({processor_name(device)}), {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print("warning: other processes share the cores; threads that wait on each other can make the numbers "
              "meaningless (the load average is printed beside each row)")
    if args.full_width:
        full_width(args)
    else:
        medium(args, device)


if __name__ == "__main__":
    main()
