"""The catalogue of bad input: every case fails at start-up with a message that says what to do
(or is refused per request with HTTP 400: tests/test_serve.py)."""

import json

import pytest

import hae_vllm
from hae_vllm.config import EvictionConfigError

EngineArgs = pytest.importorskip("vllm.engine.arg_utils").EngineArgs


def _engine_args(model, **kw):
    import hae_vllm.plugin

    hae_vllm.plugin.register()
    return EngineArgs(model=str(model), max_model_len=512, **kw)


def test_speculative_decoding_refused(llava_path):
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"),
                      speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(EvictionConfigError, match="speculative decoding"):
        ea.create_engine_config()


def test_quantised_kv_cache_refused(llava_path):
    """fp8 with per-token-head scales keeps scales beside the bytes: refused (plain fp8 is
    accepted, tests/test_fp8.py)."""
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), kv_cache_dtype="fp8_per_token_head")
    with pytest.raises(EvictionConfigError, match="per-layer-scaled fp8"):
        ea.create_engine_config()


@pytest.mark.parametrize("kv_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_allowed(llava_path, kv_dtype):
    cfg = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"),
                       kv_cache_dtype=kv_dtype).create_engine_config()
    assert cfg.cache_config.cache_dtype == kv_dtype
    assert cfg.scheduler_config.scheduler_cls == "hae_vllm.engine.scheduler.EvictionScheduler"


def test_pipeline_parallel_refused(llava_path):
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), pipeline_parallel_size=2)
    with pytest.raises(EvictionConfigError, match="pipeline parallelism"):
        ea.create_engine_config()


@pytest.mark.parametrize("field", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallel_refused(llava_path, field):
    """Context parallelism shards tokens over ranks by logical position (vLLM's DCP context
    split; FlashInfer reads per-rank lengths the runner computes from the unstripped ones)."""
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), **{field: 2})
    with pytest.raises(EvictionConfigError, match="context parallelism.*--" + field.replace("_", "-")):
        ea.create_engine_config()


def test_unquantised_explicit_kv_dtype_allowed(llava_path):
    cfg = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), kv_cache_dtype="float16",
                       dtype="float16").create_engine_config()
    assert cfg.scheduler_config.scheduler_cls == "hae_vllm.engine.scheduler.EvictionScheduler"


def test_custom_scheduler_refused(llava_path):
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), scheduler_cls="my.Scheduler")
    with pytest.raises(EvictionConfigError, match="scheduler"):
        ea.create_engine_config()


def test_async_scheduling_refused(llava_path):
    ea = _engine_args(llava_path, additional_config=hae_vllm.kv_eviction("hae"), async_scheduling=True)
    with pytest.raises(EvictionConfigError, match="no-async-scheduling"):
        ea.create_engine_config()


def _tiny_text_model(tmp_path, **config):
    """A config-only checkpoint: start-up checks run before any weight is read."""
    from hae_lab.tiny_models import tiny_model_path

    src = tiny_model_path("llava")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=512, max_position_embeddings=1024, torch_dtype="float32")
    base.update(config)
    (tmp_path / "config.json").write_text(json.dumps(base))
    return tmp_path


def test_sliding_window_model_refused(tmp_path):
    model = _tiny_text_model(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    ea = _engine_args(model, additional_config=hae_vllm.kv_eviction("hae"))
    with pytest.raises(EvictionConfigError, match="sliding-window"):
        ea.create_engine_config()


def test_alibi_model_refused(tmp_path):
    model = _tiny_text_model(tmp_path, architectures=["BloomForCausalLM"], model_type="bloom", n_head=2, n_layer=2)
    ea = _engine_args(model, additional_config=hae_vllm.kv_eviction("hae"))
    with pytest.raises(EvictionConfigError, match="ALiBi"):
        ea.create_engine_config()


def test_text_only_model_runs_without_eviction_with_warning(tmp_path, caplog):
    model = _tiny_text_model(tmp_path, architectures=["LlamaForCausalLM"], model_type="llama")
    ea = _engine_args(model, additional_config=hae_vllm.kv_eviction("hae"))
    with caplog.at_level("WARNING", logger="hae_vllm"):
        ea.create_engine_config()
    assert "not multimodal" in caplog.text


def test_unknown_method_in_additional_config(llava_path):
    ea = _engine_args(llava_path, additional_config={"kv_eviction": {"method": "zip"}})
    with pytest.raises(EvictionConfigError, match="unknown kv eviction method"):
        ea.create_engine_config()


def test_eviction_off_changes_nothing(llava_path):
    """With the plugin loaded but eviction off, no setting is touched."""
    ea = _engine_args(llava_path)
    cfg = ea.create_engine_config()
    assert cfg.scheduler_config.scheduler_cls is None or "hae_vllm" not in str(cfg.scheduler_config.scheduler_cls)
