"""Reading media: a clip (or a still image) from wherever the user has it, as a list of PIL frames.

This is the first step of the pipeline: video.py turns a file, a folder, an array or a tensor into
frames; processor.py turns frames into pixel_values and text into ids; the model takes the batch.

Frames stay PIL images until processor.py converts them, because the conversion to RGB depends on
the image mode (palette, alpha, 16-bit) and transformers decides it from the same PIL image.

A video can be:
  - an animated GIF, WebP or APNG file (Pillow),
  - an mp4 / webm / mkv / avi / mov file (PyAV, the optional extra `pip install minivb[video]`),
  - a folder of image files, one frame each, in natural order of the file names (frame2 < frame10),
  - a numpy array or a torch tensor of shape (T, H, W, 3), dtype uint8, RGB (the layout decord,
    PyAV and torchvision.io.read_video return; a (T, 3, H, W) tensor is refused rather than guessed:
    with H or W equal to 3 the two layouts cannot be told apart),
  - a list of PIL images.
Every video is sampled to `num_frames` frames, uniformly (see `sample_indices`). A container file is read by
seeking to each sampled frame rather than decoding the whole stream, can be cut to a segment [start, end) in
seconds first, and is described by `video_info` (what `python -m minivb info VIDEO` prints).

Errors are FileNotFoundError (a path that does not exist) or ValueError naming what is wrong.
"""

import contextlib
import dataclasses
import math
import os
import re
import warnings
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

