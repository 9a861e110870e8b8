"""evaluate.py and `python -m minivb eval`: the answer normalisation, scoring the toy checkpoint, resuming, refusing."""

import json
import os

import pytest

from minivb import data, evaluate
from minivb.__main__ import main

TOY = os.path.join(os.path.dirname(__file__), "..", "weights", "toy-vicuna")


@pytest.mark.parametrize("prediction, answer", [
    ("Red.", "red"), ("CIRCLE", "circle"), ("the left", "left"), ("two", "2"), ("Two!", "2"), ("none", "0"),
    ("A red circle moves left.", "red circle moves left"), ("don't", "dont"), ("it's", "its"),
    ("left-hand", "left hand"), ("1,000", "1000"), ("  Yes\n", "yes"), ("an apple", "apple"),
])
def test_normalisation_makes_these_equal(prediction, answer):
    assert evaluate.is_correct(prediction, answer)


@pytest.mark.parametrize("prediction, answer", [
    ("red", "blue"), ("2.5", "25"), ("two cats", "2"), ("left", "the left side"), ("theater", "ater"),
])
def test_normalisation_keeps_these_apart(prediction, answer):
    assert not evaluate.is_correct(prediction, answer)


def test_normalize_forms():
    assert evaluate.normalize("The Red.") == "red"
    assert evaluate.normalize("It's 2.5 (or three)!") == "its 2.5 or 3"


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    data.write_toy_dataset(folder, clips=2, seed=0)
    return folder


