"""Video inputs on the tiny Qwen2-VL: eviction of video tokens, against the HF oracle.

A video's tokens carry M-RoPE positions with a temporal component (one step per pair of
frames) besides height and width; keys are stored after RoPE, so evicting some of them and
compacting the rest must leave every survivor's rotation as it was, and text after the video
must continue at the model's rope delta.  One engine (float32, hae at budget 0.5, chunks of 96
tokens) runs a batch mixing a video request, a video request with a decode budget (parks and
restores), one request with an image and a video, and an image request.  Checks:

* the visual mask covers video tokens: every ``<|video_pad|>`` (and ``<|image_pad|>``)
  position counts as visual and nothing else is evicted by the visual-only method;
* every request replays on the HF oracle (its processor and M-RoPE positions for
  ``video_grid_thw``) with the engine's eviction events: float32 tokens and log-probs;
* the same replays fail with the eviction set shifted by one, and on an oracle whose video
  tokens all share one temporal position: a pass needs the right positions removed and the
  right temporal rotations kept.
"""

import pytest
import torch

from hae_vllm.selfcheck import shift_positions
from hae_vllm.testing.oracle import HFOracle, MaskedReplay, Tolerance, compare_with_oracle, events_from_trace
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, build_prompt, run_in_subprocess

pytestmark = pytest.mark.engine

DECODE = {"kv_eviction_decode_budget": 0.5, "kv_eviction_decode_start": 0, "kv_eviction_bin_capacity": 2, "kv_eviction_rescore_interval": 4,
          "kv_eviction_restore_margin": 0.5}
REQS = [
    RequestSpec(text="What happens in this video?", videos=[11], max_tokens=16),
    RequestSpec(text="Tell me a long story about this clip.", videos=[12], max_tokens=48, extra_args=DECODE),
    RequestSpec(text="Is the picture a frame of the video?", images=[13], videos=[14], video_frames=4,
                max_tokens=16),
    RequestSpec(text="Describe the picture please.", images=[15], max_tokens=16),
    # 30 frames: 15 temporal patches, more than the 8 spatial ones, where transformers' own
    # M-RoPE positions for the text after a video part from the reference (see the oracle).
    RequestSpec(text="What happens in this long video?", videos=[16], video_frames=30, max_tokens=12),
]
VIDEO_TOKENS = (256, 256, 128, 0, 960)  # 30, 8 or 4 frames of 224 x 224: 64 tokens per pair of frames


@pytest.fixture(scope="module")
def record():
    return run_in_subprocess(ScenarioSpec(model="qwen2vl", requests=REQS, eviction={"method": "hae", "budget": 0.5},
                                          max_num_batched_tokens=96, max_num_seqs=4))


@pytest.fixture(scope="module")
def oracle(record):
    return HFOracle(record["model_path"])


def media(record, i):
    p = build_prompt(record["model_kind"], REQS[i])
    out = []
    for kind in ("image", "video"):
        m = p.get("multi_modal_data", {}).get(kind, [])
        out += m if isinstance(m, list) else [m]
    return p["prompt"], out


def agreements(oracle, record, corrupt=None):
    out = []
    replay = MaskedReplay(oracle)
    for i, r in enumerate(record["results"]):
        prompt, mm = media(record, i)
        events = events_from_trace(r["evictions"] + r["decode_events"])
        if corrupt is not None:
            events = corrupt(events)
        ref = replay.generate(prompt, mm, len(r["token_ids"]), events, follow=r["token_ids"])
        out.append(compare_with_oracle(r, ref, Tolerance.for_dtype("float32")))
    return out


def token_positions(record, i, token: str) -> set[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(record["model_path"])
    tid = tok.convert_tokens_to_ids(token)
    return {p for p, t in enumerate(record["results"][i]["prompt_token_ids"]) if t == tid}


def test_visual_mask_covers_video_tokens(record):
    for i, r in enumerate(record["results"]):
        video = token_positions(record, i, "<|video_pad|>")
        image = token_positions(record, i, "<|image_pad|>")
        assert len(video) == VIDEO_TOKENS[i]
        ev = r["eviction"]
        assert ev is not None and ev["evicted_positions"], f"request {i} should evict"
        assert ev["num_visual_tokens"] == len(video) + len(image)
        if i != 1:  # the decode request parks text too, but prefill eviction is visual only
            assert set(ev["evicted_positions"]) <= video | image
    assert set(record["results"][0]["eviction"]["evicted_positions"]) & token_positions(record, 0, "<|video_pad|>")
    kinds = {e["kind"] for e in record["results"][1]["decode_events"]}
    assert {"park", "restore"} <= kinds, f"the decode request should park and restore, got {kinds}"
    assert record["free_blocks_after"] == record["free_blocks_before"], "blocks leaked"


def test_video_replays_on_oracle(record, oracle):
    for i, a in enumerate(agreements(oracle, record)):
        assert a.ok, f"request {i}: {a.problem}"
        assert a.compared == a.num_tokens


def test_video_wrong_evictions_fail(record, oracle):
    wrong = agreements(oracle, record, corrupt=shift_positions)
    assert [i for i, a in enumerate(wrong) if a.ok] == []


class FlatTimeOracle(HFOracle):
    """The oracle with every video token's temporal M-RoPE position set to its video's first
    (what a model that ignored the frames' times would compute)."""

    def __init__(self, path):
        super().__init__(path)
        inner = self.model.model
        original = inner.get_rope_index

        def get_rope_index(input_ids, mm_token_type_ids, *args, **kwargs):
            pos, deltas = original(input_ids, mm_token_type_ids, *args, **kwargs)
            pos = pos.clone()
            for b in range(pos.shape[1]):
                video = (mm_token_type_ids[b] == 2).nonzero().flatten()
                # Runs of consecutive video tokens are one video each.
                runs = torch.tensor_split(video, (torch.diff(video) > 1).nonzero().flatten() + 1)
                for run in runs:
                    if len(run):
                        pos[0, b, run] = int(pos[0, b, run[0]])
            return pos, deltas

        inner.get_rope_index = get_rope_index


def test_video_flat_temporal_positions_fail(record):
    flat = agreements(FlatTimeOracle(record["model_path"]), record)
    assert [i for i, a in enumerate(flat) if a.ok] == [3], "only the image request may agree"


def test_long_video_needs_reference_positions(record, oracle):
    """transformers' stock ``get_rope_index`` (what the oracle wraps) gives the text after the
    30-frame video other positions than vLLM and the Qwen2-VL reference; replayed with it, that
    request disagrees while the others still agree."""
    inner = oracle.model.model
    fixed = inner.get_rope_index
    inner.get_rope_index = fixed.__wrapped__
    try:
        stock = agreements(oracle, record)
    finally:
        inner.get_rope_index = fixed
    assert [i for i, a in enumerate(stock) if not a.ok] == [4]
