"""Hooks on the V1 model runner (GPUModelRunner; the CPU runner inherits them).

The runner has the request identities the attention backend lacks; these hooks hand them to
the worker's :class:`~hae_vllm.worker.runtime.EvictionRuntime` and carry its reports back in
the model runner output.
"""

from __future__ import annotations

from copy import copy

from hae_vllm.attention.backends import check_attention_backends
from hae_vllm.config import engine_config_from_additional
from hae_vllm.patches import is_patched, wraps_patch
from hae_vllm.worker.runtime import activate, runtime_for
from hae_vllm.protocol import REPORT_ATTR


def _attach_reports(runner, output):
    rt = runtime_for(runner)
    if rt is None or not rt.reports:
        return output
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if not isinstance(output, ModelRunnerOutput):
        return output  # reports wait for the next real output
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy(output)
    setattr(output, REPORT_ATTR, rt.take_reports())
    return output


def patch__update_states(cls) -> None:
    original = cls._update_states
    if is_patched(original):
        return

    @wraps_patch(original)
    def _update_states(self, scheduler_output):
        result = original(self, scheduler_output)
        rt = runtime_for(self)
        if rt is not None:
            rt.on_states_updated(scheduler_output)
        return result

    cls._update_states = _update_states


def patch_execute_model(cls) -> None:
    original = cls.execute_model
    if is_patched(original):
        return

    @wraps_patch(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        # This runner's attention layers reach this runner's runtime (or none) in this step.
        rt = activate(self)
        output = original(self, scheduler_output, *args, **kwargs)
        if rt is not None:
            # Every layer has written its KV for this step: compaction is safe now.
            rt.after_forward()
            if output is not None:
                output = _attach_reports(self, output)
        return output

    cls.execute_model = execute_model


def patch_sample_tokens(cls) -> None:
    original = cls.sample_tokens
    if is_patched(original):
        return

    @wraps_patch(original)
    def sample_tokens(self, *args, **kwargs):
        return _attach_reports(self, original(self, *args, **kwargs))

    cls.sample_tokens = sample_tokens


def patch_initialize_attn_backend(cls) -> None:
    original = cls.initialize_attn_backend
    if is_patched(original):
        return

    @wraps_patch(original)
    def initialize_attn_backend(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        cfg = engine_config_from_additional(self.vllm_config.additional_config)
        if cfg.enabled:
            check_attention_backends(self.attn_groups, cfg.method)
        return result

    cls.initialize_attn_backend = initialize_attn_backend


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patch_initialize_attn_backend(GPUModelRunner)
    patch__update_states(GPUModelRunner)
    patch_execute_model(GPUModelRunner)
    patch_sample_tokens(GPUModelRunner)
