"""Per-request knobs are validated where the request enters vLLM (API/LLM process), so a bad
``vllm_xargs`` value is an HTTP 400 with a message, never an engine error."""

from __future__ import annotations

from hae_vllm.config import EvictionConfigError, engine_config_from_additional, request_config
from hae_vllm.patches import is_patched, wraps_patch


def patch__validate_params(cls) -> None:
    original = cls._validate_params
    if is_patched(original):
        return

    @wraps_patch(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if extra:
            try:
                base = engine_config_from_additional(self.vllm_config.additional_config)
                request_config(base, extra)
            except EvictionConfigError as e:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(e), parameter="vllm_xargs") from e
        return result

    cls._validate_params = _validate_params


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    patch__validate_params(InputProcessor)
