"""`vllm serve MODEL --kv-eviction hae` as a user types it: OpenAI API, /metrics, bad input."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from hae_vllm.testing.server import ServerError, image_data_url, vllm_server

pytestmark = pytest.mark.engine

VLLM = str(Path(sys.executable).parent / "vllm")


@pytest.fixture(scope="module")
def server(llava_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--kv-eviction", "hae", "--kv-eviction-config", '{"budget": 0.5}', "--dtype", "float32",
            "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2}']
    try:
        with vllm_server(llava_path, args, log, timeout=240) as base:
            yield base, llava_path, log
    except ServerError as e:
        pytest.fail(str(e))


def _chat(base, model, extra=None, n_images=1, max_tokens=8):
    content = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in range(n_images)]
    content.append({"type": "text", "text": "What do you see?"})
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0}
    if extra:
        body["vllm_xargs"] = extra
    return requests.post(base + "/v1/chat/completions", json=body, timeout=120)


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


def test_help_lists_the_flag():
    out = subprocess.run([VLLM, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KVEviction" in out.stdout
    out = subprocess.run([VLLM, "serve", "--help=kv-eviction"], capture_output=True, text=True, timeout=120)
    assert "--kv-eviction {" in out.stdout
    out = subprocess.run([VLLM, "serve", "--help=all"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--kv-eviction {fastv,h2o,hae,madakv,none,random,snapkv,streamingllm}" in out.stdout
    assert "--kv-eviction-config" in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--kv-eviction", "bogus"], "invalid choice"),
        (["--kv-eviction", "hae", "--kv-eviction-config", "{not json"], "not valid JSON"),
        (["--kv-eviction", "hae", "--kv-eviction-config", '{"budget": 0}'], "budget"),
        (["--kv-eviction", "hae", "--kv-eviction-config", "no_such_preset"], "no such file"),
        (["--kv-eviction", "hae", "--kv-eviction-config", '{"nonsense": 1}'], "unknown kv eviction setting"),
    ],
)
def test_bad_flags_fail_at_startup(llava_path, args, needle):
    out = subprocess.run([VLLM, "serve", llava_path, "--max-model-len", "1024", *args],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert needle in out.stdout + out.stderr
