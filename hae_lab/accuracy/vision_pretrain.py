"""Dense pre-training of the scenes model's vision tower and projector (issue 31).

    python -m hae_lab.accuracy.vision_pretrain --out .cache/scenes_vision [--steps 1500]
        [--transfer-from models/grid-llava-v4] [--threads 1]

LLaVA starts from a CLIP encoder pre-trained on images; nothing here is pre-trained, and a
frozen random tower (runs ``s1`` and ``t1``) gave the text model patch features from which it
never learned where an object is or what colour it has (held-out attr, find and read stayed
near 0 for 1000+ steps).  This step trains the vision tower and the projector alone, on the
scenes' pixels, to make every visual token say what it shows: each of the 576 patches is
labelled from the scene's ink (``Scene.ink``) with

* ``object``: whether at least ``MIN_INK`` of its 196 pixels are an object's ink (patches with
  a little ink are not scored);
* ``colour`` and ``kind`` (shape, or which digit) of that object, on object patches only:
  a patch holding part of a digit is labelled with the whole digit, so the tower learns to read
  a glyph across the patches it spans;
* ``cell``: the layout cell the patch lies in (keeps the cell code of
  :func:`hae_lab.accuracy.train.init_positions_cells` readable);

each read by a linear head from the projector's output, the features the text model gets, or
(``--align``) through the text model's embeddings of the class words (:class:`WordHead`).
The labels are per patch, so what a token carries stays where its pixels are: evicting an
object's patches still loses the object (background tokens carry no object, unlike a tower
pooled per cell).  The heads are dropped afterwards; the checkpoint written to ``--out`` is the
whole VLM (text model re-initialised as :mod:`hae_lab.accuracy.train` does, or transferred
with ``--transfer-from``), for ``train --init-from <out> --freeze vision,projector``.
Uses both CLIP layers (``vision_feature_layer`` -1; LLaVA's -2 would leave one).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from hae_lab.accuracy import scenes
from hae_lab.accuracy.tasks import SHAPES, cell_name

MIN_INK = 10  # pixels of 196: a patch with fewer is not an object patch (nor scored as background)
GRID = scenes.PIXELS // scenes.PATCH  # 24 patches a side
COLOURS = tuple(scenes.COLOURS)
KINDS = tuple(SHAPES) + tuple(f"digit {d}" for d in scenes.DIGITS)
PRETRAIN_SEED = 424242  # scenes of the pre-training: seeds apart from every task split


def patch_labels(scene: scenes.Scene) -> dict[str, np.ndarray]:
    """Per-patch targets ``[576]`` (row-major), ``-100`` where not scored."""
    ink = scene.ink().reshape(GRID, scenes.PATCH, GRID, scenes.PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    names = scene.cells()
    n = len(names)
    counts = np.stack([(ink == k + 1).sum(1) for k in range(n)], axis=1) if n else np.zeros((GRID * GRID, 0), int)
    best = counts.argmax(1) if n else np.zeros(GRID * GRID, int)
    most = counts.max(1) if n else np.zeros(GRID * GRID, int)
    obj = np.where(most >= MIN_INK, 1, np.where(most > 0, -100, 0))
    colour = np.full(GRID * GRID, -100)
    kind = np.full(GRID * GRID, -100)
    for k, name in enumerate(names):
        ob = scene.objects[name]
        sel = (obj == 1) & (best == k)
        colour[sel] = COLOURS.index(ob.colour)
        kind[sel] = KINDS.index(f"digit {ob.digit}" if ob.shape == "digit" else ob.shape)
    per = GRID // scenes.LAYOUT
    idx = np.arange(GRID * GRID)
    row, col = (idx // GRID) // per, (idx % GRID) // per
    return {"object": obj, "colour": colour, "kind": kind, "row": row, "col": col, "cell": row * scenes.LAYOUT + col,
            "owner": np.where(obj == 1, best, -1)}


TARGETS = ("object", "colour", "kind", "cell")


class WordHead(torch.nn.Module):
    """Logits ``scale * x . E[w] + bias`` over class words ``w``, ``E`` the text model's input
    embedding of each word (fixed here): the projector learns to write a patch's colour, kind and
    cell as the words the text model reads and writes (LLaVA's first stage aligns the projector
    to the language model's embeddings likewise, through captions)."""

    def __init__(self, emb: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("emb", emb.detach().clone())
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.zeros(emb.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x @ self.emb.T + self.bias


def class_words(tokenizer) -> dict[str, list[int]]:
    """The token of each class's word: colours and shapes (whole-word tokens of the world), a
    digit's character (its last token in " 7"), cell names in row-major order."""
    one = lambda w: tokenizer.encode(w, add_special_tokens=False)[-1]  # noqa: E731
    return {"colour": [one(f" {c}") for c in COLOURS],
            "kind": [one(f" {k}") for k in SHAPES] + [one(f" {d}") for d in scenes.DIGITS],
            "cell": [one(f" {cell_name(r, c)}") for r in range(scenes.LAYOUT) for c in range(scenes.LAYOUT)]}


class Heads(torch.nn.Module):
    def __init__(self, dim: int, embeddings: torch.Tensor | None = None, words: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        self.object = torch.nn.Linear(dim, 2)
        sizes = {"colour": len(COLOURS), "kind": len(KINDS), "cell": scenes.LAYOUT ** 2}
        for k, n in sizes.items():
            setattr(self, k, WordHead(embeddings[words[k]]) if words else torch.nn.Linear(dim, n))


def visual_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the text model receives for each patch: ``[B, 576, text_hidden]``."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # drop CLS ("default" strategy)
    return model.model.multi_modal_projector(feats)


# Training scenes are busier than the tasks' (3-7 objects, 30% digits): more objects, and
# digits more often, per image, so a step sees ~4x the glyphs (reading them is what takes longest).
TRAIN_OBJECTS = (6, 12)
TRAIN_DIGIT_SHARE = 0.6


def batch(processor, rng: np.random.Generator, n: int, busy: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scs = [scenes.Scene.random(rng, TRAIN_OBJECTS, TRAIN_DIGIT_SHARE) if busy else scenes.Scene.random(rng)
           for _ in range(n)]
    pix = processor.image_processor([s.render() for s in scs], return_tensors="pt")["pixel_values"]
    labels = [patch_labels(s) for s in scs]
    return pix, {k: torch.as_tensor(np.stack([lb[k] for lb in labels])) for k in labels[0]}


def losses(heads: Heads, feats: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ce = torch.nn.functional.cross_entropy
    return {k: ce(getattr(heads, k)(feats).flatten(0, 1), y[k].flatten(), ignore_index=-100)
            for k in TARGETS}


@torch.no_grad()
def evaluate(model, heads: Heads, processor, n: int = 32) -> dict[str, float]:
    """Held-out scenes: per-patch accuracy of each head where scored, and per object the
    majority vote of its patches' colour and kind (what reading an object from its tokens needs)."""
    rng = np.random.default_rng(PRETRAIN_SEED + 1)
    pix, y = batch(processor, rng, n, busy=False)
    feats = visual_features(model, pix)
    out = {}
    for k in TARGETS:
        pred = getattr(heads, k)(feats).argmax(-1)
        m = y[k] != -100
        out[k] = round(float((pred[m] == y[k][m]).float().mean()), 4)
    hit = {"colour": [], "kind": [], "digit": []}
    preds = {k: getattr(heads, k)(feats).argmax(-1) for k in ("colour", "kind")}
    for b in range(n):
        for o in set(y["owner"][b].tolist()) - {-1}:
            sel = y["owner"][b] == o
            for k in ("colour", "kind"):
                hit[k].append(int(torch.mode(preds[k][b][sel]).values) == int(y[k][b][sel][0]))
            if int(y["kind"][b][sel][0]) >= len(SHAPES):  # a digit: is it read?
                hit["digit"].append(hit["kind"][-1])
    out.update({f"object_{k}": round(float(np.mean(v)), 4) for k, v in hit.items() if v})
    return out


def pretrain(out: Path, steps: int, batch_size: int, lr: float, seed: int, transfer_from: str | None,
             eval_every: int, continue_from: Path | None = None, vision_config: dict | None = None,
             align: bool = False) -> dict:
    """Build (or, with ``continue_from``, load a previous ``out`` of this script, heads included,
    for a further schedule of ``steps``) and pre-train; writes the checkpoint to ``out``."""
    import shutil

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hae_lab.accuracy.train import init_positions_cells, reinit_for_training, transfer_text_weights
    from hae_lab.tiny_models import _llava_key, _save_weights, build_tiny_llava

    random.seed(seed)
    torch.manual_seed(seed)
    previous, transferred = None, None
    if continue_from is not None:
        continue_from = Path(continue_from)
        if continue_from.resolve() != out.resolve():
            shutil.copytree(continue_from, out, dirs_exist_ok=True)
        previous = json.loads((out / "vision_pretrain_log.json").read_text())
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(out)
    else:
        build_tiny_llava(out, seed=seed, patch_size=scenes.PATCH, image_size=scenes.PIXELS,
                         added_tokens=scenes.added_tokens(), numbered_images=True, max_positions=8192)
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["vision_feature_layer"] = -1
        cfg["vision_config"].update(vision_config or {})
        cfg_path.write_text(json.dumps(cfg, indent=2))
        from transformers import LlavaConfig

        model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(out)).to(torch.float32)
        processor = AutoProcessor.from_pretrained(out)
        reinit_for_training(model, seed)
        init_positions_cells(model, cells=scenes.LAYOUT)
        if transfer_from:
            transferred = transfer_text_weights(model, processor.tokenizer, Path(transfer_from))
    words = class_words(processor.tokenizer) if align else None
    heads = Heads(model.config.text_config.hidden_size, model.get_input_embeddings().weight, words)
    if previous is not None:
        heads.load_state_dict(torch.load(out / "vision_heads.pt"))
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    # A continuation draws other scenes than the run it continues (seeded by how many came before).
    done = sum(p["config"]["steps"] for p in [previous, *(previous or {}).get("previous", [])] if p) if previous else 0
    rng = np.random.default_rng([PRETRAIN_SEED + seed, done])
    log = {"config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "min_ink": MIN_INK,
                      "train_objects": TRAIN_OBJECTS, "train_digit_share": TRAIN_DIGIT_SHARE,
                      "align_to_embeddings": align,
                      "transfer_from": transfer_from, "vision_feature_layer": -1, "continue_from": str(continue_from or ""),
                      "vision_config": {k: model.config.vision_config.to_dict()[k] for k in
                                        ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
                      "torch_threads": torch.get_num_threads()},
           "transferred": transferred, "loss": [], "eval": []}
    if previous is not None:  # the earlier schedules, oldest first
        log["previous"] = [*previous.pop("previous", []), previous]
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        cur = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur
        pix, y = batch(processor, rng, batch_size)
        parts = losses(heads, visual_features(model, pix), y)
        loss = parts["object"] + parts["colour"] + parts["kind"] + 0.5 * parts["cell"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log["loss"].append((step, {k: round(v.item(), 4) for k, v in parts.items()}))
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} " + " ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
                  + f" ({time.time() - t0:.0f}s)", flush=True)
        if eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            acc = evaluate(model, heads, processor)
            model.train()
            log["eval"].append((step, acc))
            print(f"step {step} heldout {acc}", flush=True)
    log["wall_s"] = round(time.time() - t0, 1)
    _save_weights(model.eval(), out, _llava_key)
    torch.save(heads.state_dict(), out / "vision_heads.pt")
    (out / "vision_pretrain_log.json").write_text(json.dumps(log, indent=1))
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transfer-from", default=None)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--continue-from", default=None,
                    help="a previous --out of this script: its weights and heads go on with a new schedule of --steps")
    ap.add_argument("--vision-config", default=None,
                    help='vision tower sizes, JSON, e.g. \'{"hidden_size": 128, "intermediate_size": 512}\' '
                         "(default: the tiny LLaVA's 2 x 64)")
    ap.add_argument("--align", action="store_true",
                    help="read colour, kind and cell through the text model's embeddings of their words (WordHead)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain(out, args.steps, args.batch_size, args.lr, args.seed, args.transfer_from, args.eval_every,
             args.continue_from, json.loads(args.vision_config) if args.vision_config else None, args.align)


if __name__ == "__main__":
    main()
