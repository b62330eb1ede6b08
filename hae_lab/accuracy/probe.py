"""Probe: is the cell lookup of the grid tasks learnable without hand-set attention? (issue 21)

    python -m hae_lab.accuracy.probe --out .cache/v4runs/p1 --steps 600 --curriculum '[[200,1],[400,2],[600,6]]'

Trains the grid-llava-v3 architecture (64 visual tokens per image, one token per cell name,
numbered images) on ``cell`` questions only, from the standard initialisation (no wired or
frozen weights), with a curriculum on the exact number of filled cells per grid: with one
filled cell the colour can be read with attention spread over the whole image, so the value
and read-out paths learn first; with two or more, only attention on the asked cell answers.
Every ``--eval-every`` steps it records, on held-out items (70% full, as the benchmark's):
teacher-forced colour accuracy, and for each text layer the largest share of one head's
attention that the answer's cell token puts on the asked cell's four patches (uniform over
the prompt would be ~0.05).  The log (config, loss curve, evaluations) goes to ``--out``/log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hae_lab.accuracy.tasks import COLOURS, SHAPES, Grid, Item, cell_name, generate
from hae_lab.accuracy.train import (GRID_TOKENS, _batch, _build_model, frozen_parts, init_cell_alignment,
                                     init_positions_2d, init_positions_cells, reinit_for_training)
from hae_lab.tiny_models import build_tiny_llava, llava_numbered_prompt

PROBE_SEED = 50_000_000  # train items of the probe: a seed range no task split uses


FILLER = "Look again. "


def cell_item_k(index: int, k: int, size: int = 4, same: bool = False, pad: int = 0, queries: int = 1) -> Item:
    """A ``cell`` question on a grid with exactly ``k`` filled cells (the asked one among them);
    ``same``: every shape has the asked one's colour (the image's mean colour is the answer).
    ``queries`` > 1: that many filled cells asked in one question, in random order, answered
    ``r2c3 red, r1c4 blue, ...`` - each colour is predicted at a cell token whose distance from
    the image differs from item to item, so no lookup tied to one query position answers."""
    rng = np.random.default_rng(PROBE_SEED + index * 7919 + k)
    cells = [[None] * size for _ in range(size)]
    spots = rng.permutation(size * size)[:k]
    for s in spots:
        cells[s // size][s % size] = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
    g = Grid(size, cells)
    r, c = divmod(int(spots[0]), size)
    if same:
        for s in spots:
            cells[s // size][s % size] = (cells[r][c][0], cells[s // size][s % size][1])
    # ``pad``: up to that many filler sentences before the question, so the asked cell token sits
    # at varying distances from the image (as describe's cell tokens do): a lookup learned at one
    # query position can lean on rotary phases that hold only there.
    filler = FILLER * int(rng.integers(0, pad + 1)) if pad else ""
    q = min(queries, k)
    if q > 1:
        asked = [divmod(int(s), size) for s in rng.permutation(spots)[:q]]
        names = [cell_name(a, b) for a, b in asked]
        return Item("cells", f"{filler}What colors are the shapes in {', '.join(names[:-1])} and {names[-1]}?",
                    ", ".join(f"{n} {cells[a][b][0]}" for n, (a, b) in zip(names, asked)), [g])
    return Item("cell", f"{filler}What color is the shape in {cell_name(r, c)}?", f"{cell_name(r, c)} {cells[r][c][0]}",
                [g])


def mask_repeated_cells(labels: torch.Tensor, items: list[Item], cell_ids: torch.Tensor) -> None:
    """In items asking several cells, no loss on the answer's cell names after the first: they
    are copies of the question's list in its order (an induction step this probe does not
    study).  The colours, each predicted at the cell token before it, keep their loss."""
    for i, it in enumerate(items):
        if it.task == "cells":
            row = labels[i]
            cell_pos = torch.isin(row, cell_ids).nonzero().flatten()
            row[cell_pos[1:]] = -100


def _target(item: Item) -> tuple[int, int]:
    name = item.answer.split()[0]
    return int(name[1]) - 1, int(name[3]) - 1


@torch.no_grad()
def probe_eval(model, processor, items, grid: int = 8, cells: int = 4) -> dict:
    """Teacher-forced colour accuracy and, per layer, the best head's attention share from the
    answer's cell token onto the asked cell's patches."""
    model.eval()
    enc = _batch(processor, items, "cpu", llava_numbered_prompt)
    out = model(**{k: v for k, v in enc.items() if k != "labels"}, output_attentions=True)
    lengths = enc["attention_mask"].sum(1).tolist()
    img_id = model.config.image_token_index
    per = grid // cells
    correct, shares = 0, None
    for i, it in enumerate(items):
        end = int(lengths[i])
        qpos = end - 3  # answer = [cell, colour, </s>]: the cell token predicts the colour
        correct += int(out.logits[i, qpos].argmax() == enc["input_ids"][i, qpos + 1])
        vis = (enc["input_ids"][i] == img_id).nonzero().flatten()
        r, c = _target(it)
        patches = [(r * per + dr) * grid + c * per + dc for dr in range(per) for dc in range(per)]
        keys = vis[patches]
        s = torch.stack([a[i, :, qpos, keys].sum(-1) for a in out.attentions])  # [layers, heads]
        shares = s if shares is None else shares + s
    model.train()
    shares = shares / len(items)
    return {"acc": round(correct / len(items), 4),
            "lookup": [round(float(x), 3) for x in shares.max(1).values],
            "lookup_head": [int(x) for x in shares.max(1).indices]}


@torch.no_grad()
def cell_readout(model, processor, images: int = 64, filled: int = 11) -> dict:
    """How well a linear read-out (least squares; the patches of the first 3/4 of the images
    fitted, the rest held out) tells a patch's grid cell from what carries it into the text
    model: the vision tower's hidden states (embeddings, then after each layer) and the
    projector's output, which is what the text model's keys are computed from.  1.0: the cell is
    there; 1/16: it is not."""
    items = [cell_item_k(60_000_000 + i, filled) for i in range(images)]
    enc = _batch(processor, items, "cpu", llava_numbered_prompt)
    tower = model.model.vision_tower
    out = tower(enc["pixel_values"], output_hidden_states=True)
    layer = model.config.vision_feature_layer
    proj = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])

    def acc(feats):
        f = feats.reshape(-1, feats.shape[-1]).float()
        n = f.shape[0]
        pos = torch.arange(n) % 64
        cell = ((pos // 8) // 2) * 4 + (pos % 8) // 2
        x = torch.cat([f, torch.ones(n, 1)], 1)
        fit = torch.arange(n) < n * 3 // 4
        w = torch.linalg.lstsq(x[fit], torch.nn.functional.one_hot(cell, 16).float()[fit]).solution
        return round(float(((x[~fit] @ w).argmax(1) == cell[~fit]).float().mean()), 4)

    return {"vision_hidden_states": [acc(h[:, 1:]) for h in out.hidden_states], "vision_feature_layer": layer,
            "projector_output": acc(proj), "images": images}


def code_bilinear(model, processor, batches: int = 8, batch_size: int = 32, filled: int = 11, pad: int = 12) -> dict:
    """For a model started with ``--align-cells`` (cell code of the patches in text channels
    0-7, of the cell tokens in 8-15): per first-layer head, the bilinear form between the two
    codes in the slow rotary dimensions (frequency index >= 10 of 16: phases that move < 0.5
    rad over 150 tokens, so a match there holds at any query distance), and how much of it is
    *which cell* - its projection on the centred matching pattern (row with row, column with
    column) - against its norm.  A form with equal rows says "a cell token looks at these
    patches" whatever the cell.  Also the gradient of the loss along that pattern over
    ``batches`` independent batches (mean, std): what the next steps would add."""
    attn = model.model.language_model.layers[0].self_attn
    hd, nq, nkv = attn.head_dim, model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    half = hd // 2
    slow = [i for i in range(10, half)] + [i + half for i in range(10, half)]
    centred = torch.eye(4) - 0.25
    pattern = torch.zeros(8, 8)
    pattern[:4, :4], pattern[4:, 4:] = centred, centred
    pattern /= pattern.norm()
    wq, wk = attn.q_proj.weight, attn.k_proj.weight
    grads = []
    for b in range(batches):
        items = [cell_item_k(30_000_000 + b * batch_size + i, filled, pad=pad) for i in range(batch_size)]
        model.zero_grad()
        model(**_batch(processor, items, "cpu", llava_numbered_prompt)).loss.backward()
        grads.append((wq.grad.clone(), wk.grad.clone()))
    model.zero_grad()
    out = []
    with torch.no_grad():
        for h in range(nq):
            rq = [h * hd + d for d in slow]
            rk = [(h // (nq // nkv)) * hd + d for d in slow]
            q, k = wq[rq][:, 8:16], wk[rk][:, 0:8]
            m = q.T @ k
            along = torch.tensor([-float(((gq[rq][:, 8:16].T @ k + q.T @ gk[rk][:, 0:8]) * pattern).sum())
                                  for gq, gk in grads])
            out.append({"head": h, "norm": round(float(m.norm()), 4), "matching": round(float((m * pattern).sum()), 4),
                        "row_spread": round(float((m - m.mean(0)).norm() / m.norm()), 4),
                        "descent_along_matching_mean": float(along.mean()), "descent_along_matching_std": float(along.std()) if len(along) > 1 else 0.0})
    return {"heads": out, "batches": batches, "batch_size": batch_size, "filled": filled, "pad": pad}


@torch.no_grad()
def answer_token_accuracy(model_dir: Path, task: str = "needle", n: int = 48) -> dict:
    """Teacher-forced accuracy of each answer token of ``task``'s held-out items (all answers of
    the task must have the same number of tokens, as ``needle``'s: image, cell, colour, a space,
    three digits, ``</s>``): which step of the answer a model has not learned."""
    from transformers import AutoProcessor

    from hae_lab.accuracy.train import prompt_format

    model = _build_model(Path(model_dir), None).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    items = list(generate(task, "heldout", n))
    enc = _batch(processor, items, "cpu", prompt_format(Path(model_dir)))
    labels = enc.pop("labels")
    logits = model(**enc).logits
    rows = []
    for i in range(len(items)):
        pos = (labels[i] != -100).nonzero().flatten()
        rows.append((logits[i, pos - 1].argmax(-1) == labels[i, pos]).float())
    assert len({len(r) for r in rows}) == 1, "answers of different lengths"
    tokens = [processor.tokenizer.convert_ids_to_tokens(int(t)) for t in labels[0][labels[0] != -100]]
    return {"model": str(model_dir), "task": task, "n": n, "first_item_answer_tokens": tokens,
            "accuracy_per_answer_token": [round(float(x), 4) for x in torch.stack(rows).mean(0)]}


def export(state_path: Path, out: Path, seed: int = 0, layers: int = 4, grow_to: int | None = None,
           text_overrides: dict | None = None) -> Path:
    """Write the probe's weights as a checkpoint ``train.py --init-from`` (and HF/vLLM) loads:
    the same tokenizer, processor and config as the probe's model (rebuilt from ``seed``).

    ``grow_to``: a deeper text model whose first ``layers`` layers are the probe's; the new
    layers start with the standard initialisation and zero output projections (attention
    ``o_proj``, MLP ``down_proj``), so they add nothing to the residual stream at first and the
    grown model computes what the probe's did (progressive stacking)."""
    from hae_lab.tiny_models import _llava_key, _save_weights

    out.mkdir(parents=True, exist_ok=True)
    build_tiny_llava(out, seed=seed, patch_size=28, added_tokens=GRID_TOKENS, numbered_images=True)
    model = _build_model(out, {**(text_overrides or {}), "num_hidden_layers": grow_to or layers})
    reinit_for_training(model, seed)
    missing, unexpected = model.load_state_dict(torch.load(state_path, weights_only=True), strict=not grow_to)
    assert not unexpected, unexpected
    prefix = "model.language_model.layers."
    assert all(k.startswith(prefix) and int(k[len(prefix):].split(".")[0]) >= layers for k in missing), missing
    with torch.no_grad():
        for layer in model.model.language_model.layers[layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    _save_weights(model.eval(), out, _llava_key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--curriculum", default="[[200,1],[400,2],[600,6]]",
                    help="JSON [[until_step, filled_cells or [lo, hi], same_colour (optional, 0/1), "
                         "filler sentences before the question, up to (optional), "
                         "cells asked per question, n or [lo, hi] (optional)], ...]")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="constant")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pos-init", choices=("cells", "sincos", "random"), default="cells")
    ap.add_argument("--text-config", default=None, help="other text model sizes, JSON")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--align-cells", type=float, default=0.0,
                    help="with --pos-init cells: start the cell code in one basis from the vision position table "
                         "to the cell tokens' embeddings (train.init_cell_alignment, no wired head), this gain")
    ap.add_argument("--center-code", action="store_true",
                    help="with --align-cells: the cell tokens' code minus its mean (zero sum over the 8 channels)")
    ap.add_argument("--init-state", default=None, help="start from a probe's model.pt (continue a probe)")
    ap.add_argument("--export-only", action="store_true",
                    help="write --out/model.pt as a checkpoint folder --out/hf (for train.py --init-from) and exit")
    ap.add_argument("--freeze", default=None, help="comma list of parts kept at their initial weights: vision, projector")
    ap.add_argument("--answer-tokens", default=None, metavar="MODEL_DIR",
                    help="teacher-forced accuracy of each needle answer token of MODEL_DIR, written to --out (a file)")
    ap.add_argument("--diagnose", action="store_true",
                    help="after a run: how well the cell can be read from what reaches the text model, at "
                         "initialisation and now (cell_readout); for an --align-cells run also the first layer's "
                         "code-to-code attention form (code_bilinear); written to --out/diagnose.json")
    ap.add_argument("--grow-to", type=int, default=None,
                    help="with --export-only: that many text layers, the new ones adding nothing at first "
                         "(written to --out/hf<N>)")
    ap.add_argument("--mask-multi-cells", action="store_true",
                    help="in items asking several cells, no loss on the answer's second and later cell names")
    ap.add_argument("--colour-only-until", type=int, default=0,
                    help="loss on the colour token alone up to this step (the cell copy and </s> unlabelled)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.center_code and not args.align_cells:
        ap.error("--center-code centres the code --align-cells writes into the cell tokens: give --align-cells too")
    if args.answer_tokens:
        res = answer_token_accuracy(Path(args.answer_tokens))
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
        return
    out = Path(args.out)
    if args.diagnose:
        base = out / "hf"
        from transformers import AutoProcessor

        model = _build_model(base, None)
        processor = AutoProcessor.from_pretrained(base)
        cfg = json.loads((out / "log.json").read_text())["config"]
        init = _build_model(base, None)  # the run's initialisation, rebuilt as main() does
        reinit_for_training(init, cfg["seed"])
        if cfg["pos_init"] == "cells":
            init_positions_cells(init)
        if cfg.get("align_cells"):
            init_cell_alignment(init, processor.tokenizer, gain=cfg["align_cells"], wire=0.0)
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        model.set_attn_implementation("eager")
        res = {"run": str(out), "started_from": cfg.get("init_state") or "its initialisation",
               "cell_readout_at_init": cell_readout(init.eval(), processor),
               "cell_readout": cell_readout(model.eval(), processor)}
        if cfg.get("align_cells"):
            res.update(code_bilinear(model.train(), processor))
        (out / "diagnose.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    if args.export_only:
        print(export(out / "model.pt", out / (f"hf{args.grow_to}" if args.grow_to else "hf"), args.seed, args.layers,
                     args.grow_to, json.loads(args.text_config) if args.text_config else None))
        return
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="hae_probe_"))
    build_tiny_llava(base, seed=args.seed, patch_size=28, added_tokens=GRID_TOKENS, numbered_images=True)
    overrides = {"num_hidden_layers": args.layers, **(json.loads(args.text_config) if args.text_config else {})}
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = _build_model(base, overrides)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    reinit_for_training(model, args.seed)
    if args.pos_init == "cells":
        init_positions_cells(model)
    elif args.pos_init == "sincos":
        init_positions_2d(model)
    if args.align_cells:
        init_cell_alignment(model, processor.tokenizer, gain=args.align_cells, wire=0.0)
    if args.center_code:
        # each cell token's code minus its mean over its 8 channels: every code then has the
        # same projection on the all-ones direction (zero), so no part of the code says only
        # "a cell token" and the first thing attention learns from it cannot be "look at any
        # patch" - what it can learn from the code is which cell
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            for r in range(4):
                for c in range(4):
                    tid = processor.tokenizer.convert_tokens_to_ids(f" {cell_name(r, c)}")
                    emb[tid, 8:16] -= emb[tid, 8:16].mean()
    if args.init_state:
        model.load_state_dict(torch.load(args.init_state, weights_only=True))
    model.set_attn_implementation("eager")
    model.train()
    frozen = frozen_parts(model, args.freeze)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    cur = json.loads(args.curriculum)
    cell_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(f" {cell_name(r, c)}")
                             for r in range(4) for c in range(4)])
    held = list(generate("cell", "heldout", args.eval_n, fill=0.7))
    held2 = [cell_item_k(10_000_000 + i, 2) for i in range(args.eval_n)]
    held_pad = [cell_item_k(20_000_000 + i, 11, pad=12) for i in range(args.eval_n)]
    log = {"config": vars(args), "frozen_tensors": len(frozen), "loss": [], "eval": []}
    rng = random.Random(args.seed)
    t0 = time.time()
    idx = 0
    for step in range(1, args.steps + 1):
        stage = next((c for c in cur if step <= c[0]), cur[-1])
        k, same = stage[1], bool(stage[2]) if len(stage) > 2 else False
        pad = stage[3] if len(stage) > 3 else 0
        nq = stage[4] if len(stage) > 4 else 1
        items = []
        for _ in range(args.batch_size):
            kk = rng.randint(k[0], k[1]) if isinstance(k, list) else k
            qq = rng.randint(nq[0], nq[1]) if isinstance(nq, list) else nq
            items.append(cell_item_k(idx, kk, same=same, pad=pad, queries=qq))
            idx += 1
        lr = args.lr * min(1.0, step / args.warmup)
        if args.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        enc = _batch(processor, items, "cpu", llava_numbered_prompt)
        if args.mask_multi_cells:
            mask_repeated_cells(enc["labels"], items, cell_ids)
        if step <= args.colour_only_until:
            end = enc["attention_mask"].sum(1)
            rows = torch.arange(len(items))
            enc["labels"][rows, end - 3] = -100
            enc["labels"][rows, end - 1] = -100
        loss = model(**enc).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["loss"].append((step, k, round(loss.item(), 4)))
        if step % args.eval_every == 0 or step == args.steps:
            ev = {"step": step, "filled": k, "wall": round(time.time() - t0, 1),
                  "heldout70": probe_eval(model, processor, held), "two_cells": probe_eval(model, processor, held2),
                  "padded11": probe_eval(model, processor, held_pad)}
            log["eval"].append(ev)
            print(json.dumps(ev), flush=True)
            (out / "log.json").write_text(json.dumps(log))
            torch.save(model.state_dict(), out / "model.pt")  # a stopped run continues with --init-state
        elif step % 10 == 0:
            print(f"step {step} k={k} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    (out / "log.json").write_text(json.dumps(log))
    torch.save(model.state_dict(), out / "model.pt")
    export(out / "model.pt", out / "hf", args.seed, args.layers, text_overrides=overrides)


if __name__ == "__main__":
    main()
