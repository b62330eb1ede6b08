"""The accuracy harness: dataset loading, scoring modes, aggregation over physical blocks, reports."""

import base64
import json

import pytest

from hae_lab.accuracy import harness as H
from hae_lab.accuracy.tasks import Grid, score


def _png(tmp_path, name="a.png"):
    p = tmp_path / name
    Grid(2, [[("red", "square"), None], [None, None]]).render(32).save(p)
    return p


def test_contains_scoring_and_unknown_mode():
    assert score("blue", "The answer is Blue.", "contains") == 1.0
    assert score("blue 12", "blue 13 blue 12", "contains") == 1.0
    assert score("blue", "bluish", "contains") == 0.0
    with pytest.raises(ValueError, match="scoring"):
        score("a", "a", "fuzzy")


def test_load_jsonl_paths_base64_and_data_urls(tmp_path):
    p = _png(tmp_path)
    b64 = base64.b64encode(p.read_bytes()).decode()
    lines = [
        {"id": "x", "image": "a.png", "question": "q?", "answer": "B"},
        {"images": [str(p), b64, "data:image/png;base64," + b64], "question": "q2", "answer": 3,
         "scoring": "contains", "task": "mm", "max_tokens": 5},
    ]
    ds = tmp_path / "d.jsonl"
    ds.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = H.load_jsonl(ds)
    assert [it.id for it in items] == ["x", "2"]
    assert items[1].answer == "3" and items[1].scoring == "contains" and items[1].max_tokens == 5
    urls = items[0].images + items[1].images
    assert len(urls) == 4 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert len({u.split(",", 1)[1] for u in urls}) == 1  # the same bytes every way


