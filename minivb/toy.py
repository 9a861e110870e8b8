"""The toy world: short synthetic clips of one moving shape, and questions about them with short answers.

Where it sits: random weights answer noise, so a learner never sees the machine work. This file draws a tiny
visual world that a small InstructBLIP-Video can learn from scratch in minutes on a CPU (train.py), so that the
demo and the notebooks show real answers and attention that means something.

The world, fixed so that anyone can draw clips of it:
  - a clip is 4 frames; each shows ONE solid shape (circle, square or triangle) in one of four roughly pure
    colours (red, green, blue, yellow), its size 15-30 % of the frame width, on a plain light background;
  - the shape moves in a straight line, left, right, up or down, by a similar step each frame;
  - questions come in several phrasings each (upper / lower case, with or without "?"); answers are one word
    ("red", "circle", "left"), or a short sentence for "Describe the video." ("a red circle moves left").

Everything is deterministic from an integer seed: `make_clip(seed)` draws the same clip on every machine.
Training uses seeds 0, 1, 2, ...; the held-out split uses seeds from HELDOUT_OFFSET on, which training never
reaches, so the evaluation clips are clips the model never saw.

Shapes: T frames (4), S pixels per side (the frames are square), uint8 RGB arrays (T, S, S, 3).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

NUM_FRAMES = 4
COLORS = {"red": (225, 30, 30), "green": (30, 170, 45), "blue": (35, 65, 225), "yellow": (240, 205, 15)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards

# Several phrasings per question type; `_vary` adds case and punctuation changes on top.
QUESTIONS = {
    "color": ("What color is the shape?", "What colour is it?", "What color is it?", "What is the color of the shape?",
              "Which colour is the shape?"),
    "shape": ("What shape is it?", "What is the shape?", "Which shape is it?", "What kind of shape is shown?"),
    "direction": ("Which direction is it moving?", "Which way does the shape move?", "Where is the shape going?",
                  "In which direction does it move?"),
    "describe": ("Describe the video.", "What happens in the video?", "Describe the clip."),
}
QUESTION_TYPES = tuple(QUESTIONS)

HELDOUT_OFFSET = 1_000_000_000  # training seeds stay below this; held-out seeds start here


@dataclass
class Clip:
    frames: np.ndarray  # (T, S, S, 3) uint8
    color: str
    shape: str
    direction: str

    def describe(self) -> str:
        return f"a {self.color} {self.shape} moves {self.direction}"

    def answer(self, question_type: str) -> str:
        if question_type == "describe":
            return self.describe()
        return {"color": self.color, "shape": self.shape, "direction": self.direction}[question_type]

    def to_gif(self, path, frame_ms: int = 400) -> None:
        """Save as an animated GIF that loops (what `make demo` reads back through video.py)."""
        images = [Image.fromarray(frame) for frame in self.frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


@dataclass
class Example:
    clip: Clip
    question_type: str
    question: str
    answer: str


def make_clip(seed: int, size: int = 112) -> Clip:
    """Draw the clip of this seed: frames (4, size, size, 3) uint8 and what they show."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an integer number of pixels >= 16, got {size!r}")
    rng = np.random.default_rng(seed)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))

    # "Roughly pure" hues: the base colour plus a little noise, so colour is not one exact RGB triple.
    rgb = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, 3), 0, 255))
    background = _light_background(rng)
    side = rng.uniform(0.15, 0.30) * size  # the shape's width (and height)
    steps = rng.uniform(0.10, 0.14) * size * rng.uniform(0.85, 1.15, NUM_FRAMES - 1)  # similar, not equal, steps
    travel = steps.sum()

    # Place the start so that the whole path stays inside the frame: along the motion the shape needs
    # side + travel pixels, across it only side.
    dx, dy = DIRECTIONS[direction]
    along = rng.uniform(0, size - side - travel)
    across = rng.uniform(0, size - side)
    if dx:
        x0 = along if dx > 0 else size - side - along
        y0 = across
    else:
        x0 = across
        y0 = along if dy > 0 else size - side - along
    offsets = np.concatenate([[0.0], np.cumsum(steps)])  # (T,) distance travelled at each frame

    frames = np.empty((NUM_FRAMES, size, size, 3), dtype=np.uint8)
    for t in range(NUM_FRAMES):
        image = Image.new("RGB", (size, size), background)
        _draw(ImageDraw.Draw(image), shape, x0 + dx * offsets[t], y0 + dy * offsets[t], side, rgb)
        frames[t] = np.asarray(image)
    return Clip(frames=frames, color=color, shape=shape, direction=direction)


def _light_background(rng) -> tuple[int, int, int]:
    kind = rng.integers(3)
    if kind == 0:
        return (255, 255, 255)  # white
    if kind == 1:
        grey = int(rng.integers(200, 246))
        return (grey, grey, grey)  # light grey
    return tuple(int(c) for c in rng.integers(205, 256, 3))  # a light tint


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, side: float, rgb) -> None:
    """A solid shape in the box whose top-left corner is (x, y), `side` pixels wide and high."""
    box = (x, y, x + side, y + side)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:  # an upright triangle: apex at the top middle, base along the bottom of the box
        draw.polygon([(x + side / 2, y), (x + side, y + side), (x, y + side)], fill=rgb)


def _vary(question: str, rng) -> str:
    """Case and punctuation as people type: as written, lower case or UPPER CASE; with or without the final mark."""
    case = rng.integers(3)
    question = question if case == 0 else question.lower() if case == 1 else question.upper()
    if rng.integers(2):
        question = question.rstrip("?.")
    return question


def make_example(seed: int, size: int = 112, question_type: str | None = None) -> Example:
    """The clip of this seed and one question about it (a random type unless `question_type` is given)."""
    clip = make_clip(seed, size)
    if question_type is not None and question_type not in QUESTIONS:
        raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
    # A second generator, seeded apart from the drawing, so that asking another question keeps the clip.
    rng = np.random.default_rng([seed, 1])
    if question_type is None:
        question_type = str(rng.choice(QUESTION_TYPES))
    phrasings = QUESTIONS[question_type]
    question = _vary(phrasings[rng.integers(len(phrasings))], rng)
    return Example(clip=clip, question_type=question_type, question=question, answer=clip.answer(question_type))


def split_seed(split: str, index: int) -> int:
    """The seed of example `index` of a split: training seeds and held-out seeds never meet."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < HELDOUT_OFFSET:
        raise ValueError(f"index must be an integer in [0, {HELDOUT_OFFSET}), got {index!r}")
    return int(index) if split == "train" else HELDOUT_OFFSET + int(index)


def heldout_examples(num_clips: int = 200, size: int = 112, question_types=QUESTION_TYPES) -> list[Example]:
    """Every question type asked about each of the first `num_clips` held-out clips."""
    return [make_example(split_seed("heldout", i), size, question_type=kind)
            for i in range(num_clips) for kind in question_types]
