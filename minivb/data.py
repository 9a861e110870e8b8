"""Video-QA datasets: read an annotation file, check all of it, and decode its clips for evaluate.py and finetune.py.

Where it sits: before the processor. An annotation file says which video each question is about; this file turns
it into `Entry` records (checked up front, so that a bad file fails in a second and not after an hour of work) and
into a torch Dataset that decodes the frames (video.read_video) in DataLoader workers while the model runs.

The format is LAVIS's, the one MSRVTT-QA and MSVD-QA are distributed in for InstructBLIP: a JSON list of objects

    [{"video": "video7010.mp4", "question": "what is a man doing?", "answer": "cook", "question_id": 0}, ...]

`video` is a file name (or a folder of frames) relative to the videos folder; `question_id` is an int or a str,
unique in the file. JSON Lines (one such object a line) is read too. Other keys (question_type, answer_type, ...)
are kept in `Entry.fields`, so that accuracy can be split by them.

`write_toy_dataset` writes a dataset of this format from the toy world (toy.py), with answers written the many
ways people write them ("Red.", "CIRCLE", "the left"), so that the whole path can be tried on a fresh clone.
"""

import json
import os
from fractions import Fraction
from dataclasses import dataclass, field

import numpy as np
import torch

from . import toy
from .video import check_num_frames, read_video

REQUIRED_KEYS = ("video", "question", "answer", "question_id")
MISSING_SHOWN = 5  # missing videos named in the error (a wrong --videos folder misses all of them)


@dataclass
class Entry:
    video: str  # relative to the videos folder
    question: str
    answer: str
    question_id: int | str
    fields: dict = field(default_factory=dict)  # every other key of the entry, e.g. question_type


# ----------------------------------------------------------------------------- reading and checking


def read_annotations(path, videos_dir) -> list[Entry]:
    """Every entry of a JSON list or JSON Lines annotation file, the whole file checked before any work.

    Raises ValueError (not JSON, not a list of objects, an entry missing a key or with a key of the wrong type, a
    duplicate question_id; the entry's index is named) or FileNotFoundError (the file, the videos folder, or the
    first few videos that are not under it).
    """
    path, videos_dir = os.fspath(path), os.fspath(videos_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if not os.path.isdir(videos_dir):
        raise FileNotFoundError(f"videos folder {videos_dir} does not exist")
    records = _parse(path)
    entries, seen = [], {}
    for index, record in enumerate(records):
        entry = _entry(record, index, path)
        if entry.question_id in seen:
            raise ValueError(f"{path}: entry {index} repeats question_id {entry.question_id!r} of entry "
                             f"{seen[entry.question_id]}; question ids must be unique")
        seen[entry.question_id] = index
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path} holds no entries; expected a list of video/question/answer/question_id objects")
    missing = sorted({e.video for e in entries if not os.path.exists(os.path.join(videos_dir, e.video))})
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (f" and {len(missing) - MISSING_SHOWN} more"
                                                      if len(missing) > MISSING_SHOWN else "")
        raise FileNotFoundError(f"{len(missing)} of the videos of {path} are not under {videos_dir}: {shown}")
    return entries