# Containers read through PyAV; every other file goes to Pillow (which reads animated GIF/WebP/APNG).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Uniformly spaced frame indices: (arange(n) * total) // n.

    The official example uses np.arange(0, total, total / n), which gives the same first n indices
    but one index too many when total / n is not exact (61 frames, n = 7 -> 8 indices). When the
    clip has fewer frames than asked, frames repeat: the model always sees `num_frames` frames.
    """
    return ((np.arange(num_frames) * total) // num_frames).tolist()


def read_video(source, num_frames: int = 4, start: float | None = None, end: float | None = None) -> list[Image.Image]:
    """Read `num_frames` uniformly sampled frames of a video given in any of the forms listed above.

    start, end: a segment [start, end) in seconds from the first frame, sampled uniformly instead of the whole
    video (container files only: they carry timestamps).
    """
    check_num_frames(num_frames)
    path = _existing_path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS):
        return _read_with_pyav(path, num_frames, start, end)
    if start is not None or end is not None:
        what = path if path is not None else f"a {type(source).__name__}"
        raise ValueError(f"start and end (seconds) need a video file with timestamps ({', '.join(VIDEO_EXTENSIONS)}); "
                         f"got {what}")
    if path is not None:
        return _read_folder(path, num_frames) if os.path.isdir(path) else _read_with_pillow(path, num_frames)
    if isinstance(source, torch.Tensor):
        source = _tensor_to_numpy(source, "video")
    if isinstance(source, np.ndarray):
        _check_uint8(source, "video")
        if source.ndim != 4 or source.shape[-1] != 3:
            raise ValueError(
                f"a video array must have shape (T, H, W, 3) (RGB, channels last), got {source.shape} "
                "(a (T, 3, H, W) tensor: pass tensor.permute(0, 2, 3, 1))"
            )
        if source.shape[0] == 0:
            raise ValueError("empty video: the array has 0 frames")
        _check_size(source.shape[1:3], "video frames")
        return [Image.fromarray(source[i]) for i in sample_indices(source.shape[0], num_frames)]
    if isinstance(source, (list, tuple)):
        if len(source) == 0:
            raise ValueError("empty video: the list of frames is empty")
        for i, frame in enumerate(source):
            if not isinstance(frame, Image.Image):
                raise ValueError(f"a video given as a list must hold PIL images; frame {i} is a {type(frame).__name__}")
            _check_size(frame.size[::-1], f"frame {i}")
        return [source[i] for i in sample_indices(len(source), num_frames)]
    raise ValueError(
        "a video must be a file or folder path, a (T, H, W, 3) uint8 numpy array or torch tensor, "
        f"or a list of PIL images; got a {type(source).__name__}"
    )


def check_num_frames(num_frames) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")


def read_image(source) -> Image.Image:
    """Read one still image: a file path, a PIL image, or an (H, W, 3) uint8 numpy array / torch tensor."""
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source)
        if os.path.isdir(path):
            raise ValueError(f"expected an image file, got a folder: {path}")
        image = _open_image(path)  # an animated file gives its first frame
        _load(image, path)
    elif isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, torch.Tensor):
            source = _tensor_to_numpy(source, "image")
        if not isinstance(source, np.ndarray):
            raise ValueError(
                "an image must be a file path, a PIL image, or an (H, W, 3) uint8 numpy array or torch tensor; "
                f"got a {type(source).__name__}"
            )
        _check_uint8(source, "image")
        if source.ndim != 3 or source.shape[-1] != 3:
            raise ValueError(f"an image array must have shape (H, W, 3) (RGB, channels last), got {source.shape}")
        _check_size(source.shape[:2], "image")
        image = Image.fromarray(source)
    _check_size(image.size[::-1], "image")
    return image


# --- files ------------------------------------------------------------------------------------------


def _existing_path(source) -> str:
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    return path


def _open_image(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {path} as an image or animation: {e}") from None


def _load(image: Image.Image, path: str) -> None:
    """Decode the current frame now, so that a truncated or corrupt file fails here, naming the file."""
    try:
        image.load()
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from None


def _read_with_pillow(path: str, num_frames: int) -> list[Image.Image]:
    """Animated GIF / WebP / APNG (or a still image, read as a one-frame video)."""
    with _open_image(path) as image:
        total = getattr(image, "n_frames", 1)
        wanted = sample_indices(total, num_frames)
        frames = []
        # Every frame is decoded, not only the sampled ones: a GIF truncated after the sampled frames
        # would otherwise pass silently. Decoding is sequential in Pillow anyway.
        for index in range(total):
            try:
                image.seek(index)
            except EOFError as e:
                raise ValueError(f"{path} is truncated or corrupt: frame {index} of {total} is missing ({e})") from None
            _load(image, path)
            if index in wanted:
                _check_size(image.size[::-1], f"{path}, frame {index}")
                frame = image.copy()  # seek() reuses the image object: keep a copy of this frame
                frames.extend([frame] * wanted.count(index))
    return frames


def _natural_key(name: str):
    """Sort key putting frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_folder(path: str, num_frames: int) -> list[Image.Image]:
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    names = sorted(
        (n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in extensions and not n.startswith(".")),
        key=_natural_key,
    )
    if not names:
        raise ValueError(f"empty video: no image files in folder {path}")
    frames = []
    for index in sample_indices(len(names), num_frames):
        frames.append(read_image(os.path.join(path, names[index])))
    return frames


# --- containers (PyAV): seek to the sampled frames ------------------------------------------------------
#
# An mp4 / webm / mkv / avi / mov file is a container: it interleaves *packets* of compressed video (and
# audio) with a header that describes each stream. Packets do not stand alone. A *keyframe* (I-frame) is coded
# by itself; every other frame is coded as a difference from frames before it (P) or around it (B). A keyframe
# and the frames that depend on it form a *group of pictures* (GOP): to see frame k, a decoder starts at the
# keyframe at or before k and decodes every frame from there to k. Phones put a keyframe every 1-2 s,
# encoders for the web every 2-10 s.
#
# Each frame carries a *presentation timestamp* (pts), an integer counted in the stream's *time base* (a
# fraction of a second: 1/15360 for H.264 in mp4, 1/1000 in webm), and the demuxer can *seek*: jump to the
# keyframe at or before a timestamp, using the container's index (mp4's sample table, webm's cues). Seeking is
# cheap (no decoding); decoding is what costs. So instead of decoding the whole stream to keep 4 frames, we
# seek to each sampled frame's keyframe and decode forward only to that frame (measured with `make
# bench-video` on 2 shared cores, best of 6 runs: 4 frames of a 200 s 640x360 H.264 clip with a keyframe every
# 10 s in 0.014 s, against 2.6 s to decode the whole stream; the cost is at most one GOP per sampled frame,
# whatever the length).
#
# Frame k of a stream at a constant rate of r frames per second is shown at time k / r after the first frame:
# its pts is the first frame's pts + k / (r * time base). B-frames are stored out of order (a B-frame follows
# the frame it looks forward to), so packets are not in pts order, but the decoder outputs frames in pts order;
# and the first pts is often not 0 (an edit list or a start offset), so it is read from the first frame. A
# variable-rate stream (some phones) is read by time: index k is the frame on screen k / (average rate) seconds in.


