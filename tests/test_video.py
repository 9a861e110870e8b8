"""Reading frames (minivb/video.py): every source kind, uniform sampling, and the errors of bad media."""

import os
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from minivb import video
from minivb.video import read_image, read_video, sample_indices

DATA = os.path.join(os.path.dirname(__file__), "data")
GIF = os.path.join(DATA, "clock_cc0_1bpp.gif")  # 61 frames, 120x120
WEBM = os.path.join(DATA, "big_buck_bunny_432_433.webm")  # 24 frames, 1280x720, the stream reports 0 frames


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def gray_frames(count: int, height: int = 8, width: int = 10) -> np.ndarray:
    """(count, H, W, 3) uint8 frames whose value identifies the frame: frame i is filled with 10 * i."""
    return np.stack([np.full((height, width, 3), 10 * i, np.uint8) for i in range(count)])


def frame_values(frames) -> list[int]:
    return [int(pixels(f)[0, 0, 0]) for f in frames]


def write_video(path: str, codec: str, pix_fmt: str, count: int = 10) -> None:
    """A 32x32 clip whose frame i is filled with 20 * i."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- sampling ---------------------------------------------------------------------------------------


def test_sample_indices_61_frames_7():
    assert sample_indices(61, 7) == [0, 8, 17, 26, 34, 43, 52]
    assert sample_indices(61, 7) == ((np.arange(7) * 61) // 7).tolist()
    official = np.arange(0, 61, 61 / 7).astype(int)  # the official example: one index too many
    assert len(official) == 8 and official[:7].tolist() == sample_indices(61, 7)


def test_sample_indices_repeats_frames_of_a_short_clip():
    assert sample_indices(3, 5) == [0, 0, 1, 1, 2]
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    assert sample_indices(24, 4) == [0, 6, 12, 18]


# --- files ------------------------------------------------------------------------------------------


def all_gif_frames() -> list[np.ndarray]:
    with Image.open(GIF) as gif:
        return [pixels(frame) for frame in ImageSequence.Iterator(gif)]


@pytest.mark.parametrize("num_frames", [1, 4, 7, 61])
def test_gif_frames_are_the_sampled_ones(num_frames):
    reference = all_gif_frames()
    assert len(reference) == 61
    frames = read_video(GIF, num_frames)
    assert len(frames) == num_frames
    for frame, index in zip(frames, sample_indices(61, num_frames)):
        assert frame.size == (120, 120)
        np.testing.assert_array_equal(pixels(frame), reference[index])
    # the hands move: the sampled frames are not all the same picture
    if num_frames > 1:
        assert not np.array_equal(pixels(frames[0]), pixels(frames[-1]))


def test_webm_without_frame_count_is_counted_by_decoding():
    with av.open(WEBM) as container:
        assert container.streams.video[0].frames == 0  # WebM carries no count
        reference = [np.asarray(f.to_image()) for f in container.decode(video=0)]
    assert len(reference) == 24
    frames = read_video(WEBM, 4)
    assert [f.size for f in frames] == [(1280, 720)] * 4
    for frame, index in zip(frames, [0, 6, 12, 18]):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])
    frames = read_video(WEBM, 7)
    for frame, index in zip(frames, sample_indices(24, 7)):
        np.testing.assert_array_equal(np.asarray(frame), reference[index])


@pytest.mark.parametrize("name, codec, pix_fmt", [
    ("clip.mp4", "mpeg4", "yuv420p"),  # reports its frame count
    ("clip.avi", "mpeg4", "yuv420p"),
    ("clip.mkv", "ffv1", "yuv444p"),  # reports 0: counted by decoding
])
def test_containers_through_pyav(tmp_path, name, codec, pix_fmt):
    path = str(tmp_path / name)
    write_video(path, codec, pix_fmt)
    values = frame_values(read_video(path, 4))  # indices 0, 2, 5, 7 of 10
    assert values == pytest.approx([0, 40, 100, 140], abs=3)  # lossy codecs are a few levels off


def test_frames_convert_to_rgb_on_the_decoding_thread(tmp_path):
    """YUV -> RGB with threads=1 (video._rgb: swscale's pool of threads for each frame hung a forked DataLoader
    worker), the same pixels as PyAV's default, threaded conversion."""
    calls = []

    class Frame:
        def to_image(self, **options):
            calls.append(options)
            return "picture"

    assert video._rgb(Frame()) == "picture" and calls == [{"threads": 1}]
    path = str(tmp_path / "clip.mp4")
    write_video(path, "mpeg4", "yuv420p")
    with av.open(path) as container:
        frame = next(container.decode(video=0))
        assert np.array_equal(np.asarray(video._rgb(frame)), np.asarray(frame.to_image()))


@pytest.mark.parametrize("name, options", [("clip.webp", {"lossless": True}), ("clip.png", {})])
def test_animated_webp_and_apng(tmp_path, name, options):
    frames = [Image.fromarray(f) for f in gray_frames(9)]
    path = str(tmp_path / name)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **options)
    assert frame_values(read_video(path, 3)) == [0, 30, 60]


def test_still_image_file_is_a_one_frame_video(tmp_path):
    path = str(tmp_path / "still.jpg")
    Image.new("RGB", (16, 12), (200, 10, 10)).save(path)
    frames = read_video(path, 4)
    assert len(frames) == 4 and all(f.size == (16, 12) for f in frames)