def run_eval(dataset, out, *extra):
    return main(["eval", "--model", TOY, "--annotations", str(dataset / "annotations.json"), "--videos",
                 str(dataset / "videos"), "--out", str(out), "--prompt", "{}", "--dtype", "float32",
                 "--num-workers", "0", *extra])


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_scores_the_toy_checkpoint_and_resumes(toy_dataset, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    assert run_eval(toy_dataset, out, "--limit", "3", "--batch-size", "2") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "accuracy 100.0 % on 3 questions"
    first = read_lines(out)
    assert [r["question_id"] for r in first] == [0, 1, 2]

    # A crash in the middle of writing: the last line cut off. The rerun drops it, asks it again and the rest.
    text = out.read_text()
    out.write_text(text[:-20])
    assert run_eval(toy_dataset, out, "--batch-size", "4") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "accuracy 100.0 % on 8 questions"
    assert "  question_type direction      100.0 % of 2" in lines
    records = read_lines(out)
    assert sorted(r["question_id"] for r in records) == list(range(8))  # none twice, none missing
    assert records[:2] == first[:2]  # the complete lines were kept, not asked again
    assert all(set(r) == {"question_id", "question", "answer", "prediction", "correct"} for r in records)
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert summary["questions"] == 8 and summary["correct"] == 8 and summary["this_run"]["asked"] == 6
    assert summary["by_question_type"]["color"] == {"accuracy": 1.0, "correct": 2, "questions": 2}
    assert summary["settings"]["prompt"] == "{}" and summary["settings"]["num_beams"] == 5
    assert (tmp_path / "preds.png").stat().st_size > 1000  # the accuracy per question type as a bar chart

    # Everything answered: a rerun (--limit or not) asks nothing and prints the accuracy over the whole file.
    assert run_eval(toy_dataset, out, "--limit", "2") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "accuracy 100.0 % on 8 questions"
    assert len(read_lines(out)) == 8


def test_batched_answers_equal_one_at_a_time(toy_dataset, toy_model, tmp_path):
    model, processor = toy_model
    entries = data.read_annotations(toy_dataset / "annotations.json", toy_dataset / "videos")
    predictions = {}
    for batch_size in (1, 5):
        out = str(tmp_path / f"b{batch_size}.jsonl")
        evaluate.evaluate(model, processor, entries, toy_dataset / "videos", out, prompt="{}", batch_size=batch_size,
                          num_workers=0, show_progress=False)
        predictions[batch_size] = [r["prediction"] for r in read_lines(tmp_path / f"b{batch_size}.jsonl")]
    assert predictions[1] == predictions[5]
    assert len(predictions[1]) == 8


@pytest.fixture(scope="module")
def toy_model():
    import minivb

    return minivb.load_model(TOY), minivb.load_processor(TOY)


def test_the_papers_prompt_is_the_default(toy_dataset, toy_model, tmp_path):
    model, processor = toy_model
    entries = data.read_annotations(toy_dataset / "annotations.json", toy_dataset / "videos")[:2]
    out = str(tmp_path / "p.jsonl")
    evaluate.evaluate(model, processor, entries, toy_dataset / "videos", out, num_workers=0, show_progress=False)
    settings = json.loads((tmp_path / "p.summary.json").read_text())["settings"]
    assert settings["prompt"] == "Question: {} Short answer:"
    assert (settings["num_beams"], settings["max_new_tokens"], settings["min_new_tokens"]) == (5, 10, 1)
    assert evaluate.LENGTH_PENALTY == {"llama": 0.0, "t5": -1.0}


@pytest.mark.parametrize("entries, message", [
    ([{"video": "toy000000000.mp4", "question": "q?", "answer": "a"}], "entry 0 has no 'question_id' key"),
    ([{"video": "v.mp4", "question": "q?", "answer": "a", "question_id": 1},
      {"video": "v.mp4", "question": "q?", "answer": "a", "question_id": 1}], "entry 1 repeats question_id 1"),
    ([{"video": "missing.mp4", "question": "q?", "answer": "a", "question_id": 1}], "missing.mp4"),
])
def test_bad_annotations_are_refused_up_front(toy_dataset, tmp_path, capsys, entries, message):
    for entry in entries:
        if entry["video"] == "v.mp4":
            entry["video"] = sorted(os.listdir(toy_dataset / "videos"))[0]
    annotations = tmp_path / "bad.json"
    annotations.write_text(json.dumps(entries))
    out = tmp_path / "preds.jsonl"
    code = main(["eval", "--model", TOY, "--annotations", str(annotations), "--videos", str(toy_dataset / "videos"),
                 "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["bad.json"]  # nothing written


def test_refuses_another_datasets_predictions_and_other_settings(toy_dataset, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text(json.dumps({"question_id": 99, "question": "q", "answer": "a", "prediction": "a",
                               "correct": True}) + "\n")
    assert run_eval(toy_dataset, out) == 2
    assert "question_id 99, which the annotations do not have" in capsys.readouterr().err
    out.unlink()
    assert run_eval(toy_dataset, out, "--limit", "1") == 0
    assert run_eval(toy_dataset, out, "--num-beams", "3") == 2
    assert "other settings (num_beams 5 -> 3)" in capsys.readouterr().err
    assert len(read_lines(out)) == 1


def test_toy_dataset_command(tmp_path, capsys):
    assert main(["toy-dataset", "--out", str(tmp_path / "d"), "--clips", "2", "--seed", "3"]) == 0
    records = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert len(records) == 8 and len(os.listdir(tmp_path / "d" / "videos")) == 2
    assert main(["toy-dataset", "--out", str(tmp_path / "e"), "--clips", "0"]) == 2
    assert "clips must be an integer in [1, 1000000]" in capsys.readouterr().err


def test_flan_t5_batched_equals_one_at_a_time(toy_dataset, tmp_path):
    """The encoder-decoder path (right padding, T5's length penalty -1) on the tiny random Flan-T5."""
    import minivb

    folder = os.path.join(os.path.dirname(__file__), "..", "weights", "flan-t5-tiny")
    model, processor = minivb.load_model(folder), minivb.load_processor(folder)
    entries = data.read_annotations(toy_dataset / "annotations.json", toy_dataset / "videos")[:3]
    predictions = {}
    for batch_size in (1, 3):
        out = tmp_path / f"t5-b{batch_size}.jsonl"
        evaluate.evaluate(model, processor, entries, toy_dataset / "videos", str(out), batch_size=batch_size,
                          num_workers=0, show_progress=False)
        predictions[batch_size] = [r["prediction"] for r in read_lines(out)]
    assert predictions[1] == predictions[3]
    assert all(predictions[1])  # random weights: words, not answers, but at least one token each
