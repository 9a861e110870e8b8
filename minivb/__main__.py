"""The command line: ask a checkpoint about a video or an image, or describe a checkpoint.

    python -m minivb ask --model DIR --video PATH "What is happening?"
    python -m minivb ask --model DIR --video PATH --start 60 --end 90 "What happens in this half minute?"
    python -m minivb info DIR [--frames N]     (parts and sizes, and what each dtype needs and fits here)
    python -m minivb info VIDEO        (duration, frame count, codec, and the frames that would be sampled)
    python -m minivb eval --model DIR --annotations FILE --videos DIR [--out preds.jsonl]   (see evaluate.py)
    python -m minivb quantize --model DIR --out DIR      (an int8 copy of the checkpoint, see quant.py)
    python -m minivb toy-dataset --out DIR --clips N     (a video-QA dataset of toy clips, see data.py)
    python -m minivb finetune --model DIR --annotations FILE --videos DIR --out DIR     (see finetune.py; the same
                                       under torchrun --nproc_per_node N -m minivb finetune ...)

Errors print one line on stderr and exit with code 2, with no traceback.
"""

import argparse
import os
import sys

import torch

from . import evaluate, finetune
from .data import write_toy_dataset
from .memory import WORKLOAD, Workload
from .quant import QUANTIZE_CHOICES, save_quantized
from .video import VIDEO_EXTENSIONS, read_video, video_info

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LARGE_CHECKPOINT = 200_000_000  # bytes; above this, loading prints its progress
# ask's defaults: the paper's 5 beams, and answers short enough that its one search never packs its weights (packing.py)
ASK_NUM_BEAMS, ASK_MAX_NEW_TOKENS = 5, 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minivb", description="minivb: InstructBLIP-Video in plain PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer a question about a video or an image")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="checkpoint directory (official layout)")
    source = ask.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="a GIF / WebP / APNG, a folder of frames, or mp4 / webm / mkv / avi (PyAV)")
    source.add_argument("--image", help="an image file")
    ask.add_argument("--frames", type=int, default=4, help="frames sampled uniformly from the video (default 4)")
    ask.add_argument("--start", type=float, help="sample from this time on (seconds; mp4 / webm / mkv / avi / mov)")
    ask.add_argument("--end", type=float, help="sample before this time (seconds; mp4 / webm / mkv / avi / mov)")
    ask.add_argument("--num-beams", type=int, default=ASK_NUM_BEAMS)
    ask.add_argument("--max-new-tokens", type=int, default=ASK_MAX_NEW_TOKENS)
    ask.add_argument("--repetition-penalty", type=float, default=1.5)
    ask.add_argument("--length-penalty", type=float, default=1.0)
    add_load_arguments(ask)

    evaluation = commands.add_parser("eval", help="accuracy on a video-QA annotation file (the paper's protocol)")
    evaluate.add_arguments(evaluation)
    add_load_arguments(evaluation)

    toy_dataset = commands.add_parser("toy-dataset", help="write a video-QA dataset of toy clips (annotations.json "
                                                          "and videos/) to try eval and finetune on")
    toy_dataset.add_argument("--out", required=True, help="folder to write")
    toy_dataset.add_argument("--clips", type=int, required=True, help="clips; four questions are asked about each")
    toy_dataset.add_argument("--seed", type=int, default=0, help="datasets of different seeds share no clip")
    toy_dataset.add_argument("--answers", choices=["varied", "plain"], default="varied",
                             help="varied (default): 'Red.', 'CIRCLE', 'the left', to evaluate on; plain: as the toy "
                                  "model writes them, to fine-tune on")

    finetune.add_arguments(commands.add_parser(
        "finetune", help="train the Q-Former, queries and projection on an annotation file (the InstructBLIP recipe)"))

    quantize = commands.add_parser("quantize", help="write an int8 copy of a checkpoint (its language model's linear "
                                                    "weights), which then loads without quantizing again")
    quantize.add_argument("--model", required=True, help="checkpoint directory (official layout)")
    quantize.add_argument("--out", required=True, help="folder to write the int8 checkpoint to")

    info = commands.add_parser("info", help="architecture and parameter counts of a checkpoint, or what a video holds")
    info.add_argument("model", help="checkpoint directory (official layout), or a video file (mp4 webm mkv avi mov)")
    info.add_argument("--frames", type=int, default=4, help="frames that would be sampled from a video, and answered "
                                                            "about in a checkpoint's memory figures (default 4)")
    info.add_argument("--num-beams", type=int, default=ASK_NUM_BEAMS, help="for a checkpoint's memory figures")
    info.add_argument("--start", type=float, help="for a video: segment start (seconds)")
    info.add_argument("--end", type=float, help="for a video: segment end (seconds)")

    args = parser.parse_args(argv)
    try:
        if args.command == "ask":
            print(run_ask(args))
        elif args.command == "eval":
            print(evaluate.run(args, load_checkpoint))
        elif args.command == "finetune":
            summary = finetune.finetune(args)
            if summary:  # process 0 alone, under torchrun
                print(summary)
        elif args.command == "quantize":
            print(run_quantize(args.model, args.out))
        elif args.command == "toy-dataset":
            path = write_toy_dataset(args.out, args.clips, args.seed, args.answers)
            print(f"wrote {path} and {os.path.join(args.out, 'videos')}")
        elif os.path.isfile(args.model) and args.model.lower().endswith(VIDEO_EXTENSIONS):
            print(run_video_info(args.model, args.frames, args.start, args.end))
        else:
            print(run_info(args.model, Workload(num_frames=args.frames, num_beams=args.num_beams)))
    except (ValueError, FileNotFoundError) as e:
        print(f"minivb: error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_progress(done, total, file):
    print(f"loading {os.path.basename(file)} ({done + 1}/{total})", file=sys.stderr, flush=True)


def _checkpoint_bytes(path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.name.endswith(".safetensors"))


def run_ask(args) -> str:
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    if args.image is not None and (args.start is not None or args.end is not None):
        raise ValueError("--start and --end cut a segment of a --video; an --image has none")
    import minivb
    from .model import check_context

    processor = minivb.load_processor(args.model)
    if args.video is not None:
        frames = read_video(args.video, args.frames, start=args.start, end=args.end)
        batch = processor(text=args.question, videos=[frames], num_frames=args.frames)
    else:
        batch = processor(text=args.question, images=[args.image])
    config = minivb.load_config(args.model)
    if not config.is_encoder_decoder:  # too many frames for the positions: said before the (slow) load
        check_context(config, batch["pixel_values"], batch["input_ids"], args.max_new_tokens)
    model = load_weights(args)
    batch = {name: tensor.to(args.device) for name, tensor in batch.items()}
    # The tokenizer's eos ends the answers (`</s>`, 2, for Vicuna); the official Vicuna config's eos (1) is an artefact.
    ids = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
                         eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def run_quantize(source, out) -> str:
    def progress(done, total, file):
        print(f"quantizing {os.path.basename(file)} ({done + 1}/{total})", file=sys.stderr, flush=True)

    save_quantized(source, out, progress=progress)
    written, read = _checkpoint_bytes(out) / 1e9, _checkpoint_bytes(source) / 1e9
    return (f"wrote {out}: {written:.2f} GB of safetensors (from {read:.2f} GB); load it as any checkpoint, e.g. "
            f"python -m minivb ask --model {out} ...")


def add_load_arguments(parser) -> None:
    """How to load the checkpoint (`ask` and `eval`)."""
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="auto (default): bfloat16, half the bytes of float32 to read per token, if it fits in "
                             "memory; else bfloat16 with the language model in int8")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8: the language model's linear layers in int8 (half the memory of bfloat16)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="load even when minivb estimates that the model does not fit in the available memory")
    parser.add_argument("--device", default="cpu")