def test_folder_in_natural_order_ignoring_other_files(tmp_path):
    for i, frame in enumerate(gray_frames(12)):
        Image.fromarray(frame).save(tmp_path / f"frame{i + 1}.png")  # frame1 .. frame12
    (tmp_path / "notes.txt").write_text("not a frame")
    # natural order: frame1, frame2, ..., frame10 (a plain sort would put frame10 second)
    assert frame_values(read_video(str(tmp_path), 4)) == [0, 30, 60, 90]
    assert frame_values(read_video(tmp_path, 12)) == [10 * i for i in range(12)]


# --- arrays, tensors, lists -------------------------------------------------------------------------


def test_numpy_tensor_and_list_sources_agree():
    video = gray_frames(10)
    expected = [0, 20, 50, 70]  # indices 0, 2, 5, 7
    assert frame_values(read_video(video, 4)) == expected
    assert frame_values(read_video(torch.from_numpy(video), 4)) == expected
    assert frame_values(read_video([Image.fromarray(f) for f in video], 4)) == expected
    np.testing.assert_array_equal(np.asarray(read_video(video, 10)[3]), video[3])


def test_read_image_sources(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    for source in (array, torch.from_numpy(array), Image.fromarray(array), str(path), path):
        np.testing.assert_array_equal(pixels(read_image(source)), array)
    rgba = Image.new("RGBA", (3, 4))
    assert read_image(rgba) is rgba  # the mode is kept: the processor composites alpha onto white


# --- errors -----------------------------------------------------------------------------------------


def test_missing_file_names_it(tmp_path):
    missing = str(tmp_path / "nothere.gif")
    with pytest.raises(FileNotFoundError, match="nothere.gif"):
        read_video(missing)
    with pytest.raises(FileNotFoundError, match="nothere.gif"):
        read_image(missing)


def test_truncated_gif_is_refused(tmp_path):
    data = open(GIF, "rb").read()
    path = tmp_path / "truncated.gif"
    path.write_bytes(data[:5000])  # Pillow still finds 6 frames; the last one is cut
    with pytest.raises(ValueError, match=r"truncated\.gif is truncated or corrupt"):
        read_video(str(path), 4)


def test_garbage_files_are_refused(tmp_path):
    gif = tmp_path / "garbage.gif"
    gif.write_bytes(b"GIF89a" + b"\x00" * 50)
    with pytest.raises(ValueError, match="cannot read .*garbage.gif"):
        read_video(str(gif))
    with pytest.raises(ValueError, match="cannot read .*garbage.gif"):
        read_image(str(gif))
    mp4 = tmp_path / "garbage.mp4"
    mp4.write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match="cannot read .*garbage.mp4 as a video"):
        read_video(str(mp4))
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.webm"):
        read_video(str(empty))


def test_video_without_frames_is_empty(tmp_path):
    path = tmp_path / "header_only.webm"
    path.write_bytes(open(WEBM, "rb").read()[:6000])  # the header and no complete frame
    with pytest.raises(ValueError, match="empty video: .*header_only.webm has no decodable frames"):
        read_video(str(path))


def test_file_without_video_stream(tmp_path):
    path = str(tmp_path / "sound.mkv")
    with av.open(path, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        for packet in [*stream.encode(samples), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(ValueError, match="sound.mkv has no video stream"):
        read_video(path)


def test_missing_pyav_says_how_to_install(monkeypatch, tmp_path):
    path = str(tmp_path / "clip.mp4")
    write_video(path, "mpeg4", "yuv420p")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(ValueError, match=r"clip.mp4 needs PyAV.*pip install minivb\[video\]"):
        read_video(path)


def test_empty_sources(tmp_path):
    with pytest.raises(ValueError, match="empty video: the array has 0 frames"):
        read_video(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty video: the list of frames is empty"):
        read_video([])
    with pytest.raises(ValueError, match="empty video: no image files in folder"):
        read_video(str(tmp_path))


def test_zero_size_frames_and_images():
    with pytest.raises(ValueError, match=r"zero size \(0x5 pixels\)"):
        read_video(np.zeros((2, 0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"frame 1 has zero size"):
        read_video([Image.new("RGB", (4, 4)), Image.new("RGB", (0, 4))])
    with pytest.raises(ValueError, match="image has zero size"):
        read_image(Image.new("L", (7, 0)))
    with pytest.raises(ValueError, match="image has zero size"):
        read_image(np.zeros((0, 0, 3), np.uint8))


def test_arrays_of_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=r"shape \(T, H, W, 3\).*got \(4, 3, 8, 8\).*permute\(0, 2, 3, 1\)"):
        read_video(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(T, H, W, 3\).*got \(8, 8, 3\)"):
        read_video(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype uint8.*got float32"):
        read_video(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="dtype torch.uint8.*got torch.float32"):
        read_video(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\).*got \(8, 8\)"):
        read_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="dtype uint8.*got uint16"):
        read_image(np.zeros((8, 8, 3), np.uint16))


def test_unsupported_sources_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="a video must be a file or folder path.*got a int"):
        read_video(3)
    with pytest.raises(ValueError, match="frame 1 is a ndarray"):
        read_video([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="an image must be .*got a list"):
        read_image([1, 2])
    with pytest.raises(ValueError, match="expected an image file, got a folder"):
        read_image(str(tmp_path))
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
            read_video(gray_frames(3), bad)
