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
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Mapping

CONFIG_KEY = "kv_eviction"
REQUEST_METHOD_KEY = "kv_eviction"
REQUEST_PREFIX = "kv_eviction_"

def methods() -> dict[str, str]:
    """Method name -> one-line description (``none`` plus the policy registry)."""
    from hae_vllm.policies.registry import POLICIES

    return {"none": "no eviction: identical to vanilla vLLM", **{n: c.description for n, c in POLICIES.items()}}


def presets() -> dict[str, Traversable]:
    """Preset name -> its YAML file: the package data in ``hae_vllm/presets/`` (found through
    ``importlib.resources``, so an installed wheel has them as a source checkout does)."""
    root = resources.files("hae_vllm") / "presets"
    return {f.name[: -len(".yaml")]: f for f in root.iterdir() if f.name.endswith(".yaml")}


def _preset(name: str) -> Traversable:
    found = presets()
    if name not in found:
        raise EvictionConfigError(
            f"no preset named {name!r}; the presets are: {', '.join(sorted(found))} "
            "(or pass inline JSON or a YAML file path)"
        )
    return found[name]


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
    # The keep ratio (decode_budget) applies once the request has generated this share of the
    # tokens it held after its prefill (1.0: an answer as long as its cache; 0: from the first
    # step).  A short answer adds little KV: evicting from the prompt for it costs answers for
    # little memory.  An absolute decode_budget_tokens applies whenever it is exceeded.
    decode_start: float = 1.0
    # Scores of live and binned tokens: s <- decode_decay * s + attention of the new query.
    decode_decay: float = 0.9
    # Decode scoring runs every score_interval steps, over the queries of the steps since, in
    # one pass (the same decayed scores as scoring every step); budgets, parking and restores
    # are decided when a request is scored.  1 scores every step.  32: once per block of new
    # tokens (parking moves whole blocks, so checking more often buys little), which spreads
    # the pass's fixed host cost over 32 steps (benchmarks/long_generation.py).
    score_interval: int = 32
    # Recent tokens never parked during decode.
    decode_recent_tokens: int = 16
    # Recycle bin: at most bin_capacity parked blocks per request (lowest value released first).
    bin_capacity: int = 4
    # Every rescore_interval decode steps the best binned block is restored when its mean score
    # beats restore_margin x the mean score of the weakest live block's worth of tokens.  (A
    # parked block's mean drifts up from the low it was parked at while the weakest live block
    # is always the current low: checked often, most checks restore a block that is parked
    # again soon after.  32: about once per block of new tokens.)
    rescore_interval: int = 32
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
    # Conversation reuse (needs prefix caching): a request whose prompt extends an earlier
    # evicting request's tokens continues from the cache that request left (holes and all)
    # instead of recomputing it.  Requests with a decode budget never do.
    session_reuse: bool = True
    # Admission reserve (engine-wide): KV blocks a waiting or preempted request must leave free
    # to be admitted while others run (vLLM's scheduler ``watermark``; the larger of the two
    # applies).  Eviction shrinks what a request holds but not what it will grow by, so filling
    # the pool as vLLM does without eviction preempts more running requests, and a preempted
    # request's compacted cache is rarely reusable (docs/how-it-works.md).  None (default): the
    # peak of what the running requests are expected to grow into, re-estimated every step
    # (hae_vllm.engine.admission); a number: that fixed share of the pool; 0 = vLLM's admission.
    admission_reserve: float | None = None
    # Block size chosen when eviction is on and the user set none.
    default_block_size: int = 32

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def decode_enabled(self) -> bool:
        return self.enabled and (self.decode_budget is not None or self.decode_budget_tokens is not None)

    def validate(self) -> "EvictionConfig":
        """Raise :class:`EvictionConfigError` naming the first bad setting (wrong types too)."""
        if self.method not in methods():
            raise EvictionConfigError(
                f"unknown kv eviction method {self.method!r}; choose one of {sorted(methods())}"
            )
        # (name, low, high, low inclusive, optional)
        for name, lo, hi, lo_incl, optional in (
            ("budget", 0.0, 1.0, False, True),
            ("decode_budget", 0.0, 1.0, False, True),
            ("max_evict_frac", 0.0, 1.0, True, False),
            ("decode_decay", 0.0, 1.0, True, False),
            ("theta", 0.0, 1.0, False, False),
            ("r_global", 0.0, math.inf, True, False),
            ("r_individual", 0.0, math.inf, True, False),
            ("variance_gain", 0.0, math.inf, True, False),
            ("text_threshold_scale", 0.0, math.inf, True, False),
            ("restore_margin", 0.0, math.inf, True, False),
            ("decode_start", 0.0, math.inf, True, False),
            ("admission_reserve", 0.0, 0.5, True, True),
        ):
            _check_number(name, getattr(self, name), lo, hi, lo_incl, optional)
        for name, minimum, optional in (
            ("sink_tokens", 0, False), ("recent_tokens", 0, False), ("window", 0, False),
            ("pool_kernel", 0, False), ("fastv_layer", 0, False), ("seed", 0, False),
            ("decode_recent_tokens", 0, False), ("bin_capacity", 0, False),
            ("rescore_interval", 1, False), ("score_interval", 1, False), ("decode_budget_tokens", 1, True),
            ("default_block_size", 16, False),
        ):
            _check_int(name, getattr(self, name), minimum, optional)
        if self.default_block_size % 16 != 0:
            raise EvictionConfigError("default_block_size must be a positive multiple of 16")
        if not isinstance(self.session_reuse, bool):
            raise EvictionConfigError(f"session_reuse must be true or false, got {self.session_reuse!r}")
        if self.pooling not in ("max", "avg"):
            raise EvictionConfigError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.budget is None and self.method not in ("none", "hae"):
            raise EvictionConfigError(
                f"method {self.method!r} has no thresholds of its own: set a budget (keep ratio)"
            )
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


