"""Per-request knobs are validated where vLLM validates the request, *before* it is rendered.

Rendering a multimodal prompt marks its images as sent in the API process's multimodal cache
(P0).  A request rejected after rendering never reaches the EngineCore, so a concurrent request
carrying the same image could be rendered in between and sent without its data: the engine
(P1) then misses the item and answers 500 ("P0/P1 cache drift").  A bad knob must therefore be
refused before rendering, which is also what makes the refusal an HTTP 400 for a streaming
request (the response has not started yet) instead of an error event inside a 200 stream:

* ``BaseServing._check_model`` (OpenAI chat/completions/responses, Anthropic, batch chat): the
  first check every generating endpoint makes, before rendering and before the response starts;
* ``OfflineInferenceMixin._params_to_seq`` (offline ``LLM.generate/chat/enqueue``): runs on the
  whole batch's parameters before the first prompt is rendered or queued;
* ``InputProcessor._validate_params``: the backstop for any other entry (``AsyncLLM`` used
  directly); ``process_inputs`` then drops a rejected request's items from P0.
"""

from __future__ import annotations

from typing import Any

from hae_vllm.config import check_request_knobs, engine_config_from_additional
from hae_vllm.patches import is_patched, wraps_patch


def knob_error(additional_config, extra_args) -> tuple[str, str] | None:
    """``(knob, message)`` for a bad eviction knob in ``extra_args``, else None."""
    if not extra_args:
        return None
    return check_request_knobs(engine_config_from_additional(additional_config), extra_args)


def _message(knob: str, msg: str) -> str:
    return f"invalid vllm_xargs {knob!r}: {msg}"


def _raise_knob_error(additional_config, extra_args) -> None:
    bad = knob_error(additional_config, extra_args)
    if bad is not None:
        from vllm.exceptions import VLLMValidationError

        knob, msg = bad
        raise VLLMValidationError(_message(knob, msg), parameter=f"vllm_xargs.{knob}", value=extra_args.get(knob))


def _serving_additional_config(serving) -> Any:
    client = getattr(serving, "engine_client", None)
    vllm_config = getattr(client, "vllm_config", None)
    return getattr(vllm_config, "additional_config", None)


def patch__check_model(cls) -> None:
    original = cls._check_model
    if is_patched(original):
        return

    @wraps_patch(original)
    async def _check_model(self, request, *args, **kwargs):
        error = await original(self, request, *args, **kwargs)
        if error is not None:
            return error
        xargs = getattr(request, "vllm_xargs", None)
        if xargs:
            # Raised, not returned: vLLM's handlers log a returned error as "Error with model";
            # its exception handler answers a VLLMValidationError with a 400 naming the param.
            _raise_knob_error(_serving_additional_config(self), xargs)
        return None

    cls._check_model = _check_model


def patch__params_to_seq(cls) -> None:
    original = cls._params_to_seq
    if is_patched(original):
        return

    @wraps_patch(original)
    def _params_to_seq(self, params, num_requests, *args, **kwargs):
        seq = original(self, params, num_requests, *args, **kwargs)
        additional = self.llm_engine.vllm_config.additional_config
        checked: set[int] = set()
        for p in seq:
            if id(p) not in checked:  # one params object is often shared by the whole batch
                checked.add(id(p))
                _raise_knob_error(additional, getattr(p, "extra_args", None))
        return seq

    cls._params_to_seq = _params_to_seq


def patch__validate_params(cls) -> None:
    original = cls._validate_params
    if is_patched(original):
        return

    @wraps_patch(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        _raise_knob_error(self.vllm_config.additional_config, getattr(params, "extra_args", None))
        return result

    cls._validate_params = _validate_params


def _forget_multimodal_items(input_processor, prompt) -> None:
    """Drop a request's multimodal items from the API process's cache (P0) after the request
    was refused there: it never reaches the EngineCore, so P1 never stores them."""
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
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.v1.engine.input_processor import InputProcessor

    patch__validate_params(InputProcessor)
    patch_process_inputs(InputProcessor)
    patch__params_to_seq(OfflineInferenceMixin)
    try:
        from vllm.entrypoints.serve.engine.serving import BaseServing
    except ImportError:  # API server extras missing: offline use only
        return
    patch__check_model(BaseServing)
