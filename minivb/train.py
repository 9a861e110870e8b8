"""Training: teach an InstructBLIP-Video to answer questions about the toy clips of toy.py.

Where it sits: everything else in minivb runs a trained model; this file makes one. It uses the model's own
forward with `labels` (model.py computes the loss), the processor the checkpoint ships with (processor.py) and
`save_checkpoint` (saving.py), so what comes out is an official-layout checkpoint that minivb, the CLI and
transformers all read.

Two recipes:
  "instructblip"  the paper's: start from a checkpoint, freeze the vision encoder and the language model, train only
                  the Q-Former, the query tokens and the projection (the instruction-aware bridge between the two);
  "full"          everything from scratch: a small architecture (TOY_* below) with the real Vicuna tokenizer. This
                  is how the shipped toy checkpoint weights/toy-vicuna is made (`make train-toy`).
The loop is written plainly: AdamW, linear warm-up then cosine decay, gradient clipping, and the loss only on the
answer tokens (labels -100 on the visual placeholders, the question and the padding). It is the one loop of minivb:
finetune.py runs the InstructBLIP recipe on an annotation file through the same `train_loop`, optimizer groups,
schedule and `make_batch`.

    python -m minivb.train full --out weights/toy-vicuna
    python -m minivb.train instructblip --init weights/vicuna-tiny --out /tmp/bridge --steps 200
    python -m minivb.train eval --model weights/toy-vicuna --clips 200

Shapes: B batch, T frames (4), Q queries per frame, L prompt + answer length, V vocabulary.
"""

import argparse
import itertools
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import toy
from .config import InstructBlipVideoConfig, LlamaConfig, QFormerConfig, VisionConfig
from .evaluate import is_correct  # the standard VQA answer normalisation, then exact match: `eval`'s one rule
from .model import InstructBlipVideo, load_model
from .processor import load_processor
from .saving import copy_processor_files, save_checkpoint, write_json

# The toy architecture: the official one, shrunk. Vocabularies stay official (the real tokenizers), and they are
# most of the weights: the 32k x D embedding and lm_head tables. 112 px frames and 14 px patches give an 8 x 8 grid.
TOY_IMAGE_SIZE = 112
TOY_VISION = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          image_size=TOY_IMAGE_SIZE, patch_size=14)
TOY_QFORMER = QFormerConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, cross_attention_frequency=1, encoder_hidden_size=64)
# Official Vicuna ids: </s> (2) is bos and eos, [PAD] 32000, <video> 32002; 32064 rows like vicuna-tiny.
TOY_TEXT = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=32064, max_position_embeddings=256, bos_token_id=2, eos_token_id=2,
                       pad_token_id=32000)
TOY_NUM_QUERY_TOKENS = 2  # 2 per frame, 8 visual tokens for 4 frames: the language model's sequence stays short
VIDEO_TOKEN = 32002
DEMO_CLIP = 11  # held-out clip 11: a red circle moving down, shipped as example.gif
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "qformer_tokenizer")
# How often each question type is asked in training. Colour is learned within a few hundred steps; shape and
# direction need the vision encoder to find edges and positions first, so they get most of the steps.
QUESTION_MIX = {"color": 0.1, "shape": 0.3, "direction": 0.35, "describe": 0.25}
# The peak learning rate. Direction is the hard skill: the ViT and the Q-Former must carry where the shape is in
# each frame, and the language model must learn to tell frame 1's tokens from frame 4's by their position alone.
# At 1e-3 colour and shape are learned within a few hundred steps and direction never is (17-30 % after 3000 steps
# in every run we tried, chance is 25 %); at 3e-4 all three are (direction 99 % of 100 held-out clips at 3000).
PEAK_LR = 3e-4
# The pixel statistics of every official checkpoint (OpenAI CLIP); kept so the toy reads frames like the real ones.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------------------- the model and its folder


def toy_config() -> InstructBlipVideoConfig:
    return InstructBlipVideoConfig(vision=TOY_VISION, qformer=TOY_QFORMER, text=TOY_TEXT,
                                   num_query_tokens=TOY_NUM_QUERY_TOKENS, video_token_index=VIDEO_TOKEN)


