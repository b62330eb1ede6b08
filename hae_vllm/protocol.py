"""Every message between the scheduler (EngineCore process) and the workers, in one place.

vLLM gives a plugin no field of its own in these objects, so each message rides as an
attribute of an object vLLM already sends between the two (pickled with it):

============================ ============================ =====================================
attribute                    carried by                   value
============================ ============================ =====================================
:data:`REPORT_ATTR`          ``ModelRunnerOutput``        ``{req_id: EvictionReport}``
                             (worker -> scheduler)        what the step evicted, parked,
                                                          released or wants back
:data:`PRESSURE_ATTR`        ``SchedulerOutput``          ``bool``: the pool is short; free
                             (scheduler -> worker)        evicted blocks within this step
:data:`BIN_UPDATES_ATTR`     ``SchedulerOutput``          ``{req_id: BinUpdates}``: restores
                                                          confirmed, parked blocks lost
:data:`SESSION_ATTR`         ``SchedulerOutput``          ``{req_id: SessionStart}``: requests
                                                          starting from an earlier request's
                                                          kept cache (``engine/sessions.py``)
:data:`QUERY_STARTS_ATTR`    a backend's attention        the step's query starts (host
                             metadata (builder -> the     tensor), which FlashInfer's and
                             same worker's scoring)       FlashAttention's metadata lack
============================ ============================ =====================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

REPORT_ATTR = "hae_eviction_reports"
PRESSURE_ATTR = "hae_memory_pressure"
BIN_UPDATES_ATTR = "hae_bin_updates"
SESSION_ATTR = "hae_sessions"
QUERY_STARTS_ATTR = "hae_query_start_loc_cpu"


@dataclass(frozen=True)
class EvictionReport:
    """Worker -> scheduler, per request and step.

    hole_blocks: logical blocks that are now null holes (prefill eviction: free them);
    num_prompt_tokens: the tokens a prefill decision saw (set by every decision, one that
    evicts nothing included: the scheduler then knows the request's eviction is final);
    parked: (logical index, block id) moved to the recycle bin (decode eviction);
    released: parked block ids released for good; restore: (index, block id) to take back.
    """

    hole_blocks: tuple[int, ...] = ()
    num_visual: int = 0
    num_text: int = 0
    num_prompt_tokens: int = 0
    parked: tuple[tuple[int, int], ...] = ()
    released: tuple[int, ...] = ()
    restore: tuple[tuple[int, int], ...] = ()


@dataclass
class BinUpdates:
    """Scheduler -> worker, per request: bin blocks restored (logical index, block id) or lost
    (handed out again by the pool before they could be restored)."""

    restored: list[tuple[int, int]] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class SessionStart(NamedTuple):
    """Scheduler -> worker: a request starts from the cache ``source`` left, ``num_tokens`` of
    its prompt served from it (null placeholders where ``source`` had holes)."""

    source: str
    num_tokens: int
