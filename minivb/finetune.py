"""Fine-tuning: the InstructBLIP recipe on a video-QA annotation file, in one process or many (torchrun).

Where it sits: data.py reads the annotation file and decodes the clips; this file trains the bridge between the
frozen towers with train.py's loop and writes an official-layout checkpoint that `eval` (evaluate.py), `ask` and
transformers' InstructBlipVideoForConditionalGeneration read.

    python -m minivb finetune --model DIR --annotations FILE --videos DIR --out DIR
    torchrun --nproc_per_node 2 -m minivb finetune ...      (the same arguments; --batch-size stays the global batch)

The recipe, as the InstructBLIP paper ("Implementation Details", arXiv 2305.06500) and LAVIS run it:
  - the vision encoder and the language model are frozen, and written out bit for bit as they came in;
  - the Q-Former, the query tokens and the language projection learn;
  - AdamW, betas (0.9, 0.999), weight decay 0.05; the learning rate rises linearly for the first 1,000 steps (or a
    tenth of a shorter run) to its peak, 1e-5, then follows a cosine down to 0;
  - the loss is the language model's cross-entropy on the answer tokens and the eos only (labels -100 elsewhere);
    the Q-Former reads the prompt, never the answer (train.make_batch).
  Unlike LAVIS, minivb has no dropout (LAVIS's Q-Former drops 10 % of its activations while training).
The language model being frozen, it keeps its own way of writing an answer: the bridge can make it say "red" where
it says "blue", not "RED!" where it writes "red". Fine-tune on answers in the style the model writes (MSRVTT-QA's
one lower-case word suits Vicuna; the toy's: `toy-dataset --answers plain`).

What --out receives:
  model.safetensors, config.json, tokenizer and preprocessor files   the checkpoint, in the official layout
  loss.csv, loss.png                                                 the loss and learning rate of every step
  state.pt (with --save-every N)                                     what --resume needs to go on, see `save_state`

Data parallel: under torchrun every process takes every world_size-th example of each global batch (a
DistributedSampler over the same seeded permutation), DDP all-reduces the gradients of the trainable part only, and
process 0 alone writes. The loss is the mean over all the scored tokens of the global batch, whichever process holds
them, so one process and N processes follow the same loss curve (to float rounding).

Shapes: B global batch, b = B / world_size per process, T frames, L prompt + answer length.
"""

import csv
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import data
from .checkpoint import stored_dtypes
from .config import load_config
from .evaluate import PROMPT  # train with the prompt `eval` asks with
from .model import load_model
from .processor import load_processor
from .saving import copy_processor_files, replacing, save_checkpoint
from .train import init_layers, learning_rate, make_batch, make_optimizer, select_trainable, train_loop

# The recipe (the InstructBLIP paper's "Implementation Details"; LAVIS instruction tuning).
PEAK_LR = 1e-5
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.999)
WARMUP_STEPS = 1000
CLIP_NORM = 1.0  # as the toy trainer (the paper names no clipping): one bad batch at a 1e-3 lr can undo a run
STATE_FILE = "state.pt"
LOSS_FILE = "loss.csv"


# ----------------------------------------------------------------------------- processes


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (RANK in the environment) join the process group: nccl between
    GPUs, gloo on CPUs. A plain `python -m minivb finetune` is rank 0 of 1 and needs no launcher."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


