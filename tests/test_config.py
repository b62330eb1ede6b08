"""Configuration layers and the errors users see."""

import json

import pytest

import hae_vllm
from hae_vllm.config import (
    EvictionConfig,
    EvictionConfigError,
    build_engine_config,
    engine_config_from_additional,
    request_config,
)


def test_defaults_preset_inline_and_overrides_layer_in_order(tmp_path):
    assert EvictionConfig().method == "none" and not EvictionConfig().enabled
    preset = build_engine_config("hae")
    assert preset.budget == 0.5  # from hae_vllm/presets/hae.yaml
    inline = build_engine_config("hae", '{"budget": 0.3, "sink_tokens": 2}')
    assert (inline.budget, inline.sink_tokens, inline.r_global) == (0.3, 2, preset.r_global)
    f = tmp_path / "mine.yaml"
    f.write_text("budget: 0.7\nrecent_tokens: 3\n")
    from_file = build_engine_config("hae", str(f), recent_tokens=5)
    assert (from_file.budget, from_file.recent_tokens) == (0.7, 5)
    assert build_engine_config("hae", "hae_thresholds_only").budget is None


def test_additional_config_forms_agree():
    a = engine_config_from_additional({"kv_eviction": "hae"})
    b = engine_config_from_additional({"kv_eviction": {"method": "hae"}})
    c = engine_config_from_additional(hae_vllm.kv_eviction("hae"))
    assert a == b == c
    assert engine_config_from_additional(None) == EvictionConfig()


@pytest.mark.parametrize(
    "source,needle",
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "mapping"),
        ('{"budget": 1.5}', "(0, 1]"),
        ('{"budget": 0}', "(0, 1]"),
        ('{"sink_tokens": -1}', "non-negative integer"),
        ('{"r_global": "high"}', "r_global must be a number in >= 0"),
        ('{"max_evict_frac": "most"}', "max_evict_frac must be a number in [0, 1]"),
        ('{"decode_decay": 2}', "decode_decay must be a number in [0, 1]"),
        ('{"theta": null}', "theta must be a number"),
        ('{"rescore_interval": 0}', "integer >= 1"),
        ('{"default_block_size": 24}', "multiple of 16"),
        ('{"admission_reserve": 0.6}', "admission_reserve must be a number in [0, 0.5]"),
        ('{"colour": "blue"}', "unknown kv eviction setting"),
        ("definitely_not_a_file", "no such file"),
    ],
)
def test_bad_engine_config_says_what_to_do(source, needle):
    with pytest.raises(EvictionConfigError, match=None) as e:
        build_engine_config("hae", source)
    assert needle in str(e.value)


def test_malformed_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("budget: [unclosed\n")
    with pytest.raises(EvictionConfigError, match="not valid YAML"):
        build_engine_config("hae", str(f))
    f.write_text("- just\n- a list\n")
    with pytest.raises(EvictionConfigError, match="mapping"):
        build_engine_config("hae", str(f))


def test_unknown_method():
    with pytest.raises(EvictionConfigError, match="unknown kv eviction method"):
        build_engine_config("h2oo")


def test_request_knobs():
    base = build_engine_config("hae")
    assert request_config(base, None) is base
    assert request_config(base, {"unrelated": 1}) is base  # other extra_args pass through
    assert request_config(base, {"kv_eviction_budget": 0.25}).budget == 0.25
    assert not request_config(base, {"kv_eviction": "none"}).enabled
    for bad, needle in [
        ({"kv_eviction_budget": 3}, "(0, 1]"),
        ({"kv_eviction": "nope"}, "not a method"),
        ({"kv_eviction_trace_path": "/tmp/x"}, "unknown per-request knob"),
        ({"kv_eviction_admission_reserve": 0.1}, "unknown per-request knob"),  # engine-wide
        ({"kv_eviction_sink_tokens": 1.5}, "non-negative integer"),
    ]:
        with pytest.raises(EvictionConfigError) as e:
            request_config(base, bad)
        assert needle in str(e.value)
    off = EvictionConfig()
    with pytest.raises(EvictionConfigError, match="started without eviction"):
        request_config(off, {"kv_eviction": "hae"})
    assert request_config(off, {"kv_eviction": "none"}).method == "none"


def test_config_round_trips_through_json():
    cfg = build_engine_config("hae", '{"budget": 0.4}')
    assert EvictionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_method_has_a_preset_and_an_unknown_preset_lists_them():
    from hae_vllm.config import methods, presets

    assert set(methods()) - {"none"} <= set(presets())
    with pytest.raises(EvictionConfigError) as e:
        build_engine_config("hae", "snapkvv")
    assert "snapkvv" in str(e.value) and "snapkv" in str(e.value) and "hae_thresholds_only" in str(e.value)