def load_checkpoint(args):
    """The model and processor of --model, loaded as the options of add_load_arguments say."""
    import minivb

    processor = minivb.load_processor(args.model)  # checks the folder before the (slower) weights
    return load_weights(args), processor


def load_weights(args):
    """The model of --model, loaded as the options of add_load_arguments say."""
    import minivb

    large = os.path.isdir(args.model) and _checkpoint_bytes(args.model) > LARGE_CHECKPOINT
    # auto: bfloat16, what the official checkpoints were trained in; decoding, which reads every weight once per
    # token, goes at the speed of memory: half the bytes of float32, close to twice the tokens per second. Where it
    # does not fit, load_model takes int8 for the language model and says so.
    dtype = "auto" if args.dtype == "auto" else DTYPES[args.dtype]
    return minivb.load_model(args.model, dtype=dtype, device=args.device, progress=_print_progress if large else None,
                             quantize=args.quantize, check_memory=not args.no_memory_check, workload=workload(args))


def workload(args) -> Workload:
    """What the command asks of one generate call: the activations load_model's memory check counts."""
    if args.command == "eval":
        return Workload(batch_size=args.batch_size, num_frames=args.num_frames, num_beams=args.num_beams,
                        max_new_tokens=args.max_new_tokens)
    frames = args.frames if args.video is not None else 1  # an image is one frame
    return Workload(num_frames=frames, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)