class TrainablePart(torch.nn.Module):
    """The query tokens, Q-Former and projection as one module, for DDP: it broadcasts and all-reduces these and
    nothing else (no copy of the frozen ViT and language model goes between processes). Its forward runs the whole
    model, whose frozen towers DDP does not see: they are held in a list, not as a submodule."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens, self.qformer, self.projection = model.query_tokens, model.qformer, model.projection
        self.whole = [model]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.whole[0](**batch, loss_only=True).loss


def scored_tokens(labels: torch.Tensor, is_encoder_decoder: bool) -> torch.Tensor:
    """How many tokens the loss averages over: T5 scores its decoder labels as they are, Vicuna from position 1."""
    return (labels if is_encoder_decoder else labels[:, 1:]).ne(-100).sum()


# ----------------------------------------------------------------------------- data order


def batches(dataset, prompt: str, processor, is_encoder_decoder: bool, num_frames: int, batch_size: int,
            epochs: int, start_step: int, seed: int, rank: int, world_size: int, num_workers: int):
    """This process's share of every global batch from `start_step` on.

    The order is a function of (seed, epoch) alone: DistributedSampler shuffles all the entries with seed + epoch
    and gives process r the entries r, r + world_size, ... of that permutation, so the global batch of a step is
    the same examples for any number of processes, and a resumed run starts at its step without decoding a single
    clip it skips. The last incomplete batch of an epoch is dropped, as LAVIS does.
    """
    local = batch_size // world_size  # b
    steps_per_epoch = len(dataset) // batch_size
    first_epoch, skip = divmod(start_step, steps_per_epoch)
    for epoch in range(first_epoch, epochs):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        order = list(sampler)[:steps_per_epoch * local]  # this process's entries, in order
        order = order[skip * local:] if epoch == first_epoch else order
        loader = DataLoader(dataset, batch_size=local, sampler=order, collate_fn=data.collate,
                            num_workers=num_workers)
        for items in loader:
            entries = [entry for entry, frames in items]
            yield make_batch(processor, [prompt.format(entry.question) for entry in entries],
                             [frames for entry, frames in items], [entry.answer for entry in entries],
                             is_encoder_decoder, num_frames)


# ----------------------------------------------------------------------------- the resumable state


def save_state(path: str, model, optimizer, step: int, losses: list, settings: dict) -> None:
    """Everything --resume needs to reach the weights an uninterrupted run reaches: the trainable weights (in
    float32, as trained), the optimizer's moments, the step (with the seed in `settings` it fixes the data order
    and the learning rate), the RNG and the losses so far. Written to a temporary file and renamed, so that a crash
    while saving leaves the previous state whole."""
    state = {"step": step, "settings": settings, "losses": losses, "rng": torch.get_rng_state(),
             "trainable": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with replacing(path) as temporary:
        torch.save(state, temporary)


def load_state(path: str, model, optimizer, settings: dict) -> tuple[int, list]:
    """Restore what save_state wrote; refuse a state from a run with other settings. Returns (step, losses)."""
    # weights_only: the restricted unpickler that builds tensors, numbers and containers only, never runs code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    differ = {key: (state["settings"].get(key), value) for key, value in settings.items()
              if state["settings"].get(key) != value}
    if differ:
        listed = ", ".join(f"{key} was {old!r}, now {new!r}" for key, (old, new) in differ.items())
        raise ValueError(f"{path} is the state of another run ({listed}): resume with the same settings")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["losses"]


# ----------------------------------------------------------------------------- the loss curve


def write_loss_csv(path: str, losses: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(losses)


def plot_loss(path: str, losses: list) -> None:
    """loss.png: the loss of every step (log scale) and, beside it, the learning rate."""
    # A Figure of its own, not pyplot: nothing global changes (a notebook calling finetune keeps its inline
    # figures) and no window or display is needed.
    from matplotlib.figure import Figure

    steps, loss, lr = zip(*losses)
    figure = Figure(figsize=(10, 3.5), dpi=100)
    left, right = figure.subplots(1, 2)
    left.plot(steps, loss, linewidth=1)
    left.set(xlabel="step", ylabel="loss (answer tokens)", yscale="log", title="training loss")
    right.plot(steps, lr, linewidth=1, color="tab:orange")
    right.set(xlabel="step", ylabel="learning rate", title="warm-up, then cosine")
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------- the whole run


def reinitialise_bridge(model, seed: int) -> None:
    """Fresh Q-Former, query tokens and projection, by the toy's initialisation rule (train.init_layers): what the
    recovery test starts from, a pair of trained towers with nothing between them."""
    generator = torch.Generator().manual_seed(seed)
    init_layers(model.qformer, generator)
    init_layers(model.projection, generator)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=generator) * 0.02)


def check_arguments(args) -> None:
    for name in ("epochs", "batch_size", "num_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("save_every", "num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be a positive learning rate, got {args.lr}")
    data.check_prompt(args.prompt)
    if load_config(args.model).quantization is not None:  # its int8 weights cannot be written back as a checkpoint
        raise ValueError(f"--model {args.model} is an int8 checkpoint (`python -m minivb quantize`): fine-tune its "
                         f"unquantized source, then quantize the result")
    state = os.path.join(args.out, STATE_FILE)
    if args.resume and not os.path.isfile(state):
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {args.out} (it is written by --save-every)")
    if not args.resume and os.path.isfile(state):
        raise ValueError(f"{args.out} holds the resumable state of an earlier run: pass --resume to continue it, "
                         "or choose another --out")


def finetune(args) -> str:
    """Run the whole fine-tune of `args` (the CLI's namespace); returns the summary line."""
    check_arguments(args)
    entries = data.read_annotations(args.annotations, args.videos)  # the whole file, before any work
    rank, world_size, device = setup_distributed()
    try:
        return _finetune(args, entries, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _finetune(args, entries, rank: int, world_size: int, device: torch.device) -> str:
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch: it must divide among the "
                         f"{world_size} processes")
    steps_per_epoch = len(entries) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{args.annotations} has {len(entries)} questions, fewer than one batch of --batch-size "
                         f"{args.batch_size}")
    steps = args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else min(WARMUP_STEPS, steps // 10)
    started = time.perf_counter()

    processor = load_processor(args.model)
    # float32 for training: the frozen bfloat16 towers widen exactly and are written back in their own dtype.
    model = load_model(args.model, dtype=torch.float32, device=device)
    is_encoder_decoder = model.config.is_encoder_decoder
    torch.manual_seed(args.seed)
    if args.reinit_bridge:
        reinitialise_bridge(model, args.seed)
    params = select_trainable(model, "instructblip")
    optimizer = make_optimizer(model, params, args.lr, WEIGHT_DECAY, BETAS)
    settings = {"model": os.path.abspath(args.model), "annotations": os.path.abspath(args.annotations),
                "questions": len(entries), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "prompt": args.prompt, "num_frames": args.num_frames, "seed": args.seed, "warmup_steps": warmup,
                "reinit_bridge": args.reinit_bridge}
    state_path = os.path.join(args.out, STATE_FILE)
    start_step, losses = load_state(state_path, model, optimizer, settings) if args.resume else (0, [])

    ddp = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(TrainablePart(model), device_ids=device_ids)

    def loss_of(batch):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        loss = ddp(batch) if ddp is not None else model(**batch, loss_only=True).loss  # this process's mean
        count = scored_tokens(batch["labels"], is_encoder_decoder)
        if ddp is None:
            return loss, loss.item()
        # The global batch's mean over all its scored tokens: (sum of this process's token losses) / (all tokens).
        # DDP averages the gradients over the processes, hence the factor world_size.
        total = count.clone()
        dist.all_reduce(total)
        summed = (loss.detach() * count).reshape(1)
        dist.all_reduce(summed)
        return loss * count * world_size / total, (summed / total).item()

    csv_file = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_loss_csv(os.path.join(args.out, LOSS_FILE), losses)  # on resume, drops rows after the state's step
        csv_file = open(os.path.join(args.out, LOSS_FILE), "a", newline="", encoding="utf-8")

    def after_step(done, loss, lr):
        losses.append([done, loss, lr])
        if rank != 0:
            return
        csv.writer(csv_file).writerow([done, loss, lr])
        csv_file.flush()
        if args.save_every and done % args.save_every == 0 and done < steps:
            save_state(state_path, model, optimizer, done, losses, settings)

    dataset = data.VideoQADataset(entries, args.videos, args.num_frames)
    model.train()
    try:
        train_loop(loss_of, batches(dataset, args.prompt, processor, is_encoder_decoder, args.num_frames,
                                    args.batch_size, args.epochs, start_step, args.seed, rank, world_size,
                                    args.num_workers),
                   optimizer, params, lambda step: learning_rate(step, steps, args.lr, warmup, floor=0.0), steps,
                   args.batch_size, CLIP_NORM, start_step=start_step, after_step=after_step,
                   show_progress=rank == 0)
    finally:
        if csv_file is not None:
            csv_file.close()
    model.eval()
    if rank != 0:
        return ""

    # Frozen tensors in the dtype they were read in (the same bytes); trained ones in float32, as trained: a
    # 1e-5 step on a weight of 0.1 is 1e-4 of it, below bfloat16's resolution (4e-3), and would be rounded away.
    dtypes = stored_dtypes(args.model)
    dtypes.update({name: torch.float32 for name, p in model.named_parameters() if p.requires_grad})
    save_checkpoint(model, args.out, processor_from=args.model, dtype=dtypes)
    copy_processor_files(args.model, args.out, names=("generation_config.json",))
    if losses:
        plot_loss(os.path.join(args.out, "loss.png"), losses)
    first, last = losses[0][1], losses[-1][1]
    return (f"wrote {args.out}: {steps} steps of {args.batch_size} ({world_size} process{'es' * (world_size > 1)}), "
            f"loss {first:.4f} -> {last:.4f}, in {time.perf_counter() - started:.0f} s")


def add_arguments(parser) -> None:
    """The `finetune` subcommand's arguments (the CLI, __main__.py, adds them to its parser)."""
    parser.add_argument("--model", required=True, help="checkpoint directory to start from (official layout)")
    parser.add_argument("--annotations", required=True, help="JSON list or JSON Lines of video/question/answer/"
                                                             "question_id entries (see data.py)")
    parser.add_argument("--videos", required=True, help="the folder the annotations' video names are relative to")
    parser.add_argument("--out", required=True, help="folder for the checkpoint, loss.csv, loss.png and the state")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=PEAK_LR, help=f"peak learning rate (default {PEAK_LR:g})")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, over all processes (default 16)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"linear warm-up steps (default {WARMUP_STEPS}, or a tenth of a shorter run)")
    parser.add_argument("--prompt", default=PROMPT,
                        help=f"the template the question is put in, {{}} for the question (default {PROMPT!r})")
    parser.add_argument("--num-frames", type=int, default=4, help="frames sampled uniformly from each video")
    parser.add_argument("--save-every", type=int, default=0, help="write a resumable state every N steps (0: never)")
    parser.add_argument("--resume", action="store_true", help="continue from the state in --out")
    parser.add_argument("--seed", type=int, default=0, help="the data order, and the weights of --reinit-bridge")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding videos")
    parser.add_argument("--reinit-bridge", action="store_true",
                        help="start the Q-Former, query tokens and projection from random weights")
