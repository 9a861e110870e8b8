"""The processor: from (question, video) to the batch the model takes, and from generated ids back to text.

Where it sits: video.py reads frames -> processor.py makes pixel_values and token ids -> the model
(model.py) generates ids -> `Processor.batch_decode` turns them into the answer.

It reads an official checkpoint folder as it is:
  preprocessor_config.json          image size, resampling, rescale factor, mean / std
  tokenizer.json                    the language model's tokenizer (LLaMA/Vicuna or T5)
  tokenizer_config.json             its padding side, eos / pad tokens, decoding clean-up
  qformer_tokenizer/tokenizer.json  the Q-Former's BERT tokenizer (+ its tokenizer_config.json)
  processor_config.json             num_query_tokens (or config.json)
  config.json, if present           which placeholder token marks the visual tokens
Text goes through the `tokenizers` library on those same files, so the ids are the ones transformers'
tokenizers give; the pixels are those of transformers' BlipImageProcessorPil, frame by frame.

Letters: B batch, T frames, Q query tokens per frame, L text length, H / W the checkpoint's image size.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from .config import checkpoint_dir, load_config, read_json
from .video import read_image, read_video


class Processor:
    """Turns text + videos (or images) into model inputs; decodes generated ids. Built by `load_processor`."""

    def __init__(self, tokenizer: Tokenizer, qformer_tokenizer: Tokenizer, *, image_size: tuple[int, int],
                 resample: int, rescale_factor: float, image_mean: list[float], image_std: list[float],
                 num_query_tokens: int, placeholder_token_id: int | None, padding_side: str,
                 eos_token_id: int, pad_token_id: int, qformer_pad_token_id: int,
                 clean_up_tokenization_spaces: bool):
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.image_size = image_size  # (H, W)
        self.resample = Image.Resampling(resample)
        self.rescale_factor = rescale_factor
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.num_query_tokens = num_query_tokens
        self.placeholder_token_id = placeholder_token_id  # from config.json; None: chosen per call
        self.padding_side = padding_side
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.qformer_pad_token_id = qformer_pad_token_id
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # --- the batch -------------------------------------------------------------------------------------

    def __call__(self, text, videos=None, images=None, num_frames: int = 4) -> dict[str, torch.Tensor]:
        """Make the model's batch from B texts and B videos (or B images).

        text: one string or a list of B strings (the instructions / questions).
        videos: a list of B videos, each in any form `video.read_video` reads; `num_frames` are sampled
            uniformly from each. images: a list of B images (path, PIL image, (H, W, 3) uint8 array).
        Returns pixel_values (B, T, 3, H, W) for videos or (B, 3, H, W) for images (float32),
        qformer_input_ids / qformer_attention_mask (B, Lq) and input_ids / attention_mask (B, L) (int64).
        """
        texts = _as_text_list(text)
        if (videos is None) == (images is None):
            raise ValueError("pass exactly one of videos=[...] or images=[...], one per text")
        kind, visuals = ("videos", videos) if videos is not None else ("images", images)
        if not isinstance(visuals, (list, tuple)):
            raise ValueError(f"{kind} must be a list with one entry per text, got a {type(visuals).__name__}")
        if len(visuals) != len(texts):
            raise ValueError(f"batch size mismatch: {len(texts)} texts but {len(visuals)} {kind}")

        if videos is not None:
            frames = [read_video(video, num_frames) for video in videos]
            pixel_values = torch.stack([self.pixels(video_frames) for video_frames in frames])  # (B, T, 3, H, W)
            frames_per_sample = num_frames
        else:
            pixel_values = torch.cat([self.pixels([read_image(image)]) for image in images])  # (B, 3, H, W)
            frames_per_sample = 1

        placeholder = self._placeholder_id(is_video=videos is not None)
        qformer_input_ids, qformer_attention_mask = _pad(
            [e.ids for e in self.qformer_tokenizer.encode_batch(texts)], self.qformer_pad_token_id, "right"
        )  # (B, Lq); the instruction is cut on the left to the Q-Former's 512 positions
        # tokenizer.json's post-processor adds the official special tokens: the Vicuna prompt starts with
        # </s> (id 2, not <s>: that is how the checkpoint was trained), T5 ends with </s> (id 1).
        # This text is never cut (transformers' processor does not cut it either unless asked).
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        for i, row in enumerate(rows):
            if placeholder in row:
                raise ValueError(
                    f"text {i} contains the placeholder token {self.tokenizer.id_to_token(placeholder)!r}; "
                    "the processor inserts the placeholders itself: remove it from the text"
                )
        text_ids, text_mask = _pad(rows, self.pad_token_id, self.padding_side)  # (B, L_text)
        # The visual tokens go first, before the padding and before BOS: [<video> x T*Q][text as padded].
        # That is where transformers' processor puts them, so the Vicuna pads sit between the placeholders
        # and BOS (left padding) while T5 pads at the end.
        num_placeholders = frames_per_sample * self.num_query_tokens
        batch_size = len(texts)
        input_ids = torch.cat([torch.full((batch_size, num_placeholders), placeholder), text_ids], dim=1)
        attention_mask = torch.cat([torch.ones(batch_size, num_placeholders, dtype=torch.long), text_mask], dim=1)
        return {
            "pixel_values": pixel_values,
            "qformer_input_ids": qformer_input_ids,
            "qformer_attention_mask": qformer_attention_mask,
            "input_ids": input_ids,  # (B, T*Q + L_text)
            "attention_mask": attention_mask,
        }

    def pixels(self, frames: list[Image.Image]) -> torch.Tensor:
        """PIL frames -> normalised pixels (T, 3, H, W): BlipImageProcessorPil's steps, bit for bit."""
        height, width = self.image_size
        resized = []
        for frame in frames:
            rgb = _to_rgb(frame)
            resized.append(np.asarray(rgb.resize((width, height), resample=self.resample)))  # (H, W, 3) uint8
        pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)  # (T, 3, H, W)
        # Same arithmetic as transformers: rescale in float64, round to float32, normalise in float32.
        pixels = (pixels.double() * self.rescale_factor).float()
        return (pixels - self.image_mean) / self.image_std

    def _placeholder_id(self, is_video: bool) -> int:
        if self.placeholder_token_id is not None:
            return self.placeholder_token_id
        # No config.json (or one naming no placeholder): <video> for videos, <image> for images.
        name = "<video>" if is_video else "<image>"
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {name} token to mark the visual tokens")
        return token_id

    # --- decoding --------------------------------------------------------------------------------------

    def batch_decode(self, ids, skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Generated ids (B, L) -> B strings. Special tokens (</s>, [PAD], <video>) are dropped by default.

        clean_up_tokenization_spaces: None follows the checkpoint's tokenizer_config.json (T5: True,
        Vicuna: False); True removes the spaces before punctuation ("hello !" -> "hello!").
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"batch_decode expects ids of shape (B, L), got {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in ids):
            raise ValueError("batch_decode expects a (B, L) tensor or a list of lists of token ids")
        for row in ids:
            _check_ids(row)
        texts = self.tokenizer.decode_batch([list(row) for row in ids], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return [_clean_up(t) for t in texts] if clean_up_tokenization_spaces else texts

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None) -> str:
        """One sequence of ids (L,) -> a string."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects ids of shape (L,), got {tuple(ids.shape)}; use batch_decode")
            ids = ids.tolist()
        return self.batch_decode([ids], skip_special_tokens, clean_up_tokenization_spaces)[0]


def _as_text_list(text) -> list[str]:
    if text is None:
        raise ValueError("text is required: the instruction or question, one string per video")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text must be a string or a list of strings; item {i} is a {type(t).__name__}")
    return list(texts)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows to the longest: ids and attention mask (B, L), 1 = token, 0 = padding."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: any transparency (alpha band or palette entry) composited onto white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")  # 16-bit and float modes: as Pillow converts them (clipped to 0..255)
    except ValueError as e:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {e}") from None


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space WordPiece/SentencePiece leave before punctuation."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _check_ids(row) -> None:
    for token_id in row:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"token ids must be integers >= 0, got {token_id!r}")


# --- loading ----------------------------------------------------------------------------------------------


def load_processor(path) -> Processor:
    """Build the processor from a checkpoint folder in the official layout (see the top of this file)."""
    path = checkpoint_dir(path)
    qformer_path = os.path.join(path, "qformer_tokenizer")

    image = _image_settings(path)
    config = load_config(path) if os.path.isfile(os.path.join(path, "config.json")) else None
    num_query_tokens = _num_query_tokens(path, config)

    tokenizer = _read_tokenizer(path)
    tokenizer_config = _tokenizer_config(path)
    tokenizer.no_padding()  # padding and truncation are done here, not by settings left in the file
    tokenizer.no_truncation()
    qformer_tokenizer = _read_tokenizer(qformer_path)
    qformer_config = _tokenizer_config(qformer_path)
    qformer_tokenizer.no_padding()
    # The Q-Former has 512 positions; the official tokenizer cuts long instructions from the LEFT,
    # so the end of the instruction (usually the question) is kept.
    qformer_tokenizer.enable_truncation(
        max_length=qformer_config.get("model_max_length", 512), direction=qformer_config.get("truncation_side", "left")
    )
    padding_side = tokenizer_config.get("padding_side", "right")  # Vicuna: left, T5: right
    if padding_side not in ("left", "right"):
        raise ValueError(f"{path}/tokenizer_config.json: padding_side must be 'left' or 'right', got {padding_side!r}")

    return Processor(
        tokenizer,
        qformer_tokenizer,
        image_size=(image["size"]["height"], image["size"]["width"]),
        resample=image.get("resample", Image.Resampling.BICUBIC),
        rescale_factor=image.get("rescale_factor", 1 / 255),
        image_mean=image["image_mean"],
        image_std=image["image_std"],
        num_query_tokens=num_query_tokens,
        placeholder_token_id=config.placeholder_token_id if config is not None else None,
        padding_side=padding_side,
        # Official Vicuna checkpoints: eos = bos = unk = </s> (id 2), pad = [PAD] (32000). T5: </s> 1, <pad> 0.
        eos_token_id=_special_token_id(tokenizer, tokenizer_config, "eos_token", path),
        pad_token_id=_special_token_id(tokenizer, tokenizer_config, "pad_token", path),
        qformer_pad_token_id=_special_token_id(qformer_tokenizer, qformer_config, "pad_token", qformer_path),
        clean_up_tokenization_spaces=tokenizer_config.get("clean_up_tokenization_spaces", False),
    )


def _image_settings(path: str) -> dict:
    """preprocessor_config.json, checked: minivb implements the steps every official checkpoint sets."""
    image = read_json(os.path.join(path, "preprocessor_config.json"))
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if image.get(flag, True) is not True:
            raise ValueError(f"preprocessor_config.json: {flag} = {image[flag]!r} is not supported; minivb always "
                             "converts to RGB, resizes, rescales and normalises, as every official checkpoint")
    size = image.get("size", {})
    if not (isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int)):
        raise ValueError(f"preprocessor_config.json: size must be {{'height': int, 'width': int}}, got {size!r}")
    if image.get("resample", Image.Resampling.BICUBIC) not in list(Image.Resampling):
        raise ValueError(f"preprocessor_config.json: resample must be a PIL filter 0-5, got {image['resample']!r}")
    for name in ("image_mean", "image_std"):
        if not (isinstance(image.get(name), list) and len(image[name]) == 3):
            raise ValueError(f"preprocessor_config.json: {name} must be a list of 3 numbers, got {image.get(name)!r}")
    return image


def _num_query_tokens(path: str, config) -> int:
    """Q from processor_config.json, else from config.json; the two must agree."""
    num_query_tokens = read_json(os.path.join(path, "processor_config.json"), required=False).get("num_query_tokens")
    if num_query_tokens is None and config is not None:
        num_query_tokens = config.num_query_tokens
    if isinstance(num_query_tokens, bool) or not isinstance(num_query_tokens, int) or num_query_tokens < 1:
        raise ValueError(f"{path}: num_query_tokens missing or invalid ({num_query_tokens!r}); "
                         "expected a positive integer in processor_config.json or config.json")
    if config is not None and config.num_query_tokens != num_query_tokens:
        raise ValueError(f"{path}: processor_config.json says num_query_tokens = {num_query_tokens} but "
                         f"config.json says {config.num_query_tokens}")
    return num_query_tokens


def _read_tokenizer(folder: str) -> Tokenizer:
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"missing tokenizer.json in {folder}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise ValueError(f"{file} is not a valid tokenizer file: {e}") from None


def _tokenizer_config(folder: str) -> dict:
    """tokenizer_config.json, over special_tokens_map.json (older checkpoints keep special tokens there)."""
    values = read_json(os.path.join(folder, "special_tokens_map.json"), required=False)
    values.update(read_json(os.path.join(folder, "tokenizer_config.json"), required=False))
    return values


def _special_token_id(tokenizer: Tokenizer, tokenizer_config: dict, name: str, folder: str) -> int:
    token = tokenizer_config.get(name)
    if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
        token = token.get("content")
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
        raise ValueError(f"{folder}: {name} {token!r} from tokenizer_config.json is not in tokenizer.json")
    return token_id
