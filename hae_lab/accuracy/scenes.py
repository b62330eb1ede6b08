"""LLaVA-scale procedural scenes (issue 31): 336-pixel images seen as 24 x 24 = 576 patches of
14 pixels (LLaVA-1.5's count), mostly background, a few small objects the questions are about.

A scene is a 6 x 6 layout of cells (56 pixels, 4 x 4 patches each); 3-7 cells hold an object,
drawn 20-36 pixels wide at a jittered place inside its cell, so an object covers 2-9 of the
576 patches and a scene's objects 2-10% of them.  The background is a low-contrast texture
(plain, noise, stripes, checks; never aligned with the patches), so most visual tokens are
near-duplicates of each other, as in real photographs.  Objects are shapes (square, circle,
triangle) or digits (a 5 x 7 bitmap font), in six colours of which two pairs look alike
(red/orange, blue/purple); questions pick targets that have look-alike distractors.

Tasks (answers scored exactly unless noted; every answer starts with words the question
already gives or a cell name, so the first token, which comes from the prefill's logits
before prefill eviction applies, never decides the score alone):

* ``attr``: "What color is the object in r3c5?" -> "r3c5 red" (lookup by position);
* ``find``: "Where is the red circle?" -> "the red circle is in r3c5" (lookup by content);
* ``count``: "How many circles are there?" -> "there are 3 circles";
* ``read``: "What digit is in r2c2?" -> "r2c2 digit 7" (glyph reading, OCR-like);
* ``needle``: three scenes and a number in the text; "In image 2, what color is the object in
  r1c4? Then repeat the secret number." -> "image 2 r1c4 red 123";
* ``describe``: "List the objects." -> "r1c2 blue circle, r3c5 red digit 7, ..." in reading
  order, scored per object named, hallucinated ones counting against (``objects`` scoring);
* ``twohop``: "What color is the object right of the triangle?" -> "r2c4 blue": the question
  names an object by a property, the answer is a property of its neighbour, so the evidence
  (the neighbour) is found only after the triangle is (a later layer than the first);
* ``walk``: five scenes; "Walk through the images object by object, then repeat the first
  step." -> "step 1 image 1 r1c2 blue circle, step 2 ..., first step 1 image 1 r1c2 blue
  circle": a long generation (~260 tokens) that refers back to the images and to its own first
  step (``objects`` scoring).

Seeds: item ``i`` of task ``t`` in split ``s`` is ``SPLIT_SEEDS[s] + 1000 * index(t) + 7919 *
i``, as ``hae_lab.accuracy.tasks``; train and held-out never share a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from hae_lab.accuracy.tasks import SHAPES, SPLIT_SEEDS, cell_name, draw_shape, normalize

PIXELS = 336
PATCH = 14
LAYOUT = 6  # cells per side
CELL_PX = PIXELS // LAYOUT  # 56 pixels = 4 x 4 patches
COLOURS = {
    "red": (205, 45, 40),
    "orange": (230, 120, 35),
    "yellow": (225, 200, 40),
    "green": (50, 160, 70),
    "blue": (45, 85, 210),
    "purple": (120, 60, 170),
}
LOOKALIKE = {"red": "orange", "orange": "red", "blue": "purple", "purple": "blue", "yellow": "orange", "green": "blue"}
BACKGROUNDS = ("plain", "noise", "stripes", "checks")
# 5 x 7 bitmap digits, rows top to bottom ('#': ink).
FONT = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
DIGITS = tuple(FONT)


@dataclass
class Obj:
    colour: str
    shape: str  # one of SHAPES, or "digit"
    digit: str = ""
    size: int = 28  # pixels
    dx: int = 0  # offset of its box inside the cell
    dy: int = 0

    def words(self) -> str:
        return f"{self.colour} digit {self.digit}" if self.shape == "digit" else f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: dict[str, Obj]  # cell name -> object
    background: str
    bg_colour: tuple[int, int, int]
    seed: int

    @classmethod
    def random(cls, rng: np.random.Generator, n_objects: tuple[int, int] = (3, 7), digit_share: float = 0.3) -> "Scene":
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        cells = rng.choice(LAYOUT * LAYOUT, size=n, replace=False)
        objects = {}
        for k in sorted(int(x) for x in cells):
            objects[cell_name(k // LAYOUT, k % LAYOUT)] = _random_obj(rng, digit_share)
        bg = str(rng.choice(BACKGROUNDS))
        tone = int(rng.integers(200, 246))
        tint = rng.integers(-12, 13, size=3)
        return cls(objects, bg, tuple(int(np.clip(tone + t, 0, 255)) for t in tint), int(rng.integers(2**31)))

    def cells(self) -> list[str]:
        """Occupied cells in reading order."""
        return sorted(self.objects, key=_cell_rc)

    def render(self, pixels: int = PIXELS):
        from PIL import Image, ImageDraw

        img = Image.fromarray(_background(self.background, self.bg_colour, self.seed, PIXELS))
        draw = ImageDraw.Draw(img)
        for name, ob in self.objects.items():
            _draw_object(draw, name, ob, COLOURS[ob.colour])
        return img if pixels == PIXELS else img.resize((pixels, pixels))

    def ink(self) -> np.ndarray:
        """``[PIXELS, PIXELS]`` int: ``k + 1`` where the ``k``-th object of :meth:`cells` put
        ink, 0 on the background (the labels of the vision tower's pre-training)."""
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (PIXELS, PIXELS), 0)
        draw = ImageDraw.Draw(canvas)
        for k, name in enumerate(self.cells()):
            _draw_object(draw, name, self.objects[name], k + 1)
        return np.asarray(canvas, dtype=np.int64)

    def describe(self) -> str:
        return ", ".join(f"{name} {self.objects[name].words()}" for name in self.cells())


