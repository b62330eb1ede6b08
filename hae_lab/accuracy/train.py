"""Train the small LLaVA-architecture VLM on the procedural tasks (seeded, reproducible).

    python -m hae_lab.accuracy.train --out .cache/trained_vlm [--steps 3000] [--device cuda]

Starts from the tiny LLaVA architecture of ``hae_lab.tiny_models`` (CLIP 2x64 vision
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

from hae_lab.accuracy import scenes
from hae_lab.accuracy.tasks import COLOURS, GENERATORS, SHAPES, Item, cell_name, generate, make_item, score
from hae_lab.tiny_models import (_llava_key, _save_weights, build_tiny_llava, llava_numbered_prompt,
                                          llava_prompt)

# Whole-word tokens of the grid tasks (``--grid-tokens``): the 16 cell names, the image names of
# the numbered prompt and the colour/shape words the base BPE splits.  With them a cell is one
# token in the question, the answer and ``describe``, so finding its colour is one attention hop.
GRID_TOKENS = tuple(f" {cell_name(r, c)}" for r in range(4) for c in range(4)) + tuple(
    f" image {k}" for k in range(1, 5)) + tuple(f" {w}" for w in (*COLOURS, *SHAPES, "empty"))

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


def transfer_text_weights(model, tokenizer, src: Path) -> dict:
    """Start the text model and projector from checkpoint ``src`` (written by this script, same
    text sizes): every tensor outside the vision tower with the same name and shape is copied,
    and the token embedding and output rows of every token both tokenizers have (by string:
    the shared cell names, colours and shapes of the two worlds included).  The vision tower
    keeps its own initialisation (its patch grid differs between the worlds).  A model that
    already copies the asked cell and looks it up in the image starts the new world with that
    skill instead of from the answers' marginal distribution."""
    from transformers import AutoTokenizer

    old = _build_model(src, None).state_dict()
    old_vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    new_vocab = tokenizer.get_vocab()
    rows = [(i, old_vocab[t]) for t, i in new_vocab.items() if t in old_vocab]
    copied, rowwise = 0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or name not in old:
                continue
            src_t = old[name]
            if src_t.shape == p.shape and not name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.copy_(src_t)
                copied += 1
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")) and src_t.shape[1:] == p.shape[1:]:
                new_idx = torch.tensor([a for a, b in rows if a < p.shape[0] and b < src_t.shape[0]])
                old_idx = torch.tensor([b for a, b in rows if a < p.shape[0] and b < src_t.shape[0]])
                p[new_idx] = src_t[old_idx]
                rowwise += len(new_idx)
    return {"tensors": copied, "token_rows": rowwise, "from": str(src)}


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


def prompt_format(model_dir: Path):
    """The raw prompt function matching the checkpoint's chat template (``tiny_model_info.json``)."""
    info = Path(model_dir) / "tiny_model_info.json"
    style = json.loads(info.read_text()).get("prompt_style") if info.is_file() else None
    return llava_numbered_prompt if style == "numbered" else llava_prompt


