"""Offline ``LLM``: a bad eviction knob anywhere in a batch raises before any prompt of the batch
is rendered or queued, and the engine carries on."""

import json
import sys

import pytest

from hae_vllm.testing.scenario import launcher  # the suite's launcher (tests/conftest.py)

pytestmark = pytest.mark.engine

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError
from hae_vllm.testing.scenario import RequestSpec, build_prompt

llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=1024, enforce_eager=True, block_size=32,
          additional_config={"kv_eviction": {"method": "hae", "budget": 0.5}})
prompts = [build_prompt("llava", RequestSpec(text="Describe it.", images=[s])) for s in (71, 72)]
good = SamplingParams(max_tokens=4, temperature=0)
bad = SamplingParams(max_tokens=4, temperature=0, extra_args={"kv_eviction_budget": 2.0})
out = {}
try:
    llm.generate(prompts, [good, bad], use_tqdm=False)
    out["raised"] = None
except VLLMValidationError as e:
    out["raised"] = str(e)
    out["parameter"] = e.parameter
out["unfinished"] = llm.llm_engine.get_num_unfinished_requests()
cache = llm.llm_engine.renderer.mm_processor_cache
# The P0 multimodal cache stores an item when a prompt is rendered: nothing was.
out["p0_items"] = None if cache is None or not hasattr(cache, "_cache") else len(cache._cache)
res = llm.generate(prompts, good, use_tqdm=False)
out["after"] = [len(r.outputs[0].token_ids) for r in res]
print("@@" + json.dumps(out))
"""


def test_bad_knob_in_a_batch_raises_before_anything_is_queued(llava_path):
    proc = launcher()([sys.executable, "-c", SCRIPT, llava_path], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][2:])
    assert out["raised"] and "kv_eviction_budget" in out["raised"], out
    assert out["parameter"] == "vllm_xargs.kv_eviction_budget"
    assert out["unfinished"] == 0
    assert out["p0_items"] in (0, None), out
    assert out["after"] == [4, 4]
