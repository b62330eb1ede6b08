"""Eviction counters mirrored into Prometheus: increments once, however often a step repeats;
they arrive through vLLM's stat logger plugin group (``vllm serve``) and, offline, through the
logger hae_vllm.patches.metrics hands the LLMEngine."""

import json
import sys
import textwrap
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from hae_vllm.metrics import STATS_KEY, observe
from hae_vllm.testing.scenario import launcher  # the suite's launcher (tests/conftest.py)


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


# ---------------------------------------------------------------- the stat logger plugin
def _no_prometheus_logger():
    """vLLM's PrometheusStatLogger needs a model config; a subclass that skips it stands in
    (StatLoggerManager then adds no PrometheusStatLogger of its own)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class NoPrometheus(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None):
            self.engine_indexes = engine_indexes

        def record(self, *args, **kwargs):
            pass

        def log_engine_initialized(self):
            pass

    return NoPrometheus


def test_entry_point_gives_the_stat_logger():
    from vllm.v1.metrics.loggers import load_stat_logger_plugin_factories

    from hae_vllm.metrics import EvictionStatLogger

    assert EvictionStatLogger in load_stat_logger_plugin_factories()


def test_plugin_logger_runs_before_vllms_own(caplog):
    """As AsyncLLM builds it: plugin loggers first, then vLLM's LoggingStatLogger, which fails
    on any kv_connector_stats when no KV connector is configured, so it must never see ours."""
    import logging

    from vllm.config import VllmConfig
    from vllm.v1.metrics.loggers import LoggingStatLogger, StatLoggerManager, load_stat_logger_plugin_factories
    from vllm.v1.metrics.stats import SchedulerStats

    from hae_vllm.metrics import EvictionStatLogger

    caplog.set_level(logging.INFO, logger="vllm.v1.metrics.loggers")  # vLLM adds LoggingStatLogger at INFO
    eng = 919
    manager = StatLoggerManager(VllmConfig(), engine_idxs=[eng],
                                custom_stat_loggers=load_stat_logger_plugin_factories() + [_no_prometheus_logger()])
    manager.log_engine_initialized()
    first = manager.stat_loggers[0]
    assert isinstance(first.per_engine_stat_loggers[eng], EvictionStatLogger)
    assert any(isinstance(x, LoggingStatLogger) for a in manager.stat_loggers[1:]
               for x in getattr(a, "per_engine_stat_loggers", {}).values())
    stats = SchedulerStats(kv_connector_stats={STATS_KEY: dict(freed_blocks=3, evicted_visual_tokens=48)})
    manager.record(stats, None, engine_idx=eng)  # LoggingStatLogger would raise on our payload
    assert stats.kv_connector_stats is None
    assert _value("vllm:hae_freed_kv_blocks_total", engine=str(eng)) == 3
    assert _value("vllm:hae_evicted_tokens_total", engine=str(eng), modality="visual") == 48


def test_logger_registers_its_metrics_again_after_vllm_unregisters_them():
    """A second engine in one process: its PrometheusStatLogger unregisters every ``vllm:``
    collector (ours included); its logger starts the engine's counters from zero."""
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    from hae_vllm.metrics import EvictionStatLogger

    eng = 920
    observe(_stats(freed_blocks=4), eng)
    assert _value("vllm:hae_freed_kv_blocks_total", engine=str(eng)) == 4
    unregister_vllm_metrics()
    assert REGISTRY.get_sample_value("vllm:hae_freed_kv_blocks_total", {"engine": str(eng)}) is None
    logger = EvictionStatLogger(None, eng)  # a new engine: its scheduler counts from 0 again
    logger.log_engine_initialized()
    logger.record(_stats(freed_blocks=1), None, engine_idx=eng)
    assert _value("vllm:hae_freed_kv_blocks_total", engine=str(eng)) == 5


def test_offline_engine_gets_the_logger_first():
    """hae_vllm.patches.metrics: LLMEngine (which loads no stat logger plugins) is handed ours,
    before any logger the caller passed."""
    from hae_vllm.metrics import EvictionStatLogger
    from hae_vllm.patches import is_patched
    from hae_vllm.patches.metrics import patch___init__

    class Engine:  # LLMEngine.__init__'s shape (tests/test_patch_pins.py pins it)
        def __init__(self, vllm_config, executor_class, log_stats, aggregate_engine_logging=False,
                     usage_context=None, stat_loggers=None, multiprocess_mode=False):
            self.stat_loggers = stat_loggers

    patch___init__(Engine)
    assert is_patched(Engine.__init__)
    assert Engine(None, None, True).stat_loggers == [EvictionStatLogger]
    mine = object()
    assert Engine(None, None, True, stat_loggers=[mine]).stat_loggers == [EvictionStatLogger, mine]
    assert Engine(None, None, False, None, None, [EvictionStatLogger]).stat_loggers == [EvictionStatLogger]


# ---------------------------------------------------------------- engines (API process = this child)
_CHILD = textwrap.dedent("""
    import asyncio, json, sys, time
    from prometheus_client import REGISTRY, generate_latest
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import LoggingStatLogger
    from hae_vllm.metrics import EvictionStatLogger
    from hae_vllm.testing.scenario import RequestSpec, build_prompt

    path = sys.argv[1]
    common = dict(model=path, dtype="float32", max_model_len=2048, enforce_eager=True,
                  limit_mm_per_prompt={"image": 1},
                  additional_config={"kv_eviction": {"method": "hae", "budget": 0.5}})
    prompt = build_prompt("llava", RequestSpec(text="Describe the picture please.", images=[41]), path)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def loggers(manager):
        return [type(x).__name__ for a in manager.stat_loggers
                for x in getattr(a, "per_engine_stat_loggers", {0: a}).values()]

    def freed():
        return REGISTRY.get_sample_value("vllm:hae_freed_kv_blocks_total", {"engine": "0"}) or 0.0

    out = {}

    async def serve():
        # As `vllm serve --disable-log-stats` builds it: plugin loggers still run.
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(disable_log_stats=True, **common))
        try:
            out["async_loggers"] = loggers(engine.logger_manager)
            async for _ in engine.generate(prompt, params, request_id="a0"):
                pass
            await asyncio.sleep(1.0)
        finally:
            engine.shutdown()
        out["async_freed"] = freed()
        out["exposition"] = "vllm:hae_freed_kv_blocks_total" in generate_latest(REGISTRY).decode()

    asyncio.run(serve())
    import os
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the offline engine core in this process
    llm = LLM(disable_log_stats=False, **common)  # a second engine in this process
    out["offline_loggers"] = loggers(llm.llm_engine.logger_manager)
    llm.generate([prompt], params, use_tqdm=False)
    out["offline_freed"] = freed()
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.engine
def test_counters_arrive_through_the_plugin_logger(llava_path):
    proc = launcher()([sys.executable, "-c", _CHILD, llava_path], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    # API process: the plugin logger is the manager's first, vLLM's logging logger is off
    # (--disable-log-stats), and the counters reached the Prometheus exposition.
    assert out["async_loggers"][0] == "EvictionStatLogger", out
    assert "LoggingStatLogger" not in out["async_loggers"], out
    assert out["async_freed"] > 0 and out["exposition"], out
    # Offline: the patched LLMEngine puts the logger before vLLM's own, and a second engine's
    # counters still reach the registry (its PrometheusStatLogger unregistered ours first).
    assert out["offline_loggers"][0] == "EvictionStatLogger" and "LoggingStatLogger" in out["offline_loggers"], out
    assert out["offline_freed"] > out["async_freed"], out
