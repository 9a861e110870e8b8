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

Memory (choose_dtype): the frozen towers are held in float32 where a training step fits in the memory available
(their values exactly as the files hold them, widened), else in bfloat16 (--dtype auto, the default; --dtype asks for
one). The bridge always trains in float32. A step needs the weights, the bridge's gradients and AdamW moments (3x its
0.75 GB in float32 for the official Q-Former) and the activations autograd keeps for the backward pass of the
examples run at once (memory.training_estimate). --micro-batch-size N runs a process's share of the global batch N
examples at a time and sums their gradients, so the recipe's batch needs the memory of N examples. A full-size
vicuna-7b with bf16 towers, one example of 4 frames at a time: 19.6 GB estimated, 19.60 GB peak resident memory
measured (Intel Xeon, 13-17 s an example); float32 towers (35.7 GB) are refused. Where nothing fits, the refusal
names the --dtype or --micro-batch-size that would. Under torchrun on one CPU machine, the check counts all its
processes: a frozen tensor the files store in the dtype it is held in is their shared pages, mapped once; the rest,
once for each process.

The language model being frozen, it keeps its own way of writing an answer: the bridge can make it say "red" where
it says "blue", not "RED!" where it writes "red". Fine-tune on answers in the style the model writes (MSRVTT-QA's
one lower-case word suits Vicuna; the toy's: `toy-dataset --answers plain`).

What --out receives:
  model.safetensors, config.json, tokenizer and preprocessor files   the checkpoint, in the official layout
  loss.csv, loss.png                                                 the loss and learning rate of every step
  state.pt (with --save-every N)                                     what --resume needs (saving.save_training_state)

Data parallel: under torchrun every process takes every world_size-th example of each global batch (a
DistributedSampler over the same seeded permutation), DDP all-reduces the gradients of the trainable part only, and
process 0 alone writes. The loss is the mean over all the scored tokens of the global batch, whichever process holds
them, so one process and N processes follow the same loss curve (to float rounding).

Shapes: B global batch, b = B / world_size per process, T frames, L prompt + answer length.
"""

import contextlib
import csv
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import data, memory
from .checkpoint import stored_dtypes
from .config import load_config
from .evaluate import PROMPT  # train with the prompt `eval` asks with
from .model import build_on_meta, load_model
from .processor import load_processor
from .saving import copy_processor_files, load_training_state, save_checkpoint, save_training_state
from .train import init_layers, learning_rate, make_batch, make_optimizer, train_bridge_in_float32, train_loop

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


# ----------------------------------------------------------------------------- dtype and memory


def training_model(config, dtype: torch.dtype):
    """The model as a fine-tune trains it, on the meta device (no memory): frozen towers in `dtype`, the bridge in
    float32."""
    model = build_on_meta(config, dtype)
    train_bridge_in_float32(model)
    return model


def training_need(config, dtype: torch.dtype, examples: int, num_frames: int, device="cpu") -> memory.Estimate:
    """What a fine-tuning process needs with its frozen towers in `dtype`, running `examples` examples of
    `num_frames` frames at once (memory.training_estimate)."""
    return memory.training_estimate(training_model(config, dtype), examples, num_frames, device)


def choose_dtype(args, device: torch.device, micro: int) -> torch.dtype:
    """The dtype the frozen vision encoder and language model are held in (--dtype): float32 (exact: the files'
    values, widened) where a training step fits in the memory available, else bfloat16 (half the bytes: a 7B
    fits on 24 GB). Refused up front, with what would fit, where the asked one does not (--no-memory-check
    skips the check)."""
    asked = [torch.float32, torch.bfloat16] if args.dtype == "auto" else [getattr(torch, args.dtype)]
    if args.no_memory_check:
        return torch.bfloat16 if args.dtype == "auto" else asked[0]
    config = load_config(args.model)
    models = {dtype: training_model(config, dtype) for dtype in dict.fromkeys([*asked, torch.bfloat16])}
    # Under torchrun on one CPU machine, its processes share that machine's memory. A frozen tensor stored in the
    # dtype it is held in is the file's pages, mapped (checkpoint.py): one copy for all of them; the rest is each's own.
    processes = memory.processes_sharing(device)
    stored = stored_dtypes(args.model) if processes > 1 else {}
    shared = {dtype: sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                         if not p.requires_grad and stored.get(name) == dtype) for dtype, model in models.items()}

    def need(dtype, examples=micro):  # `micro`: the examples a process runs at once
        one = memory.training_estimate(models[dtype], examples, args.num_frames, device)
        return memory.for_processes(one, processes, shared[dtype])

    available = memory.available_bytes(device)
    for dtype in asked:
        if memory.fits(need(dtype), available):
            if dtype != asked[0]:
                print("minivb: a float32 training step does not fit in the available memory: the frozen towers are "
                      "held in bfloat16", file=sys.stderr)
            return dtype
    advice = []
    if torch.bfloat16 not in asked and memory.fits(need(torch.bfloat16), available):
        advice.append(f"--dtype bfloat16 (about {need(torch.bfloat16).total / memory.GB:.1f} GB)")
    fewer = max((n for n in range(1, micro) if memory.fits(need(torch.bfloat16, n), available)), default=0)
    if fewer:
        advice.append(f"--micro-batch-size {fewer}" + (" --dtype bfloat16" if torch.bfloat16 not in asked else "")
                      + f" (the global batch stays {args.batch_size}: its examples run {fewer} at a time)")
    total = need(asked[-1])
    raise memory.NotEnoughMemory(
        f"fine-tuning {args.model} with its frozen towers in {asked[-1]} needs about {total.total / memory.GB:.1f} "
        f"GB{f' for its {processes} processes on this machine' if processes > 1 else ''} "
        f"({total.weights / memory.GB:.1f} GB of weights, {total.optimizer / memory.GB:.1f} GB of the bridge's "
        f"gradients and AdamW moments, {total.activations / memory.GB:.1f} GB of activations for {micro} "
        f"example{'s' * (micro > 1)} of {args.num_frames} frames at once{' in each' if processes > 1 else ''}), "
        f"but only {available / memory.GB:.1f} GB "
        f"is available: " + (" or ".join(advice) if advice else "not one example at a time fits, in either dtype")
        + "; or pass --no-memory-check to try anyway, at the risk of the OS killing the process")


def check_arguments(args) -> None:
    for name in ("epochs", "batch_size", "num_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be at least 1, got {args.micro_batch_size}")
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
    share = args.batch_size // world_size
    micro = min(args.micro_batch_size or share, share)  # the examples a process runs at once
    dtype = choose_dtype(args, device, micro)
    model = load_model(args.model, dtype=dtype, device=device, check_memory=False)  # checked for training just now
    params = train_bridge_in_float32(model)
    is_encoder_decoder = model.config.is_encoder_decoder
    torch.manual_seed(args.seed)
    if args.reinit_bridge:
        reinitialise_bridge(model, args.seed)
    optimizer = make_optimizer(model, params, args.lr, WEIGHT_DECAY, BETAS)
    settings = {"model": os.path.abspath(args.model), "annotations": os.path.abspath(args.annotations),
                "questions": len(entries), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "prompt": args.prompt, "num_frames": args.num_frames, "seed": args.seed, "warmup_steps": warmup,
                "reinit_bridge": args.reinit_bridge, "dtype": str(dtype)}
    state_path = os.path.join(args.out, STATE_FILE)
    start_step, losses = load_training_state(state_path, model, optimizer, settings) if args.resume else (0, [])

    ddp = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(TrainablePart(model), device_ids=device_ids)

    def loss_of(batch):
        """The loss of this process's share of a global batch, run `micro` examples at a time: the loss to
        backpropagate (the last micro-batch's: those before it are backpropagated here, their gradients adding up)
        and the global batch's mean loss, to report."""
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        rows = len(batch["labels"])
        if ddp is None and micro >= rows:  # the whole share at once, one process: the plain mean
            loss = model(**batch, loss_only=True).loss
            return loss, loss.item()
        chunks = [{name: tensor[i:i + micro] for name, tensor in batch.items()} for i in range(0, rows, micro)]
        # The global batch's mean over all its scored tokens, wherever they lie: each micro-batch's mean weighs by
        # its share of them. DDP averages the gradients over the processes, hence the factor world_size.
        counts = [scored_tokens(chunk["labels"], is_encoder_decoder) for chunk in chunks]
        total, summed = sum(counts), torch.zeros(1, device=device)
        if ddp is not None:
            dist.all_reduce(total)
        for chunk, count in zip(chunks, counts):
            last = chunk is chunks[-1]
            # DDP all-reduces the gradients at a backward pass, once they are summed: the last micro-batch's.
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                mean = ddp(chunk) if ddp is not None else model(**chunk, loss_only=True).loss  # this chunk's mean
                loss = mean * count * world_size / total
                summed += mean.detach() * count
                if not last:
                    loss.backward()
        if ddp is not None:
            dist.all_reduce(summed)
        return loss, (summed / total).item()

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
            save_training_state(state_path, model, optimizer, done, losses, settings)

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

    # Frozen tensors copied from the checkpoint's files (the same bytes, whichever dtype they were trained in);
    # trained ones in float32, as trained: a 1e-5 step on a weight of 0.1 is 1e-4 of it, below bfloat16's
    # resolution (4e-3), and would be rounded away.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    save_checkpoint(model, args.out, processor_from=args.model, dtype=torch.float32, copy_from=(args.model, frozen))
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
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="examples a process runs at once, their gradients summed over its share of the global "
                             "batch (default: all of its share at once)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the frozen vision encoder and language model's dtype (the bridge trains in float32): "
                             "auto = float32 where it fits in memory, else bfloat16 (default auto)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="train even when minivb estimates that a step does not fit in the available memory")
