import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every engine step of every test checks the worker's cached hole removal against the direct
# computation (engine subprocesses inherit this).
os.environ.setdefault("HAE_VLLM_CHECK_HOLES", "1")
os.environ.setdefault("HAE_VLLM_CHECK_DECODE", "1")


@pytest.fixture(scope="session")
def llava_path():
    from hae_lab.tiny_models import tiny_model_path

    return str(tiny_model_path("llava"))


@pytest.fixture(scope="session")
def qwen2vl_path():
    from hae_lab.tiny_models import tiny_model_path

    return str(tiny_model_path("qwen2vl"))


_ORACLES = {}


@pytest.fixture(scope="session")
def oracle_for():
    from hae_vllm.testing.oracle import HFOracle

    def get(path):
        if path not in _ORACLES:
            _ORACLES[path] = HFOracle(path)
        return _ORACLES[path]

    return get
