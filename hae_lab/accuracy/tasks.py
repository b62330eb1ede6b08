"""Procedural visual tasks whose answers depend on a small part of the image.

Every item is generated from a seed, so train and held-out splits never overlap (different seed
ranges) and anyone can regenerate the same data.  Answers are scored exactly.

* ``cell``: a G x G grid of coloured shapes; "What color is the shape in r2c3?" (row 2, column 3)
* ``shape``: the same grid; "What shape is the <colour> one?" (the only one of that colour)
* ``single``: one shape in an empty grid; "What color is the shape?"
* ``count``: "How many <colour> shapes are there?"
* ``exists``: "Is there a <colour> <shape>?" (yes/no)
* ``needle``: several grids; a question about one of them, plus a text needle in the prompt
* ``describe``: "Describe the grid cell by cell." - long grounded generation, scored per cell
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
SPLIT_SEEDS = {"train": 0, "heldout": 10_000_000}


def draw_shape(draw, shape: str, box, fill) -> None:
    """A filled square, circle or triangle (apex up) in ``box`` [x0, y0, x1, y1]."""
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@dataclass
class Grid:
    size: int  # cells per side
    cells: list[list[tuple[str, str] | None]]  # [row][col] -> (colour, shape) or empty

    @classmethod
    def random(cls, rng: np.random.Generator, size: int = 4, fill: float = 0.7) -> "Grid":
        cells = [
            [
                (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) if rng.random() < fill else None
                for _ in range(size)
            ]
            for _ in range(size)
        ]
        return cls(size, cells)

    def render(self, pixels: int = 224):
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (pixels, pixels), (245, 245, 245))
        draw = ImageDraw.Draw(img)
        step = pixels / self.size
        for r in range(self.size):
            for c in range(self.size):
                cell = self.cells[r][c]
                x0, y0 = c * step, r * step
                draw.rectangle([x0, y0, x0 + step - 1, y0 + step - 1], outline=(200, 200, 200))
                if cell is None:
                    continue
                colour, shape = cell
                pad = step * 0.18
                box = [x0 + pad, y0 + pad, x0 + step - pad, y0 + step - pad]
                draw_shape(draw, shape, box, COLOURS[colour])
        return img

    def describe(self) -> str:
        parts = []
        for r in range(self.size):
            for c in range(self.size):
                cell = self.cells[r][c]
                parts.append(cell_name(r, c) + " " + ("empty" if cell is None else f"{cell[0]} {cell[1]}"))
        return ", ".join(parts)


@dataclass
class Item:
    task: str
    question: str
    answer: str
    grids: list[Grid] = field(repr=False)
    scoring: str = "exact"  # "exact" or "cells"
    seed: int = 0

    def images(self, pixels: int = 224):
        return [g.render(pixels) for g in self.grids]

    def to_json(self) -> dict:
        d = asdict(self)
        d["grids"] = [asdict(g) for g in self.grids]
        return d


def cell_name(r: int, c: int) -> str:
    """``r2c3`` for row index 1, column index 2 (0-based in, 1-based out)."""
    return f"r{r + 1}c{c + 1}"


def _grid_and_target(rng, size: int, fill: float) -> tuple[Grid, list[tuple[int, int]], int, int]:
    """A random grid (never empty), its filled cells and one of them drawn at random."""
    g = Grid.random(rng, size, fill)
    filled = [(r, c) for r in range(size) for c in range(size) if g.cells[r][c] is not None]
    if not filled:
        g.cells[0][0] = ("red", "square")
        filled = [(0, 0)]
    r, c = filled[rng.integers(len(filled))]
    return g, filled, r, c


def _cell_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    g, _, r, c = _grid_and_target(rng, size, fill)
    # The cell is named as in the answer and in ``describe`` ("r2c3"), one token for a model
    # whose tokenizer has the 16 cell names (models/grid-llava-v3): "row 2 column 3" asked a
    # small model to compose two digit tokens into a cell before it could look anything up.
    q = f"What color is the shape in {cell_name(r, c)}?"
    # The answer names the cell first, in ``describe``'s words ("r2c3 red"): the colour is then
    # a decoded token, not the first one (which comes from the prefill's logits, computed
    # before prefill eviction takes effect), and describing a grid teaches this task.
    return Item("cell", q, f"{cell_name(r, c)} {g.cells[r][c][0]}", [g], seed=seed)


def _shape_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    """A single cell named by its colour (the only shape of that colour): retrieval by content."""
    g, filled, r, c = _grid_and_target(rng, size, fill)
    colour, shape = g.cells[r][c]
    others = [k for k in COLOURS if k != colour]
    for rr, cc in filled:
        if (rr, cc) != (r, c) and g.cells[rr][cc][0] == colour:
            g.cells[rr][cc] = (others[rng.integers(len(others))], g.cells[rr][cc][1])
    return Item("shape", f"What shape is the {colour} one?", shape, [g], seed=seed)


def _single_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    """One shape somewhere in an otherwise empty grid: its 9-16 patches out of 256 decide the
    answer, every other visual token is background (``fill`` is ignored)."""
    g = Grid(size, [[None] * size for _ in range(size)])
    r, c = int(rng.integers(size)), int(rng.integers(size))
    g.cells[r][c] = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
    # The colour is the answer's fourth token, not its first: the first token is sampled from
    # the prefill's logits, computed before prefill eviction takes effect, so a one-word answer
    # could not be hurt by any eviction at all.
    return Item("single", "What color is the shape?", f"the shape is {g.cells[r][c][0]}", [g], seed=seed)


def _count_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    g = Grid.random(rng, size, fill)
    colour = str(rng.choice(list(COLOURS)))
    n = sum(1 for row in g.cells for cell in row if cell is not None and cell[0] == colour)
    return Item("count", f"How many {colour} shapes are there?", str(n), [g], seed=seed)


def _exists_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    g = Grid.random(rng, size, fill)
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    yes = any(cell == (colour, shape) for row in g.cells for cell in row)
    return Item("exists", f"Is there a {colour} {shape}?", "yes" if yes else "no", [g], seed=seed)


def _needle_item(rng, seed: int, size: int, fill: float = 0.7, num_images: int = 3) -> Item:
    grids = [Grid.random(rng, size, fill) for _ in range(num_images)]
    k = int(rng.integers(num_images))
    g = grids[k]
    filled = [(r, c) for r in range(size) for c in range(size) if g.cells[r][c] is not None] or [(0, 0)]
    if g.cells[0][0] is None and filled == [(0, 0)]:
        g.cells[0][0] = ("blue", "circle")
    r, c = filled[rng.integers(len(filled))]
    code = int(rng.integers(100, 1000))
    q = (f"The secret number is {code}. In image {k + 1}, what color is the shape in {cell_name(r, c)}? "
         "Then repeat the secret number.")
    # Image and cell first (see ``_cell_item``), then the colour, then the text needle.
    return Item("needle", q, f"image {k + 1} {cell_name(r, c)} {g.cells[r][c][0]} {code}", grids, seed=seed)


def _describe_item(rng, seed: int, size: int, fill: float = 0.7) -> Item:
    g = Grid.random(rng, size, fill)
    return Item("describe", "Describe the grid cell by cell.", g.describe(), [g], scoring="cells", seed=seed)


# Append new tasks at the end: a task's seeds depend on its index here.
GENERATORS = {"cell": _cell_item, "count": _count_item, "exists": _exists_item, "needle": _needle_item,
              "describe": _describe_item, "shape": _shape_item, "single": _single_item}


def make_item(task: str, split: str, index: int, size: int = 4, fill: float | tuple[float, float] = 0.7) -> Item:
    """Item number ``index`` of ``task`` in ``split`` (what ``generate`` yields at that index)."""
    seed = SPLIT_SEEDS[split] + 1000 * list(GENERATORS).index(task) + index * 7919
    rng = np.random.default_rng(seed)
    f = float(rng.uniform(*fill)) if isinstance(fill, (tuple, list)) else fill
    return GENERATORS[task](rng, seed, size, f)


def generate(task: str, split: str, n: int, size: int = 4, fill: float | tuple[float, float] = 0.7) -> Iterator[Item]:
    """``n`` items of ``task`` from ``split`` (seeds never shared between splits).

    ``fill``: share of occupied cells, or a (low, high) range drawn per item (training uses a
    range: sparse grids, with fewer distractors, teach where a cell is before dense ones)."""
    for i in range(n):
        yield make_item(task, split, i, size, fill)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().replace(".", " ").replace(",", " , ").split())


SCORING_MODES = ("exact", "contains", "cells")


def score(item_answer: str, prediction: str, scoring: str = "exact") -> float:
    """``exact``: 1.0 when the prediction's first words are the answer's words; ``contains``:
    1.0 when the answer's words occur in a row anywhere in the prediction (verbose models);
    ``cells``: the fraction of comma-separated cells that match in order."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {scoring!r}; choose one of {SCORING_MODES}")
    if scoring == "cells":
        want = [p.strip() for p in normalize(item_answer).split(",")]
        got = [p.strip() for p in normalize(prediction).split(",")]
        return sum(1 for a, b in zip(want, got) if a == b) / len(want)
    want = normalize(item_answer).split()
    got = normalize(prediction).split()
    if scoring == "contains":
        return float(any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1)))
    return float(got[: len(want)] == want)


def write_jsonl(items, path: str, image_dir: str) -> None:
    """Dataset file in the harness's JSONL format (image paths, question, answer, scoring)."""
    import os

    os.makedirs(image_dir, exist_ok=True)
    with open(path, "w") as f:
        for idx, it in enumerate(items):
            paths = []
            for j, img in enumerate(it.images()):
                p = os.path.join(image_dir, f"{it.task}_{it.seed}_{j}.png")
                img.save(p)
                paths.append(p)
            f.write(json.dumps({"id": f"{it.task}-{it.seed}", "images": paths, "question": it.question,
                                "answer": it.answer, "scoring": it.scoring, "task": it.task}) + "\n")