# Head dimensions whose rotary frequency is lowest (HF/vLLM Llama pair dim i with i + head_dim/2;
# frequency theta^(-2i/head_dim)): over a few hundred positions they barely rotate, so a match
# written there does not depend on how far apart query and key are.
def _slow_rope_dims(head_dim: int, n: int) -> list[int]:
    half = head_dim // 2
    return [i for i in range(half - n // 2, half)] + [i + half for i in range(half - n // 2, half)]


def init_cell_alignment(model, tokenizer, cells: int = 4, gain: float = 1.0, wire: float = 0.0) -> None:
    """Give the cell code of :func:`init_positions_cells` one basis from pixels to the text model.

    * The patch embedding writes nothing into the ``k = 2 * cells`` code channels, so they hold
      the cell alone (not the cell plus whatever colour the patch shows).
    * The projector passes those channels through to text-model channels ``[0, k)`` (identity
      blocks), and nothing else writes there: the keys' side.
    * The embedding of each cell token (`` r2c3``) holds the same code in channels ``[k, 2k)``
      (row one-hot, then column one-hot, times ``gain``): the queries' side.  Separate channels,
      so a cell token in the question does not look like the cell's patches.
    * ``wire`` > 0: head 0 of the first text layer starts as the lookup itself - its query reads
      channels ``[k, 2k)``, its key channels ``[0, k)``, in the slowest rotary dimensions, times
      ``wire`` - so a cell token attends to its cell's patches from step 0.  Everything else
      (values, the colour and shape read-out, copying, which image) is learned.

    Initialisation only: every weight is trained afterwards."""
    k = 2 * cells
    vt = model.model.vision_tower.vision_model if hasattr(model.model.vision_tower, "vision_model") else (
        model.model.vision_tower)
    proj = model.model.multi_modal_projector
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        vt.embeddings.patch_embedding.weight[:k].zero_()
        for lin in (proj.linear_1, proj.linear_2):
            lin.weight[:k].zero_()
            lin.weight[:, :k].zero_()
            lin.weight[:k, :k].copy_(torch.eye(k))
            lin.bias[:k].zero_()
        emb[:, :2 * k] = 0.0
        for r in range(cells):
            for c in range(cells):
                tid = tokenizer.convert_tokens_to_ids(f" {cell_name(r, c)}")
                assert tid != tokenizer.unk_token_id, cell_name(r, c)
                emb[tid, k + r] = gain
                emb[tid, k + cells + c] = gain
        if wire:
            attn = model.model.language_model.layers[0].self_attn
            hd = attn.head_dim
            dims = _slow_rope_dims(hd, k)
            attn.q_proj.weight[:hd].zero_()  # head 0
            attn.k_proj.weight[:hd].zero_()  # key-value head 0 (shared with the next query heads)
            for j, d in enumerate(dims):
                attn.q_proj.weight[d, k + j] = wire
                attn.k_proj.weight[d, j] = 1.0


# Residual channels the wired circuits use (``--wire-circuits``), text model width 128.
CH_VIS_CELL = slice(0, 8)     # visual tokens: cell code (row one-hot, column one-hot)
CH_TOK_CELL = slice(8, 16)    # cell-name tokens: the same code
CH_CONST = 16                 # every token: 1 (a bias the attention layers lack)
CH_MARK = 17                  # `` image k`` tokens: 1
CH_TOK_IMG = slice(18, 22)    # `` image k`` tokens: one-hot k
CH_VIS_IMG = slice(22, 26)    # visual tokens, after layer 1: mean of the image one-hots so far
CH_PREV_CELL = slice(26, 34)  # after layer 0: the previous token's cell code
CH_PREV_IMG = slice(34, 38)   # after layer 0: the previous token's image one-hot
CH_VIS_FLAG = 38              # visual tokens: 1
N_RESERVED = 39
CONST = 4.0


def _head_rows(h: int, hd: int) -> slice:
    return slice(h * hd, (h + 1) * hd)


def _wire_cell_lookup(attn, hd: int, slow, query_channels: slice, gain: float) -> tuple[slice, slice]:
    """Head 0 of ``attn`` (query and key rows zeroed first): its query reads the cell code in
    ``query_channels`` (x ``gain``) and its key the patches' cell code (``CH_VIS_CELL``), on
    the slow rotary dims ``slow`` (positions barely rotate them); returns its (query, key) rows."""
    qr, kr = _head_rows(0, hd), _head_rows(0, hd)
    attn.q_proj.weight[qr].zero_()
    attn.k_proj.weight[kr].zero_()
    for j, d in enumerate(slow):
        attn.q_proj.weight[qr.start + d, query_channels.start + j] = gain
        attn.k_proj.weight[kr.start + d, CH_VIS_CELL.start + j] = 1.0
    return qr, kr


def wire_grid_circuits(model, tokenizer, cells: int = 4, scale: float = 1.0, content_gain: float = 5.0) -> None:
    """Start the text model with the four attention circuits the grid tasks need, in reserved
    residual channels (``CH_*``); every weight is still trained afterwards.

    1. layer 0, head 0: a cell token attends to its cell's patches (:func:`init_cell_alignment`);
    2. layer 0, head 2: every token attends to the previous one (rotary phase shifted by one
       position, summed over all frequencies) and copies its cell code and image one-hot;
    3. layer 1, head 0: a token whose previous token names a cell attends to that cell's patches
       (a colour token, for ``describe``'s shape);
    4. layer 1, head 2: each visual token averages the `` image k`` tokens before it, which tells
       image k's tokens apart from the others (all images share the vision position table);
    5. layer 2, head 0: a cell token whose previous token names an image attends to that cell of
       that image (``needle``).

    Query/key weights and the copy heads' value/output weights are set; the looked-up heads'
    values and outputs, every MLP and the read-outs stay random and are learned."""
    # The constant channel dominates every token's norm (RMSNorm then scales all tokens alike,
    # which the previous-token head needs: its score separates neighbours by only ~14%); the
    # query scales below make up for the smaller normalised codes.
    init_cell_alignment(model, tokenizer, cells=cells, gain=1.0, wire=6.0 * scale)
    lm = model.model.language_model
    proj = model.model.multi_modal_projector
    emb = model.get_input_embeddings().weight
    hd = lm.layers[0].self_attn.head_dim
    half = hd // 2
    theta = float(getattr(lm.config, "rope_theta", None) or lm.config.rope_parameters["rope_theta"])
    freqs = [theta ** (-2.0 * i / hd) for i in range(half)]
    with torch.no_grad():
        emb[:, 4 * cells:N_RESERVED] = 0.0  # the cell codes are set by init_cell_alignment
        emb[:, CH_CONST] = CONST
        # Free channels x content_gain: next to the constant, N(0, 0.02) content would be ~1/20 of
        # a token's norm, and RMSNorm would shrink its share of every gradient step alike.
        emb[:, N_RESERVED:] *= content_gain
        for k in range(1, 5):
            tid = tokenizer.convert_tokens_to_ids(f" image {k}")
            assert tid != tokenizer.unk_token_id
            emb[tid, CH_MARK] = 1.0
            emb[tid, CH_TOK_IMG.start + k - 1] = 1.0
        l2 = proj.linear_2
        l2.weight[2 * cells:N_RESERVED].zero_()
        l2.bias[2 * cells:N_RESERVED].zero_()
        l2.bias[CH_CONST] = CONST
        l2.bias[CH_VIS_FLAG] = 1.0
        l2.weight[N_RESERVED:] *= content_gain
        for layer in lm.layers:  # nothing random writes into the reserved channels at the start
            layer.self_attn.o_proj.weight[:N_RESERVED].zero_()
            layer.mlp.down_proj.weight[:N_RESERVED].zero_()

        # 2. previous-token head: layer 0, query head 2 / key-value head 1.
        a = lm.layers[0].self_attn
        q, kk, v, o = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight
        qr, kr = _head_rows(2, hd), _head_rows(1, hd)
        q[qr].zero_(); kk[kr].zero_(); v[kr].zero_()
        # score ~ sum_i w_i cos(f_i * (distance - 1)) over the six fastest rotary pairs: largest
        # at distance 1, every other distance (0..400) at most 0.864 of it.
        for i, w in enumerate((1.0, 1.0, 1.0, 1.0, 0.5, 0.5)):
            q[qr.start + i, CH_CONST] = 1.5 * scale * w * math.cos(freqs[i])
            q[qr.start + half + i, CH_CONST] = -1.5 * scale * w * math.sin(freqs[i])
            kk[kr.start + i, CH_CONST] = 1.0
        src = list(range(CH_TOK_CELL.start, CH_TOK_CELL.stop)) + list(range(CH_TOK_IMG.start, CH_TOK_IMG.stop))
        dst = list(range(CH_PREV_CELL.start, CH_PREV_CELL.stop)) + list(range(CH_PREV_IMG.start, CH_PREV_IMG.stop))
        o[:, qr].zero_()
        for j, (a_, b_) in enumerate(zip(src, dst)):
            v[kr.start + j, a_] = 1.0
            o[b_, qr.start + j] = 0.3  # normalised inputs are ~8: copies come out ~2

        slow = _slow_rope_dims(hd, 2 * cells)
        # 3. layer 1, head 0: the previous token's cell -> that cell's patches.
        a = lm.layers[1].self_attn
        _wire_cell_lookup(a, hd, slow, CH_PREV_CELL, 7.0 * scale)
        # 4. layer 1, head 2: visual tokens average the image markers before them.
        qr, kr = _head_rows(2, hd), _head_rows(1, hd)
        a.q_proj.weight[qr].zero_(); a.k_proj.weight[kr].zero_(); a.v_proj.weight[kr].zero_()
        a.q_proj.weight[qr.start + half - 1, CH_VIS_FLAG] = 6.0 * scale
        a.k_proj.weight[kr.start + half - 1, CH_MARK] = 1.0
        a.o_proj.weight[:, qr].zero_()
        for j in range(4):
            a.v_proj.weight[kr.start + j, CH_TOK_IMG.start + j] = 1.0
            a.o_proj.weight[CH_VIS_IMG.start + j, qr.start + j] = 0.3
        # 5. layer 2, head 0: own cell + previous token's image -> that cell of that image.
        a = lm.layers[2].self_attn
        qr, kr = _wire_cell_lookup(a, hd, slow, CH_TOK_CELL, 6.0 * scale)
        # The key holds the mean of the one-hots of images 1..k' (image k' tokens); the query
        # for image k is M[:, k], chosen so that mean_{j<=k'} M[j, k] is largest at k' = k:
        # M[j, k] = -1 (j < k), 2k - 1 (j = k), -(k + 1) (j > k) (1-based).  The next-slowest
        # rotary pairs (images 1-2 in pair half-5, 3-4 in pair half-6) hold it.
        img_dims = [half - 5, 2 * half - 5, half - 6, 2 * half - 6]
        for j, d in enumerate(img_dims):
            a.k_proj.weight[kr.start + d, CH_VIS_IMG.start + j] = 1.0
            for k in range(4):
                m = -1.0 if j < k else (2 * (k + 1) - 1.0 if j == k else -(k + 2.0))
                a.q_proj.weight[qr.start + d, CH_PREV_IMG.start + k] = 8.0 * scale * m


def frozen_parts(model, parts: str | None) -> list[str]:
    """Freeze whole parts of the model (``vision``: the vision tower, as LLaVA keeps its CLIP
    encoder frozen; ``projector``): their weights keep their initial values.  Trained freely,
    the projector learned to drop the cell code the vision tower carries (a linear read-out of
    the cell from its output fell from 0.98 at initialisation to chance in p5, p8 and q5), so
    the keys of the text model no longer said which cell a patch is in."""
    names = []
    for part in filter(None, (parts or "").split(",")):
        mod = {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector}[part]
        for n, p in mod.named_parameters():
            p.requires_grad_(False)
            names.append(f"{part}.{n}")
    return names


def freeze_wired(model, cells: int = 4) -> int:
    """Keep what :func:`wire_grid_circuits` set fixed during training (gradient masks): the
    reserved residual channels (what writes them, and the cell code in the vision tower), the
    wired heads' query and key weights and the copy heads' values and outputs, and the RMSNorm
    gains of the reserved channels.  Trained freely, Adam moved these by ~lr per step each and
    undid every circuit within 400 steps (run r6).  Returns the number of frozen entries."""
    k = 2 * cells
    lm = model.model.language_model
    hd = lm.layers[0].self_attn.head_dim
    vt = model.model.vision_tower.vision_model if hasattr(model.model.vision_tower, "vision_model") else (
        model.model.vision_tower)
    proj = model.model.multi_modal_projector
    masks: dict = {}

    def freeze(p, index):
        m = masks.setdefault(p, torch.ones_like(p))
        m[index] = 0.0

    R = slice(0, N_RESERVED)
    freeze(model.get_input_embeddings().weight, (slice(None), R))
    freeze(vt.embeddings.position_embedding.weight, (slice(None), slice(0, k)))
    freeze(vt.embeddings.patch_embedding.weight, slice(0, k))
    for layer in vt.encoder.layers:
        freeze(layer.self_attn.out_proj.weight, slice(0, k))
        freeze(layer.self_attn.out_proj.bias, slice(0, k))
        freeze(layer.mlp.fc2.weight, slice(0, k))
        freeze(layer.mlp.fc2.bias, slice(0, k))
        for ln in (layer.layer_norm1, layer.layer_norm2):
            freeze(ln.weight, slice(0, k))
            freeze(ln.bias, slice(0, k))
    freeze(vt.pre_layrnorm.weight, slice(0, k))
    freeze(vt.pre_layrnorm.bias, slice(0, k))
    freeze(proj.linear_1.weight, slice(0, k))
    freeze(proj.linear_1.weight, (slice(None), slice(0, k)))
    freeze(proj.linear_1.bias, slice(0, k))
    freeze(proj.linear_2.weight, R)
    freeze(proj.linear_2.weight, (slice(None), slice(0, k)))
    freeze(proj.linear_2.bias, R)
    for layer in lm.layers:
        freeze(layer.self_attn.o_proj.weight, R)
        freeze(layer.mlp.down_proj.weight, R)
        freeze(layer.input_layernorm.weight, R)
        freeze(layer.post_attention_layernorm.weight, R)
    wired = {0: [(0, 0), (2, 1)], 1: [(0, 0), (2, 1)], 2: [(0, 0)]}  # layer: (query head, kv head)
    copies = {(0, 2), (1, 2)}  # (layer, query head) whose values and outputs are set too
    for li, heads in wired.items():
        a = lm.layers[li].self_attn
        for qh, kvh in heads:
            freeze(a.q_proj.weight, _head_rows(qh, hd))
            freeze(a.k_proj.weight, _head_rows(kvh, hd))
            if (li, qh) in copies:
                freeze(a.v_proj.weight, _head_rows(kvh, hd))
                freeze(a.o_proj.weight, (slice(None), _head_rows(qh, hd)))
    for p, m in masks.items():
        p.register_hook(lambda g, m=m: g * m)
    return int(sum((m == 0).sum().item() for m in masks.values()))


def _needle_n(index: int, fill: tuple[float, float], images) -> Item:
    """Train ``needle`` item ``index`` (the seed ``make_item`` gives it) with ``images`` images
    (an int or [lo, hi]) instead of three: a curriculum from one image to several."""
    import numpy as np

    from hae_lab.accuracy.tasks import SPLIT_SEEDS

    seed = SPLIT_SEEDS["train"] + 1000 * list(GENERATORS).index("needle") + index * 7919
    rng = np.random.default_rng(seed)
    f = float(rng.uniform(*fill))
    n = images if isinstance(images, int) else int(rng.integers(images[0], images[1] + 1))
    return GENERATORS["needle"](rng, seed, 4, f, num_images=n)


COPY_SEED = 70_000_000  # the copy drill's items: a seed range no task split uses


def copy_item(index: int, fill: tuple[float, float], digits) -> Item:
    """A training drill, not a task: one image the question does not ask about and a number of
    ``digits`` (an int or [lo, hi]) random digits to repeat.  ``needle`` ends by repeating a
    3-digit number, which takes an induction step (find the earlier place of the current digit,
    copy the one after it); with three digits per item a model trained on ``needle`` alone had
    not learned it after thousands of steps (grid-llava-v4 runs A, C, D).  Here every digit after
    the first is such a step."""
    import numpy as np

    from hae_lab.accuracy.tasks import Grid

    rng = np.random.default_rng(COPY_SEED + index * 7919)
    g = Grid.random(rng, 4, float(rng.uniform(*fill)))
    n = digits if isinstance(digits, int) else int(rng.integers(digits[0], digits[1] + 1))
    code = "".join(str(int(d)) for d in rng.integers(0, 10, n))
    return Item("copy", f"The secret number is {code}. Repeat the secret number.", code, [g],
                seed=COPY_SEED + index)


def sparsify(item, filled: int):
    """``item`` with at most ``filled`` shapes left in each grid (a curriculum's sparse stage: fewer
    distractors).  The cell the question asks about (``cell``, ``needle``) is always kept; the
    others are drawn from the item's seed; ``describe``'s answer is rewritten for the new grid."""
    import copy

    rng = random.Random(item.seed * 31 + filled)
    item = copy.deepcopy(item)
    words = item.answer.split()
    keep = {}
    if item.task == "cell":
        keep[0] = words[0]
    elif item.task == "needle":
        keep[int(words[1]) - 1] = words[2]
    for gi, g in enumerate(item.grids):
        spots = [(r, c) for r in range(g.size) for c in range(g.size) if g.cells[r][c] is not None]
        must = [(int(keep[gi][1]) - 1, int(keep[gi][3]) - 1)] if gi in keep else []
        rest = [sp for sp in spots if sp not in must]
        rng.shuffle(rest)
        for r, c in rest[max(0, filled - len(must)):]:
            g.cells[r][c] = None
    if item.task == "describe":
        item.answer = item.grids[0].describe()
    return item


def _num_images(item) -> int:
    return len(item.scenes) if hasattr(item, "scenes") else len(item.grids)


def _batch(processor, items, device, prompt=llava_prompt):
    """Input ids with labels on the answer tokens only (right padding)."""
    tok = processor.tokenizer
    assert tok.padding_side == "right", tok.padding_side
    prompts = [prompt(it.question, _num_images(it)) for it in items]
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
             fill: float = 0.7, prompt=llava_prompt, world: str = "grid") -> float:
    """Held-out accuracy with HF greedy decoding (``max_new_tokens``: the answer's length + 4)."""
    model.eval()
    total = 0.0
    tok = processor.tokenizer
    items = scenes.generate(task, "heldout", n) if world == "scenes" else generate(task, "heldout", n, fill=fill)
    for it in items:
        enc = processor(text=[prompt(it.question, _num_images(it))], images=it.images(), return_tensors="pt").to(device)
        mt = max_new_tokens or len(_answer_ids(tok, it.answer)) + 4
        out = model.generate(**enc, max_new_tokens=mt, do_sample=False)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        total += (scenes.score if world == "scenes" else score)(it.answer, text, it.scoring)
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


def export_checkpoint(ckpt: Path, out: Path) -> dict:
    """Write a resumable checkpoint's weights (``ckpt``/last.pt) as a checkpoint folder that
    ``--init-from`` (and HF/vLLM) loads, with the run's log up to there in ``train_log.json``:
    how a run is continued under a new plan (a fork) rather than resumed."""
    state = torch.load(ckpt / "last.pt", weights_only=False)
    out.mkdir(parents=True, exist_ok=True)
    for f in (ckpt / "base").iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "train_log.json", "README.md"):
            shutil.copy(f, out / f.name)
    model = _build_model(ckpt / "base", None, weights=False)
    model.load_state_dict(state["model"])
    _save_weights(model.eval(), out, _llava_key)
    log = {**state["log"], "exported_at_step": state["step"]}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def train(out: Path, steps: int | None, batch_size: int, lr: float, seed: int, device: str, eval_every: int, eval_n: int,
          task_weights: dict[str, float] | None = None, pos_init: str = "sincos",
          init_from: str | None = None, transfer_from: str | None = None, eval_tasks: tuple[str, ...] = ("single", "cell"),
          stages: list[dict] | None = None, batch_sizes: dict[str, int] | None = None,
          ckpt_dir: str | None = None, ckpt_every: int = 0, resume: bool = False, warmup: int = 100,
          text_overrides: dict | None = None, final_n: int = 200, run_name: str | None = None,
          stop_after: int | None = None, keep_every: int = 0, patch_size: int | None = None,
          grid_tokens: bool = False, numbered_images: bool = False, align_cells: float = 0.0,
          wire_lookup: float = 0.0, wire_circuits: float = 0.0, freeze_circuits: bool = False,
          freeze: str | None = None, world: str = "grid") -> dict | None:
    """Train and write the checkpoint to ``out``.  With ``ckpt_dir``, a resumable checkpoint
    (weights, optimizer, step, RNG states, data position, log) is written there every
    ``ckpt_every`` steps; ``resume`` continues from it with the saved configuration.
    ``stop_after``: leave after that many steps of this call (checkpoint written, nothing else;
    returns None), for sessions shorter than the run.  ``world``: ``grid`` (hae_lab.accuracy.tasks,
    224-pixel grids) or ``scenes`` (hae_lab.accuracy.scenes: 336-pixel scenes, 576 visual tokens,
    the world's whole-word tokens, numbered images, 8192 positions)."""
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
        world = state["log"]["config"].get("world", "grid")  # the resumed run's world
    elif init_from:  # continue: same tokenizer, processor and config as the checkpoint
        base, tmp_base = Path(init_from), None
    else:
        tmp_base = Path(tempfile.mkdtemp(prefix="hae_vlm_base_"))
        base = tmp_base
        if world == "scenes":
            build_tiny_llava(base, seed=seed, patch_size=scenes.PATCH, image_size=scenes.PIXELS,
                             added_tokens=scenes.added_tokens(), numbered_images=True, max_positions=8192)
        else:
            build_tiny_llava(base, seed=seed, **({"patch_size": patch_size} if patch_size else {}),
                             added_tokens=GRID_TOKENS if grid_tokens else (), numbered_images=numbered_images)
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
    prompt = prompt_format(base)
    if not init_from and not resume:
        reinit_for_training(model, seed)
        if pos_init == "sincos":
            init_positions_2d(model)
        elif pos_init == "cells":
            init_positions_cells(model, cells=scenes.LAYOUT if world == "scenes" else 4)
        if transfer_from:
            print(f"transferred: {transfer_text_weights(model, processor.tokenizer, Path(transfer_from))}", flush=True)
        if wire_circuits:
            wire_grid_circuits(model, processor.tokenizer, scale=wire_circuits)
        elif align_cells:
            init_cell_alignment(model, processor.tokenizer, gain=align_cells, wire=wire_lookup)
    model.to(device).train()
    if state is not None and state["log"]["config"].get("freeze_circuits"):
        freeze_circuits = True  # the resumed run's choice
    if freeze_circuits:
        print(f"frozen: {freeze_wired(model)} wired entries", flush=True)
    if state is not None:
        freeze = state["log"]["config"].get("freeze")  # the resumed run's choice
        # The resumed run's evaluation (runs before this was recorded: the tasks it evaluated).
        done = state["log"]["eval"]
        eval_tasks = tuple(state["log"]["config"].get("eval_tasks") or (done[-1][1] if done else eval_tasks))
    if freeze:
        print(f"frozen: {len(frozen_parts(model, freeze))} tensors ({freeze})", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    counters: dict[str, int] = {}
    log = {"config": {"run_name": run_name, "steps": steps, "batch_size": batch_size, "batch_sizes": batch_sizes,
                      "lr": lr, "warmup": warmup, "seed": seed, "device": device, "stages": stages,
                      "pos_init": pos_init, "init_from": init_from, "transfer_from": transfer_from, "text_overrides": text_overrides,
                      "patch_size": patch_size, "grid_tokens": grid_tokens, "numbered_images": numbered_images,
                      "align_cells": align_cells, "wire_lookup": wire_lookup,
                      "wire_circuits": wire_circuits, "freeze_circuits": freeze_circuits, "freeze": freeze,
                      "content_gain": 5.0 if wire_circuits else None, "world": world, "eval_tasks": list(eval_tasks),
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
            # the stage running at the new end (the last one, when the run gets longer) ends there
            stages = [st for st in stages if st["until"] < steps] + [
                dict(next((st for st in stages if st["until"] >= steps), stages[-1]))]
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
            if task == "copy":  # the digit-copy drill (stage key "digits": [lo, hi])
                it = copy_item(counters.get(task, 0), tuple(st["fill"]), st.get("digits", [4, 12]))
            elif st.get("images") and task == "needle":  # fewer images first (1 -> 3)
                it = _needle_n(counters.get(task, 0), tuple(st["fill"]), st["images"])
            elif world == "scenes":
                it = scenes.make_item(task, "train", counters.get(task, 0))
            else:
                it = make_item(task, "train", counters.get(task, 0), fill=tuple(st["fill"]))
            if st.get("cells"):  # exact-count curriculum: at most this many shapes per grid
                lo, hi = st["cells"] if isinstance(st["cells"], list) else (st["cells"], st["cells"])
                it = sparsify(it, random.Random(it.seed).randint(lo, hi))
            items.append(it)
            counters[task] = counters.get(task, 0) + 1
        cur_lr = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        loss = model(**_batch(processor, items, device, prompt)).loss
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
                                      fill=float(t.split("@")[1]) if "@" in t else 0.7, prompt=prompt,
                                      world=world), 4)
                    for t in eval_tasks}
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
    log["final_heldout"] = {t: round(evaluate(model, processor, t, final_n if t not in ("describe", "walk") else
                                              max(1, final_n // 4), device, prompt=prompt, world=world), 4)
                            for t in (scenes.GENERATORS if world == "scenes" else GENERATORS)} if final_n else {}
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
    ap.add_argument("--transfer-from", default=None,
                    help="start the text model and projector from this checkpoint (another world's; see "
                         "transfer_text_weights), the vision tower fresh")
    ap.add_argument("--eval-tasks", default="single,cell")
    ap.add_argument("--task-weights", default=None, help='JSON, e.g. \'{"cell": 0.7, "describe": 0.3}\'')
    ap.add_argument("--stages", default=None,
                    help='curriculum, JSON: [{"until": 1000, "weights": {"describe": 1}, "fill": [0.1, 0.5]}, ...]; '
                         'optional per stage: "cells": n or [lo, hi] (at most that many shapes per grid, the asked one kept), '
                         '"images": n or [lo, hi] (needle items with that many images)')
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
    ap.add_argument("--patch-size", type=int, default=None, help="vision patch (default 14: 256 tokens; 28: 64)")
    ap.add_argument("--grid-tokens", action="store_true", help="add the cell/colour/shape/image words as tokens")
    ap.add_argument("--numbered-images", action="store_true",
                    help="chat template that writes ' image k' before each image's tokens")
    ap.add_argument("--align-cells", type=float, default=0.0,
                    help="with --pos-init cells and --grid-tokens: start the cell code in one basis from the "
                         "vision position table to the cell tokens' embeddings, this gain (0: off)")
    ap.add_argument("--wire-lookup", type=float, default=0.0,
                    help="with --align-cells: start head 0 of text layer 0 as the cell lookup, this query scale")
    ap.add_argument("--wire-circuits", type=float, default=0.0,
                    help="start all five grid circuits (wire_grid_circuits), this scale (0: off)")
    ap.add_argument("--export-ckpt", action="store_true",
                    help="write --ckpt-dir/last.pt as a checkpoint folder --out (for --init-from) and exit, with the "
                         "held-out accuracy on --eval-tasks (--final-n items; 0: none) in its train_log.json")
    ap.add_argument("--freeze", default=None,
                    help="comma list of parts kept at their starting weights: vision, projector (see frozen_parts)")
    ap.add_argument("--world", choices=("grid", "scenes"), default="grid",
                    help="grid: 224-px grids (hae_lab.accuracy.tasks); scenes: 336-px scenes, 576 tokens per image "
                         "(hae_lab.accuracy.scenes; its tokens and numbered images implied)")
    ap.add_argument("--freeze-circuits", action="store_true",
                    help="with --wire-circuits: keep the wired weights fixed (freeze_wired); pass it on --resume too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_ckpt:
        if not args.ckpt_dir:
            ap.error("--export-ckpt needs --ckpt-dir")
        log = export_checkpoint(Path(args.ckpt_dir), Path(args.out))
        if args.final_n:  # the trainer's final evaluation, on --eval-tasks, for the exported step
            from transformers import AutoProcessor

            out = Path(args.out)
            model, processor = _build_model(out, None), AutoProcessor.from_pretrained(out)
            log["final_heldout"] = {t: round(evaluate(model, processor, t, args.final_n if t != "describe" else
                                                      max(1, args.final_n // 4), "cpu", prompt=prompt_format(out)), 4)
                                    for t in args.eval_tasks.split(",")}
            (out / "train_log.json").write_text(json.dumps(log, indent=1))
        print(f"wrote {args.out} (step {log['exported_at_step']}) {log.get('final_heldout', '')}")
        return
    train(Path(args.out), args.steps, args.batch_size, args.lr, args.seed, args.device, args.eval_every, args.eval_n,
          task_weights=json.loads(args.task_weights) if args.task_weights else None, pos_init=args.pos_init,
          init_from=args.init_from, transfer_from=args.transfer_from, eval_tasks=tuple(args.eval_tasks.split(",")),
          stages=json.loads(args.stages) if args.stages else None,
          batch_sizes=json.loads(args.batch_sizes) if args.batch_sizes else None, ckpt_dir=args.ckpt_dir,
          ckpt_every=args.ckpt_every, resume=args.resume, warmup=args.warmup,
          text_overrides=json.loads(args.text_config) if args.text_config else None, final_n=args.final_n,
          run_name=args.run_name, stop_after=args.stop_after, keep_every=args.keep_every,
          patch_size=args.patch_size, grid_tokens=args.grid_tokens, numbered_images=args.numbered_images,
          align_cells=args.align_cells, wire_lookup=args.wire_lookup, wire_circuits=args.wire_circuits,
          freeze_circuits=args.freeze_circuits, freeze=args.freeze, world=args.world)


if __name__ == "__main__":
    main()