def run_info(path, workload: Workload = WORKLOAD) -> str:
    from .config import load_config
    from .model import InstructBlipVideo

    config = load_config(path)
    with torch.device("meta"):  # count parameters without allocating them
        model = InstructBlipVideo(config)
    text = config.text
    if config.is_encoder_decoder:
        language = (f"Flan-T5 encoder-decoder: {text.num_layers}+{text.num_decoder_layers} layers x {text.d_model}, "
                    f"{text.num_heads} heads, feed-forward {text.d_ff} ({text.dense_act_fn}), vocab {text.vocab_size}")
    else:
        language = (f"LLaMA decoder: {text.num_hidden_layers} layers x {text.hidden_size}, {text.num_attention_heads} "
                    f"heads ({text.num_key_value_heads} kv), MLP {text.intermediate_size}, vocab {text.vocab_size}")
    v, q = config.vision, config.qformer
    parts = {
        "vision": (f"ViT: {v.num_hidden_layers} layers x {v.hidden_size}, {v.num_attention_heads} heads, MLP "
                   f"{v.intermediate_size}, patch {v.patch_size} at {v.image_size} px", model.vision),
        "qformer": (f"Q-Former: {q.num_hidden_layers} layers x {q.hidden_size}, cross-attention every "
                    f"{q.cross_attention_frequency}, {config.num_query_tokens} queries", model.qformer),
        "projection": (f"linear {q.hidden_size} -> {text.hidden_size}", model.projection),
        "language_model": (language, model.language_model),
    }
    lines = [f"{path}: {config.model_type}, placeholder token {config.placeholder_token_id}"
             + (f", language model's linear weights in {config.quantization}" if config.quantization else "")]
    total = 0
    for name, (description, module) in parts.items():
        count = sum(p.numel() for p in module.parameters())
        total += count
        lines.append(f"  {name:<15} {count:>15,}  {description}")
    total += model.query_tokens.numel()
    lines.append(f"  {'query_tokens':<15} {model.query_tokens.numel():>15,}")
    lines.append(f"  {'total':<15} {total:>15,}")
    return "\n".join(lines + memory_lines(config, workload))


def memory_lines(config, workload: Workload) -> list[str]:
    """What each way of loading the checkpoint needs on this machine now, and the one --dtype auto takes there."""
    from . import memory
    from .fast import has_native_bf16
    from .model import build_on_meta

    device = torch.device("cpu")
    available = memory.available_bytes(device)
    options = ([(torch.float32, None)] if config.quantization is None else []) + memory.auto_options(config)
    needs = {option: memory.estimate(build_on_meta(config, *option), workload, device) for option in options}
    auto = next((option for option in memory.auto_options(config) if memory.fits(needs[option], available)), None)
    known = f"{available / memory.GB:.1f} GB available now" if available >= 0 else "available memory unknown"
    lines = [f"memory to answer about {memory.workload_text(workload)} on this CPU ({known}):"]
    for (dtype, quantize), need in needs.items():
        name = str(dtype).removeprefix("torch.") + (f", {quantize}" if quantize else "")
        verdict = ("fits" if memory.fits(need, available) else "does not fit") + (
            ": what --dtype auto loads" if (dtype, quantize) == auto else "")
        lines.append(f"  {name:<15} {need.total / memory.GB:>8.1f} GB  ({need.weights / memory.GB:.1f} of weights, "
                     f"{need.activations / memory.GB:.1f} to answer)  {verdict}")
    if has_native_bf16():
        lines.append("  this CPU multiplies bf16 natively (avx512_bf16 / amx_bf16): bfloat16 weights compute in bfloat16")
    else:
        lines.append("  this CPU has no native bf16: bfloat16 weights compute in float32 (vision, Q-Former, the prompt) "
                     "and decode in bfloat16")
    if config.quantization is None:  # an int8 checkpoint cannot be fine-tuned (finetune.check_arguments)
        lines.append(f"memory to fine-tune (`finetune`), one example of {workload.num_frames} frame"
                     f"{'s' * (workload.num_frames > 1)} at a time (--micro-batch-size 1):")
        for dtype in (torch.float32, torch.bfloat16):
            need = finetune.training_need(config, dtype, 1, workload.num_frames, device)
            verdict = "fits" if memory.fits(need, available) else "does not fit"
            lines.append(f"  {str(dtype).removeprefix('torch.') + ' towers':<15} {need.total / memory.GB:>8.1f} GB  "
                         f"({need.weights / memory.GB:.1f} of weights, {need.optimizer / memory.GB:.1f} of gradients "
                         f"and moments, {need.activations / memory.GB:.1f} of activations)  {verdict}")
    return lines


COUNT_SOURCES = {"container": "from the container", "duration x rate": "duration x rate, rounded",
                 "counted": "counted by decoding: the container gives neither a count nor a duration"}


def run_video_info(path, num_frames, start, end) -> str:
    """What a video file holds and which frames `ask --video` would give the model (same --frames/--start/--end)."""
    info = video_info(path, num_frames, start=start, end=end)
    rate = f"{float(info.rate):.3f}".rstrip("0").rstrip(".") + " fps" if info.rate else "unknown frame rate"
    duration = f"{info.duration:.3f} s" if info.rate else "unknown (no frame rate)"
    lines = [f"{path}",
             f"  duration    {duration}",
             f"  frames      {info.frame_count} ({COUNT_SOURCES[info.count_source]})",
             f"  resolution  {info.width}x{info.height}",
             f"  codec       {info.codec}, {rate}",
             f"  keyframes   {info.keyframes} in the container's index (where a seek can land)",
             f"  sampled     {len(info.indices)} frames: " + ", ".join(map(str, info.indices))]
    if info.rate:
        lines.append("  at          " + ", ".join(f"{t:.3f}" for t in info.timestamps) + " s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
