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
* ``row`` and ``col`` of the layout cell the patch lies in (keeps the cell code of
  :func:`hae_lab.accuracy.train.init_positions_cells` readable);

each read by a linear head from the projector's output, the features the text model gets.
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
from hae_lab.accuracy.tasks import SHAPES

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
    return {"object": obj, "colour": colour, "kind": kind,
            "row": (idx // GRID) // per, "col": (idx % GRID) // per,
            "owner": np.where(obj == 1, best, -1)}


class Heads(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.object = torch.nn.Linear(dim, 2)
        self.colour = torch.nn.Linear(dim, len(COLOURS))
        self.kind = torch.nn.Linear(dim, len(KINDS))
        self.row = torch.nn.Linear(dim, scenes.LAYOUT)
        self.col = torch.nn.Linear(dim, scenes.LAYOUT)


def visual_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the text model receives for each patch: ``[B, 576, text_hidden]``."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # drop CLS ("default" strategy)
    return model.model.multi_modal_projector(feats)


def batch(processor, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scs = [scenes.Scene.random(rng) for _ in range(n)]
    pix = processor.image_processor([s.render() for s in scs], return_tensors="pt")["pixel_values"]
    labels = [patch_labels(s) for s in scs]
    return pix, {k: torch.as_tensor(np.stack([lb[k] for lb in labels])) for k in labels[0]}


def losses(heads: Heads, feats: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ce = torch.nn.functional.cross_entropy
    return {k: ce(getattr(heads, k)(feats).flatten(0, 1), y[k].flatten(), ignore_index=-100)
            for k in ("object", "colour", "kind", "row", "col")}


@torch.no_grad()
def evaluate(model, heads: Heads, processor, n: int = 32) -> dict[str, float]:
    """Held-out scenes: per-patch accuracy of each head where scored, and per object the
    majority vote of its patches' colour and kind (what reading an object from its tokens needs)."""
    rng = np.random.default_rng(PRETRAIN_SEED + 1)
    pix, y = batch(processor, rng, n)
    feats = visual_features(model, pix)
    out = {}
    for k in ("object", "colour", "kind", "row", "col"):
        pred = getattr(heads, k)(feats).argmax(-1)
        m = y[k] != -100
        out[k] = round(float((pred[m] == y[k][m]).float().mean()), 4)
    hit = {"colour": [], "kind": []}
    for k in hit:
        pred = getattr(heads, k)(feats).argmax(-1)
        for b in range(n):
            for o in set(y["owner"][b].tolist()) - {-1}:
                sel = y["owner"][b] == o
                hit[k].append(int(torch.mode(pred[b][sel]).values) == int(y[k][b][sel][0]))
    out.update({f"object_{k}": round(float(np.mean(v)), 4) for k, v in hit.items()})
    return out


def pretrain(out: Path, steps: int, batch_size: int, lr: float, seed: int, transfer_from: str | None,
             eval_every: int) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hae_lab.accuracy.train import init_positions_cells, reinit_for_training, transfer_text_weights
    from hae_lab.tiny_models import _llava_key, _save_weights, build_tiny_llava

    random.seed(seed)
    torch.manual_seed(seed)
    build_tiny_llava(out, seed=seed, patch_size=scenes.PATCH, image_size=scenes.PIXELS,
                     added_tokens=scenes.added_tokens(), numbered_images=True, max_positions=8192)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_feature_layer"] = -1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    reinit_for_training(model, seed)
    init_positions_cells(model, cells=scenes.LAYOUT)
    transferred = transfer_text_weights(model, processor.tokenizer, Path(transfer_from)) if transfer_from else None
    heads = Heads(model.config.text_config.hidden_size)
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(PRETRAIN_SEED + seed)
    log = {"config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "min_ink": MIN_INK,
                      "transfer_from": transfer_from, "vision_feature_layer": -1,
                      "torch_threads": torch.get_num_threads()},
           "transferred": transferred, "loss": [], "eval": []}
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        cur = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur
        pix, y = batch(processor, rng, batch_size)
        parts = losses(heads, visual_features(model, pix), y)
        loss = parts["object"] + parts["colour"] + parts["kind"] + 0.5 * (parts["row"] + parts["col"])
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain(out, args.steps, args.batch_size, args.lr, args.seed, args.transfer_from, args.eval_every)


if __name__ == "__main__":
    main()
