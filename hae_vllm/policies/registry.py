"""Method name -> policy class.  ``--kv-eviction NAME`` and per-request ``kv_eviction`` use it."""

from __future__ import annotations

from hae_vllm.policies.base import Policy
from hae_vllm.policies.fastv import FastVPolicy
from hae_vllm.policies.h2o import H2OPolicy
from hae_vllm.policies.hae import HAEPolicy
from hae_vllm.policies.madakv import MadaKVPolicy
from hae_vllm.policies.random import RandomPolicy
from hae_vllm.policies.snapkv import SnapKVPolicy
from hae_vllm.policies.streamingllm import StreamingLLMPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (HAEPolicy, MadaKVPolicy, StreamingLLMPolicy, H2OPolicy, SnapKVPolicy, FastVPolicy, RandomPolicy)
}


def get_policy(name: str) -> Policy:
    return POLICIES[name]()