def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise ValueError(
            f"reading {os.path.basename(path)} needs PyAV, which is not installed: pip install minivb[video] "
            "(or pass the frames as a (T, H, W, 3) uint8 array, a folder of images or an animated GIF)"
        ) from None
    return av


@contextlib.contextmanager
def _open_container(av, path: str):
    """Open `path` for reading, closed on the way out even when decoding fails; FFmpeg's errors name the file."""
    try:
        with av.open(path) as container:
            yield container
    except av.FFmpegError as e:  # also a truncated or corrupt file
        raise ValueError(f"cannot read {path} as a video: {e}") from None


@dataclasses.dataclass
class VideoInfo:
    """What the container says about its first video stream, and what `read_video` would sample from it."""

    path: str
    frame_count: int
    count_source: str  # "container" (the stream's frame count), "duration x rate", or "counted" (by decoding)
    rate: Fraction | None  # average frames per second; None when the container does not know it
    width: int
    height: int
    codec: str
    indices: list[int]  # the sampled frames
    keyframes: int | None = None  # keyframes in the container's index, where a seek can land (video_info only)

    @property
    def duration(self) -> float | None:
        """Seconds from the first frame to the end of the last one."""
        return float(self.frame_count / self.rate) if self.rate else None

    @property
    def timestamps(self) -> list[float] | None:
        """Seconds from the first frame to each sampled frame."""
        return [float(index / self.rate) for index in self.indices] if self.rate else None


def video_info(path, num_frames: int = 4, start: float | None = None, end: float | None = None) -> VideoInfo:
    """Describe a container file (mp4, webm, mkv, avi, mov) and the frames `read_video` would sample from it."""
    path = _existing_path(path)
    check_num_frames(num_frames)
    av = _import_av(path)
    with _open_container(av, path) as container:
        info = _describe(av, container, path, num_frames, start, end)
        stream = container.streams.video[0]
        # WebM / MKV keep their index (the cues) after the frames; FFmpeg reads it at the first seek.
        with contextlib.suppress(av.FFmpegError):  # a file that cannot seek lists what it has
            container.seek(stream.start_time or 0, stream=stream)
        return dataclasses.replace(info, keyframes=sum(1 for entry in stream.index_entries if entry.is_keyframe))


def _describe(av, container, path: str, num_frames: int, start, end) -> VideoInfo:
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate  # a Fraction, e.g. 30000/1001; None for some streams
    # The count, cheapest first. mp4 / mov / avi store it in the header. WebM / MKV do not (they report 0): there
    # it is the duration times the rate, rounded (the duration runs to the end of the last frame). Where neither
    # exists (a stream written live, e.g. by a browser), the only way left is to decode every frame and count.
    if stream.frames > 0:
        frame_count, source = stream.frames, "container"
    elif rate and (stream.duration or container.duration):
        seconds = stream.duration * stream.time_base if stream.duration else Fraction(container.duration, av.time_base)
        frame_count, source = round(seconds * rate), "duration x rate"
    else:
        frame_count, source = _count_by_decoding(av, path), "counted"
    if frame_count == 0:
        raise ValueError(f"empty video: {path} has no decodable frames")
    first, count = _segment(frame_count, rate, start, end, path)
    indices = [first + index for index in sample_indices(count, num_frames)]
    return VideoInfo(path, frame_count, source, rate, stream.width, stream.height, stream.codec_context.name, indices)


