"""data.py: annotation files are checked whole before any work; the toy dataset round-trips through the reader."""

import json

import numpy as np
import pytest

from minivb import data, toy


def write_entries(folder, entries, name="annotations.json", lines=False):
    (folder / "videos").mkdir(exist_ok=True)
    path = folder / name
    text = "\n".join(json.dumps(e) for e in entries) + "\n" if lines else json.dumps(entries)
    path.write_text(text)
    return path


def make_videos(folder, *names):
    (folder / "videos").mkdir(exist_ok=True)
    for name in names:
        toy.make_clip(0, 32).to_gif(folder / "videos" / name)


ENTRIES = [{"video": "a.gif", "question": "what colour?", "answer": "red", "question_id": 7, "question_type": "color"},
           {"video": "b.gif", "question": "what shape?", "answer": "circle", "question_id": "q8"}]


@pytest.mark.parametrize("lines", [False, True])
def test_reads_json_and_json_lines(tmp_path, lines):
    make_videos(tmp_path, "a.gif", "b.gif")
    entries = data.read_annotations(write_entries(tmp_path, ENTRIES, lines=lines), tmp_path / "videos")
    assert [(e.video, e.question, e.answer, e.question_id) for e in entries] == [
        ("a.gif", "what colour?", "red", 7), ("b.gif", "what shape?", "circle", "q8")]
    assert entries[0].fields == {"question_type": "color"} and entries[1].fields == {}


@pytest.mark.parametrize("text, message", [
    ("[{\"video\": ", "is not valid JSON"),
    ("{\"video\": \"a.gif\"}\nnot json\n", "line 1"),
    ("{\"a\": 1, \"b\": 2}", "holds a JSON object"),
    ("3", "holds a JSON int"),
    ("[]", "holds no entries"),
    ("[3]", "entry 0 is a int"),
])
def test_refuses_what_is_not_a_list_of_objects(tmp_path, text, message):
    make_videos(tmp_path, "a.gif")
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data.read_annotations(path, tmp_path / "videos")


def test_names_the_entry_and_the_key(tmp_path):
    make_videos(tmp_path, "a.gif", "b.gif")
    broken = [dict(ENTRIES[0]), {k: v for k, v in ENTRIES[1].items() if k != "answer"}]
    with pytest.raises(ValueError, match="entry 1 has no 'answer' key"):
        data.read_annotations(write_entries(tmp_path, broken), tmp_path / "videos")
    wrong_type = [dict(ENTRIES[0], question_id=True)]
    with pytest.raises(ValueError, match="entry 0 key 'question_id' must be an int or a str"):
        data.read_annotations(write_entries(tmp_path, wrong_type), tmp_path / "videos")
    duplicate = [ENTRIES[0], dict(ENTRIES[1], question_id=7)]
    with pytest.raises(ValueError, match="entry 1 repeats question_id 7 of entry 0"):
        data.read_annotations(write_entries(tmp_path, duplicate), tmp_path / "videos")


def test_names_the_first_missing_videos(tmp_path):
    make_videos(tmp_path, "a.gif")
    entries = [dict(ENTRIES[0], video=f"v{i}.mp4", question_id=i) for i in range(8)] + [dict(ENTRIES[0], question_id=99)]
    with pytest.raises(FileNotFoundError, match=r"8 of the videos .* v0.mp4, v1.mp4, v2.mp4, v3.mp4, v4.mp4 and 3 more"):
        data.read_annotations(write_entries(tmp_path, entries), tmp_path / "videos")
    with pytest.raises(FileNotFoundError, match="videos folder"):
        data.read_annotations(write_entries(tmp_path, ENTRIES), tmp_path / "nowhere")


def test_toy_dataset_round_trip(tmp_path):
    path = data.write_toy_dataset(tmp_path, clips=3, seed=1)
    entries = data.read_annotations(path, tmp_path / "videos")
    assert len(entries) == 3 * len(toy.QUESTION_TYPES)
    assert [e.fields["question_type"] for e in entries[:4]] == list(toy.QUESTION_TYPES)
    assert len({e.video for e in entries}) == 3
    dataset = data.VideoQADataset(entries, tmp_path / "videos", num_frames=4)
    entry, frames = dataset[4]
    assert entry is entries[4] and len(frames) == 4
    # The clip is held-out clip 1,000,001, its frames within a few levels of the drawing (lossy mp4 or exact GIF).
    clip = toy.make_clip(toy.split_seed("heldout", 1_000_001))
    for frame, drawn in zip(frames, clip.frames):
        assert np.abs(np.asarray(frame, dtype=np.int16) - drawn).mean() < 2.0
    assert entries[4].answer.lower().strip(".!").removeprefix("the ").removeprefix("a ") in clip.color
    assert data.collate([(entry, frames)]) == [(entry, frames)]


def test_toy_dataset_plain_answers(tmp_path):
    varied = json.loads(open(data.write_toy_dataset(tmp_path / "v", clips=5, seed=2)).read())
    plain = json.loads(open(data.write_toy_dataset(tmp_path / "p", clips=5, seed=2, answers="plain")).read())
    clip = toy.make_clip(toy.split_seed("heldout", 2_000_000))
    assert [e["answer"] for e in plain[:4]] == [clip.answer(kind) for kind in toy.QUESTION_TYPES]
    assert [e["question"] for e in plain] == [e["question"] for e in varied]
    assert sum(e["answer"] != p["answer"] for e, p in zip(varied, plain)) >= 5  # the varied forms differ
    with pytest.raises(ValueError, match="answers must be 'varied' or 'plain'"):
        data.write_toy_dataset(tmp_path / "x", clips=1, answers="upper")