def _check_number(name: str, v: Any, lo: float, hi: float, lo_incl: bool, optional: bool) -> None:
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    ok = ok and (lo <= v if lo_incl else lo < v) and v <= hi
    if not ok:
        lb = "[" if lo_incl else "("
        rng = f"{lb}{lo:g}, {hi:g}]" if math.isfinite(hi) else f">= {lo:g}"
        raise EvictionConfigError(f"{name} must be a number in {rng}, got {v!r}")


def _check_int(name: str, v: Any, minimum: int, optional: bool) -> None:
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        kind = "non-negative integer" if minimum == 0 else f"integer >= {minimum}"
        raise EvictionConfigError(f"{name} must be a {kind}, got {v!r}")


# Fields a single request may override (trace_path, block size and the admission reserve are
# engine-wide).
REQUEST_FIELDS = tuple(
    f.name for f in fields(EvictionConfig)
    if f.name not in ("method", "trace_path", "default_block_size", "admission_reserve")
)


def load_config_source(source: str | None) -> dict[str, Any]:
    """Parse ``--kv-eviction-config``: inline JSON, a YAML/JSON file path, or a preset name
    (e.g. ``hae_thresholds_only`` -> ``hae_vllm/presets/hae_thresholds_only.yaml``)."""
    if source is None or source == "":
        return {}
    text = source.strip()
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvictionConfigError(f"--kv-eviction-config is not valid JSON: {e}") from e
    else:
        path: Path | Traversable = Path(text)
        if not path.exists():
            if text not in presets():
                raise EvictionConfigError(
                    f"--kv-eviction-config {text!r}: no such file and no such preset; the presets are: "
                    f"{', '.join(sorted(presets()))} (or pass inline JSON or a YAML file path)"
                )
            path = _preset(text)
        data = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EvictionConfigError(
            f"--kv-eviction-config must describe a mapping of settings, got {type(data).__name__}"
        )
    return data


def _read_yaml(path: Path | Traversable) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EvictionConfigError(f"{path} is not valid YAML: {e}") from e


def build_engine_config(method: str | None, source: str | None = None, **overrides: Any) -> EvictionConfig:
    """Merge: dataclass defaults <- the method's preset <- config source <-
    explicit overrides <- method."""
    data: dict[str, Any] = {}
    src = load_config_source(source)
    meth = method or overrides.get("method") or src.get("method") or "none"
    if meth != "none" and meth in methods():
        # Every registered method ships a preset; a missing one is a broken install, not a
        # method without defaults (it would silently lose e.g. hae's budget).
        preset = _read_yaml(_preset(meth)) or {}
        if not isinstance(preset, dict):
            raise EvictionConfigError(f"preset {meth!r} must describe a mapping of settings")
        data.update(preset)
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


def check_request_knobs(base: EvictionConfig, extra_args: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``(knob, message)`` when a request's eviction knobs are bad, else None.

    The knobs are validated together (a method may need a budget that another knob gives);
    when they fail, each is tried alone so the answer names the knob at fault, and the
    combination is blamed (``vllm_xargs``) only when no single knob is."""
    if not extra_args:
        return None
    knobs = {k: v for k, v in extra_args.items() if k == REQUEST_METHOD_KEY or k.startswith(REQUEST_PREFIX)}
    try:
        request_config(base, knobs)
        return None
    except EvictionConfigError as e:
        whole = str(e)
    for key, value in knobs.items():
        try:
            request_config(base, {key: value})
        except EvictionConfigError as e:
            return key, str(e)
    return (next(iter(knobs)) if len(knobs) == 1 else "vllm_xargs"), whole


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
