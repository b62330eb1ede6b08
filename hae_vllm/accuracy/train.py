"""Train the small LLaVA-architecture VLM on the procedural tasks (seeded, reproducible).

    python -m hae_vllm.accuracy.train --out .cache/trained_vlm [--steps 3000] [--device cuda]

Starts from the tiny LLaVA architecture of ``hae_vllm.testing.tiny_models`` (CLIP 2x64 vision
tower, 256 visual tokens per 224-px image, Llama 4x128 text model), trains every parameter with
next-token loss on the answer tokens only, and writes a checkpoint vLLM and HuggingFace load
(same layout as the tiny models).  Held-out accuracy on single-cell questions is evaluated
with greedy decoding every ``--eval-every`` steps and recorded in ``train_log.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hae_vllm.accuracy.tasks import GENERATORS, generate, score
from hae_vllm.testing.tiny_models import _llava_key, _save_weights, build_tiny_llava, llava_prompt

# Cell questions are the measured task; ``describe`` supervises every cell of the grid in one
# item (dense grounding signal); ``needle`` adds several images and a text needle.
TASK_WEIGHTS = {"cell": 0.45, "describe": 0.25, "needle": 0.15, "count": 0.075, "exists": 0.075}


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position table [grid*grid, dim]: half the channels encode the row, half
    the column (the MAE/ViT fixed embedding; row-major patch order)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    idx = torch.arange(grid, dtype=torch.float32)
    rows = idx.repeat_interleave(grid)[:, None] * freqs
    cols = idx.repeat(grid)[:, None] * freqs
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


def init_positions_2d(model) -> None:
    """Start the vision tower's learned position embeddings from a 2-D sine-cosine table, so
    that a patch's row and column are linearly readable from the first step (the random
    initial table of the tiny model carries them only weakly).  Still trained afterwards."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    n, dim = emb.shape[0] - 1, emb.shape[1]  # [CLS] + patches
    grid = int(round(n ** 0.5))
    assert grid * grid == n and dim % 4 == 0, (n, dim)
    with torch.no_grad():
        emb[0].zero_()
        emb[1:].copy_(sincos_2d(grid, dim))


def _batch(processor, items, device):
    """Input ids with labels on the answer tokens only."""
    tok = processor.tokenizer
    prompts = [llava_prompt(it.question, len(it.grids)) for it in items]
    full = [p + " " + it.answer + tok.eos_token for p, it in zip(prompts, items)]
    images = [img for it in items for img in it.images()]
    enc = processor(text=full, images=images, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    for i, p in enumerate(prompts):
        n_prompt = len(processor(text=[p], images=items[i].images(), return_tensors="pt")["input_ids"][0])
        pad_left = int((enc["attention_mask"][i] == 0).sum()) if tok.padding_side == "left" else 0
        labels[i, : pad_left + n_prompt] = -100
    labels[enc["attention_mask"] == 0] = -100
    enc["labels"] = labels
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def evaluate(model, processor, task: str, n: int, device, max_new_tokens: int = 4) -> float:
    model.eval()
    total = 0.0
    for it in generate(task, "heldout", n):
        enc = processor(text=[llava_prompt(it.question, len(it.grids))], images=it.images(), return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        total += score(it.answer, text, it.scoring)
    model.train()
    return total / n


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, device: str, eval_every: int, eval_n: int,
          task_weights: dict[str, float] | None = None, pos_init: str = "sincos") -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    task_weights = task_weights or TASK_WEIGHTS
    random.seed(seed)
    torch.manual_seed(seed)
    base = Path(tempfile.mkdtemp(prefix="hae_vlm_base_"))
    build_tiny_llava(base, seed=seed)
    processor = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    if pos_init == "sincos":
        init_positions_2d(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pools = {t: generate(t, "train", 10**7) for t in task_weights}
    tasks, weights = zip(*task_weights.items())
    rng = random.Random(seed)
    log = {"config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device,
                      "task_weights": task_weights, "pos_init": pos_init,
                      "torch_threads": torch.get_num_threads()},
           "machine": _machine(device), "loss": [], "eval": []}
    t0 = time.time()
    for step in range(1, steps + 1):
        items = [next(pools[rng.choices(tasks, weights)[0]]) for _ in range(batch_size)]
        cur_lr = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss = model(**_batch(processor, items, device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            log["loss"].append((step, round(loss.item(), 5)))
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if eval_every and (step % eval_every == 0 or step == steps):
            acc = evaluate(model, processor, "cell", eval_n, device)
            log["eval"].append((step, acc))
            print(f"step {step} heldout cell accuracy {acc:.3f}", flush=True)
    log["train_seconds"] = round(time.time() - t0, 1)
    log["final_heldout"] = {t: evaluate(model, processor, t, 200 if t == "cell" else 50, device,
                                        max_new_tokens=128 if t == "describe" else 8)
                            for t in GENERATORS}
    print(f"final held-out accuracy (HF, greedy): {log['final_heldout']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    _save_weights(model.cpu().eval(), out, _llava_key)
    log["model_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    return log


def _machine(device: str) -> dict:
    import platform

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/grid-llava-v1")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--pos-init", choices=("sincos", "random"), default="sincos")
    args = ap.parse_args()
    train(Path(args.out), args.steps, args.batch_size, args.lr, args.seed, args.device, args.eval_every, args.eval_n,
          pos_init=args.pos_init)


if __name__ == "__main__":
    main()
