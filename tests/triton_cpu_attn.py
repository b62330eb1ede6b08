"""Run a Python module in an engine process whose attention is vLLM's TRITON_ATTN backend
(the eviction subclass once hae_vllm's plugin registers), its kernels executed by Triton's
interpreter on CPU tensors.  Test harness only: nothing here belongs in hae_vllm.

    TRITON_INTERPRET=1 python tests/triton_cpu_attn.py <module> [args...]

vLLM's CPU build cannot select TRITON_ATTN on its own; four stand-ins, applied before vLLM is
imported, let it (each names the upstream code it works around):

1. ``vllm/triton_utils/importing.py`` disables Triton on a CPU build unless
   ``triton.backends.backends`` has a "cpu" entry: an inactive stand-in entry is registered.
2. Every other vLLM consumer of ``HAS_TRITON`` is kept on today's CPU paths (V1 model runner,
   C++ slot mapping, torch sampler) by setting it back to False in the two modules that hold
   it after import; ``triton`` and ``tl`` stay the real modules, so the attention kernels are
   real Triton code run by the interpreter.
3. ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN whatever is asked: asked for
   TRITON_ATTN, it returns that enum member's class path (hae_vllm's subclass when registered).
4. ``triton_reshape_and_cache_flash`` asks ``torch.cuda.get_device_capability`` for a tile
   size: answered (9, 0) for the duration of the call only.

Scenario processes started from a process under the harness (the self-check's engine) run
under it too.  At exit the process writes ``$HAE_TEST_TRITON_CALLS`` (JSON): how often the Triton cache write
and attention ran, and the attention implementation classes that ran, so a test can prove the
path was taken.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

CALLS: dict = {"kv_writes": 0, "forwards": 0, "impls": []}


def install() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("TRITON_INTERPRET=1 must be set before Triton is imported")
    if "vllm" in sys.modules:
        raise SystemExit("install() must run before vLLM is imported")
    import torch
    import triton.backends as tb

    class _InactiveCpuDriver:  # satisfies vLLM's check only; Triton never picks an inactive driver
        @staticmethod
        def is_active() -> bool:
            return False

    tb.backends.setdefault("cpu", tb.Backend(compiler=object, driver=_InactiveCpuDriver))

    import vllm.triton_utils as tu
    import vllm.triton_utils.importing as tui

    assert tu.HAS_TRITON and not isinstance(tu.triton, tui.TritonPlaceholder), "Triton still disabled"
    tu.HAS_TRITON = tui.HAS_TRITON = False

    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if (selected_backend == AttentionBackendEnum.TRITON_ATTN and not attn_selector_config.use_mla
                and not getattr(attn_selector_config, "use_sparse", False)):
            return AttentionBackendEnum.TRITON_ATTN.get_path()
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

    import vllm.v1.attention.backends.triton_attn as ta

    store = ta.triton_reshape_and_cache_flash

    def triton_reshape_and_cache_flash(*args, **kwargs):
        CALLS["kv_writes"] += 1
        real = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        try:
            return store(*args, **kwargs)
        finally:
            torch.cuda.get_device_capability = real

    ta.triton_reshape_and_cache_flash = triton_reshape_and_cache_flash

    forward = ta.TritonAttentionImpl.forward

    def counted_forward(self, *args, **kwargs):
        CALLS["forwards"] += 1
        if type(self).__name__ not in CALLS["impls"]:
            CALLS["impls"].append(type(self).__name__)
        return forward(self, *args, **kwargs)

    ta.TritonAttentionImpl.forward = counted_forward
    # Scenario processes this process starts (python -m hae_vllm.selfcheck) run through the
    # harness too.
    from hae_vllm.testing import scenario

    launch = scenario.launcher()

    def through_harness(argv, **kwargs):
        if argv[1:3] == ["-m", "hae_vllm.testing.scenario"]:
            argv = [argv[0], __file__, *argv[2:]]
        return launch(argv, **kwargs)

    scenario.set_launcher(through_harness)
    out = os.environ.get("HAE_TEST_TRITON_CALLS")
    if out:
        # Only a process whose engine ran writes (the self-check's own process has none).
        atexit.register(lambda: CALLS["forwards"] and open(out, "w").write(json.dumps(CALLS)))


if __name__ == "__main__":
    install()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
