"""Evaluation: zero-shot video question answering scored the way the InstructBLIP paper scores it.

Where it sits: after everything else. data.py reads and checks the annotation file and decodes the clips; this
file asks the model every question (in batches, the next videos decoded by DataLoader workers meanwhile), scores
each answer by exact match after the standard VQA answer normalisation, and writes one JSON line per question.

    python -m minivb eval --model DIR --annotations FILE --videos DIR --out preds.jsonl

The protocol, as LAVIS runs InstructBLIP on MSVD-QA / MSRVTT-QA / iVQA (the paper's Table 1):
  - the prompt "Question: {} Short answer:", given to the Q-Former and to the language model;
  - 4 frames sampled uniformly;
  - beam search, 5 beams, 1 to 10 new tokens, repetition penalty 1.5, and the length penalty of each language
    model's `predict_answers` (LENGTH_PENALTY below): short answers are what these benchmarks want.

The predictions file is also the run's memory: rerunning with the same --out skips the questions already in it,
and a last line cut off by a crash is dropped and asked again. A summary JSON (accuracy overall and per question
type, the settings) and a bar chart of the accuracy per question type are written beside it.
"""

import json
import os
import re
import time

import torch
from tqdm import tqdm

from . import data
from .saving import replacing, write_json

PROMPT = "Question: {} Short answer:"
NUM_BEAMS = 5
MAX_NEW_TOKENS = 10
MIN_NEW_TOKENS = 1
REPETITION_PENALTY = 1.5  # LAVIS blip2_vicuna_instruct / blip2_t5_instruct generate(repetition_penalty=1.5)
# LAVIS predict_answers: blip2_vicuna_instruct.py `length_penalty=0`, blip2_t5_instruct.py `length_penalty=-1`
# (salesforce/LAVIS, lavis/models/blip2_models/). Beam scores are divided by length ** penalty: 0 ranks by the
# summed log-probabilities, which already favours short answers; -1 multiplies by the length, favouring them more.
LENGTH_PENALTY = {"llama": 0.0, "t5": -1.0}
GROUP_FIELDS = ("question_type", "answer_type")  # accuracy is split by these where the annotations have them
LINE_KEYS = ("question_id", "question", "answer", "prediction", "correct")  # one line of the predictions file


# ----------------------------------------------------------------------------- scoring


# The standard VQA answer normalisation (the VQA challenge's evaluation script, which LAVIS uses), written out.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"""[;/\[\]"{}()=+\\_\-><@`,?!]""")


def normalize(answer: str) -> str:
    """'The Red.' -> 'red', 'Two!' -> '2', "don't" -> 'dont': the form in which answers are compared."""
    text = " ".join(answer.lower().split())  # lower case; tabs, newlines and repeated spaces as one space
    text = re.sub(r"(\d),(\d)", r"\1\2", text)  # a thousands separator: 1,000 -> 1000
    text = PUNCTUATION.sub(" ", text)  # VQA's marks (not the apostrophe, nor ':'): left-hand -> left hand
    text = re.sub(r"\.(?!\d)", "", text)  # full stops, but not decimal points: 2.5 stays
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    # Contractions: the VQA script maps "dont" to "don't" with a table of ~170 words; dropping the apostrophe on
    # both sides makes the same pairs equal ("isnt" and "isn't", "its" and "it's") in one rule.
    return " ".join(word.replace("'", "") for word in words)


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalisation: the benchmarks' top-1 accuracy."""
    return normalize(prediction) == normalize(answer)


# ----------------------------------------------------------------------------- the predictions file


