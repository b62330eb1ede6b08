"""Two engines in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each engine's attention
reaches its own eviction runtime, never the other's.

vLLM's attention backends have no handle on their model runner, so the eviction backends find
the runtime through the process (``hae_vllm.worker.runtime.activate``, called at the start of
every step).  Here an evicting engine and a plain one step in alternation; the evicting
engine's decode scoring, parks, restores and tokens must be exactly those of the same request
in an engine alone in its process."""

import json
import os
import sys
from dataclasses import asdict

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, launcher, run_in_subprocess

REQ = RequestSpec(text="Tell me a long story about this picture.", images=[77], max_tokens=72)
# Decode eviction from the first steps (no prefill eviction), scored every 4 steps.
EVICTION = {"method": "hae", "budget": 1.0, "decode_budget": 0.5, "decode_start": 0, "score_interval": 4, "bin_capacity": 1,
            "rescore_interval": 8}

SCRIPT = r"""
import json, sys
from dataclasses import replace
from hae_vllm.testing.scenario import (RequestSpec, _engine, _round, _sampling_params, _TraceReader, build_prompt,
                                       spec_from_dict)

spec = spec_from_dict(json.loads(sys.argv[1]))
trace = sys.argv[2]
evicting, kind, path, _ = _engine(spec, trace)
plain, _, _, _ = _engine(replace(spec, eviction=None), None)
other = [RequestSpec("Describe this picture.", [5], max_tokens=200)]
plain.enqueue(build_prompt(kind, other[0], path), _sampling_params(replace(spec, requests=other)), use_tqdm=False)

def pause():  # the plain engine runs two steps between every two of the evicting engine's
    for _ in range(2):
        if plain.llm_engine.has_unfinished_requests():
            plain.llm_engine.step()

rec = _round(evicting, kind, spec, spec.requests, None, _TraceReader(trace), path, slice_steps=2, pause=pause)
print("@@" + json.dumps(rec["results"][0]))
"""


def test_an_evicting_engine_beside_a_plain_one_in_one_process(tmp_path):
    spec = ScenarioSpec(model="llava", requests=[REQ], eviction=EVICTION, logprobs=True)
    alone = run_in_subprocess(spec)["results"][0]
    assert sum(1 for e in alone["decode_events"] if e["kind"] == "park") >= 2, "the request parks (test premise)"

    proc = launcher()([sys.executable, "-c", SCRIPT, json.dumps(asdict(spec)), str(tmp_path / "trace.jsonl")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    beside = json.loads(lines[-1][2:])
    def events(res):  # request ids carry a random suffix
        return [{k: v for k, v in e.items() if k != "request_id"} for e in res["decode_events"]]

    assert events(beside) == events(alone)
    assert beside["token_ids"] == alone["token_ids"]
    assert max(abs(a - b) for a, b in zip(beside["logprobs"], alone["logprobs"])) < 1e-5
