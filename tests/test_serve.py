"""`vllm serve MODEL --kv-eviction hae` as a user types it: OpenAI API, /metrics, bad input."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from hae_lab.server import ServerError, image_data_url, vllm_server

pytestmark = pytest.mark.engine

VLLM = str(Path(sys.executable).parent / "vllm")
# `vllm serve` with a test-only delay after rendering (see the script): holds open the window in
# which a request rendered before validation strands a concurrent request's image.
LAUNCHER = [sys.executable, str(Path(__file__).parent / "serve_with_render_delay.py")]


@pytest.fixture(scope="module")
def server(llava_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--kv-eviction", "hae", "--kv-eviction-config", '{"budget": 0.5}', "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2}']
    try:
        with vllm_server(llava_path, args, log, timeout=240, launcher=LAUNCHER) as base:
            yield base, llava_path, log
    except ServerError as e:
        pytest.fail(str(e))


def _chat(base, model, extra=None, n_images=1, max_tokens=8, stream=False, first_image=0):
    content = [{"type": "image_url", "image_url": {"url": image_data_url(first_image + i)}} for i in range(n_images)]
    content.append({"type": "text", "text": "What do you see?"})
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if extra:
        body["vllm_xargs"] = extra
    return requests.post(base + "/v1/chat/completions", json=body, timeout=120, stream=stream)


def _metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_image_request_evicts_and_metrics_show_it(server):
    base, model, _ = server
    r = _chat(base, model)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    r = _chat(base, model, n_images=2, extra={"kv_eviction_budget": 0.4})
    assert r.status_code == 200, r.text
    time.sleep(1.5)
    m = requests.get(base + "/metrics").text
    assert _metric(m, "vllm:hae_freed_kv_blocks_total") > 0
    assert _metric(m, 'vllm:hae_evicted_tokens_total{engine="0",modality="visual"}') > 0
    assert "vllm:kv_cache_usage_perc" in m


def test_second_chat_turn_continues_from_the_kept_cache(server):
    """A chat client re-sends the conversation: the second turn is served from the cache the
    first turn's eviction left (vllm:hae_session_hits_total), not recomputed."""
    base, model, _ = server
    before = _metric(requests.get(base + "/metrics").text, "vllm:hae_session_hit_tokens_total")
    first = [{"type": "image_url", "image_url": {"url": image_data_url(41)}}, {"type": "text", "text": "What do you see?"}]
    messages = [{"role": "user", "content": first}]
    r = requests.post(base + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    messages += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And what colour is it?"}]
    r = requests.post(base + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    time.sleep(1.5)
    after = _metric(requests.get(base + "/metrics").text, "vllm:hae_session_hit_tokens_total")
    assert after - before >= 256, "the second turn recomputed the image instead of continuing"


@pytest.mark.parametrize(
    "knobs,needle",
    [
        ({"kv_eviction_budget": 2.0}, "budget"),
        ({"kv_eviction_budget": "lots"}, "budget"),
        ({"kv_eviction": "magic"}, "not a method"),
        ({"kv_eviction_sinks": 3}, "unknown per-request knob"),
        ({"kv_eviction_recent_tokens": -1}, "recent_tokens"),
    ],
)
def test_bad_per_request_knob_is_http_400(server, knobs, needle):
    base, model, _ = server
    r = _chat(base, model, extra=knobs)
    assert r.status_code == 400, r.text
    assert needle in r.text
    # The server is still healthy afterwards.
    assert _chat(base, model, max_tokens=2).status_code == 200


def test_bad_knob_names_the_knob(server):
    base, model, _ = server
    r = _chat(base, model, extra={"kv_eviction": "snapkv", "kv_eviction_budget": 2.0})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "vllm_xargs.kv_eviction_budget"
    assert "kv_eviction_budget" in err["message"]


@pytest.mark.parametrize("knobs", [{"kv_eviction_budget": 2.0}, {"kv_eviction": "magic"}])
def test_bad_knob_on_a_stream_is_http_400_before_any_data(server, knobs):
    """vLLM refuses invalid parameters of a streaming request with a 400 before the stream
    starts; eviction knobs must not be the exception (no 200 with an SSE error event)."""
    base, model, _ = server
    r = _chat(base, model, extra=knobs, stream=True)
    body = r.content.decode()
    assert r.status_code == 400, body
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "data:" not in body
    assert r.json()["error"]["param"].startswith("vllm_xargs.")


def test_refused_request_does_not_strand_a_concurrent_image(server):
    """Regression (P0/P1 multimodal cache drift, HTTP 500): request A carries an image and a bad
    knob, request B the same image and good knobs, B sent while A is between rendering and
    refusal (held open by the test launcher's render delay).  Refusing A before rendering leaves
    the image unmarked, so B carries its data; refusing A after rendering made B a 500."""
    base, model, _ = server
    for seed in (9101, 9102):  # images no other test sent
        results = {}

        def send_a():
            results["a"] = _chat(base, model, first_image=seed, extra={"kv_eviction_budget": 2.0,
                                                                        "test_render_delay_s": 4})

        t = threading.Thread(target=send_a)
        t.start()
        time.sleep(1.0)
        b = _chat(base, model, first_image=seed, extra={"kv_eviction_budget": 0.5})
        t.join()
        assert results["a"].status_code == 400, results["a"].text
        assert b.status_code == 200, b.text
    assert _chat(base, model, max_tokens=2).status_code == 200


def _drift(base, model, seed, stream=False):
    """Image ``seed`` sent once (both multimodal caches hold it), then again with the engine's
    cache emptied after rendering: the API process sends it without data, the engine misses it."""
    first = _chat(base, model, first_image=seed)
    assert first.status_code == 200, first.text
    again = _chat(base, model, first_image=seed, extra={"test_drop_engine_mm_cache": 1}, stream=stream)
    return first, again


def _streamed_text(r):
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_multimodal_cache_drift_is_resubmitted(server):
    """vLLM's P0/P1 cache drift (the engine lost an image the API process sent without data),
    forced deterministically: re-rendered with the image and re-submitted server-side, the
    request answers 200 with the tokens it gets without drift, streaming or not."""
    base, model, log = server
    first, again = _drift(base, model, 9301)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    first, again = _drift(base, model, 9302, stream=True)
    assert again.status_code == 200
    assert _streamed_text(again) == first.json()["choices"][0]["message"]["content"]
    assert "rendered again with its data and re-submitted" in log.read_text()


def test_multimodal_cache_drift_without_resubmission_is_a_500(llava_path, tmp_path):
    """The same drift with HAE_VLLM_MM_RESUBMIT=0 (vLLM's own handling): a 500, and a 200 stream
    carrying an error event.  What the resubmission removes."""
    args = ["--kv-eviction", "hae", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    try:
        with vllm_server(llava_path, args, tmp_path / "old.log", timeout=240, launcher=LAUNCHER,
                         env={"HAE_VLLM_MM_RESUBMIT": "0"}) as base:
            _, again = _drift(base, llava_path, 9303)
            assert again.status_code == 500, again.text
            _, again = _drift(base, llava_path, 9304, stream=True)
            assert again.status_code == 200 and b'"error"' in again.content
    except ServerError as e:
        pytest.fail(str(e))


def test_help_lists_the_flag():
    out = subprocess.run([VLLM, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KVEviction" in out.stdout
    out = subprocess.run([VLLM, "serve", "--help=kv-eviction"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--kv-eviction {fastv,h2o,hae,madakv,none,random,snapkv,streamingllm}" in out.stdout
    assert "--kv-eviction-config" in out.stdout


# Two cases through the real command (argparse's check, and the config layer every other bad
# setting goes through: its messages are tests/test_config.py's); each costs a vLLM import.
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--kv-eviction", "bogus"], "invalid choice"),
        (["--kv-eviction", "hae", "--kv-eviction-config", '{"nonsense": 1}'], "unknown kv eviction setting"),
    ],
)
def test_bad_flags_fail_at_startup(llava_path, args, needle):
    out = subprocess.run([VLLM, "serve", llava_path, "--max-model-len", "1024", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert needle in out.stdout + out.stderr


def test_readme_serve_command_works_as_typed(llava_path, tmp_path):
    """`vllm serve MODEL --kv-eviction hae`, nothing else and no VLLM_CPU_KVCACHE_SPACE: vLLM's
    default CPU memory share does not fit many machines (ours included); eviction picks one
    that does and says so."""
    log = tmp_path / "typed.log"
    try:
        with vllm_server(llava_path, ["--kv-eviction", "hae"], log, timeout=300, kv_space_gib=None) as base:
            assert _chat(base, llava_path, max_tokens=2).status_code == 200
    except ServerError as e:
        pytest.fail(str(e))
    text = log.read_text()
    assert "hae_vllm: --kv-eviction hae with no --block-size: using block size 32" in text