def _count_by_decoding(av, path: str) -> int:
    with _open_container(av, path) as container:
        container.streams.video[0].thread_type = "AUTO"
        return sum(1 for _ in container.decode(video=0))


def _segment(frame_count: int, rate, start, end, path: str) -> tuple[int, int]:
    """The first frame and the number of frames of the segment [start, end) in seconds (the whole video: None, None).

    Frame k is shown from k / rate to (k + 1) / rate: the segment starts with the frame on screen at `start` and
    ends with the last frame shown before `end`. An `end` past the end of the video stops at the end.
    """
    if start is None and end is None:
        return 0, frame_count
    if not rate:
        raise ValueError(f"{path} has no frame rate: a segment (start, end in seconds) cannot be located in it")
    duration = frame_count / rate
    start = 0.0 if start is None else float(start)
    end = float(duration) if end is None else float(end)
    if start < 0 or end < 0:
        raise ValueError(f"start and end are times in seconds >= 0, got start={start}, end={end} "
                         f"({path} lasts {float(duration):.3f} s)")
    if start >= duration:
        raise ValueError(f"start={start} s is past the end of {path}, which lasts {float(duration):.3f} s")
    if start >= end:
        raise ValueError(f"start must be before end, got start={start} s, end={end} s "
                         f"({path} lasts {float(duration):.3f} s)")
    # Times are floats (0.1 s is not exact in binary): round to a millionth of a frame before floor and ceil.
    first = math.floor(round(start * rate, 6))
    stop = min(math.ceil(round(end * rate, 6)), frame_count)  # frames first .. stop - 1
    return first, stop - first


def _read_with_pyav(path: str, num_frames: int, start, end) -> list[Image.Image]:
    av = _import_av(path)
    with _open_container(av, path) as container:
        info = _describe(av, container, path, num_frames, start, end)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # slice and frame threads: all cores decode
        if info.count_source == "counted" or not info.rate:
            return _decode_sequentially(av, path, info)
        with _open_container(av, path) as probe:
            return _decode_by_seeking(av, container, probe, info, path)


def _decode_by_seeking(av, container, probe, info: VideoInfo, path: str) -> list[Image.Image]:
    """Decode the frames at `info.indices`: seek to a keyframe when that skips frames, else decode forward.

    `probe` is a second handle on the same file, used only to ask where a seek would land: a seek in
    `container` throws away the decoder's state, so we seek there only when the keyframe it lands on lies after
    the frame decoded last. Sorted indices in one GOP are thus served by one seek, and no seek goes backwards.
    """
    stream = container.streams.video[0]
    step = 1 / (info.rate * stream.time_base)  # one frame, in pts units (512 for 30 fps in 1/15360)
    frames = container.decode(stream)  # only this stream is decoded: audio packets are read past
    current = next(frames, None)  # the first frame: time zero of the video
    if current is None:
        raise ValueError(f"empty video: {path} has no decodable frames")
    if current.pts is None:  # no timestamps (rare: a raw stream in a container): count frames instead
        return _decode_sequentially(av, path, info)
    origin, pictures, ended, missing = current.pts, {}, False, []
    for index in sorted(set(info.indices)):
        target = origin + index * step  # the pts frame `index` has
        # A frame counts as reached within half a frame of its pts: webm's millisecond pts are rounded.
        if not ended and current.pts < target - step / 2 and _seek_lands_after(av, probe, target, current.pts):
            container.seek(round(target), stream=stream)  # backward: the keyframe at or before `target`
            frames = container.decode(stream)
            landed = next(frames, None)
            if landed is None or landed.pts > target + step / 2:
                # FFmpeg seeks back to a keyframe whose pts is at or before the target (mp4 with B-frames
                # included, tested); a demuxer that lands past it would skip the frame: decode from the start.
                return _decode_sequentially(av, path, info)
            current = landed
        while not ended and current.pts < target - step / 2:  # decode forward: each frame up to the target
            following = next(frames, None)
            ended = following is None  # the stream ends before `index`: the count was wrong
            current = current if ended else following
        if current.pts < target - step / 2:
            missing.append(index)
        pictures[index] = _rgb(current)  # YUV -> RGB only for the frames kept
    if missing:
        _warn_short(path, missing, info)
    return [pictures[index] for index in info.indices]


