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

# Single-cell questions are the measured tasks: ``single`` (one shape in an empty grid) is what
# this CPU can teach the model; ``cell`` (a cell named by row and column among distractors)
# and the others stayed at chance in every run we could afford (models/grid-llava-v1/README.md).
TASK_WEIGHTS = {"single": 1.0}
# Training grids have 10-70% of their cells filled (held-out: 70%): sparse grids have fewer
# distractors, so where a cell is can be learned before dense grids demand it exactly.
TRAIN_FILL = (0.1, 0.7)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position table [grid*grid, dim]: half the channels encode the row, half
    the column (the MAE/ViT fixed embedding; row-major patch order)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    idx = torch.arange(grid, dtype=torch.float32)
    rows = idx.repeat_interleave(grid)[:, None] * freqs
    cols = idx.repeat(grid)[:, None] * freqs
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


def reinit_for_training(model, seed: int, std: float = 0.02) -> None:
    """Standard transformer initialisation (GPT-2/CLIP style: N(0, 0.02) weights, zero biases,
    unit norms).  The tiny test models use large random weights on purpose (peaked attention
    for the oracle tests); trained from there, the residual stream is already ~10x its input by
    the last layer and the model fails to learn where things are in the image."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


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
def evaluate(model, processor, task: str, n: int, device, max_new_tokens: int = 16) -> float:
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
          task_weights: dict[str, float] | None = None, pos_init: str = "sincos",
          init_from: str | None = None, eval_tasks: tuple[str, ...] = ("single", "cell")) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    task_weights = task_weights or TASK_WEIGHTS
    random.seed(seed)
    torch.manual_seed(seed)
    if init_from:  # continue: same tokenizer, processor and config as the checkpoint
        base, tmp_base = Path(init_from), None
    else:
        base = tmp_base = Path(tempfile.mkdtemp(prefix="hae_vlm_base_"))
        build_tiny_llava(base, seed=seed)
    processor = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    if not init_from:
        reinit_for_training(model, seed)
        if pos_init == "sincos":
            init_positions_2d(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    pools = {t: generate(t, "train", 10**7, fill=TRAIN_FILL) for t in task_weights}
    tasks, weights = zip(*task_weights.items())
    rng = random.Random(seed)
    log = {"config": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device,
                      "task_weights": task_weights, "train_fill": TRAIN_FILL, "pos_init": pos_init, "init_from": init_from,
                      "torch_threads": torch.get_num_threads()},
           "machine": _machine(device), "loss": [], "eval": []}
    if init_from and (base / "train_log.json").is_file():
        log["previous"] = json.loads((base / "train_log.json").read_text())
    t0 = time.time()
    for step in range(1, steps + 1):
        # One task per batch: prompts of a batch then have the same number of images, so
        # little compute goes to padding (a needle item is three times a cell item's length).
        task = rng.choices(tasks, weights)[0]
        items = [next(pools[task]) for _ in range(batch_size)]
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
            accs = {t: evaluate(model, processor, t, eval_n, device) for t in eval_tasks}
            log["eval"].append((step, accs))
            print(f"step {step} heldout accuracy {accs}", flush=True)
    log["train_seconds"] = round(time.time() - t0, 1)
    log["final_heldout"] = {t: evaluate(model, processor, t, 200 if t in ("single", "cell", "shape") else 50, device,
                                        max_new_tokens=128 if t == "describe" else 16)
                            for t in GENERATORS}
    print(f"final held-out accuracy (HF, greedy): {log['final_heldout']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "train_log.json", "README.md") and (
                base.resolve() != out.resolve()):
            shutil.copy(f, out / f.name)
    _save_weights(model.cpu().eval(), out, _llava_key)
    log["model_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    if tmp_base is not None:
        shutil.rmtree(tmp_base, ignore_errors=True)
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
    ap.add_argument("--init-from", default=None, help="continue from a checkpoint written by this script")
    ap.add_argument("--eval-tasks", default="single,cell")
    ap.add_argument("--task-weights", default=None, help='JSON, e.g. \'{"cell": 0.7, "describe": 0.3}\'')
    args = ap.parse_args()
    train(Path(args.out), args.steps, args.batch_size, args.lr, args.seed, args.device, args.eval_every, args.eval_n,
          task_weights=json.loads(args.task_weights) if args.task_weights else None, pos_init=args.pos_init,
          init_from=args.init_from, eval_tasks=tuple(args.eval_tasks.split(",")))


if __name__ == "__main__":
    main()
