"""Every supported attention backend, CUDA ones included, built from vLLM's own classes on CPU
tensors: the metadata its builder hands to the kernels has the null holes dropped, and a
backend eviction does not patch is refused at start-up."""

import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

import hae_vllm.plugin  # noqa: E402
from hae_vllm.attention import backends  # noqa: E402
from hae_vllm.config import EvictionConfig, EvictionConfigError  # noqa: E402
from hae_vllm.protocol import QUERY_STARTS_ATTR  # noqa: E402
from hae_vllm.worker import runtime as runtime_mod  # noqa: E402

BS = 16
LAYER = "language_model.model.layers.0.self_attn.attn"


@pytest.fixture(scope="module")
def vllm_config(llava_path):
    from vllm.engine.arg_utils import EngineArgs

    hae_vllm.plugin.register()
    return EngineArgs(model=llava_path, max_model_len=512, block_size=BS).create_engine_config()


def _importable(member):
    module = backends.SUPPORTED[member].rsplit(".", 1)[0]
    try:
        __import__(module)
        return True
    except Exception:
        return False


def _members():
    return [pytest.param(m, marks=pytest.mark.skipif(not _importable(m), reason=f"{m}'s module does not import here"))
            for m in backends.SUPPORTED]


@pytest.mark.parametrize("member", _members())
def test_registered_backend_is_the_eviction_subclass(member):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    hae_vllm.plugin.register()
    cls = AttentionBackendEnum[member].get_class()
    module, name = backends.SUPPORTED[member].rsplit(".", 1)
    upstream = getattr(__import__(module, fromlist=[name]), name)
    assert issubclass(cls, upstream) and backends.is_eviction_backend(cls)
    assert cls.get_name() == upstream.get_name() == member
    assert issubclass(cls.get_impl_cls(), upstream.get_impl_cls())
    builder = cls.get_builder_cls()
    assert issubclass(builder, upstream.get_builder_cls())
    # The one builder path that would reuse stale seq_lens with a new table is off.
    assert builder.supports_update_block_table is False
    # Resolvable by name (what the registry and pickle do).
    assert getattr(backends, builder.__name__) is builder


def _runtime_with_holes(req_ids):
    rt = runtime_mod.EvictionRuntime(SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids)), EvictionConfig())
    rt.holes.num_requests = 1
    return rt


def _decode_batch():
    """Three decode requests; request 0 has holes at its logical blocks 1 and 3, request 2 at 0."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    table = torch.tensor([[5, 0, 7, 0, 9, 0], [3, 4, 6, 0, 0, 0], [0, 8, 2, 0, 0, 0]], dtype=torch.int32)
    seq = torch.tensor([5 * BS - 3, 3 * BS - 1, 3 * BS], dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)
    cam = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=3, num_actual_tokens=3,
        max_query_len=1, max_seq_len=int(seq.max()), block_table_tensor=table,
        slot_mapping=torch.tensor([9 * BS + 12, 6 * BS + 14, 2 * BS + 15], dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq.clone(),
    )
    want_table = [[5, 7, 9], [3, 4, 6], [8, 2]]
    want_seq = [3 * BS - 3, 3 * BS - 1, 2 * BS]
    return cam, want_table, want_seq


def _built(member, vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.float32)
    cls = AttentionBackendEnum[member].get_class()
    with set_current_vllm_config(vllm_config):
        return cls.get_builder_cls()(spec, [LAYER], vllm_config, torch.device("cpu"))


@pytest.mark.parametrize("member", ["TRITON_ATTN", "FLASH_ATTN", "CPU_ATTN"])
def test_builder_hands_kernels_a_table_without_holes(member, vllm_config, monkeypatch):
    """The real builder (its upstream build() included) on CPU tensors: the kernels' metadata
    carries each row's live blocks in order and seq_lens shortened by the holes."""
    if not _importable(member):
        pytest.skip(f"{member}'s module does not import here")
    builder = _built(member, vllm_config)
    cam, want_table, want_seq = _decode_batch()
    seen = {}
    upstream_build = type(builder).__mro__[1].build

    def spy(self, common_prefix_len, cam_in, fast_build=False):
        seen["cam"] = cam_in
        return upstream_build(self, common_prefix_len, cam_in, fast_build)

    monkeypatch.setattr(type(builder).__mro__[1], "build", spy)
    monkeypatch.setattr(runtime_mod, "_CURRENT", _runtime_with_holes(["a", "b", "c"]))
    try:
        meta = builder.build(0, cam)
    except Exception as e:  # an upstream build that needs the GPU (e.g. a CUDA-only scheduler call)
        if "cuda" in repr(e).lower() or "gpu" in repr(e).lower():
            pytest.skip(f"{member}'s upstream build needs CUDA here: {e!r}"[:200])
        raise
    got = seen["cam"]
    for i, row in enumerate(want_table):
        assert got.block_table_tensor[i, : len(row)].tolist() == row
    assert got.seq_lens.tolist() == want_seq
    assert got.max_seq_len == max(want_seq)
    assert got.seq_lens_cpu_upper_bound.tolist() == want_seq
    # And what the kernels read, where the metadata exposes it under vLLM's usual names.
    for name in ("block_table", "block_table_tensor"):
        t = getattr(meta, name, None)
        if isinstance(t, torch.Tensor):
            for i, row in enumerate(want_table):
                assert t[i, : len(row)].tolist() == row
    for name in ("seq_lens", "seq_lens_tensor"):
        t = getattr(meta, name, None)
        if isinstance(t, torch.Tensor) and t.numel() == 3:
            assert t.tolist() == want_seq
    # Scoring's host query starts ride on whatever metadata the upstream builder made.
    assert getattr(meta, QUERY_STARTS_ATTR) is cam.query_start_loc_cpu
    # Without holes anywhere the builder passes the metadata through untouched.
    monkeypatch.setattr(runtime_mod, "_CURRENT", None)
    builder.build(0, cam)
    assert seen["cam"] is cam