def _seek_lands_after(av, probe, target: Fraction, position: int) -> bool:
    """Whether seeking to `target` lands on a keyframe after `position` (both pts): ask the probe's demuxer."""
    stream = probe.streams.video[0]
    try:
        probe.seek(round(target), stream=stream)
    except av.FFmpegError:  # a file that cannot seek (an AVI without its index): decode forward
        return False
    packet = next(probe.demux(stream), None)  # the keyframe; reading a packet decodes nothing
    landing = None if packet is None else packet.pts if packet.pts is not None else packet.dts
    return landing is not None and landing > position


def _decode_sequentially(av, path: str, info: VideoInfo) -> list[Image.Image]:
    """Decode every frame from the start and keep the ones at `indices`: the reference, and the path for streams
    that give no way to turn an index into a timestamp (no frame count, no rate, no pts)."""
    indices, pictures, last = info.indices, {}, None
    with _open_container(av, path) as container:
        container.streams.video[0].thread_type = "AUTO"
        for position, frame in enumerate(container.decode(video=0)):
            last = frame
            if position in indices:
                pictures[position] = _rgb(frame)
            if position >= max(indices):
                break
    if last is None:
        raise ValueError(f"empty video: {path} has no decodable frames")
    missing = [index for index in indices if index not in pictures]
    if missing:
        _warn_short(path, missing, info)
        pictures.update(dict.fromkeys(missing, _rgb(last)))
    return [pictures[index] for index in indices]


def _rgb(frame) -> Image.Image:
    """A decoded frame (YUV) as an RGB picture, converted on this thread (threads=1). Since PyAV 17 swscale makes a
    pool of threads for each frame it converts, and one such conversion hung forever in a DataLoader worker (forked)
    of a process that had decoded videos before: the worker waiting in avpriv_slicethread_execute for pool threads
    that did not exist (notebook 10's evaluation, once in a CI run; PyAV 18.1). The frames kept are few (4 to 16 a
    video) and small beside their decoding, whose own threads stay."""
    return frame.to_image(threads=1)


def _warn_short(path: str, missing: list[int], info: VideoInfo) -> None:
    """Where the count proves wrong (a truncated file, a wrong header), the last frame stands in: the model still
    gets `num_frames` frames, and the user is told."""
    warnings.warn(f"{path} ends before frame {missing[0]} ({info.count_source} said {info.frame_count} frames): "
                  f"its last frame stands in for frames {missing}")


# --- arrays -----------------------------------------------------------------------------------------


def _tensor_to_numpy(tensor: torch.Tensor, what: str) -> np.ndarray:
    if tensor.dtype != torch.uint8:
        raise ValueError(f"a {what} tensor must have dtype torch.uint8 (values 0-255), got {tensor.dtype}")
    return tensor.detach().cpu().numpy()


def _check_uint8(array: np.ndarray, what: str) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"a {what} array must have dtype uint8 (values 0-255), got {array.dtype}")


def _check_size(height_width, what: str) -> None:
    height, width = height_width
    if height == 0 or width == 0:
        raise ValueError(f"{what} has zero size ({height}x{width} pixels); expected at least 1x1")
