"""Eviction counters mirrored into Prometheus: increments once, however often a step repeats."""

from types import SimpleNamespace

from prometheus_client import REGISTRY

from hae_vllm.metrics import STATS_KEY, observe


def _value(name: str, **labels) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _stats(**counters):
    base = dict(evicted_visual_tokens=0, evicted_text_tokens=0, freed_blocks=0, evicted_requests=0,
                peak_blocks_in_use=0, parked_blocks=0, restored_blocks=0, released_blocks=0,
                lost_blocks=0, bin_occupancy=0, pressure_steps=0)
    base.update(counters)
    return SimpleNamespace(kv_connector_stats={STATS_KEY: base})


def test_observe_publishes_increments_and_skips_unchanged_steps():
    eng = 917  # an engine index no other test uses
    observe(_stats(freed_blocks=5, evicted_visual_tokens=100, peak_blocks_in_use=40), eng)
    observe(_stats(freed_blocks=5, evicted_visual_tokens=100, peak_blocks_in_use=40), eng)  # unchanged
    assert _value("vllm:hae_freed_kv_blocks_total", engine=str(eng)) == 5
    assert _value("vllm:hae_evicted_tokens_total", engine=str(eng), modality="visual") == 100
    assert _value("vllm:hae_peak_kv_blocks_in_use", engine=str(eng)) == 40
    observe(_stats(freed_blocks=8, evicted_visual_tokens=100, peak_blocks_in_use=41, bin_occupancy=3), eng)
    assert _value("vllm:hae_freed_kv_blocks_total", engine=str(eng)) == 8
    assert _value("vllm:hae_peak_kv_blocks_in_use", engine=str(eng)) == 41
    assert _value("vllm:hae_bin_occupancy_blocks", engine=str(eng)) == 3
    # A gauge going back down is published too (not mistaken for "unchanged").
    observe(_stats(freed_blocks=8, evicted_visual_tokens=100, peak_blocks_in_use=41, bin_occupancy=0), eng)
    assert _value("vllm:hae_bin_occupancy_blocks", engine=str(eng)) == 0


def test_observe_pops_its_payload():
    s = _stats(freed_blocks=1)
    observe(s, 918)
    assert s.kv_connector_stats is None  # vLLM's own loggers never see our dict
