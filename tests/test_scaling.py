"""benchmarks/scaling.py's arithmetic, without engines: prompt sizes, the log-log slope and the
summary its last line is made of (the engine runs are the benchmark itself)."""

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, mode, length, ratio, peak):
    return {"method": method, "mode": mode, "length": length, "prompt_tokens": length + 9, "ttft_ratio": ratio,
            "extra_peak_mib": peak}


def test_prompt_sizes_reach_the_asked_lengths(scaling):
    for n in (1000, 4000, 8000, 16000, 32000):
        tokens = scaling.units_for(n) * scaling.IMAGE_TOKENS + 20
        assert abs(tokens - n) <= scaling.IMAGE_TOKENS // 2 + 20
        frames = scaling.units_for(n, "video")
        assert frames % 2 == 0  # Qwen2-VL takes frames in pairs
        assert abs(frames * scaling.FRAME_TOKENS + 30 - n) <= scaling.FRAME_TOKENS + 30
    assert scaling.units_for(32000) * scaling.IMAGE_TOKENS >= 32000 - 20
    assert scaling.units_for(32000, "video") * scaling.FRAME_TOKENS >= 32000 - 30


def test_deeper_model_repeats_the_layers():
    """``--layers``: the tiny model with its decoder layers repeated (layer i = layer i mod 4),
    the vision tower and everything else as they were."""
    from safetensors.torch import load_file

    from hae_lab import tiny_models

    base = tiny_models.tiny_model_path("llava")
    deep = tiny_models.long_context_path("llava", 40960, 10)
    import json

    cfg = json.loads((deep / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 10
    assert cfg["text_config"]["max_position_embeddings"] == 40960
    w0, w = load_file(str(base / "model.safetensors")), load_file(str(deep / "model.safetensors"))
    layer = "language_model.model.layers.{}.self_attn.q_proj.weight"
    assert layer.format(9) in w and layer.format(10) not in w
    assert (w[layer.format(9)] == w0[layer.format(1)]).all() and (w[layer.format(4)] == w0[layer.format(0)]).all()
    other = [k for k in w0 if ".layers." not in k or "vision" in k]
    assert other and all((w[k] == w0[k]).all() for k in other)


def test_slope_of_a_power_law(scaling):
    xs = [1000, 4000, 16000]
    assert scaling.slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert scaling.slope(xs, [x**2 / 7 for x in xs]) == pytest.approx(2.0)


def test_summary_takes_the_worst_method_and_the_steepest_memory(scaling):
    rows = [_row("hae", "oneshot", 1000, 1.01, 0.0), _row("hae", "oneshot", 4000, 1.02, 0.0),
            _row("h2o", "oneshot", 250, 1.1, 0.2), _row("h2o", "oneshot", 1000, 1.2, 2.0),
            _row("h2o", "oneshot", 4000, 1.9, 8.0),
            _row("snapkv", "chunked", 1000, 1.0, 0.5), _row("snapkv", "chunked", 4000, 1.1, 0.9)]
    s = scaling.summarize(rows, [{"ok": True}], [250, 1000, 4000])
    assert s["max_prompt_tokens"] == 4009 and s["hae_ttft_ratio_at_max"] == 1.02
    assert (s["worst_method"], s["worst_ttft_ratio_at_max"]) == ("h2o/oneshot", 1.9)
    assert s["eviction_peak_mib_at_max"] == 8.0
    # Only methods with >= 1 MiB at the longest prompt enter the exponent, fitted over readings
    # of >= 1 MiB (below: the allocator's granularity; h2o's 0.2 MiB at 250 tokens is left out).
    assert set(s["memory_growth_exponents"]) == {"h2o/oneshot"}
    assert s["memory_growth_exponent"] == pytest.approx(1.0, abs=0.01)
    assert s["hf_oracle_match"] is True
    assert scaling.summarize(rows, [{"ok": True}, {"ok": False}], [250, 1000, 4000])["hf_oracle_match"] is False
    assert scaling.summarize(rows, [], [250, 1000, 4000])["hf_oracle_match"] is False
