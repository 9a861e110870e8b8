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
Every video is sampled to `num_frames` frames, uniformly (see `sample_indices`).

Errors are FileNotFoundError (a path that does not exist) or ValueError naming what is wrong.
"""

import os
import re

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


def read_video(source, num_frames: int = 4) -> list[Image.Image]:
    """Read `num_frames` uniformly sampled frames of a video given in any of the forms listed above."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if isinstance(source, (str, os.PathLike)):
        path = _existing_path(source)
        if os.path.isdir(path):
            return _read_folder(path, num_frames)
        if path.lower().endswith(VIDEO_EXTENSIONS):
            return _read_with_pyav(path, num_frames)
        return _read_with_pillow(path, num_frames)
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


def _read_with_pyav(path: str, num_frames: int) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise ValueError(
            f"reading {os.path.basename(path)} needs PyAV, which is not installed: pip install minivb[video] "
            "(or pass the frames as a (T, H, W, 3) uint8 array, a folder of images or an animated GIF)"
        ) from None

    def decode(wanted: list[int]) -> tuple[int, list[Image.Image]]:
        """Decode the whole stream once; return its number of frames and the wanted ones."""
        frames, total = [], 0
        try:
            with av.open(path) as container:
                for frame in container.decode(video=0):
                    frames.extend([frame.to_image()] * wanted.count(total))  # RGB
                    total += 1
        except av.FFmpegError as e:  # also a truncated or corrupt file
            raise ValueError(f"cannot read {path} as a video: {e}") from None
        return total, frames

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            total = container.streams.video[0].frames
    except av.FFmpegError as e:
        raise ValueError(f"cannot read {path} as a video: {e}") from None
    if total == 0:  # WebM (and MKV) carry no frame count: count by decoding
        total, _ = decode([])
    decoded, frames = decode(sample_indices(total, num_frames)) if total > 0 else (0, [])
    if decoded != total and decoded > 0:  # a reported count can be wrong: sample from the true one
        decoded, frames = decode(sample_indices(decoded, num_frames))
    if decoded == 0:
        raise ValueError(f"empty video: {path} has no decodable frames")
    return frames


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