def init_weights(model: InstructBlipVideo, seed: int) -> None:
    """Random weights for training from scratch: every matrix N(0, 1/fan_in), embeddings N(0, 0.02^2), norms at 1,
    biases at 0.

    Why not BERT's and LLaMA's std 0.02 everywhere: that is right for 768 to 4096 channels, but at 48 to 64 channels
    each layer would shrink its signal about four times, and what the Q-Former reads from the frames would reach the
    language model too faint to learn shapes and motion in minutes. 1/fan_in keeps every layer's output at the
    scale of its input. The query tokens must differ from each other: left at zero they would stay identical.
    """
    generator = torch.Generator().manual_seed(seed)
    embeddings = (model.query_tokens, model.vision.class_token, model.vision.position_embedding)
    init_layers(model, generator)
    with torch.no_grad():
        for param in embeddings:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        # Where a patch lies is what "which direction?" is about: start the patch positions from a 2D sine-cosine
        # code (as MAE does) rather than noise, so they are readable from the first step; they still learn. Scaled
        # by 3, the code is as strong as what the patches show: at scale 1 it drowns in the colour and edge
        # features, and a linear probe trained with the vision side for 800 steps tells in which ninth of the frame
        # the shape starts for 21 % of held-out clips (chance 19 %); at scale 3 for 91 %.
        grid = model.config.vision.image_size // model.config.vision.patch_size
        model.vision.position_embedding[0, 1:] = 3 * sincos_2d(grid, model.config.vision.hidden_size)


