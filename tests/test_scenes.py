"""The LLaVA-scale scene world (issue 31): items are reproducible, answers follow from the
scene, objects are a minority of the 576 patches, and the objects score counts hallucinations."""

import numpy as np
import pytest

from hae_lab.accuracy import scenes
from hae_lab.accuracy.scenes import GENERATORS, LAYOUT, PATCH, PIXELS, Scene, make_item, score


def test_576_patches_per_image():
    assert (PIXELS // PATCH) ** 2 == 576
    assert make_item("attr", "train", 0).images()[0].size == (PIXELS, PIXELS)


@pytest.mark.parametrize("task", list(GENERATORS))
def test_items_are_reproducible_and_splits_differ(task):
    a, b = make_item(task, "train", 5), make_item(task, "train", 5)
    assert a.to_json() == b.to_json()
    assert np.array_equal(np.asarray(a.images()[0]), np.asarray(b.images()[0]))
    assert make_item(task, "heldout", 5).seed != a.seed


def _obj(item, cell, k=0):
    return item.scenes[k].objects[cell]


@pytest.mark.parametrize("i", range(20))
def test_answers_follow_from_the_scene(i):
    it = make_item("attr", "heldout", i)
    cell = it.question.split()[-1].rstrip("?")
    assert it.answer == f"{cell} {_obj(it, cell).colour}"
    it = make_item("find", "heldout", i)
    colour, shape = it.question.split()[3:5]
    shape = shape.rstrip("?")
    where = [c for c, o in it.scenes[0].objects.items() if (o.colour, o.shape) == (colour, shape)]
    assert len(where) == 1 and it.answer.endswith(where[0])
    it = make_item("read", "heldout", i)
    cell = it.question.split()[-1].rstrip("?")
    assert _obj(it, cell).shape == "digit" and it.answer == f"{cell} digit {_obj(it, cell).digit}"
    it = make_item("twohop", "heldout", i)
    tri = [c for c, o in it.scenes[0].objects.items() if o.shape == "triangle"]
    assert len(tri) == 1
    r, c = scenes._cell_rc(tri[0])
    right = scenes.cell_name(r, c + 1)
    assert it.answer == f"{right} {_obj(it, right).colour}"
    it = make_item("count", "heldout", i)
    shape = it.question.split()[2][:-1]
    assert it.answer == f"there are {sum(o.shape == shape for o in it.scenes[0].objects.values())} {shape}s"


def test_objects_are_a_minority_of_the_patches():
    """Patches an object touches: at most ~10% of the image on average (the rest is texture)."""
    shares = []
    for i in range(20):
        s = make_item("describe", "heldout", i).scenes[0]
        ink = np.asarray(s.render()).astype(int)
        bare = np.asarray(Scene({}, s.background, s.bg_colour, s.seed).render()).astype(int)
        diff = (np.abs(ink - bare).sum(-1) > 0).reshape(PIXELS // PATCH, PATCH, PIXELS // PATCH, PATCH)
        touched = diff.any(axis=(1, 3))
        shares.append(touched.mean())
        assert touched.sum() >= 2 * len(s.objects)
    assert 0.01 < np.mean(shares) < 0.12


def test_lookalike_distractors_are_present():
    for i in range(20):
        it = make_item("attr", "heldout", i)
        cell = it.question.split()[-1].rstrip("?")
        ob = _obj(it, cell)
        twins = [o for c, o in it.scenes[0].objects.items() if c != cell and (
            (o.shape == ob.shape and o.colour == scenes.LOOKALIKE[ob.colour]) or
            (ob.shape == "digit" and o.shape == "digit" and o.colour == ob.colour))]
        assert twins or len(it.scenes[0].objects) == LAYOUT * LAYOUT


def test_objects_scoring_counts_missing_and_hallucinated():
    ans = "r1c2 blue circle, r3c5 red digit 7"
    assert score(ans, "r3c5 red digit 7, r1c2 blue circle", "objects") == 1.0
    assert score(ans, "r1c2 blue circle", "objects") == 0.5
    assert score(ans, "r1c2 blue circle, r3c5 red digit 7, r6c6 green square, r2c2 red circle", "objects") == 0.5
    assert score(ans, "r1c2 purple circle, r3c5 red digit 1", "objects") == 0.0


def test_walk_is_a_long_answer_that_ends_by_recalling_its_first_step():
    it = make_item("walk", "heldout", 0)
    steps = it.answer.split(", ")
    assert len(it.scenes) == 5 and len(steps) >= 31 and len(it.answer.split()) >= 200
    assert steps[-1] == "first " + steps[0]


@pytest.mark.parametrize("i", range(4))
def test_patch_labels_follow_the_ink(i):
    """The vision pre-training's targets (hae_lab.accuracy.vision_pretrain.patch_labels): a patch
    is an object patch where the scene's pixels there are that object's colour, background where
    no object drew; each object owns at least one patch, labelled with its colour and kind."""
    from hae_lab.accuracy.vision_pretrain import COLOURS, KINDS, MIN_INK, patch_labels

    scene = make_item("attr", "heldout", i).scenes[0]
    lb = patch_labels(scene)
    img = np.asarray(scene.render(), dtype=np.int64)
    g = PIXELS // PATCH
    patches = img.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, PATCH * PATCH, 3)
    for k, name in enumerate(scene.cells()):
        ob = scene.objects[name]
        mine = np.flatnonzero(lb["owner"] == k)
        assert len(mine), f"{name} owns no patch"
        assert (lb["colour"][mine] == COLOURS.index(ob.colour)).all()
        kind = f"digit {ob.digit}" if ob.shape == "digit" else ob.shape
        assert (lb["kind"][mine] == KINDS.index(kind)).all()
        r, c = scenes._cell_rc(name)
        assert (lb["row"][mine] == r).all() and (lb["col"][mine] == c).all()
        # at least MIN_INK pixels of each of its patches are exactly the object's colour
        exact = (patches[mine] == np.asarray(scenes.COLOURS[ob.colour])).all(-1).sum(1)
        assert (exact >= MIN_INK).all()
    bg = np.flatnonzero(lb["object"] == 0)
    assert len(bg) > 0.8 * g * g and (lb["colour"][bg] == -100).all() and (lb["owner"][bg] == -1).all()


def test_class_words_are_distinct_tokens_of_the_world(tmp_path):
    """vision_pretrain --align reads each class through one token of the scenes tokenizer: every
    colour, shape, digit and cell maps to its own token, and that token decodes to the word."""
    from hae_lab.accuracy.vision_pretrain import COLOURS, KINDS, class_words
    from hae_lab.tiny_models import build_tiny_llava
    from transformers import AutoTokenizer

    build_tiny_llava(tmp_path, patch_size=PATCH, image_size=PIXELS, added_tokens=scenes.added_tokens(),
                     numbered_images=True, max_positions=8192)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    words = class_words(tok)
    assert [len(words[k]) for k in ("colour", "kind", "cell")] == [len(COLOURS), len(KINDS), LAYOUT * LAYOUT]
    for k, ids in words.items():
        assert len(set(ids)) == len(ids), k
    assert [tok.decode([i]).strip() for i in words["colour"]] == list(COLOURS)
    assert [tok.decode([i]).strip() for i in words["kind"]] == [k.split()[-1] for k in KINDS]
    assert tok.decode([words["cell"][LAYOUT + 2]]).strip() == "r2c3"


def test_harness_scene_items_and_objects_scoring():
    """hae_lab.accuracy.harness: held-out scenes as evaluation items (one image per scene, 336
    pixels) and the ``objects`` scoring the harness applies to ``describe``."""
    import base64
    import io

    from PIL import Image

    from hae_lab.accuracy import harness as H

    items = H.scene_items(["attr", "describe"], 2)
    assert [it.task for it in items] == ["attr", "attr", "describe", "describe"]
    d = items[2]
    assert d.scoring == "objects" and d.answer == make_item("describe", "heldout", 0).answer
    img = Image.open(io.BytesIO(base64.b64decode(d.images[0].split(",", 1)[1])))
    assert img.size == (PIXELS, PIXELS)
    first, *rest = d.answer.split(", ")
    assert H.score_item(d.answer, d.answer, "objects") == 1.0
    assert 0.0 < H.score_item(d.answer, first, "objects") < 1.0  # the others missing
    assert H.score_item(items[0].answer, items[0].answer + " extra", "exact") == 1.0