def default_out(model: str, annotations: str) -> str:
    """predictions of model M on annotations A go to M-A.jsonl in the current folder unless --out says otherwise."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(annotations)))[0]
    return f"{os.path.basename(os.path.normpath(model))}-{stem}.jsonl"


def _stem(out: str) -> str:
    return out[:-len(".jsonl")] if out.endswith(".jsonl") else out


def summary_path(out: str) -> str:
    return _stem(out) + ".summary.json"


def read_predictions(out: str, entries: list[data.Entry]) -> dict:
    """The complete lines already in `out`, by question_id (a missing file: none).

    A line that does not parse, or lacks a key, can only be the last one, cut off by a crash: it is dropped (and the
    file rewritten without it), and its question is asked again. A complete line about a question_id that the
    annotations do not have means `out` belongs to another dataset: refused, nothing touched.
    """
    if not os.path.exists(out):
        return {}
    with open(out, encoding="utf-8") as f:
        lines = f.read().split("\n")
    known = {_key(e.question_id) for e in entries}
    done, broken = {}, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or any(key not in record for key in LINE_KEYS):
            broken.append(number)
            continue
        key = _key(record["question_id"])
        if key not in known:
            raise ValueError(f"{out} line {number} answers question_id {record['question_id']!r}, which the "
                             "annotations do not have: it holds another dataset's predictions; pass another --out")
        done[key] = record
    if broken:
        last = max(number for number, line in enumerate(lines, start=1) if line.strip())
        if broken != [last]:
            raise ValueError(f"{out} has unreadable lines {broken[:5]} before its last line; it is not a predictions "
                             "file that minivb wrote: pass another --out")
        _rewrite(out, done.values())
    return done


def _key(question_id) -> str:
    """question_id 7 and "7" are different questions: compare them as their JSON text."""
    return json.dumps(question_id)


def _rewrite(out: str, records) -> None:
    with replacing(out) as temporary, open(temporary, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _check_settings(out: str, settings: dict) -> None:
    """A resumed run must ask the way the first run asked, or the accuracy would mix two protocols."""
    path = summary_path(out)
    if not os.path.exists(out) or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f).get("settings", {})
    changed = [f"{name} {before[name]!r} -> {value!r}" for name, value in settings.items()
               if name in before and before[name] != value]
    if changed:
        raise ValueError(f"{out} was written with other settings ({', '.join(changed)}); rerun with those, "
                         "or pass another --out")


# ----------------------------------------------------------------------------- the run


def summarize(entries: list[data.Entry], done: dict) -> dict:
    """Accuracy over every question in `done`, overall and per value of each GROUP_FIELDS field present."""
    correct = sum(bool(record["correct"]) for record in done.values())
    summary = {"accuracy": correct / len(done) if done else 0.0, "correct": correct, "questions": len(done)}
    for name in GROUP_FIELDS:
        groups = {}
        for entry in entries:
            record = done.get(_key(entry.question_id))
            if record is not None and name in entry.fields:
                right, total = groups.get(str(entry.fields[name]), (0, 0))
                groups[str(entry.fields[name])] = (right + bool(record["correct"]), total + 1)
        if groups:
            summary[f"by_{name}"] = {value: {"accuracy": right / total, "correct": right, "questions": total}
                                     for value, (right, total) in sorted(groups.items())}
    return summary


@torch.no_grad()
def evaluate(model, processor, entries: list[data.Entry], videos_dir, out: str, *, prompt: str = PROMPT,
             num_frames: int = 4, num_beams: int = NUM_BEAMS, max_new_tokens: int = MAX_NEW_TOKENS,
             min_new_tokens: int = MIN_NEW_TOKENS, batch_size: int = 8, num_workers: int = 2,
             limit: int | None = None, settings: dict | None = None, show_progress: bool = True) -> dict:
    """Answer every entry (the first `limit`) not yet in `out`, append its line as each batch finishes, and return
    the summary (also written beside `out`) over all the lines of `out`."""
    data.check_prompt(prompt)
    settings = {"prompt": prompt, "num_frames": num_frames, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                "min_new_tokens": min_new_tokens, **(settings or {})}
    _check_settings(out, settings)
    done = read_predictions(out, entries)
    asked = entries[:limit] if limit else entries
    todo = [entry for entry in asked if _key(entry.question_id) not in done]
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    _write_summary(out, entries, done, settings)

    length_penalty = LENGTH_PENALTY[model.config.text.model_type]
    device = model.query_tokens.device
    # The workers decode the videos and make the processor's tensors of the next batches while the model answers
    # this one (the processor resizes and normalises every frame: a fifth of the time of a toy batch of 8).
    loader = torch.utils.data.DataLoader(data.VideoQADataset(todo, videos_dir, num_frames), batch_size=batch_size,
                                         collate_fn=Batcher(processor, prompt, num_frames), num_workers=num_workers)
    bar = tqdm(total=len(asked), initial=len(asked) - len(todo), desc="eval", unit="question",
               disable=not show_progress, dynamic_ncols=True)
    started = time.perf_counter()
    with open(out, "a", encoding="utf-8") as f:
        for entries_asked, batch in loader:
            ids = model.generate(**{name: tensor.to(device) for name, tensor in batch.items()},
                                 num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 repetition_penalty=REPETITION_PENALTY, length_penalty=length_penalty,
                                 eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
            predictions = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
            for entry, prediction in zip(entries_asked, predictions):
                record = {"question_id": entry.question_id, "question": entry.question, "answer": entry.answer,
                          "prediction": prediction, "correct": is_correct(prediction, entry.answer)}
                f.write(json.dumps(record) + "\n")
                done[_key(entry.question_id)] = record
            f.flush()  # a crash loses at most the batch being asked
            right = sum(bool(r["correct"]) for r in done.values())
            bar.set_postfix_str(f"accuracy {right / len(done):.1%}", refresh=False)
            bar.update(len(entries_asked))
    bar.close()
    seconds = time.perf_counter() - started
    summary = _write_summary(out, entries, done, settings, asked=len(todo), seconds=seconds)
    plot_accuracy(_stem(out) + ".png", summary)
    return summary


class Batcher:
    """The DataLoader's collate_fn: (Entry, frames) pairs -> (entries, the processor's batch for them)."""

    def __init__(self, processor, prompt: str, num_frames: int):
        self.processor, self.prompt, self.num_frames = processor, prompt, num_frames

    def __call__(self, items: list) -> tuple[list[data.Entry], dict[str, torch.Tensor]]:
        entries = [entry for entry, frames in items]
        batch = self.processor(text=[self.prompt.format(entry.question) for entry in entries],
                               videos=[frames for entry, frames in items], num_frames=self.num_frames)
        return entries, batch


def _write_summary(out, entries, done, settings, asked: int = 0, seconds: float = 0.0) -> dict:
    summary = summarize(entries, done)
    summary["settings"] = settings
    summary["this_run"] = {"asked": asked, "seconds": round(seconds, 3),
                           "questions_per_second": round(asked / seconds, 3) if seconds else None}
    write_json(summary_path(out), summary)
    return summary


def plot_accuracy(path: str, summary: dict) -> None:
    """A bar per question type (and per answer type) with its accuracy, where the annotations have such a field."""
    groups = [(name, summary[f"by_{name}"]) for name in GROUP_FIELDS if f"by_{name}" in summary]
    if not groups:
        return
    # A Figure of its own, not pyplot: nothing global changes (a notebook calling eval keeps its inline figures)
    # and no window or display is needed. Imported here: only the chart needs it, and it takes a second.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(groups), 3.5), dpi=100)
    axes = figure.subplots(1, len(groups), squeeze=False)
    for axis, (name, values) in zip(axes[0], groups):
        labels = list(values)
        bars = axis.bar(labels, [100 * values[label]["accuracy"] for label in labels])
        axis.bar_label(bars, labels=[f"{100 * values[label]['accuracy']:.1f} % of {values[label]['questions']}"
                                     for label in labels], fontsize=8)
        axis.set(ylim=(0, 110), ylabel="accuracy (%)", title=f"by {name.replace('_', ' ')}")
        axis.tick_params(axis="x", labelrotation=30)
    figure.suptitle(f"accuracy {100 * summary['accuracy']:.1f} % on {summary['questions']} questions")
    figure.tight_layout()
    figure.savefig(path)


def format_summary(summary: dict) -> str:
    """The lines `eval` prints: per group, then `accuracy XX.X % on N questions` last."""
    lines = []
    for name in GROUP_FIELDS:
        for value, group in summary.get(f"by_{name}", {}).items():
            lines.append(f"  {name} {value:<14} {100 * group['accuracy']:5.1f} % of {group['questions']}")
    lines.append(f"accuracy {100 * summary['accuracy']:.1f} % on {summary['questions']} questions")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    """The `eval` subcommand's arguments (the CLI, __main__.py, adds them to its parser)."""
    parser.add_argument("--model", required=True, help="checkpoint directory (official layout)")
    parser.add_argument("--annotations", required=True,
                        help="JSON list or JSON Lines of video/question/answer/question_id entries (see data.py)")
    parser.add_argument("--videos", required=True, help="the folder the annotations' video names are relative to")
    parser.add_argument("--out", help="predictions, one JSON line per question; rerunning with it resumes "
                                      "(default: MODEL-ANNOTATIONS.jsonl in the current folder)")
    parser.add_argument("--prompt", default=PROMPT,
                        help=f"the template the question is put in, {{}} for the question (default {PROMPT!r}; "
                             "'{}' passes the question as it is)")
    parser.add_argument("--num-frames", type=int, default=4, help="frames sampled uniformly from each video")
    parser.add_argument("--num-beams", type=int, default=NUM_BEAMS)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--min-new-tokens", type=int, default=MIN_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding videos")
    parser.add_argument("--limit", type=int, help="only the first N questions of the file")


def run(args, load) -> str:
    """The `eval` command: check everything, load with `load(args)` -> (model, processor), evaluate; returns the
    lines to print."""
    for name in ("num_frames", "num_beams", "max_new_tokens", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.min_new_tokens < 0 or args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens must be in [0, --max-new-tokens], got {args.min_new_tokens}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    data.check_prompt(args.prompt)
    entries = data.read_annotations(args.annotations, args.videos)  # the whole file, before any work
    out = args.out or default_out(args.model, args.annotations)
    settings = {"model": os.path.abspath(args.model), "dtype": args.dtype, "quantize": args.quantize}
    _check_settings(out, {"prompt": args.prompt, "num_frames": args.num_frames, "num_beams": args.num_beams,
                          "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens, **settings})
    read_predictions(out, entries)  # refuse another dataset's file before the (slow) load
    model, processor = load(args)
    summary = evaluate(model, processor, entries, args.videos, out, prompt=args.prompt, num_frames=args.num_frames,
                       num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                       min_new_tokens=args.min_new_tokens, batch_size=args.batch_size, num_workers=args.num_workers,
                       limit=args.limit, settings=settings)
    return format_summary(summary)
