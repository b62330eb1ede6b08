"""The CPU memory share eviction picks when the user chose none (hae_vllm.patches.engine_args)."""

from types import SimpleNamespace

import pytest

engine_args_mod = pytest.importorskip("hae_vllm.patches.engine_args")
GiB = 1 << 30


def _args(**kw):
    base = dict(kv_cache_memory_bytes=None, gpu_memory_utilization=0.92)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def node(monkeypatch):
    """Pretend the first NUMA node has ``total``/``available`` bytes (the reference machine's
    reading: 13.59 GiB, 11.79 available)."""
    import vllm.utils.cpu_resource_utils as cru

    state = {"total": int(13.59 * GiB), "available": int(11.79 * GiB)}
    monkeypatch.setattr(cru, "get_memory_node_info",
                        lambda node_id=0: SimpleNamespace(total_memory=state["total"], available_memory=state["available"]))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return state


def test_kv_size_chosen_to_fit_the_node(node):
    a = _args()
    engine_args_mod._fit_cpu_memory(a)
    # Half of what is left once the engine processes started, in whole 256 MiB.
    assert a.kv_cache_memory_bytes == 4.75 * GiB
    assert a.kv_cache_memory_bytes + engine_args_mod._CPU_START_HEADROOM <= node["available"]
    assert a.gpu_memory_utilization == 0.92


@pytest.mark.parametrize("change", [
    {"args": {"gpu_memory_utilization": 0.5}},          # the user chose a share
    {"args": {"kv_cache_memory_bytes": 2 * GiB}},      # ... or a KV size
    {"env": "2"},                                      # ... or VLLM_CPU_KVCACHE_SPACE
    {"node": (64 * GiB, 62 * GiB)},                    # vLLM's default fits: left alone
])
def test_left_alone(node, monkeypatch, change):
    a = _args(**change.get("args", {}))
    before = dict(vars(a))
    if "env" in change:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", change["env"])
    if "node" in change:
        node["total"], node["available"] = change["node"]
    engine_args_mod._fit_cpu_memory(a)
    assert vars(a) == before