@torch.no_grad()
def init_layers(module: torch.nn.Module, generator: torch.Generator) -> None:
    """init_weights' rule for every layer inside `module`: matrices N(0, 1/fan_in), embedding tables
    N(0, 0.02^2), norm gains 1, biases 0 (finetune.py re-initialises the Q-Former and projection with it too)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Embedding):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
        elif isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = layer.weight[0].numel()  # inputs per output: in_features, or 3 * patch * patch
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * fan_in**-0.5)
            if layer.bias is not None:
                layer.bias.zero_()
    for name, param in module.named_parameters():
        if param.dim() == 1 and not name.endswith("bias"):
            param.fill_(1.0)  # LayerNorm / RMSNorm gains
        elif name.endswith("bias") and param.dim() == 1:
            param.zero_()


def sincos_2d(grid: int, channels: int) -> torch.Tensor:
    """(grid*grid, channels): a quarter of the channels sin(x f), a quarter cos(x f), then the same for y."""
    if channels % 4:
        raise ValueError(f"the vision hidden size must be a multiple of 4 for a 2D sine-cosine code, got {channels}")
    frequencies = 1.0 / 10000 ** (torch.arange(channels // 4) / (channels // 4))  # (C/4,)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid) each, row-major
    angles_x = x.reshape(-1, 1) * frequencies  # (grid*grid, C/4)
    angles_y = y.reshape(-1, 1) * frequencies
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)  # (grid*grid, C)


def prepare_folder(out: str, tokenizer_from: str, config: InstructBlipVideoConfig) -> None:
    """Write the processor side of the checkpoint first (tokenizers, image size, queries), so that training reads
    its clips through exactly the processor the checkpoint will ship with."""
    os.makedirs(out, exist_ok=True)
    copy_processor_files(tokenizer_from, out, TOKENIZER_FILES)
    size = config.vision.image_size
    preprocessor = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "BlipImageProcessor",
                    "processor_class": "InstructBlipProcessor", "resample": 3, "rescale_factor": 1 / 255,
                    "size": {"height": size, "width": size}}
    processor = {"num_query_tokens": config.num_query_tokens, "processor_class": "InstructBlipVideoProcessor"}
    for name, values in (("preprocessor_config.json", preprocessor), ("processor_config.json", processor)):
        write_json(os.path.join(out, name), values, sort_keys=True)


# ----------------------------------------------------------------------------- batches


def make_batch(processor, prompts: list[str], videos: list, answers: list[str], is_encoder_decoder: bool,
               num_frames: int = toy.NUM_FRAMES) -> dict[str, torch.Tensor]:
    """The processor's batch for (prompt, video) pairs, plus labels that score only the answer and its eos.

    videos: B videos in any form the processor reads (toy clips (T, S, S, 3) uint8, lists of PIL frames).
    """
    eos = processor.eos_token_id
    if is_encoder_decoder:
        # T5: the prompt goes to the encoder, the answer (the tokenizer appends </s>) is the decoder's target.
        batch = processor(text=prompts, videos=videos, num_frames=num_frames)
        targets = [processor.tokenizer.encode(answer).ids for answer in answers]
        labels = torch.full((len(targets), max(map(len, targets))), -100)  # (B, La), -100 = not scored
        for i, ids in enumerate(targets):
            labels[i, :len(ids)] = torch.tensor(ids)
        batch["labels"] = labels
        return batch

    # Vicuna: [<video> x T*Q][</s> question answer </s>][pads]. The processor's batch of the questions alone gives
    # the pixels and the Q-Former's input: the Q-Former attends both ways, so an answer in its input would flow into
    # the visual tokens, the loss would drop to zero by copying, and nothing would be learned about the clips.
    batch = processor(text=prompts, videos=videos, num_frames=num_frames)
    placeholders = batch["input_ids"][:, :num_frames * processor.num_query_tokens]  # (B, T*Q)
    rows, scored = [], []
    for prompt, answer in zip(prompts, answers):
        question = processor.tokenizer.encode(prompt).ids  # starts with </s>, as the processor's
        full = processor.tokenizer.encode(f"{prompt} {answer}").ids
        if full[:len(question)] != question:
            raise ValueError(f"the answer {answer!r} changes how {prompt!r} is tokenized")
        rows.append(full + [eos])
        scored.append(len(full) - len(question) + 1)  # the answer tokens and the eos
    # Right padding, unlike the processor's left padding for generation: the forward numbers positions 0..L-1, so
    # with the pads at the end every real token sits at the position generation gives it (the count of real
    # tokens before it); left pads would shift each row's text by a different amount.
    length = max(map(len, rows))
    text_ids = torch.full((len(rows), length), processor.pad_token_id)  # (B, L)
    text_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)  # (B, L), -100 = not scored
    for i, (row, k) in enumerate(zip(rows, scored)):
        text_ids[i, :len(row)] = torch.tensor(row)
        text_mask[i, :len(row)] = 1
        labels[i, len(row) - k:len(row)] = text_ids[i, len(row) - k:len(row)]
    batch["input_ids"] = torch.cat([placeholders, text_ids], dim=1)  # (B, T*Q + L)
    batch["attention_mask"] = torch.cat([torch.ones_like(placeholders), text_mask], dim=1)
    batch["labels"] = torch.cat([torch.full_like(placeholders, -100), labels], dim=1)  # (B, T*Q + L)
    return batch


# ----------------------------------------------------------------------------- answering and evaluation


@torch.no_grad()
def answer(model, processor, questions: list[str], videos: list, max_new_tokens: int = 10) -> list[str]:
    """Greedy answers, one per (question, video)."""
    device = model.query_tokens.device
    batch = {name: tensor.to(device) for name, tensor in processor(text=questions, videos=videos).items()}
    ids = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=1,
                         eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def evaluate(model, processor, num_clips: int = 200, batch_size: int = 100,
             question_types=toy.QUESTION_TYPES) -> dict[str, float]:
    """Held-out accuracy per question type: every type asked about each of `num_clips` clips training never saw."""
    was_training = model.training
    model.eval()
    size = processor.image_size[0]
    examples = toy.heldout_examples(num_clips, size, question_types)
    right = {kind: 0 for kind in question_types}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        predictions = answer(model, processor, [e.question for e in chunk], [e.clip.frames for e in chunk])
        for example, prediction in zip(chunk, predictions):
            right[example.question_type] += is_correct(prediction, example.answer)
    model.train(was_training)
    return {kind: right[kind] / num_clips for kind in question_types}


def format_accuracy(accuracy: dict[str, float]) -> str:
    return "  ".join(f"{kind} {value:6.1%}" for kind, value in accuracy.items())


# ----------------------------------------------------------------------------- the loop


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then a cosine down to `floor` times it: large steps early, fine ones at the end."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def select_trainable(model: InstructBlipVideo, recipe: str) -> list[torch.nn.Parameter]:
    if recipe == "full":
        return list(model.parameters())
    # InstructBLIP: the pretrained ViT and LLM stay as they are; only the bridge between them learns.
    for param in model.parameters():
        param.requires_grad_(False)
    bridge = [model.query_tokens, *model.qformer.parameters(), *model.projection.parameters()]
    for param in bridge:
        param.requires_grad_(True)
    return bridge


def train_bridge_in_float32(model: InstructBlipVideo) -> list[torch.nn.Parameter]:
    """The InstructBLIP recipe's trainable set (select_trainable), in float32 whatever the frozen towers' dtype:
    AdamW's small steps would round away in bfloat16 (a 1e-5 step on a weight of 0.1 is below its resolution).
    Returns the trained parameters. Works on a meta-device model too (finetune's memory estimate)."""
    params = select_trainable(model, "instructblip")
    for param in params:
        param.data = param.data.float()
    return params


def make_optimizer(model: InstructBlipVideo, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    # No weight decay on gains, biases and the query tokens: they are not weights that should shrink to zero.
    # (LAVIS decays every tensor of 2 dimensions or more, the (1, Q, Hq) query tokens included; at the recipe's
    # lr 1e-5 and decay 0.05 that is a shrink of 5e-7 a step.)
    decay = [p for p in params if p.dim() >= 2 and p is not model.query_tokens]
    no_decay = [p for p in params if not (p.dim() >= 2 and p is not model.query_tokens)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def train_loop(loss_of, batches, optimizer, params: list[torch.nn.Parameter], schedule, steps: int,
               batch_size: int, clip_norm: float = 1.0, start_step: int = 0, after_step=None,
               show_progress: bool = True) -> None:
    """The one training loop, for the toy (`train` below) and the fine-tune recipe (finetune.py).

    loss_of(batch) -> (the loss to backpropagate, the loss to report as a float); batches yields the batches of
    steps start_step, start_step + 1, ...; schedule(step) -> the learning rate of that step;
    after_step(steps_done, loss, lr) logs, evaluates or saves. The tqdm bar shows loss, lr and examples/s.
    """
    bar = tqdm(total=steps, initial=start_step, desc="training", unit="step", disable=not show_progress,
               dynamic_ncols=True)
    started = time.perf_counter()
    for step, batch in zip(range(start_step, steps), batches):
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss, reported = loss_of(batch)
        loss.backward()
        # Clipping keeps one unlucky batch from undoing what the warm-up built.
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        rate = batch_size * (step + 1 - start_step) / (time.perf_counter() - started)
        bar.set_postfix_str(f"loss {reported:.4f}  lr {lr:.2e}  {rate:.1f} examples/s", refresh=False)
        bar.update(1)
        if after_step is not None:
            after_step(step + 1, reported, lr)
    bar.close()


def toy_batches(processor, batch_size: int, seed: int, is_encoder_decoder: bool):
    """Fresh training clips forever: clip k of step s is drawn from seed s * batch_size + k, its question type
    from QUESTION_MIX."""
    size = processor.image_size[0]
    mix = np.random.default_rng(seed)
    for step in itertools.count():
        seeds = [toy.split_seed("train", step * batch_size + i) for i in range(batch_size)]
        kinds = mix.choice(list(QUESTION_MIX), size=batch_size, p=list(QUESTION_MIX.values()))
        examples = [toy.make_example(seed, size, question_type=str(kind)) for seed, kind in zip(seeds, kinds)]
        yield make_batch(processor, [e.question for e in examples], [e.clip.frames for e in examples],
                         [e.answer for e in examples], is_encoder_decoder)


def train(model, processor, recipe: str, steps: int, batch_size: int, lr: float, weight_decay: float = 0.05,
          warmup: int | None = None, clip_norm: float = 1.0, seed: int = 0, eval_every: int = 0,
          eval_clips: int = 50) -> None:
    """Train in place on fresh training clips, `batch_size` a step (training clip k is drawn from seed k)."""
    torch.manual_seed(seed)
    params = select_trainable(model, recipe)
    optimizer = make_optimizer(model, params, lr, weight_decay, betas=(0.9, 0.98))
    warmup = warmup if warmup is not None else max(1, steps // 20)
    device = model.query_tokens.device

    def loss_of(batch):
        loss = model(**{name: tensor.to(device) for name, tensor in batch.items()}, loss_only=True).loss
        return loss, loss.item()

    def after_step(done, loss, lr):
        if eval_every and done % eval_every == 0 and done < steps:
            tqdm.write(f"  step {done}: held-out ({eval_clips} clips): "
                       f"{format_accuracy(evaluate(model, processor, eval_clips))}", file=sys.stderr)

    model.train()
    train_loop(loss_of, toy_batches(processor, batch_size, seed, model.config.is_encoder_decoder), optimizer, params,
               lambda step: learning_rate(step, steps, lr, warmup), steps, batch_size, clip_norm,
               after_step=after_step)
    model.eval()


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minivb.train", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("full", "train the toy architecture from scratch"),
                       ("instructblip", "train the Q-Former, queries and projection of a checkpoint (--init)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--out", required=True, help="checkpoint folder to write")
        command.add_argument("--steps", type=int, default=4000)
        command.add_argument("--batch-size", type=int, default=16)
        command.add_argument("--lr", type=float, default=PEAK_LR, help="peak learning rate")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--eval-every", type=int, default=500, help="steps between held-out checks (0: none)")
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
        if name == "full":
            command.add_argument("--tokenizer-from", default="weights/vicuna-tiny",
                                 help="checkpoint folder whose Vicuna tokenizer files are copied")
        else:
            command.add_argument("--init", required=True, help="checkpoint folder to start from")
    evaluation = commands.add_parser("eval", help="held-out accuracy per question type")
    evaluation.add_argument("--model", required=True)
    evaluation.add_argument("--clips", type=int, default=200)
    evaluation.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "clips"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.command == "eval":
        model, processor = load_model(args.model), load_processor(args.model)
        accuracy = evaluate(model, processor, args.clips)
        print(f"held-out accuracy on {args.clips} clips per question type (exact answer, greedy):")
        for kind, value in accuracy.items():
            print(f"  {kind:10s} {value:6.1%}")
        return

    started = time.time()
    if args.command == "full":
        config = toy_config()
        prepare_folder(args.out, args.tokenizer_from, config)
        torch.manual_seed(args.seed)
        model = InstructBlipVideo(config)
        init_weights(model, args.seed)
        processor_from = None  # prepare_folder wrote the processor files already
        # A held-out clip to ask about: `make demo` reads it back through video.py like any user's GIF.
        toy.make_clip(toy.split_seed("heldout", DEMO_CLIP), TOY_IMAGE_SIZE).to_gif(os.path.join(args.out, "example.gif"))
    else:
        model, processor_from = load_model(args.init), args.init
    processor = load_processor(processor_from or args.out)
    train(model, processor, args.command, args.steps, args.batch_size, args.lr, seed=args.seed,
          eval_every=args.eval_every)
    # bf16 storage halves the files; the answers are checked after the round trip below.
    save_checkpoint(model, args.out, processor_from=processor_from, dtype=torch.bfloat16)
    print(f"wrote {args.out} in {time.time() - started:.0f}s", file=sys.stderr)
    reloaded, reloaded_processor = load_model(args.out), load_processor(args.out)
    print(f"held-out accuracy (200 clips, as saved): {format_accuracy(evaluate(reloaded, reloaded_processor))}")


if __name__ == "__main__":
    main()