def _draw_object(draw, name: str, ob: Obj, fill) -> None:
    r, c = _cell_rc(name)
    x0, y0 = c * CELL_PX + ob.dx, r * CELL_PX + ob.dy
    box = [x0, y0, x0 + ob.size - 1, y0 + ob.size - 1]
    if ob.shape != "digit":
        draw_shape(draw, ob.shape, box, fill)
    else:  # 5 x 7 font, strokes ob.size // 7 pixels
        px = max(2, ob.size // 7)
        for yy, row in enumerate(FONT[ob.digit]):
            for xx, ch in enumerate(row):
                if ch == "#":
                    draw.rectangle([x0 + xx * px, y0 + yy * px, x0 + (xx + 1) * px - 1, y0 + (yy + 1) * px - 1],
                                   fill=fill)


def _cell_rc(name: str) -> tuple[int, int]:
    r, c = name[1:].split("c")
    return int(r) - 1, int(c) - 1


def _random_obj(rng, digit_share: float) -> Obj:
    colour = str(rng.choice(list(COLOURS)))
    if rng.random() < digit_share:
        size = int(rng.integers(28, 36))  # a digit needs a few pixels per stroke to be read
        shape, digit = "digit", str(rng.choice(DIGITS))
    else:
        size = int(rng.integers(20, 37))
        shape, digit = str(rng.choice(SHAPES)), ""
    height = (size // 7) * 7 if shape == "digit" else size
    dx = int(rng.integers(0, CELL_PX - size + 1))
    dy = int(rng.integers(0, CELL_PX - height + 1))
    return Obj(colour, shape, digit, size, dx, dy)


def _background(style: str, colour, seed: int, pixels: int) -> np.ndarray:
    """Low-contrast texture (+-12 levels around ``colour``); periods never a multiple of the
    14-pixel patch, so neighbouring patches are alike but not identical."""
    rng = np.random.default_rng(seed)
    base = np.asarray(colour, dtype=np.float32)
    y, x = np.mgrid[0:pixels, 0:pixels].astype(np.float32)
    if style == "plain":
        tex = np.zeros((pixels, pixels), np.float32)
    elif style == "noise":
        coarse = rng.normal(0, 1, (pixels // 8 + 2, pixels // 8 + 2)).astype(np.float32)
        tex = np.kron(coarse, np.ones((8, 8), np.float32))[:pixels, :pixels] * 5
    elif style == "stripes":
        period = float(rng.uniform(9, 23))
        angle = float(rng.uniform(0, np.pi))
        tex = 8 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    else:  # checks
        period = int(rng.integers(17, 31))
        tex = 8 * ((((x // period) + (y // period)) % 2) * 2 - 1)
    img = base[None, None, :] + tex[:, :, None] + rng.normal(0, 2, (pixels, pixels, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class SceneItem:
    task: str
    question: str
    answer: str
    scenes: list[Scene] = field(repr=False)
    scoring: str = "exact"  # "exact" or "objects"
    seed: int = 0

    def images(self, pixels: int = PIXELS):
        return [s.render(pixels) for s in self.scenes]

    def to_json(self) -> dict:
        d = asdict(self)
        d["scenes"] = [asdict(s) for s in self.scenes]
        return d


def _with_lookalike(rng, scene: Scene, target: str) -> None:
    """Put a look-alike of the object in ``target`` in another cell: the same shape in the
    look-alike colour, or (a digit) another digit in the same colour."""
    ob = scene.objects[target]
    free = [cell_name(k // LAYOUT, k % LAYOUT) for k in range(LAYOUT * LAYOUT)
            if cell_name(k // LAYOUT, k % LAYOUT) not in scene.objects]
    if not free:
        return
    other = free[int(rng.integers(len(free)))]
    twin = _random_obj(rng, 1.0 if ob.shape == "digit" else 0.0)
    if ob.shape == "digit":
        twin.colour, twin.digit = ob.colour, str(rng.choice([d for d in DIGITS if d != ob.digit]))
    else:
        twin.colour, twin.shape = LOOKALIKE[ob.colour], ob.shape
    scene.objects[other] = twin


def _target(rng, scene: Scene, kind: str | None = None) -> str:
    """A random occupied cell (of a digit or a shape when ``kind`` says; one is made if none)."""
    cells = [c for c in scene.cells() if kind is None or (scene.objects[c].shape == "digit") == (kind == "digit")]
    if not cells:
        cell = scene.cells()[int(rng.integers(len(scene.cells())))]
        scene.objects[cell] = _random_obj(rng, 1.0 if kind == "digit" else 0.0)
        return cell
    return cells[int(rng.integers(len(cells)))]


def _attr_item(rng, seed):
    s = Scene.random(rng)
    cell = _target(rng, s)
    _with_lookalike(rng, s, cell)
    return SceneItem("attr", f"What color is the object in {cell}?", f"{cell} {s.objects[cell].colour}", [s], seed=seed)


def _find_item(rng, seed):
    s = Scene.random(rng)
    cell = _target(rng, s, "shape")
    _with_lookalike(rng, s, cell)
    ob = s.objects[cell]
    for other in s.cells():  # the description must be unique
        o = s.objects[other]
        if other != cell and (o.colour, o.shape) == (ob.colour, ob.shape):
            s.objects[other] = Obj(LOOKALIKE[ob.colour], o.shape, o.digit, o.size, o.dx, o.dy)
    return SceneItem("find", f"Where is the {ob.colour} {ob.shape}?", f"the {ob.colour} {ob.shape} is in {cell}", [s],
                     seed=seed)


def _count_item(rng, seed):
    s = Scene.random(rng, digit_share=0.2)
    shape = str(rng.choice(SHAPES))
    n = sum(1 for o in s.objects.values() if o.shape == shape)
    return SceneItem("count", f"How many {shape}s are there?", f"there are {n} {shape}s", [s], seed=seed)


def _read_item(rng, seed):
    s = Scene.random(rng, digit_share=0.5)
    cell = _target(rng, s, "digit")
    _with_lookalike(rng, s, cell)
    return SceneItem("read", f"What digit is in {cell}?", f"{cell} digit {s.objects[cell].digit}", [s], seed=seed)


def _needle_item(rng, seed, num_images: int = 3):
    scenes = [Scene.random(rng) for _ in range(num_images)]
    k = int(rng.integers(num_images))
    cell = _target(rng, scenes[k])
    code = int(rng.integers(100, 1000))
    q = (f"The secret number is {code}. In image {k + 1}, what color is the object in {cell}? "
         "Then repeat the secret number.")
    return SceneItem("needle", q, f"image {k + 1} {cell} {scenes[k].objects[cell].colour} {code}", scenes, seed=seed)


def _describe_item(rng, seed):
    s = Scene.random(rng)
    return SceneItem("describe", "List the objects.", s.describe(), [s], scoring="objects", seed=seed)


def _twohop_item(rng, seed):
    """Exactly one triangle, with an object in the cell to its right."""
    s = Scene.random(rng, digit_share=0.2)
    for cell in s.cells():
        if s.objects[cell].shape == "triangle":
            ob = s.objects[cell]
            s.objects[cell] = Obj(ob.colour, "square", "", ob.size, ob.dx, ob.dy)
    r, c = int(rng.integers(LAYOUT)), int(rng.integers(LAYOUT - 1))
    tri, right = cell_name(r, c), cell_name(r, c + 1)
    colour = str(rng.choice(list(COLOURS)))
    s.objects[tri] = Obj(colour, "triangle", "", 30, int(rng.integers(0, CELL_PX - 29)), int(rng.integers(0, CELL_PX - 29)))
    if right not in s.objects:
        s.objects[right] = _random_obj(rng, 0.2)
        if s.objects[right].shape == "triangle":
            s.objects[right].shape = "circle"
    s.objects = dict(sorted(s.objects.items(), key=lambda kv: _cell_rc(kv[0])))
    return SceneItem("twohop", "What color is the object right of the triangle?",
                     f"{right} {s.objects[right].colour}", [s], seed=seed)


def _walk_item(rng, seed, num_images: int = 5):
    """Every object of five scenes as a numbered step, then the first step again: ~260 answer
    tokens with the world's whole-word tokens, ~2900 prompt tokens."""
    scenes = [Scene.random(rng, n_objects=(6, 7)) for _ in range(num_images)]
    steps = [f"image {k + 1} {cell} {s.objects[cell].words()}" for k, s in enumerate(scenes) for cell in s.cells()]
    answer = ", ".join(f"step {i + 1} {st}" for i, st in enumerate(steps)) + f", first step 1 {steps[0]}"
    return SceneItem("walk", "Walk through the images object by object, then repeat the first step.", answer,
                     scenes, scoring="objects", seed=seed)


# Append new tasks at the end: a task's seeds depend on its index here.
GENERATORS = {"attr": _attr_item, "find": _find_item, "count": _count_item, "read": _read_item,
              "needle": _needle_item, "describe": _describe_item, "twohop": _twohop_item, "walk": _walk_item}


def make_item(task: str, split: str, index: int) -> SceneItem:
    seed = SPLIT_SEEDS[split] + 1000 * list(GENERATORS).index(task) + index * 7919
    return GENERATORS[task](np.random.default_rng(seed), seed)


def generate(task: str, split: str, n: int) -> Iterator[SceneItem]:
    for i in range(n):
        yield make_item(task, split, i)


def score_objects(answer: str, prediction: str) -> float:
    """Objects named correctly (cell and words, in any order) over the larger of the objects
    asked for and the objects named: missing and hallucinated objects both cost."""
    def entries(text: str) -> list[str]:
        return [e.strip() for e in normalize(text).replace(";", ",").split(",") if e.strip()]

    want, got = entries(answer), entries(prediction)
    remaining = list(want)
    hits = 0
    for g in got:
        if g in remaining:
            remaining.remove(g)
            hits += 1
    return hits / max(len(want), len(got), 1)


def score(answer: str, prediction: str, scoring: str = "exact") -> float:
    if scoring == "objects":
        return score_objects(answer, prediction)
    from hae_lab.accuracy.tasks import score as grid_score

    return grid_score(answer, prediction, scoring)


def added_tokens() -> tuple[str, ...]:
    """Whole-word tokens of this world: cell names, image names, colours, shapes, digits'
    word, so that every answer word is one token (as grid-llava's ``--grid-tokens``)."""
    return (tuple(f" {cell_name(r, c)}" for r in range(LAYOUT) for c in range(LAYOUT))
            + tuple(f" image {k}" for k in range(1, 6))
            + tuple(f" {w}" for w in (*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "digit", "first", "step")))
