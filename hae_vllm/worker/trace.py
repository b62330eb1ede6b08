"""The eviction trace (``trace_path``): one JSON line per eviction event, what the HF oracle
replays.  (The messages to the scheduler are in :mod:`hae_vllm.protocol`.)
"""

from __future__ import annotations

import json
import threading

class TraceWriter:
    """Appends eviction events to ``path`` (None: nothing is written), one JSON object a line.
    Every TP rank writes its own lines (``tp_rank``); readers keep rank 0's."""

    def __init__(self, path: str | None, tp_rank: int = 0) -> None:
        self.path = path
        self.tp_rank = tp_rank
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.path)

    def write(self, rec: dict) -> None:
        if not self.path:
            return
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prefill(self, st, plan, T: int, num_visual: int, diagnostics: dict, deferred: bool, kernels: str) -> None:
        """A request's prefill eviction (its plan: positions evicted, blocks freed)."""
        self.write({
            "request_id": st.req_id,
            "kind": "prefill",
            "method": st.cfg.method,
            "tp_rank": self.tp_rank,
            "diagnostics": diagnostics,
            "num_tokens": T,
            "evicted_positions": list(plan.victims),
            "hole_blocks": list(plan.hole_blocks),
            "num_visual_evicted": num_visual,
            "num_text_evicted": plan.num_evicted - num_visual,
            "num_visual_tokens": int(st.visual_mask.sum()),
            "config": st.cfg.to_dict(),
            # True: compacted at the start of the first decode step; False: in the prefill step
            # (the scheduler reported memory pressure).
            "at_first_decode_step": deferred,
            # Which implementation of the scoring and compaction kernels ran.
            "kernels": kernels,
        })

    def session(self, req_id: str, source: str, hit_tokens: int, num_tokens: int) -> None:
        """A request with ``num_tokens`` tokens (re)starts from the cache ``source`` kept: the
        first ``hit_tokens`` come from it, the rest are computed attending to it."""
        self.write({"request_id": req_id, "kind": "session", "source": source, "hit_tokens": int(hit_tokens),
                    "num_tokens": int(num_tokens), "tp_rank": self.tp_rank})

    def event(self, st, kind: str, num_tokens: int, positions: list[int], blocks: int) -> None:
        """A decode-stage event: ``park`` or ``restore`` of ``blocks`` blocks holding ``positions``."""
        if not self.path:
            return
        self.write({"request_id": st.req_id, "kind": kind, "num_tokens": int(num_tokens),
                    "positions": [int(p) for p in positions], "blocks": int(blocks), "tp_rank": self.tp_rank})
