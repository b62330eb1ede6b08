"""Eviction configuration: dataclass defaults -> YAML/JSON preset -> CLI flag -> per-request knob.

The engine-wide config travels to every vLLM process inside ``VllmConfig.additional_config``
under the key :data:`CONFIG_KEY`.  Per-request overrides travel in
``SamplingParams.extra_args`` (OpenAI: ``vllm_xargs``) as flat keys::

    kv_eviction            method name ("none" or "hae")
    kv_eviction_<field>    any field of :class:`EvictionConfig` listed in REQUEST_FIELDS
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

CONFIG_KEY = "kv_eviction"
REQUEST_METHOD_KEY = "kv_eviction"
REQUEST_PREFIX = "kv_eviction_"

def methods() -> dict[str, str]:
    """Method name -> one-line description (``none`` plus the policy registry)."""
    from hae_vllm.policies.registry import POLICIES

    return {"none": "no eviction: identical to vanilla vLLM", **{n: c.description for n, c in POLICIES.items()}}


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class EvictionConfigError(ValueError):
    """A bad eviction setting; the message says what to do."""


@dataclass(frozen=True)
class EvictionConfig:
    """Settings of one eviction method.

    Budget semantics (shared by every method so comparisons are at equal memory):
    ``budget`` is the fraction of the prompt's tokens to keep (``None``: keep whatever the
    method's own thresholds keep).  The physical saving is rounded down to whole KV blocks.
    """

    method: str = "none"
    # Keep ratio of prompt tokens in (0, 1]; None = thresholds alone decide.
    budget: float | None = None
    # Dual-Attention Pruning thresholds (MustDrop arXiv 2411.10803; HAE arXiv 2602.02197):
    # a visual token is a victim when its share of the global attention mass is below
    # r_global (after the adaptive rule) AND its largest single attention is below r_individual.
    r_global: float = 0.001
    r_individual: float = 0.0015
    # Adaptive rule: r_global_eff = r_global * (1 + variance_gain * CV), CV the coefficient of
    # variation of the visual tokens' global shares.  Concentrated (high-variance) attention
    # means most visual tokens are redundant, so the threshold rises.  0 disables it.
    variance_gain: float = 1.0
    # Cap c: at most this fraction of the candidate tokens is evicted.
    max_evict_frac: float = 0.95
    # Protected tokens: the first sink_tokens and the last recent_tokens of the prompt.
    sink_tokens: int = 4
    recent_tokens: int = 8
    # Text tokens are candidates too (scored by the same queries), their thresholds scaled by
    # text_threshold_scale (< 1: text is pruned more gently than vision).
    evict_text: bool = False
    text_threshold_scale: float = 0.25
    # Opt-in JSONL trace of each request's evicted positions (engine-wide only).
    trace_path: str | None = None
    # HAE ablation: also score every layer and report the per-layer victim overlap.
    measure_layer_overlap: bool = False
    # Dynamic Decoding Eviction (decode stage): live tokens are kept within the budget, either a
    # keep ratio of the tokens the request would otherwise hold or an absolute token count.
    decode_budget: float | None = None
    decode_budget_tokens: int | None = None
    # Scores of live and binned tokens: s <- decode_decay * s + attention of the new query.
    decode_decay: float = 0.9
    # Recent tokens never parked during decode.
    decode_recent_tokens: int = 16
    # Recycle bin: at most bin_capacity parked blocks per request (lowest value released first).
    bin_capacity: int = 4
    # Every rescore_interval decode steps the best binned block is restored when its mean score
    # beats restore_margin x the mean score of the weakest live block's worth of tokens.
    rescore_interval: int = 8
    restore_margin: float = 1.0
    # Observation window (SnapKV) / proxy tokens (MadaKV): the last `window` prompt tokens.
    window: int = 32
    # SnapKV pooling over neighbouring positions.
    pool_kernel: int = 7
    pooling: str = "max"
    # FastV: the decoder layer (0-based) whose attention ranks visual tokens.
    fastv_layer: int = 2
    # MadaKV: share of a modality's attention mass a head must cover.
    theta: float = 0.9
    # Random: seed of the permutation.
    seed: int = 0
    # Block size chosen when eviction is on and the user set none.
    default_block_size: int = 32

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def decode_enabled(self) -> bool:
        return self.enabled and (self.decode_budget is not None or self.decode_budget_tokens is not None)

    def validate(self) -> "EvictionConfig":
        if self.method not in methods():
            raise EvictionConfigError(
                f"unknown kv eviction method {self.method!r}; choose one of {sorted(methods())}"
            )
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
                raise EvictionConfigError(f"budget must be a number in (0, 1], got {self.budget!r}")
            if not (0.0 < float(self.budget) <= 1.0) or math.isnan(self.budget):
                raise EvictionConfigError(
                    f"budget is the fraction of prompt tokens to keep and must be in (0, 1], "
                    f"got {self.budget}"
                )
        for name in ("r_global", "r_individual", "variance_gain", "text_threshold_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or math.isnan(v):
                raise EvictionConfigError(f"{name} must be a non-negative number, got {v!r}")
        if not (0.0 <= self.max_evict_frac <= 1.0):
            raise EvictionConfigError(f"max_evict_frac must be in [0, 1], got {self.max_evict_frac}")
        if self.decode_budget is not None and (
            isinstance(self.decode_budget, bool)
            or not isinstance(self.decode_budget, (int, float))
            or not (0.0 < float(self.decode_budget) <= 1.0)
        ):
            raise EvictionConfigError(f"decode_budget must be in (0, 1], got {self.decode_budget!r}")
        if self.decode_budget_tokens is not None and (
            not isinstance(self.decode_budget_tokens, int) or self.decode_budget_tokens < 1
        ):
            raise EvictionConfigError(
                f"decode_budget_tokens must be a positive integer, got {self.decode_budget_tokens!r}"
            )
        if not (0.0 <= self.decode_decay <= 1.0):
            raise EvictionConfigError(f"decode_decay must be in [0, 1], got {self.decode_decay}")
        if not isinstance(self.restore_margin, (int, float)) or self.restore_margin < 0:
            raise EvictionConfigError(f"restore_margin must be >= 0, got {self.restore_margin!r}")
        for name in ("decode_recent_tokens", "bin_capacity"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EvictionConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.rescore_interval, int) or self.rescore_interval < 1:
            raise EvictionConfigError(f"rescore_interval must be a positive integer, got {self.rescore_interval!r}")
        if self.pooling not in ("max", "avg"):
            raise EvictionConfigError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if not (0.0 < self.theta <= 1.0):
            raise EvictionConfigError(f"theta must be in (0, 1], got {self.theta}")
        if self.budget is None and self.method not in ("none", "hae"):
            raise EvictionConfigError(
                f"method {self.method!r} has no thresholds of its own: set a budget (keep ratio)"
            )
        for name in ("sink_tokens", "recent_tokens", "window", "pool_kernel", "fastv_layer", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EvictionConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.default_block_size % 16 != 0 or self.default_block_size <= 0:
            raise EvictionConfigError("default_block_size must be a positive multiple of 16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "EvictionConfig":
        return dataclasses.replace(self, **changes).validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvictionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvictionConfigError(
                f"unknown kv eviction setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        return cls(**dict(data)).validate()


# Fields a single request may override (trace_path and block size are engine-wide).
REQUEST_FIELDS = tuple(
    f.name for f in fields(EvictionConfig) if f.name not in ("method", "trace_path", "default_block_size")
)


def load_config_source(source: str | None) -> dict[str, Any]:
    """Parse ``--kv-eviction-config``: inline JSON, a YAML/JSON file path, or a preset name
    from ``configs/`` (e.g. ``hae`` -> ``configs/hae.yaml``)."""
    if source is None or source == "":
        return {}
    text = source.strip()
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvictionConfigError(f"--kv-eviction-config is not valid JSON: {e}") from e
    else:
        path = Path(text)
        if not path.exists():
            preset = CONFIG_DIR / f"{text}.yaml"
            if preset.exists():
                path = preset
            else:
                raise EvictionConfigError(
                    f"--kv-eviction-config {text!r}: no such file, and no preset {preset.name} in "
                    f"{CONFIG_DIR}; pass inline JSON, a YAML file, or a preset name"
                )
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise EvictionConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EvictionConfigError(
            f"--kv-eviction-config must describe a mapping of settings, got {type(data).__name__}"
        )
    return data


def build_engine_config(method: str | None, source: str | None = None, **overrides: Any) -> EvictionConfig:
    """Merge: dataclass defaults <- preset for the method (if it exists) <- config source <-
    explicit overrides <- method."""
    data: dict[str, Any] = {}
    src = load_config_source(source)
    meth = method or overrides.get("method") or src.get("method") or "none"
    preset = CONFIG_DIR / f"{meth}.yaml"
    if meth != "none" and preset.exists():
        data.update(load_config_source(str(preset)))
    data.update(src)
    data.update(overrides)
    data["method"] = meth
    return EvictionConfig.from_dict(data)


_ENGINE_CONFIG_CACHE: dict[str, EvictionConfig] = {}


def engine_config_from_additional(additional_config: Mapping[str, Any] | None) -> EvictionConfig:
    """The engine-wide config as stored in ``VllmConfig.additional_config`` (memoised: it is
    read on every request's validation, and presets live in YAML files)."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return EvictionConfig()
    raw = additional_config[CONFIG_KEY]
    if not isinstance(raw, (str, Mapping)):
        raise EvictionConfigError(
            f"additional_config[{CONFIG_KEY!r}] must be a method name or a mapping, got {raw!r}"
        )
    key = json.dumps(raw, sort_keys=True, default=str)
    cfg = _ENGINE_CONFIG_CACHE.get(key)
    if cfg is None:
        if isinstance(raw, str):
            cfg = build_engine_config(raw)
        else:
            data = dict(raw)
            cfg = build_engine_config(data.pop("method", None), None, **data)
        if len(_ENGINE_CONFIG_CACHE) < 64:
            _ENGINE_CONFIG_CACHE[key] = cfg
    return cfg


def request_config(base: EvictionConfig, extra_args: Mapping[str, Any] | None) -> EvictionConfig:
    """Apply a request's knobs (``SamplingParams.extra_args``) on top of the engine config.

    Raises :class:`EvictionConfigError` for unknown knobs or bad values, so the API server can
    answer 400 before the request reaches the engine.
    """
    if not extra_args:
        return base
    changes: dict[str, Any] = {}
    for key, value in extra_args.items():
        if key == REQUEST_METHOD_KEY:
            if value not in methods():
                raise EvictionConfigError(
                    f"kv_eviction={value!r} is not a method; choose one of {sorted(methods())}"
                )
            changes["method"] = value
        elif key.startswith(REQUEST_PREFIX):
            name = key[len(REQUEST_PREFIX):]
            if name not in REQUEST_FIELDS:
                raise EvictionConfigError(
                    f"unknown per-request knob {key!r}; valid: "
                    f"{[REQUEST_METHOD_KEY] + [REQUEST_PREFIX + f for f in REQUEST_FIELDS]}"
                )
            changes[name] = value
    if not changes:
        return base
    if changes.get("method", base.method) != "none" and not base.enabled:
        raise EvictionConfigError(
            "this server was started without eviction (--kv-eviction none); per-request "
            "eviction needs the engine started with --kv-eviction METHOD"
        )
    try:
        return dataclasses.replace(base, **changes).validate()
    except TypeError as e:  # wrong type for a field
        raise EvictionConfigError(str(e)) from e