def _parse(path: str) -> list:
    """The records of a JSON list, or of JSON Lines (one object a line, blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as whole_error:
        # Not one JSON document: JSON Lines, if every non-blank line is one.
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == 1 and text.lstrip().startswith("["):  # a JSON list with a syntax error
                    raise ValueError(f"{path} is not valid JSON: {whole_error}") from None
                raise ValueError(f"{path} is neither JSON nor JSON Lines: line {number}: {e}") from None
        return records
    if isinstance(records, dict):  # one JSON Lines record, or an object where a list was expected
        if all(key in records for key in REQUIRED_KEYS) and len(text.strip().splitlines()) == 1:
            return [records]
        raise ValueError(f"{path} holds a JSON object; expected a list of video/question/answer/question_id objects")
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}; expected a list of "
                         "video/question/answer/question_id objects")
    return records


def _entry(record, index: int, path: str) -> Entry:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: entry {index} is a {type(record).__name__}; expected an object with keys "
                         f"{', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise ValueError(f"{path}: entry {index} has no {key!r} key (expected {', '.join(REQUIRED_KEYS)})")
    for key in ("video", "question", "answer"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{path}: entry {index} key {key!r} must be a non-empty string, got {record[key]!r}")
    question_id = record["question_id"]
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise ValueError(f"{path}: entry {index} key 'question_id' must be an int or a str, got {question_id!r}")
    fields = {key: value for key, value in record.items() if key not in REQUIRED_KEYS}
    return Entry(record["video"], record["question"], record["answer"], question_id, fields)


# ----------------------------------------------------------------------------- decoding


def check_prompt(prompt: str) -> None:
    """A prompt template (eval's and finetune's --prompt, evaluate.evaluate's prompt) holds `{}` once: where each
    entry's question goes."""
    if prompt.count("{}") != 1:
        raise ValueError(f"--prompt must hold one {{}} where the question goes, got {prompt!r}")


class VideoQADataset(torch.utils.data.Dataset):
    """(Entry, frames) pairs: the frames, `num_frames` PIL images sampled uniformly, are decoded on access, so a
    DataLoader with workers decodes the next batch's videos while the model works on this one."""

    def __init__(self, entries: list[Entry], videos_dir, num_frames: int = 4):
        check_num_frames(num_frames)
        self.entries, self.videos_dir, self.num_frames = list(entries), os.fspath(videos_dir), num_frames

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        entry = self.entries[index]
        return entry, read_video(os.path.join(self.videos_dir, entry.video), self.num_frames)


def collate(items: list) -> list:
    """Keep the (Entry, frames) pairs as they are: the processor makes the tensors of a batch."""
    return list(items)


# ----------------------------------------------------------------------------- the toy dataset


# The ways people write the toy's answers; the standard normalisation (evaluate.normalize) makes each one equal to
# the plain word. Number words ("two" vs "2") do not occur: the toy world has nothing to count.
ANSWER_FORMS = {
    "color": ("{}", "{C}.", "{U}", "{}!"),
    "shape": ("{}", "{U}", "a {}", "A {}.", "{C}!"),
    "direction": ("{}", "{C}.", "{U}", "{}!", "the {}"),  # "the left", "the right"; not "the up"
    "describe": ("{}", "{C}.", "The {rest}."),
}


def _written(answer: str, question_type: str, rng) -> str:
    """`answer` as a person might have typed it: 'Red.', 'CIRCLE', 'the left', 'The red circle moves left.'"""
    forms = [form for form in ANSWER_FORMS[question_type] if not (form == "the {}" and answer in ("up", "down"))]
    form = forms[rng.integers(len(forms))]
    return form.format(answer, C=answer.capitalize(), U=answer.upper(), rest=answer.split(" ", 1)[-1])


def write_toy_dataset(out, clips: int, seed: int = 0, answers: str = "varied") -> str:
    """Write `clips` held-out toy clips under out/videos/ (mp4 through PyAV when installed, GIF otherwise) and
    out/annotations.json asking every question type about each; returns the annotation file's path.

    answers="varied": written the ways people write them (ANSWER_FORMS), what `eval` is tried on; "plain": as the
    toy's language model writes them ("red", "a red circle moves left"), what fine-tuning needs, since the
    InstructBLIP recipe freezes the language model and so cannot teach it to write "RED" or "Red.".

    Clip k is held-out clip seed * 1,000,000 + k (train.py never trains on held-out clips), so datasets of
    different seeds share no clip: fine-tune on seed 1, evaluate on seed 0.
    """
    if isinstance(clips, bool) or not isinstance(clips, int) or not 1 <= clips <= 1_000_000:
        raise ValueError(f"clips must be an integer in [1, 1000000], got {clips!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1000:
        raise ValueError(f"seed must be an integer in [0, 1000), got {seed!r}")
    if answers not in ("varied", "plain"):
        raise ValueError(f"answers must be 'varied' or 'plain', got {answers!r}")
    out = os.fspath(out)
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    try:
        import av
    except ImportError:
        av = None
    rng = np.random.default_rng([seed, 14])
    records = []
    for k in range(clips):
        index = seed * 1_000_000 + k
        clip_seed = toy.split_seed("heldout", index)
        name = f"toy{index:09d}." + ("mp4" if av is not None else "gif")
        for question_type in toy.QUESTION_TYPES:
            example = toy.make_example(clip_seed, question_type=question_type)
            if question_type == toy.QUESTION_TYPES[0]:
                path = os.path.join(out, "videos", name)
                _write_mp4(av, example.clip.frames, path) if av is not None else example.clip.to_gif(path)
            records.append({"video": name, "question": example.question,
                            "answer": _written(example.answer, question_type, rng) if answers == "varied"
                            else example.answer,
                            "question_id": len(records), "question_type": question_type})
    path = os.path.join(out, "annotations.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    return path


def _write_mp4(av, frames: np.ndarray, path: str) -> None:
    """(T, S, S, 3) uint8 as H.264 at 2.5 frames per second (the GIF's 400 ms a frame), every frame kept.

    crf 12 keeps the toy's colours within a few levels of the drawing (the default, 23, smears the shape's edge)."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(5, 2))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "bf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
