"""`vllm serve MODEL --kv-eviction hae --data-parallel-size 2`: two engine cores behind one API
server (vLLM's own load balancing).  Eviction runs in both, both export their metrics, no block
is leaked, and a sample of requests matches the HF oracle with the engine's evictions removed."""

import json
import threading
import time

import pytest
import requests

from hae_lab.server import ServerError, image_data_url, vllm_server

pytestmark = pytest.mark.engine

QUESTION = "What do you see?"


def _metric_by_engine(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'engine="' in line:
            eng = line.split('engine="', 1)[1].split('"', 1)[0]
            out[eng] = out.get(eng, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def dp_run(llava_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    trace = tmp / "trace.jsonl"
    args = ["--kv-eviction", "hae", "--kv-eviction-config", json.dumps({"budget": 0.5, "trace_path": str(trace)}),
            "--data-parallel-size", "2", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
            "--max-num-seqs", "4"]
    results: dict[int, requests.Response] = {}
    try:
        with vllm_server(llava_path, args, tmp / "server.log", timeout=420,
                         env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}) as base:
            def send(seed):
                body = {"model": llava_path, "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image_data_url(seed)}},
                            {"type": "text", "text": QUESTION}]}]}
                results[seed] = requests.post(base + "/v1/chat/completions", json=body, timeout=300)

            threads = [threading.Thread(target=send, args=(9500 + i,)) for i in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            time.sleep(2.0)
            metrics = requests.get(base + "/metrics").text
    except ServerError as e:
        pytest.fail(str(e))
    records = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    return results, metrics, records, (tmp / "server.log").read_text()


def test_both_engine_cores_evict(dp_run):
    results, metrics, records, _ = dp_run
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    freed = _metric_by_engine(metrics, "vllm:hae_freed_kv_blocks_total")
    assert set(freed) == {"0", "1"} and all(v > 0 for v in freed.values()), freed
    assert len({r["request_id"] for r in records if r["kind"] == "prefill"}) == len(results)


def test_no_block_is_leaked(dp_run):
    _, metrics, _, _ = dp_run
    usage = _metric_by_engine(metrics, "vllm:kv_cache_usage_perc")
    assert set(usage) == {"0", "1"} and all(v == 0.0 for v in usage.values()), usage


def test_a_sample_matches_the_oracle(dp_run, oracle_for, llava_path):
    from transformers import AutoTokenizer

    from hae_lab.tiny_models import make_test_image

    results, _, records, _ = dp_run
    oracle = oracle_for(llava_path)
    tok = AutoTokenizer.from_pretrained(llava_path)
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                     tokenize=False, add_generation_prompt=True)
    if tok.bos_token and prompt.startswith(tok.bos_token):
        prompt = prompt[len(tok.bos_token):]  # the processor adds it
    checked = 0
    for seed in sorted(results)[:3]:
        body = results[seed].json()
        (rec,) = [r for r in records if r["kind"] == "prefill" and r["request_id"].startswith(body["id"])]
        ref = oracle.generate(prompt, [make_test_image(seed, 224)], body["usage"]["completion_tokens"],
                              rec["evicted_positions"])
        assert len(ref.prompt_token_ids) == body["usage"]["prompt_tokens"]
        assert tok.decode(ref.token_ids, skip_special_tokens=True) == body["choices"][0]["message"]["content"]
        checked += 1
    assert checked == 3
