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


def _forget_multimodal_items(input_processor, prompt) -> None:
    """Drop a rejected request's multimodal items from the API process's shadow cache.

    Rendering marks image items as sent to the EngineCore before ``process_inputs`` validates
    the request; a rejected request never reaches the engine, so without this the next request
    with the same image would be sent without its data (a "P0/P1 cache drift", answered 500)."""
    cache = getattr(getattr(input_processor, "renderer", None), "mm_processor_cache", None)
    hashes = prompt.get("mm_hashes") if isinstance(prompt, dict) else None
    if cache is None or not hashes:
        return
    for items in hashes.values() if isinstance(hashes, dict) else [hashes]:
        for h in items or ():
            if isinstance(h, str):
                cache.invalidate(h)


def patch_process_inputs(cls) -> None:
    original = cls.process_inputs
    if is_patched(original):
        return

    @wraps_patch(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError

        try:
            return original(self, request_id, prompt, params, *args, **kwargs)
        except VLLMValidationError:
            _forget_multimodal_items(self, prompt)
            raise

    cls.process_inputs = process_inputs


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    patch__validate_params(InputProcessor)
    patch_process_inputs(InputProcessor)
