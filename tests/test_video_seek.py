"""Seeking in container files (minivb/video.py): the frames read are exactly those a sequential decode gives.

Clips are encoded in tmp_path with PyAV (small: 64x64, 10 fps) and each frame carries its own index as a
pattern (16 black or white squares, one bit each), so a wrong frame shows as a wrong number, not just as
different pixels. Cases: H.264 with a keyframe every 10 s, B-frames, a first timestamp that is not 0 (a start
offset, and B-frames with an edit list), VP9 webm and H.264 mkv without a frame count, a count that proves wrong,
segments, `info VIDEO`, and how many frames are decoded.
"""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from minivb.__main__ import main
from minivb.video import read_video, sample_indices, video_info

RATE, SIZE = 10, 64


def pattern(index: int) -> np.ndarray:
    """(64, 64, 3) uint8: bit b of `index` as a white 16x16 square at row b // 4, column b % 4 (red channel);
    green changes every frame so that no two frames are alike for the encoder either."""
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    for bit in range(16):
        if (index >> bit) & 1:
            row, column = divmod(bit, 4)
            frame[row * 16:(row + 1) * 16, column * 16:(column + 1) * 16, 0] = 255
    frame[..., 1] = (index * 7) % 256
    return frame


def index_of(image) -> int:
    """Read the index back from the centres of the squares (lossy codecs blur the edges only)."""
    red = np.asarray(image)[..., 0]
    return sum(1 << bit for bit in range(16) if red[(bit // 4) * 16 + 8, (bit % 4) * 16 + 8] > 128)


def write_clip(path, codec: str, count: int, keyframe_every: int, bframes: int = 0, first_pts: int = 0,
               container_options=None) -> str:
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "x264-params": f"keyint={keyframe_every}:"
                              f"min-keyint={keyframe_every}:scenecut=0:bframes={bframes}"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(index), format="rgb24")
            frame.pts, frame.time_base = first_pts + index, Fraction(1, RATE)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decode_all(path: str) -> list[np.ndarray]:
    """The reference: every frame of the stream, decoded in order from the start."""
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


CLIPS = {  # name: (codec, frames, keyframe every, B-frames, first pts in frames)
    "keyframe_every_10s.mp4": ("libx264", 300, 100, 0, 0),
    "bframes.mp4": ("libx264", 120, 25, 3, 0),
    "start_offset.mp4": ("libx264", 120, 30, 0, 15),  # the first frame is shown at 1.5 s
    "bframes_edit_list.mp4": ("libx264", 120, 30, 2, 7),  # B-frames delay the first pts: an edit list
    "no_frame_count.webm": ("libvpx-vp9", 120, 30, 0, 0),
    "no_frame_count.mkv": ("libx264", 120, 30, 2, 0),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {name: write_clip(folder / name, codec, count, every, bframes, first)
            for name, (codec, count, every, bframes, first) in CLIPS.items()}


@pytest.mark.parametrize("name", CLIPS)
def test_frames_equal_a_sequential_decode(clips, name):
    path = clips[name]
    reference = decode_all(path)
    assert len(reference) == CLIPS[name][1]
    assert [index_of(frame) for frame in reference] == list(range(len(reference)))  # the pattern survives the codec
    for num_frames in (1, 4, 7, 16):
        wanted = sample_indices(len(reference), num_frames)
        frames = read_video(path, num_frames)
        assert [index_of(frame) for frame in frames] == wanted
        for frame, index in zip(frames, wanted):
            np.testing.assert_array_equal(np.asarray(frame), reference[index])


def test_where_the_frame_count_comes_from(clips):
    mp4 = video_info(clips["keyframe_every_10s.mp4"])
    assert (mp4.frame_count, mp4.count_source, mp4.rate, mp4.duration) == (300, "container", 10, 30.0)
    assert (mp4.width, mp4.height, mp4.codec, mp4.keyframes) == (64, 64, "h264", 3)
    assert mp4.indices == [0, 75, 150, 225] and mp4.timestamps == [0.0, 7.5, 15.0, 22.5]
    with av.open(clips["no_frame_count.webm"]) as container:
        assert container.streams.video[0].frames == 0  # WebM stores no count
    webm = video_info(clips["no_frame_count.webm"])
    assert (webm.frame_count, webm.count_source, webm.codec, webm.keyframes) == (120, "duration x rate", "vp9", 4)
    offset = video_info(clips["start_offset.mp4"], num_frames=3)
    assert offset.timestamps == [0.0, 4.0, 8.0]  # seconds from the first frame, not from the container's zero


def test_live_webm_without_count_or_duration_is_counted(tmp_path):
    # A webm written live (a browser's MediaRecorder) has neither a frame count nor a duration, nor an index.
    path = write_clip(tmp_path / "live.webm", "libvpx-vp9", 50, 10, container_options={"live": "1"})
    info = video_info(path)
    assert (info.frame_count, info.count_source) == (50, "counted")
    reference = decode_all(path)
    frames = read_video(path, 5)
    assert [index_of(frame) for frame in frames] == [0, 10, 20, 30, 40]
    for frame, index in zip(frames, [0, 10, 20, 30, 40]):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])


# --- how much is decoded ----------------------------------------------------------------------------


class RecordingContainer:
    """av.open's container, with its seeks and decoded frames written to `log`; everything else passed through.
    settings["seek_late_s"] makes every seek land that many seconds later; settings["seek_fails"] makes it fail;
    settings["decode_fails_after"] makes decoding fail after that many frames, as a corrupt packet would."""

    def __init__(self, container, log, settings):
        self._container, self._log, self._settings = container, log, settings

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self._log.append(("close", self))
        return self._container.__exit__(*error)

    def seek(self, offset, stream, **options):
        self._log.append(("seek", self))
        if self._settings["seek_fails"]:
            raise av.error.PermissionError(1, "seek refused by the test")
        return self._container.seek(offset + round(self._settings["seek_late_s"] / stream.time_base),
                                    stream=stream, **options)

    def decode(self, *streams, **kind):
        for count, frame in enumerate(self._container.decode(*streams, **kind)):
            if count == self._settings["decode_fails_after"]:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            self._log.append(("frame", self, frame.pts))
            yield frame


@pytest.fixture
def record(monkeypatch):
    """Containers opened by av.open record into the returned log; the returned settings change their seeks."""
    log, settings, real_open = [], {"seek_late_s": 0, "seek_fails": False, "decode_fails_after": None}, av.open

    def recording_open(*args, **kwargs):
        container = RecordingContainer(real_open(*args, **kwargs), log, settings)
        log.append(("open", container))
        return container

    monkeypatch.setattr(av, "open", recording_open)
    return log, settings


def decoded_by_each_container(log) -> list[list[int]]:
    containers = [entry[1] for entry in log if entry[0] == "open"]
    return [[entry[2] for entry in log if entry[0] == "frame" and entry[1] is c] for c in containers]


def test_decoded_frames_far_below_the_stream_length(tmp_path, record):
    log, _ = record
    # 60 s, a keyframe every 5 s: 5 samples land 0, 2, 4, 1 and 3 s after their keyframe.
    path = write_clip(tmp_path / "minute.mp4", "libx264", 600, 50)
    frames = read_video(path, 5)
    assert [index_of(frame) for frame in frames] == [0, 120, 240, 360, 480]
    [decoded] = [frames for frames in decoded_by_each_container(log) if frames]  # one container decodes
    assert len(decoded) == 1 + 21 + 41 + 11 + 31  # each sample: its keyframe and the frames up to it
    assert len(decoded) < 600 / 5
    assert decoded == sorted(set(decoded))  # no frame decoded twice: no seek went backwards


def test_one_seek_per_group_of_pictures(clips, record):
    log, _ = record
    wanted = sample_indices(300, 16)  # 16 frames over 3 groups of 100: 5 or 6 per group
    frames = read_video(clips["keyframe_every_10s.mp4"], 16)
    assert [index_of(frame) for frame in frames] == wanted
    decoder = next(entry[1] for entry in log if entry[0] == "frame")
    assert sum(1 for entry in log if entry[:2] == ("seek", decoder)) == 2  # to the keyframes at 10 s and 20 s
    [decoded] = [frames for frames in decoded_by_each_container(log) if frames]
    assert decoded == sorted(set(decoded))
    assert len(decoded) == (wanted[5] + 1) + (wanted[10] - 100 + 1) + (wanted[15] - 200 + 1)


@pytest.mark.parametrize("trouble", ["seek_late_s", "seek_fails"])
def test_a_seek_that_lands_past_the_frame_or_fails_still_gives_the_right_frames(clips, record, trouble):
    log, settings = record
    settings[trouble] = 3.0 if trouble == "seek_late_s" else True
    path = clips["keyframe_every_10s.mp4"]
    reference = decode_all(path)
    log.clear()
    frames = read_video(path, 4)
    assert [index_of(frame) for frame in frames] == [0, 75, 150, 225]
    for frame, index in zip(frames, [0, 75, 150, 225]):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])
    decoded = [frames for frames in decoded_by_each_container(log) if frames]
    if trouble == "seek_late_s":  # the seek for 7.5 s landed at 10 s: decoded again from the start, up to 225
        assert len(decoded) == 2 and len(decoded[1]) == 226
    else:  # no seek possible: decoded forward in one pass, up to 225
        assert len(decoded) == 1 and len(decoded[0]) == 226