@dataclass
class _FlashInferLikeMetadata:
    """FlashInferMetadata keeps no query_start_loc at all (vLLM 0.32, flashinfer.py)."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor


def _flashinfer_like_backend():
    class Builder:
        def __init__(self):
            self.kv_cache_spec = SimpleNamespace(block_size=BS)

        def build(self, common_prefix_len, cam, fast_build=False):
            return _FlashInferLikeMetadata(cam.num_actual_tokens, cam.slot_mapping)

    class Impl:
        def forward(self, *args, **kwargs):
            return None

    class Upstream:
        get_builder_cls = staticmethod(lambda: Builder)
        get_impl_cls = staticmethod(lambda: Impl)

    Upstream.__module__ = "upstream.flashinfer"
    return backends.make_eviction_backend(Upstream)


def test_scoring_splits_queries_on_metadata_without_query_starts(monkeypatch):
    """A backend whose metadata has no query starts (FlashInfer) still gets its step's queries
    split by request: the eviction builder leaves the host copy on the metadata, and the
    runtime's scoring hook reads it there."""
    cam, _, _ = _decode_batch()
    meta = _flashinfer_like_backend().get_builder_cls()().build(0, cam)
    assert not hasattr(meta, "query_start_loc") and getattr(meta, QUERY_STARTS_ATTR) is cam.query_start_loc_cpu
    rt = _runtime_with_holes(["a", "b", "c"])
    seen = []
    monkeypatch.setattr(rt, "wants_scoring", lambda name: True)
    monkeypatch.setattr(rt.view, "layout", lambda: SimpleNamespace(as_stored_keys=lambda k, cache: k))
    monkeypatch.setattr(rt, "score", lambda impl, name, q, k, cache, qsl: seen.append(qsl.tolist()))
    layer = SimpleNamespace(layer_name=LAYER)
    q, k = torch.zeros(3, 4, 32), torch.zeros(3, 2, 32)
    rt.after_kv_write(None, layer, q, k, torch.zeros(1), meta)
    assert seen == [cam.query_start_loc_cpu.tolist()]
    with pytest.raises(RuntimeError, match="no host query starts"):
        rt.after_kv_write(None, layer, q, k, torch.zeros(1), _FlashInferLikeMetadata(3, cam.slot_mapping))


def test_a_plain_backend_is_refused():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    plain = SimpleNamespace(backend=CPUAttentionBackend, layer_names=[LAYER], kernel_block_size=None)
    with pytest.raises(EvictionConfigError, match="CPU_ATTN.*Supported backends: CPU_ATTN, FLASH_ATTN, TRITON_ATTN, FLASHINFER"):
        backends.check_attention_backends([[plain]], "hae")
    ours = SimpleNamespace(backend=backends.EvictionCPUAttentionBackend, layer_names=[LAYER], kernel_block_size=None)
    backends.check_attention_backends([[ours]], "hae")
    split = SimpleNamespace(backend=backends.EvictionCPUAttentionBackend, layer_names=[LAYER], kernel_block_size=16)
    with pytest.raises(EvictionConfigError, match="kernel blocks"):
        backends.check_attention_backends([[split]], "hae")


_PLAIN_ENGINE = """
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=1024, enforce_eager=True)
out = llm.generate(["USER: hello ASSISTANT:"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
print("@@generated", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.engine
def test_serve_refuses_a_backend_it_does_not_patch(llava_path, monkeypatch):
    """`vllm serve --kv-eviction hae` with CPU_ATTN left plain (test-only switch) stops at
    start-up naming the backend; without eviction an engine on the same plain backend starts."""
    from hae_vllm.testing.scenario import launcher

    monkeypatch.setenv("HAE_VLLM_TEST_UNREGISTERED_BACKENDS", "CPU_ATTN")
    vllm = str(__import__("pathlib").Path(sys.executable).parent / "vllm")
    out = subprocess.run([vllm, "serve", llava_path, "--max-model-len", "1024", "--kv-eviction", "hae",
                          "--enforce-eager"], capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "vLLM chose the attention backend CPU_ATTN" in text, text[-3000:]
    assert "Supported backends: CPU_ATTN, FLASH_ATTN, TRITON_ATTN, FLASHINFER" in text
    # Without eviction the same (plain) backend serves: an engine starts and generates.
    plain = launcher()([sys.executable, "-c", _PLAIN_ENGINE, llava_path], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert plain.returncode == 0 and "@@generated 2" in plain.stdout, plain.stderr[-3000:]
