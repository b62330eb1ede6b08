import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every engine step of every test checks the worker's cached hole removal against the direct
# computation (engine subprocesses inherit this).
os.environ.setdefault("HAE_VLLM_CHECK_HOLES", "1")
os.environ.setdefault("HAE_VLLM_CHECK_DECODE", "1")


# The environment every test starts from: as the session found it once the tests were collected
# (set by python_run, before it starts the zygote from the same environment).
_SESSION_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """Each test (and the module fixtures before it) leaves the environment as the session
    found it.  vLLM's CPU platform sets variables for its workers while it configures an
    engine (LD_PRELOAD, VLLM_WORKER_MULTIPROC_METHOD, ...); a test or module fixture that builds
    a vLLM config in this process must not hand them to every process the later tests start.
    pytest's own ``PYTEST_*`` variables are left to pytest."""
    yield
    if not _SESSION_ENV:
        return
    target = {**_SESSION_ENV, **{k: v for k, v in os.environ.items() if k.startswith("PYTEST_")}}
    if os.environ != target:
        os.environ.clear()
        os.environ.update(target)


@pytest.fixture(scope="session", autouse=True)
def python_run():
    """``subprocess.run`` for Python commands, forked from a process that has torch and vLLM
    imported (hae_lab/zygote.py: about 20 s saved per engine process); scenario runs use it too.
    ``HAE_VLLM_TEST_NO_ZYGOTE=1`` starts every process plainly."""
    import subprocess

    from hae_vllm.testing import scenario

    _SESSION_ENV.update(os.environ)

    if os.environ.get("HAE_VLLM_TEST_NO_ZYGOTE") == "1":
        yield subprocess.run
        return
    from hae_lab.zygote import Zygote

    zygote = Zygote.start()
    scenario.set_launcher(zygote.run)
    try:
        yield zygote.run
    finally:
        scenario.set_launcher(None)
        zygote.close()


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