@pytest.mark.parametrize("error", ["segment", "corrupt packet"])
def test_every_container_is_closed_when_an_error_is_raised(clips, record, error):
    log, settings = record
    if error == "segment":  # raised after the first container is open
        with pytest.raises(ValueError, match="past the end"):
            read_video(clips["bframes.mp4"], 4, start=100.0)
    else:  # raised while decoding, with the probe open too
        settings["decode_fails_after"] = 3  # frames per decode() call: after a seek, the 4th
        with pytest.raises(ValueError, match=r"cannot read .*bframes.mp4 as a video: .*Invalid data"):
            read_video(clips["bframes.mp4"], 4)
    opened = [entry[1] for entry in log if entry[0] == "open"]
    closed = [entry[1] for entry in log if entry[0] == "close"]
    assert len(opened) == (1 if error == "segment" else 2) and sorted(map(id, opened)) == sorted(map(id, closed))


# --- counts that prove wrong, truncated files ------------------------------------------------------


def test_a_stream_shorter_than_its_header_says_repeats_its_last_frame(clips, tmp_path):
    data = open(clips["no_frame_count.webm"], "rb").read()
    path = tmp_path / "cut.webm"
    path.write_bytes(data[:len(data) // 2])  # the header still says 12 s; the cues at the end are gone
    reference = decode_all(str(path))
    assert 30 < len(reference) < 90
    assert video_info(path).frame_count == 120
    expected = [0, 30, min(60, len(reference) - 1), len(reference) - 1]  # 0, 30, 60, 90 of the 120 announced
    with pytest.warns(UserWarning, match=r"cut.webm ends before frame (60|90) \(duration x rate said 120 frames\)"):
        frames = read_video(path, 4)
    assert [index_of(frame) for frame in frames] == expected
    for frame, index in zip(frames, expected):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])


