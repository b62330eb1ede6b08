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

from hae_vllm.accuracy.tasks import GENERATORS, generate, make_item, score
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


def _answer_ids(tok, answer: str) -> list[int]:
    """Token ids of `` <answer></s>`` as they appear after the prompt (byte-level BPE never
    merges across the space that starts the answer, so they equal the tail of the whole)."""
    return tok(" " + answer + tok.eos_token, add_special_tokens=False)["input_ids"]


def init_positions_cells(model, cells: int = 4, amp: float = 2.0) -> None:
    """The 2-D sine-cosine table, with its first ``2 * cells`` channels replaced by a one-hot
    code of the grid cell a patch lies in (row, then column; ``amp`` on, 0 off).  Questions
    name cells, not patches: with the cell readable linearly, attending to "row 2 column 3"
    is a match on 8 features instead of a bucketing of fine positions the model must learn
    first.  Still an initialisation: the table is trained afterwards."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    n, dim = emb.shape[0] - 1, emb.shape[1]
    grid = int(round(n ** 0.5))
    assert grid * grid == n and grid % cells == 0 and dim % 4 == 0 and dim >= 4 * cells, (n, dim, cells)
    table = sincos_2d(grid, dim)
    idx = torch.arange(n)
    per = grid // cells
    table[:, : 2 * cells] = 0.0
    table[idx, (idx // grid) // per] = amp
    table[idx, cells + (idx % grid) // per] = amp
    with torch.no_grad():
        emb[0].zero_()
        emb[1:].copy_(table)


def _batch(processor, items, device):
    """Input ids with labels on the answer tokens only (right padding)."""
    tok = processor.tokenizer
    assert tok.padding_side == "right", tok.padding_side
    prompts = [llava_prompt(it.question, len(it.grids)) for it in items]
    full = [p + " " + it.answer + tok.eos_token for p, it in zip(prompts, items)]
    images = [img for it in items for img in it.images()]
    enc = processor(text=full, images=images, return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    lengths = enc["attention_mask"].sum(1).tolist()
    for i, it in enumerate(items):
        ans = _answer_ids(tok, it.answer)
        end = int(lengths[i])
        assert enc["input_ids"][i, end - len(ans):end].tolist() == ans, (it.answer, "answer tokens differ in context")
        labels[i, end - len(ans):end] = enc["input_ids"][i, end - len(ans):end]
    enc["labels"] = labels
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def evaluate(model, processor, task: str, n: int, device, max_new_tokens: int | None = None,
             fill: float = 0.7) -> float:
    """Held-out accuracy with HF greedy decoding (``max_new_tokens``: the answer's length + 4)."""
    model.eval()
    total = 0.0
    tok = processor.tokenizer
    for it in generate(task, "heldout", n, fill=fill):
        enc = processor(text=[llava_prompt(it.question, len(it.grids))], images=it.images(), return_tensors="pt").to(device)
        mt = max_new_tokens or len(_answer_ids(tok, it.answer)) + 4
        out = model.generate(**enc, max_new_tokens=mt, do_sample=False)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        total += score(it.answer, text, it.scoring)
    model.train()
    return total / n


def _stages(stages, task_weights, steps) -> list[dict]:
    """Curriculum: ``[{"until": step, "weights": {task: w}, "fill": [lo, hi]}, ...]``; the last
    stage runs to the end.  Without one, a single stage of ``task_weights`` on ``TRAIN_FILL``."""
    if not stages:
        return [{"until": steps, "weights": task_weights or TASK_WEIGHTS, "fill": list(TRAIN_FILL)}]
    out = [dict(st) for st in stages]
    for st in out:
        st.setdefault("fill", list(TRAIN_FILL))
    out[-1]["until"] = steps
    return out


def _build_model(base: Path, text_overrides: dict | None, weights: bool = True):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if not weights:  # resuming: the weights come from the checkpoint (sizes from config.json)
        return LlavaForConditionalGeneration(LlavaConfig.from_pretrained(base)).to(torch.float32)
    if not text_overrides:
        return LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    config = LlavaConfig.from_pretrained(base)
    for k, v in text_overrides.items():
        setattr(config.text_config, k, v)
    config.save_pretrained(base)  # the checkpoint written at the end carries the new sizes
    return LlavaForConditionalGeneration(config).to(torch.float32)


def train(out: Path, steps: int | None, batch_size: int, lr: float, seed: int, device: str, eval_every: int, eval_n: int,
          task_weights: dict[str, float] | None = None, pos_init: str = "sincos",
          init_from: str | None = None, eval_tasks: tuple[str, ...] = ("single", "cell"),
          stages: list[dict] | None = None, batch_sizes: dict[str, int] | None = None,
          ckpt_dir: str | None = None, ckpt_every: int = 0, resume: bool = False, warmup: int = 100,
          text_overrides: dict | None = None, final_n: int = 200, run_name: str | None = None,
          stop_after: int | None = None, keep_every: int = 0) -> dict | None:
    """Train and write the checkpoint to ``out``.  With ``ckpt_dir``, a resumable checkpoint
    (weights, optimizer, step, RNG states, data position, log) is written there every
    ``ckpt_every`` steps; ``resume`` continues from it with the saved configuration.
    ``stop_after``: leave after that many steps of this call (checkpoint written, nothing else;
    returns None), for sessions shorter than the run."""
    from transformers import AutoProcessor

    if not resume:
        steps = steps or 3000
    new_stages = stages if resume else None  # on resume: the stages from here on (the past ones stay)
    stages = _stages(stages, task_weights, steps or 0)
    batch_sizes = batch_sizes or {}
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    state = None
    if resume:
        if ckpt is None or not (ckpt / "last.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {ckpt}/last.pt")
        state = torch.load(ckpt / "last.pt", weights_only=False)
        base, tmp_base = ckpt / "base", None
    elif init_from:  # continue: same tokenizer, processor and config as the checkpoint
        base, tmp_base = Path(init_from), None
    else:
        tmp_base = Path(tempfile.mkdtemp(prefix="hae_vlm_base_"))
        base = tmp_base
        build_tiny_llava(base, seed=seed)
    random.seed(seed)
    torch.manual_seed(seed)
    model = _build_model(base, None if (resume or init_from) else text_overrides, weights=not resume)
    if ckpt is not None and not resume:
        ckpt.mkdir(parents=True, exist_ok=True)
        if (ckpt / "base").exists():
            shutil.rmtree(ckpt / "base")
        shutil.copytree(base, ckpt / "base")
        base, tmp_base = ckpt / "base", (shutil.rmtree(tmp_base, ignore_errors=True) if tmp_base else None)
    processor = AutoProcessor.from_pretrained(base)
    if not init_from and not resume:
        reinit_for_training(model, seed)
        if pos_init == "sincos":
            init_positions_2d(model)
        elif pos_init == "cells":
            init_positions_cells(model)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    counters: dict[str, int] = {}
    log = {"config": {"run_name": run_name, "steps": steps, "batch_size": batch_size, "batch_sizes": batch_sizes,
                      "lr": lr, "warmup": warmup, "seed": seed, "device": device, "stages": stages,
                      "pos_init": pos_init, "init_from": init_from, "text_overrides": text_overrides,
                      "torch_threads": torch.get_num_threads()},
           "machine": _machine(device), "loss": [], "eval": [], "wall": []}
    start, elapsed = 1, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        counters, log, start, elapsed = state["counters"], state["log"], state["step"] + 1, state["elapsed"]
        stages, batch_sizes, lr, warmup = (log["config"]["stages"], log["config"]["batch_sizes"], log["config"]["lr"],
                                           log["config"]["warmup"])
        steps = steps or log["config"]["steps"]
        if new_stages:
            past = [st for st in stages if st["until"] < start]
            stages = past + _stages(new_stages, None, steps)
            log.setdefault("stage_changes", []).append((start - 1, new_stages))
            log["config"]["stages"] = stages
        if steps != log["config"]["steps"]:  # a new length: the cosine re-aims at it from here
            log.setdefault("length_changes", []).append((start - 1, log["config"]["steps"], steps))
            stages = [st for st in stages if st["until"] < steps] + [dict(next(st for st in stages if st["until"] >= steps))]
            stages[-1]["until"] = steps
            log["config"]["steps"], log["config"]["stages"] = steps, stages
        log.setdefault("resumed_at", []).append(start - 1)
        print(f"resumed at step {start - 1} ({elapsed:.0f}s trained)", flush=True)
    if init_from and (base / "train_log.json").is_file():
        log["previous"] = json.loads((base / "train_log.json").read_text())
    t0 = time.time() - elapsed
    for step in range(start, steps + 1):
        st = next(s for s in stages if step <= s["until"])
        # One task per batch: prompts of a batch then have the same number of images, so
        # little compute goes to padding (a needle item is three times a cell item's length).
        tasks, weights = zip(*st["weights"].items())
        task = rng.choices(tasks, weights)[0]
        bs = batch_sizes.get(task, batch_size)
        items = []
        for _ in range(bs):
            items.append(make_item(task, "train", counters.get(task, 0), fill=tuple(st["fill"])))
            counters[task] = counters.get(task, 0) + 1
        cur_lr = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss = model(**_batch(processor, items, device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["loss"].append((step, task, round(loss.item(), 5)))
        if step % 10 == 0:
            print(f"step {step} {task} loss {loss.item():.4f} lr {cur_lr:.2e} ({time.time() - t0:.0f}s)", flush=True)
        if eval_every and (step % eval_every == 0 or step == steps):
            # "cell@0.2": held-out items at fill 0.2 (fewer distractors) to see a curriculum's first stage.
            accs = {t: round(evaluate(model, processor, t.split("@")[0],
                                      max(4, eval_n // 4) if t.startswith("describe") else eval_n, device,
                                      fill=float(t.split("@")[1]) if "@" in t else 0.7), 4) for t in eval_tasks}
            log["eval"].append((step, accs))
            log["wall"].append((step, round(time.time() - t0, 1)))
            print(f"step {step} heldout accuracy {accs}", flush=True)
        if ckpt is not None and ckpt_every and (step % ckpt_every == 0 or step == steps):
            tmp = ckpt / "last.pt.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "counters": counters, "log": log, "step": step,
                        "elapsed": time.time() - t0}, tmp)
            os.replace(tmp, ckpt / "last.pt")
            if keep_every and step % keep_every == 0:  # snapshots to go back to (a stage can undo the last)
                shutil.copy(ckpt / "last.pt", ckpt / f"step{step}.pt")
        if stop_after and step - start + 1 >= stop_after and step < steps:
            if ckpt is None or ckpt_every == 0 or step % ckpt_every:
                raise ValueError("stop_after needs a checkpoint at the step it stops (ckpt_every dividing it)")
            print(f"stopped at step {step}; continue with --resume", flush=True)
            return None
    log["train_seconds"] = round(time.time() - t0, 1)
    log["final_heldout"] = {t: round(evaluate(model, processor, t, final_n if t != "describe" else max(1, final_n // 4),
                                              device), 4)
                            for t in GENERATORS} if final_n else {}
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
    ap.add_argument("--steps", type=int, default=None, help="default 3000 (with --resume: the saved run's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--pos-init", choices=("sincos", "cells", "random"), default="sincos")
    ap.add_argument("--init-from", default=None, help="continue from a checkpoint written by this script")
    ap.add_argument("--eval-tasks", default="single,cell")
    ap.add_argument("--task-weights", default=None, help='JSON, e.g. \'{"cell": 0.7, "describe": 0.3}\'')
    ap.add_argument("--stages", default=None,
                    help='curriculum, JSON: [{"until": 1000, "weights": {"describe": 1}, "fill": [0.1, 0.5]}, ...]')
    ap.add_argument("--batch-sizes", default=None, help='per-task batch size, JSON, e.g. \'{"needle": 8}\'')
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--text-config", default=None, help='text model sizes, JSON, e.g. \'{"hidden_size": 192}\'')
    ap.add_argument("--ckpt-dir", default=None, help="resumable checkpoint folder (e.g. under .cache/)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true",
                    help="continue from --ckpt-dir/last.pt with its saved config; --steps, when it differs, "
                         "changes the run's length (cosine schedule and last stage re-aimed); --stages replaces "
                         "the stages from the resumed step on")
    ap.add_argument("--final-n", type=int, default=200, help="held-out items per task in the final evaluation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--stop-after", type=int, default=None, help="leave after this many steps (resume later)")
    ap.add_argument("--keep-every", type=int, default=0, help="also keep --ckpt-dir/step<N>.pt every N steps")
    ap.add_argument("--run-name", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train(Path(args.out), args.steps, args.batch_size, args.lr, args.seed, args.device, args.eval_every, args.eval_n,
          task_weights=json.loads(args.task_weights) if args.task_weights else None, pos_init=args.pos_init,
          init_from=args.init_from, eval_tasks=tuple(args.eval_tasks.split(",")),
          stages=json.loads(args.stages) if args.stages else None,
          batch_sizes=json.loads(args.batch_sizes) if args.batch_sizes else None, ckpt_dir=args.ckpt_dir,
          ckpt_every=args.ckpt_every, resume=args.resume, warmup=args.warmup,
          text_overrides=json.loads(args.text_config) if args.text_config else None, final_n=args.final_n,
          run_name=args.run_name, stop_after=args.stop_after, keep_every=args.keep_every)


if __name__ == "__main__":
    main()