@pytest.mark.parametrize("line, msg", [
    ({"image": "missing.png", "question": "q", "answer": "a"}, "neither a file"),
    ({"image": [], "question": "q", "answer": "a", "scoring": "fuzzy"}, "scoring"),
    ({"image": [], "answer": "a"}, "question"),
])
def test_load_jsonl_errors_name_the_line(tmp_path, line, msg):
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps({"image": [], "question": "ok", "answer": "a"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"d.jsonl:2: .*{msg}"):
        H.load_jsonl(ds)


def _row(setting, method, budget, task, sc, T=281, freed=0, evicted=0):
    return {"setting": setting, "method": method, "budget": budget, "task": task, "score": sc,
            "prompt_tokens": T, "prompt_blocks": -(-T // 32), "freed_blocks": freed, "evicted_tokens": evicted}


def test_summary_uses_freed_blocks_and_the_quick_line():
    rows = [
        _row("full", "full", None, "cell", 1.0), _row("full", "full", None, "cell", 1.0),
        _row("hae@0.4", "hae", 0.4, "cell", 1.0, freed=5, evicted=160),
        _row("hae@0.4", "hae", 0.4, "cell", 0.0, freed=5, evicted=160),
        _row("random@0.4", "random", 0.4, "cell", 0.0, freed=5, evicted=160),
        _row("random@0.4", "random", 0.4, "needle", 0.0, T=800, freed=14, evicted=448),
        _row("h2o@0.4", "h2o", 0.4, "cell", 0.0, freed=5, evicted=160),
        _row("h2o@0.4", "h2o", 0.4, "cell", 0.5, freed=5, evicted=160),
    ]
    s = H.summarize(rows)
    assert [x["setting"] for x in s] == ["full", "hae@0.4", "random@0.4", "h2o@0.4"]
    assert s[0]["kv_kept_frac"] == 1.0 and s[0]["accuracy"] == 1.0
    assert s[1]["kv_kept_frac"] == pytest.approx(4 / 9) and s[1]["tokens_kept_frac"] == pytest.approx(1 - 160 / 281)
    assert s[2]["kv_kept_frac"] == pytest.approx(1 - 19 / (9 + 25)) and s[2]["per_task"] == {"cell": 0.0, "needle": 0.0}
    line = H.quick_line(s, 0.4)
    assert line == "full_acc=1.0000 hae_acc=0.5000 best_baseline_acc=0.2500 budget=0.4 kv_kept_frac=0.4444"
    md = H.markdown_table(s)
    assert md.count("\n") == 6 and "| hae@0.4 | 0.444 | 0.431 | 0.500 | 0.500 | - |" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    s = H.summarize([_row("full", "full", None, "cell", 1.0), _row("hae@0.4", "hae", 0.4, "cell", 1.0, freed=5),
                     _row("hae@0.2", "hae", 0.2, "cell", 0.0, freed=7)])
    H.plot(s, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_send_per_request_knobs():
    assert H.Setting("full").extra_args({"evict_text": True}) == {"kv_eviction": "none"}
    assert H.Setting("snapkv", 0.3).extra_args({"window": 8}) == {
        "kv_eviction": "snapkv", "kv_eviction_budget": 0.3, "kv_eviction_window": 8}
    assert H.Setting("snapkv", 0.3).label == "snapkv@0.3"


def test_procedural_items_are_held_out_data_urls():
    items = H.procedural_items(["cell", "needle"], 2)
    assert [it.task for it in items] == ["cell", "cell", "needle", "needle"]
    assert [len(it.images) for it in items] == [1, 1, 3, 3]
    assert all(u.startswith("data:image/png;base64,") for it in items for u in it.images)
    assert H.messages(items[0])[0]["content"][-1] == {"type": "text", "text": items[0].question}


def test_mmbench_tsv_converts_to_a_loadable_dataset(tmp_path):
    import csv
    import importlib.util

    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mmbench_to_jsonl.py"
    spec = importlib.util.spec_from_file_location("mmbench_to_jsonl", path)
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    b64 = base64.b64encode(_png(tmp_path).read_bytes()).decode()
    tsv = tmp_path / "mm.tsv"
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerow([7, "What colour?", "nan", "red", "blue", "nan", "nan", "A", "colour", b64])
        w.writerow([8, "Test split row", "", "x", "y", "", "", "", "c", b64])  # no answer: skipped
    out = tmp_path / "mm.jsonl"
    assert mm.convert(str(tsv), str(out)) == 1
    (item,) = H.load_jsonl(out)
    assert item.id == "7" and item.answer == "A" and item.task == "colour" and item.max_tokens == 4
    assert item.question == "What colour?\nA. red\nB. blue\n" + mm.INSTRUCTION
    assert score(item.answer, "A.", item.scoring) == 1.0 and score(item.answer, "B", item.scoring) == 0.0


def test_hard_quick_line_names_the_best_baseline():
    rows = [_row("full", "full", None, "cell", 1.0), _row("hae@0.4", "hae", 0.4, "cell", 0.0, freed=5),
            _row("random@0.4", "random", 0.4, "cell", 0.0, freed=5), _row("h2o@0.4", "h2o", 0.4, "cell", 1.0, freed=5)]
    line = H.quick_line(H.summarize(rows), 0.4, name_best=True)
    assert line == ("full_acc=1.0000 hae_acc=0.0000 best_baseline_acc=1.0000 best_baseline=h2o budget=0.4 "
                    "kv_kept_frac=0.4444")


def test_decode_memory_counts_parks_and_restores_in_blocks():
    # 300-token prompt (10 blocks of 32), 2 freed at prefill; 4 parked at 300 tokens, 1 back at 340.
    events = [{"kind": "park", "num_tokens": 300, "blocks": 4}, {"kind": "restore", "num_tokens": 340, "blocks": 1}]
    m = H.decode_memory(2, events, 400, 32)
    assert m == {"peak_live_blocks": 8, "final_live_blocks": 13 - 5, "parked_blocks": 4, "restored_blocks": 1}
    assert H.decode_memory(0, [], 64, 32)["final_live_blocks"] == 2


def test_decode_settings_and_line():
    settings = H.decode_settings(0.5, [0, 2, 4])
    assert [s.label for s in settings] == ["full", "greedy@1", "bin2@1", "bin4@1", "default@1"]
    assert settings[1].extra_args({"bin_capacity": 9}) == {
        "kv_eviction": "hae", "kv_eviction_budget": 1.0, "kv_eviction_decode_budget": 0.5,
        "kv_eviction_decode_start": 0.0, "kv_eviction_bin_capacity": 0}
    assert settings[4].extra_args() == {"kv_eviction": "hae", "kv_eviction_budget": 1.0, "kv_eviction_decode_budget": 0.5}
    assert settings[3].extra_args()["kv_eviction_bin_capacity"] == 4
    mem = {"peak_live_blocks": 10, "parked_blocks": 0, "restored_blocks": 0, "full_blocks": 10}
    rows = [{**_row("full", "full", None, "describe", 1.0), **mem, "group": "full", "final_live_blocks": 10},
            {**_row("greedy@1", "hae", 1.0, "describe", 0.25), **mem, "group": "greedy", "final_live_blocks": 5,
             "parked_blocks": 5},
            {**_row("bin4@1", "hae", 1.0, "describe", 0.75), **mem, "group": "bin4", "final_live_blocks": 5,
             "parked_blocks": 7, "restored_blocks": 2}]
    s = H.summarize(rows)
    assert H.decode_quick_line(s, 4) == "describe_full=1.0000 greedy=0.2500 bin=0.7500 kv_kept_frac=0.5000"
    assert "| bin4 | 0.750 | 1.000 | 0.500 | 7 | 2 |" in H.decode_table(s)


def test_cell_and_needle_answers_name_the_cell_before_the_colour():
    from hae_lab.accuracy.tasks import generate, make_item

    for it in generate("cell", "heldout", 20):
        name = it.question.rstrip("?").split()[-1]  # "r2c3": the cell is named in the answer's words
        r, c = int(name[1]), int(name[3])
        addr, colour = it.answer.split()
        assert addr == f"r{r}c{c}" and colour == it.grids[0].cells[r - 1][c - 1][0]
    it = next(generate("needle", "heldout", 1))
    k = int(it.question.split("In image ")[1].split(",")[0])
    assert it.answer.split()[:2] == ["image", str(k)] and it.answer.split()[-1] in it.question
    assert f" {it.answer.split()[2]}?" in it.question  # the same cell name in the question
    assert make_item("describe", "train", 3).answer == list(generate("describe", "train", 4))[3].answer


def test_trainer_resumes_bit_exactly(tmp_path):
    """Two steps, stop, resume for the third == three steps in one go (weights, optimizer,
    data position and RNG all travel in the checkpoint); labels cover the answer tokens only."""
    import torch

    from hae_lab.accuracy import train as T

    torch.set_num_threads(1)
    kw = dict(steps=3, batch_size=2, lr=1e-3, seed=0, device="cpu", eval_every=0, eval_n=1, final_n=0,
              stages=[{"until": 3, "weights": {"cell": 1.0, "single": 1.0}, "fill": [0.1, 0.5]}], warmup=2,
              ckpt_every=1)
    T.train(tmp_path / "a", ckpt_dir=str(tmp_path / "ca"), **kw)
    assert T.train(tmp_path / "b", ckpt_dir=str(tmp_path / "cb"), stop_after=2, **kw) is None
    log = T.train(tmp_path / "b", ckpt_dir=str(tmp_path / "cb"), resume=True, **kw)
    a = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["model_sha256"] == a["model_sha256"] and log["resumed_at"] == [2]
    assert [list(x) for x in log["loss"]] == a["loss"]
    # A run resumed with more steps than it was planned for: its last stage runs to the new end
    # (this raised StopIteration before; only a shorter run was handled).
    assert T.train(tmp_path / "c", ckpt_dir=str(tmp_path / "cc"), stop_after=2, **kw) is None
    again = {k: v for k, v in kw.items() if k != "stages"}  # the saved stages, as `--resume --steps` gives
    longer = T.train(tmp_path / "c", ckpt_dir=str(tmp_path / "cc"), resume=True, **{**again, "steps": 4})
    assert [x[0] for x in longer["loss"]] == [1, 2, 3, 4] and [list(c) for c in longer["length_changes"]] == [[2, 3, 4]]
    assert longer["config"]["stages"][-1]["until"] == 4


def test_grid_checkpoint_numbers_images_and_has_cell_tokens(tmp_path):
    """The grid-llava-v3 base: 64 image tokens per image (patch 28), one token per cell name,
    and a chat template that renders exactly what the trainer trains on."""
    from transformers import AutoProcessor

    from hae_lab.accuracy import train as T
    from hae_lab.tiny_models import build_tiny_llava

    base = build_tiny_llava(tmp_path / "m", patch_size=28, added_tokens=T.GRID_TOKENS, numbered_images=True)
    proc = AutoProcessor.from_pretrained(base)
    tok = proc.tokenizer
    assert [tok.decode([i]) for i in tok(" r2c3 purple,", add_special_tokens=False)["input_ids"]] == [" r2c3", " purple", ","]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>" + T.prompt_format(base)("Q?", 2) == "<s>USER: image 1<image>\n image 2<image>\nQ? ASSISTANT:"
    enc = proc(text=[T.prompt_format(base)("Q?", 2)], images=[Grid(4, [[None] * 4] * 4).render()] * 2)
    assert sum(i == tok.convert_tokens_to_ids("<image>") for i in enc["input_ids"][0]) == 2 * 64


def test_wired_circuits_attend_where_the_tasks_need(tmp_path):
    """--wire-circuits: at initialisation (before any training) each wired head attends where its
    task needs it: a cell token to its cell's 4 patches (of ~80 tokens), every token to the
    previous one, a colour token to the previous cell token's patches, visual tokens to the image
    markers before them, and the needle's cell token to that cell of the asked image (of three)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hae_lab.accuracy import train as T
    from hae_lab.accuracy.tasks import generate
    from hae_lab.tiny_models import build_tiny_llava

    torch.set_num_threads(1)
    base = build_tiny_llava(tmp_path / "m", patch_size=28, added_tokens=T.GRID_TOKENS, numbered_images=True)
    proc = AutoProcessor.from_pretrained(base)
    tok = proc.tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").eval()
    T.reinit_for_training(model, 0)
    T.init_positions_cells(model)
    T.wire_grid_circuits(model, tok)
    image = tok.convert_tokens_to_ids("<image>")
    idx = torch.arange(64)

    def cell(r, c):  # the 4 of 64 patches (8 x 8, row-major) in cell (r, c) of the 4 x 4 grid
        return ((idx // 8) // 2 == r) & ((idx % 8) // 2 == c)

    for it in [next(generate("describe", "heldout", 1)), *generate("needle", "heldout", 3)]:
        b = T._batch(proc, [it], "cpu", T.prompt_format(base))
        with torch.no_grad():
            att = [a[0] for a in model(**b, output_attentions=True).attentions]  # [head, query, key] per layer
        ids = b["input_ids"][0]
        n = int(b["attention_mask"][0].sum())
        vis = (ids == image).nonzero().flatten()
        words = [tok.decode([i]) for i in ids[:n]]
        assert min(att[0][2, t, t - 1] for t in range(1, n)) > 0.9  # previous token
        marks = [i for i, w in enumerate(words) if w.startswith(" image ") and i < vis[-1]]
        assert att[1][2, vis[-1], marks].sum() > 0.9  # image markers
        if it.task == "describe":
            cells = [t for t in range(vis[-1] + 1, n - 1) if len(words[t]) == 5 and words[t].startswith(" r")]
            assert len(cells) == 16
            for t in cells:
                r, c = int(words[t][2]) - 1, int(words[t][4]) - 1
                assert att[0][0, t, vis[cell(r, c)]].sum() > 0.9  # the cell token -> its cell
                assert att[1][0, t + 1, vis[cell(r, c)]].sum() > 0.9  # the next token -> the same cell
        else:
            k, name = int(it.answer.split()[1]), it.answer.split()[2]
            t = n - 7  # the answer: image k, cell, colour, " ", 3 digits, </s>
            assert words[t] == " " + name
            r, c = int(name[1]) - 1, int(name[3]) - 1
            assert att[2][0, t, vis[(k - 1) * 64:k * 64][cell(r, c)]].sum() > 0.9, (k, name)


def test_curriculum_items_keep_the_asked_cell():
    """The trainer's curriculum items (``cells``, ``images`` stage keys) and the lookup probe's:
    fewer shapes per grid with the asked one kept, describe's answer rewritten, needle with
    fewer images, and the probe's exact-count and same-colour grids."""
    from hae_lab.accuracy import probe as P
    from hae_lab.accuracy import train as T
    from hae_lab.accuracy.tasks import make_item

    def filled(g):
        return [(r, c) for r in range(4) for c in range(4) if g.cells[r][c] is not None]

    for task in ("cell", "needle", "describe"):
        it = make_item(task, "train", 7, fill=0.9)
        for k in (1, 3):
            s = T.sparsify(it, k)
            assert all(len(filled(g)) <= k for g in s.grids)
            assert s.question == it.question
            if task == "describe":
                assert s.answer == s.grids[0].describe()
            else:
                assert s.answer == it.answer  # the asked cell (and its colour) survives
    for n in (1, 2):
        it = T._needle_n(3, (0.1, 0.9), n)
        assert len(it.grids) == n and it.answer.split()[1] in {str(i) for i in range(1, n + 1)}
    it = P.cell_item_k(5, 6, same=True)
    (r, c) = P._target(it)
    assert len(filled(it.grids[0])) == 6 and it.grids[0].cells[r][c][0] == it.answer.split()[1]
    assert {it.grids[0].cells[a][b][0] for a, b in filled(it.grids[0])} == {it.answer.split()[1]}
    assert P.cell_item_k(5, 6, pad=16).question.endswith(f"What color is the shape in {it.answer.split()[0]}?")


def test_probe_multi_cell_items_and_their_labels():
    """The probe's several-cells questions: every named cell is filled and answered with its
    colour, in the question's (random) order; only the first cell name and the colours keep a
    loss.  Fails if an answer names the wrong colour, if the order is fixed, or if the mask
    hides a colour or keeps a repeated cell name."""
    from pathlib import Path

    import torch
    from transformers import AutoProcessor

    from hae_lab.accuracy import probe as P
    from hae_lab.accuracy.tasks import cell_name
    from hae_lab.accuracy.train import _batch
    from hae_lab.tiny_models import llava_numbered_prompt

    firsts = set()
    for i in range(12):
        it = P.cell_item_k(i, 8, pad=3, queries=4)
        g = it.grids[0]
        asked = it.question.split("shapes in ")[1].rstrip("?").replace(" and", ",").split(", ")
        pairs = [p.split() for p in it.answer.split(", ")]
        assert [n for n, _ in pairs] == asked and len(set(asked)) == 4
        for name, colour in pairs:
            assert g.cells[int(name[1]) - 1][int(name[3]) - 1][0] == colour
        firsts.add(asked[0])
    assert len(firsts) > 3  # the order is drawn, not the grid's
    assert P.cell_item_k(3, 2, queries=4).answer.count(",") == 1  # never more cells than shapes
    proc = AutoProcessor.from_pretrained(Path(__file__).resolve().parents[1] / "models" / "grid-llava-v3")
    tok = proc.tokenizer
    cell_ids = torch.tensor([tok.convert_tokens_to_ids(f" {cell_name(r, c)}") for r in range(4) for c in range(4)])
    items = [P.cell_item_k(1, 8, queries=3), P.cell_item_k(2, 8)]
    enc = _batch(proc, items, "cpu", llava_numbered_prompt)
    before = enc["labels"].clone()
    P.mask_repeated_cells(enc["labels"], items, cell_ids)
    assert torch.equal(enc["labels"][1], before[1])  # one cell asked: unchanged
    kept = [tok.convert_ids_to_tokens(int(t)).strip("Ġ ") for t in enc["labels"][0] if t != -100]
    names = [p.split()[0] for p in items[0].answer.split(", ")]
    colours = [p.split()[1] for p in items[0].answer.split(", ")]
    assert [w for w in kept if w in {cell_name(r, c) for r in range(4) for c in range(4)}] == [names[0]]
    assert [w for w in kept if w in colours] == colours


def test_probe_grown_model_computes_what_the_probe_did(tmp_path):
    """``probe --export-only --grow-to``: the probe's layers first, new layers that add nothing
    yet - the grown checkpoint's logits equal the probe's.  Fails if a new layer writes to the
    residual stream or a probe weight lands in the wrong place."""
    import torch
    from transformers import AutoProcessor

    from hae_lab.accuracy import probe as P
    from hae_lab.accuracy.train import GRID_TOKENS, _batch, _build_model, reinit_for_training
    from hae_lab.tiny_models import build_tiny_llava, llava_numbered_prompt

    base = tmp_path / "base"
    build_tiny_llava(base, seed=0, patch_size=28, added_tokens=GRID_TOKENS, numbered_images=True)
    small = _build_model(base, {"num_hidden_layers": 1})
    reinit_for_training(small, 3)
    with torch.no_grad():  # weights far from the initialisation the grown model starts from
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(small.state_dict(), tmp_path / "model.pt")
    grown_dir = P.export(tmp_path / "model.pt", tmp_path / "hf3", layers=1, grow_to=3)
    grown = _build_model(grown_dir, None)
    assert grown.config.text_config.num_hidden_layers == 3
    proc = AutoProcessor.from_pretrained(grown_dir)
    enc = _batch(proc, [P.cell_item_k(i, 6, queries=2) for i in range(2)], "cpu", llava_numbered_prompt)
    enc.pop("labels")
    with torch.no_grad():
        a, b = small.eval()(**enc).logits, grown.eval()(**enc).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert any(p.abs().sum() > 0 for p in grown.model.language_model.layers[2].self_attn.q_proj.parameters())


def test_code_bilinear_tells_a_cell_lookup_from_a_look_at_any_patch(tmp_path):
    """``probe.code_bilinear`` on a first layer whose head 0 is set as the cell lookup
    (``init_cell_alignment(wire=...)``): head 0's form is mostly the matching pattern; the same
    model with that head's query replaced by one vector for every cell (the "any cell token"
    form) has no matching part and equal rows.  Fails if the measure reads the wrong channels,
    dimensions or heads."""
    import torch
    from transformers import AutoProcessor

    from hae_lab.accuracy import probe as P
    from hae_lab.accuracy.train import (GRID_TOKENS, _build_model, init_cell_alignment, init_positions_cells,
                                         reinit_for_training)
    from hae_lab.tiny_models import build_tiny_llava

    base = tmp_path / "base"
    build_tiny_llava(base, seed=0, patch_size=28, added_tokens=GRID_TOKENS, numbered_images=True)
    proc = AutoProcessor.from_pretrained(base)
    model = _build_model(base, {"num_hidden_layers": 1})
    reinit_for_training(model, 0)
    init_positions_cells(model)
    init_cell_alignment(model, proc.tokenizer, gain=1.0, wire=2.0)
    model.set_attn_implementation("eager")
    res = P.code_bilinear(model, proc, batches=2, batch_size=2)
    h0, h2 = res["heads"][0], res["heads"][2]
    assert h0["matching"] > 0.5 * h0["norm"] and h0["row_spread"] > 0.5
    assert abs(h2["matching"]) < 0.1 * h0["matching"]  # another key-value head: random, small
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q[:32, 8:16] = q[:32, 8:16].sum(1, keepdim=True) / 8  # same query for every cell code
    any_cell = P.code_bilinear(model, proc, batches=1, batch_size=2)["heads"][0]
    assert abs(any_cell["matching"]) < 1e-3 and any_cell["row_spread"] < 1e-3


def test_probe_frozen_parts_keep_their_weights(tmp_path):
    """``probe --freeze vision,projector``: a training step changes the text model and leaves
    the vision tower and the projector as they were; ``--freeze vision`` alone lets the
    projector train.  Fails if a frozen part moves or the freeze reaches too far."""
    import torch
    from transformers import AutoProcessor

    from hae_lab.accuracy import probe as P
    from hae_lab.accuracy.train import GRID_TOKENS, _batch, _build_model, frozen_parts, reinit_for_training
    from hae_lab.tiny_models import build_tiny_llava, llava_numbered_prompt

    base = tmp_path / "base"
    build_tiny_llava(base, seed=0, patch_size=28, added_tokens=GRID_TOKENS, numbered_images=True)
    proc = AutoProcessor.from_pretrained(base)
    enc = _batch(proc, [P.cell_item_k(i, 6, queries=2) for i in range(2)], "cpu", llava_numbered_prompt)
    for parts, still in (("vision,projector", ("vision_tower", "multi_modal_projector")), ("vision", ("vision_tower",))):
        model = _build_model(base, {"num_hidden_layers": 1})
        reinit_for_training(model, 0)
        names = frozen_parts(model, parts)
        assert names and all(n.split(".")[0] in parts.split(",") for n in names)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**enc).loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            if any(s in n for s in still):
                assert not moved, n
            elif n.endswith("q_proj.weight") or "multi_modal_projector" in n:
                assert moved, n


def test_copy_drill_items():
    """train.copy_item: a number of the asked length, given in the question and repeated in the
    answer, one image, and different numbers for different indices (seeded)."""
    from hae_lab.accuracy.train import copy_item

    seen = set()
    for i in range(20):
        it = copy_item(i, (0.1, 0.9), [4, 12])
        assert it.answer.isdigit() and 4 <= len(it.answer) <= 12
        assert it.question == f"The secret number is {it.answer}. Repeat the secret number." and len(it.grids) == 1
        seen.add(it.answer)
    assert len(seen) == 20 and copy_item(3, (0.1, 0.9), 7).answer == copy_item(3, (0.1, 0.9), 7).answer
    assert len(copy_item(3, (0.1, 0.9), 7).answer) == 7


def test_answer_token_accuracy_reads_the_answer_tokens():
    """probe.answer_token_accuracy on grid-llava-v3, which answers needle (1.00 held out): every
    answer token right, in the answer's order (image, cell, colour, space, 3 digits, </s>).
    Fails if the logits are read one position off (they then predict the wrong tokens)."""
    from pathlib import Path

    from hae_lab.accuracy import probe as P

    res = P.answer_token_accuracy(Path(__file__).resolve().parents[1] / "models" / "grid-llava-v3", n=8)
    assert len(res["accuracy_per_answer_token"]) == 8 and res["first_item_answer_tokens"][-1] == "</s>"
    assert res["first_item_answer_tokens"][0].startswith(" image")
    assert min(res["accuracy_per_answer_token"]) >= 0.85, res


def test_export_checkpoint_continues_a_run_elsewhere(tmp_path):
    """train.export_checkpoint: a resumable checkpoint written as a folder that --init-from
    loads - the same weights (the logits equal the trainer's own export at that step)."""
    import torch

    from hae_lab.accuracy import train as T

    torch.set_num_threads(1)
    kw = dict(steps=2, batch_size=2, lr=1e-3, seed=0, device="cpu", eval_every=0, eval_n=1, final_n=0,
              stages=[{"until": 2, "weights": {"cell": 1.0}, "fill": [0.1, 0.5]}], warmup=1, ckpt_every=1)
    done = T.train(tmp_path / "a", ckpt_dir=str(tmp_path / "ca"), **kw)
    log = T.export_checkpoint(tmp_path / "ca", tmp_path / "fork")
    assert log["exported_at_step"] == 2 and (tmp_path / "fork" / "tokenizer.json").is_file()
    assert (tmp_path / "fork" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert done["model_sha256"]