def test_truncated_mp4_names_the_file(clips, tmp_path):
    data = open(clips["bframes.mp4"], "rb").read()
    path = tmp_path / "download_interrupted.mp4"
    path.write_bytes(data[:len(data) * 2 // 3])  # the index (moov) is written last: it is gone
    with pytest.raises(ValueError, match="cannot read .*download_interrupted.mp4 as a video"):
        read_video(path, 4)
    with pytest.raises(ValueError, match="cannot read .*download_interrupted.mp4 as a video"):
        video_info(path)


# --- segments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("start, end, expected", [
    (12.0, 18.0, [120, 135, 150, 165]),  # frames 120 .. 179
    (25.0, None, [250, 262, 275, 287]),  # to the end: frames 250 .. 299
    (None, 0.35, [0, 1, 2, 3]),  # frames shown before 0.35 s: 0 .. 3
    (1.05, 1.2, [10, 10, 11, 11]),  # the frame on screen at 1.05 s, then 11: fewer frames than asked repeat
    (0.3, 0.5, [3, 3, 4, 4]),  # 0.3 * 10 is 3.0000000000000004 in floating point: still frame 3
    (28.0, 99.0, [280, 285, 290, 295]),  # an end past the end stops at the end
])
def test_segments(clips, start, end, expected):
    path = clips["keyframe_every_10s.mp4"]
    reference = decode_all(path)
    frames = read_video(path, 4, start=start, end=end)
    assert [index_of(frame) for frame in frames] == expected
    for frame, index in zip(frames, expected):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])
    assert video_info(path, 4, start=start, end=end).indices == expected


