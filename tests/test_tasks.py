"""Procedural tasks: deterministic, splits disjoint, answers consistent with the grid, exact scoring."""

import numpy as np

from hae_lab.accuracy.tasks import COLOURS, GENERATORS, Grid, generate, score


def test_generation_is_deterministic_and_splits_disjoint():
    for task in GENERATORS:
        a = [i.to_json() for i in generate(task, "train", 5)]
        b = [i.to_json() for i in generate(task, "train", 5)]
        assert a == b
        held = {i.seed for i in generate(task, "heldout", 50)}
        assert held.isdisjoint({i.seed for i in generate(task, "train", 50)})


def test_cell_answers_match_the_grid_and_the_pixels():
    for item in generate("cell", "heldout", 20):
        # The question names the cell as "r2c3" (row 2, column 3), as the answer and describe do.
        name = item.question.rstrip("?").split()[-1]
        r, c = int(name[1]) - 1, int(name[3]) - 1
        assert name == f"r{r + 1}c{c + 1}"
        g = item.grids[0]
        # The answer names the cell, then its colour ("r2c3 red").
        cell, colour = item.answer.split()
        assert cell == f"r{r + 1}c{c + 1}" and g.cells[r][c][0] == colour
        img = np.asarray(item.images()[0])
        step = 224 / g.size
        centre = img[int((r + 0.6) * step), int((c + 0.5) * step)]
        assert np.abs(centre.astype(int) - np.array(COLOURS[colour])).sum() < 30


def test_count_and_exists():
    for item in generate("count", "train", 10):
        colour = item.question.split()[2]
        assert int(item.answer) == sum(cell is not None and cell[0] == colour for row in item.grids[0].cells for cell in row)
    answers = {item.answer for item in generate("exists", "train", 40)}
    assert answers == {"yes", "no"}


def test_scoring_is_exact():
    assert score("red", "Red.") == 1.0
    assert score("red", "reddish") == 0.0
    assert score("blue 123", "blue 123 and more") == 1.0
    g = Grid(2, [[("red", "square"), None], [None, ("blue", "circle")]])
    assert score(g.describe(), g.describe(), "cells") == 1.0
    assert score(g.describe(), "r1c1 red square, r1c2 empty, r2c1 red circle, r2c2 blue circle", "cells") == 0.75


def test_shape_items_name_a_unique_colour():
    for item in generate("shape", "heldout", 30, fill=(0.3, 1.0)):
        colour = item.question.split()[-2]
        cells = [cell for row in item.grids[0].cells for cell in row if cell is not None]
        matching = [cell for cell in cells if cell[0] == colour]
        assert len(matching) == 1 and matching[0][1] == item.answer


def test_fill_range_varies_density_and_float_fill_keeps_items():
    dens = [sum(c is not None for row in it.grids[0].cells for c in row)
            for it in generate("cell", "train", 40, fill=(0.1, 0.7))]
    assert min(dens) <= 4 and max(dens) >= 9
    a = [i.to_json() for i in generate("cell", "heldout", 5)]
    assert a == [i.to_json() for i in generate("cell", "heldout", 5, fill=0.7)]


def test_single_items_have_exactly_one_shape_of_the_answer_colour():
    for item in generate("single", "heldout", 20):
        cells = [cell for row in item.grids[0].cells for cell in row if cell is not None]
        assert len(cells) == 1 and item.answer == f"the shape is {cells[0][0]}"
        img = np.asarray(item.images()[0]).reshape(-1, 3).astype(int)
        coloured = np.abs(img - np.array(COLOURS[cells[0][0]])).sum(1) < 30
        assert 0.01 < coloured.mean() < 0.06  # a small part of the image decides the answer