def test_segment_of_a_clip_with_a_start_offset(clips):
    # Times count from the first frame (shown at 1.5 s in the container's clock).
    assert [index_of(f) for f in read_video(clips["start_offset.mp4"], 3, start=2.0, end=5.0)] == [20, 30, 40]


@pytest.mark.parametrize("start, end, message", [
    (30.0, None, r"start=30.0 s is past the end of .*keyframe_every_10s.mp4, which lasts 30.000 s"),
    (-1.0, 5.0, r"start and end are times in seconds >= 0, got start=-1.0, end=5.0 \(.* lasts 30.000 s\)"),
    (None, -2.0, r"start and end are times in seconds >= 0"),
    (5.0, 5.0, r"start must be before end, got start=5.0 s, end=5.0 s \(.* lasts 30.000 s\)"),
    (6.0, 2.0, r"start must be before end"),
])
def test_segment_errors_name_the_duration(clips, start, end, message):
    with pytest.raises(ValueError, match=message):
        read_video(clips["keyframe_every_10s.mp4"], 4, start=start, end=end)


def test_segments_need_a_timed_file(tmp_path):
    with pytest.raises(ValueError, match=r"start and end \(seconds\) need a video file with timestamps.*got a ndarray"):
        read_video(np.zeros((5, 4, 4, 3), np.uint8), 2, start=1.0)


# --- the command line -------------------------------------------------------------------------------


def test_info_video(clips, capsys):
    assert main(["info", clips["keyframe_every_10s.mp4"], "--frames", "3", "--start", "10", "--end", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  duration    30.000 s",
        "  frames      300 (from the container)",
        "  resolution  64x64",
        "  codec       h264, 10 fps",
        "  keyframes   3 in the container's index (where a seek can land)",
        "  sampled     3 frames: 100, 133, 166",
        "  at          10.000, 13.300, 16.600 s",
    ]
    assert main(["info", clips["no_frame_count.webm"]]) == 0
    assert "120 (duration x rate, rounded)" in capsys.readouterr().out


def test_info_video_errors_are_one_line(clips, capsys):
    assert main(["info", clips["bframes.mp4"], "--start", "50"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "past the end" in error and "lasts 12.000 s" in error


def test_ask_about_a_segment_gives_the_segments_frames_to_the_model(clips, capsys):
    import torch

    import minivb

    checkpoint = str(Path(__file__).resolve().parent.parent / "weights" / "vicuna-tiny")
    clip, question = clips["keyframe_every_10s.mp4"], "What happens?"
    assert main(["ask", "--model", checkpoint, "--video", clip, "--start", "10", "--end", "20", "--num-beams", "1",
                 "--max-new-tokens", "4", "--dtype", "float32", question]) == 0
    answer = capsys.readouterr().out.strip()
    frames = read_video(clip, 4, start=10, end=20)
    assert [index_of(frame) for frame in frames] == [100, 125, 150, 175]
    model, processor = minivb.load_model(checkpoint), minivb.load_processor(checkpoint)
    batch = processor(text=question, videos=[frames])
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=4, num_beams=1, repetition_penalty=1.5, length_penalty=1.0,
                             eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    assert answer == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    whole = processor(text=question, videos=[clip])["pixel_values"]
    assert not torch.equal(batch["pixel_values"], whole)  # the segment's frames, not the whole video's

    assert main(["ask", "--model", checkpoint, "--image", clip, "--start", "1", question]) == 2
    assert "--start and --end cut a segment of a --video" in capsys.readouterr().err
