"""Multi-turn image chat with prefix caching: what eviction costs (or saves) a chat service per turn.

    python benchmarks/multiturn.py [--method hae] [--budget 0.4] [--conversations 8] [--turns 3] [--images 1]

Conversations share a system prompt; each has its own image(s) (``--images``, sent with the
first question) and ``--turns`` turns; every turn's prompt is the whole conversation so far
(system prompt, earlier questions and answers), as chat clients send it.  The conversations
are interleaved: turn t of all of them is one batch.  The same conversations run on an engine
without eviction (``none``) and on one with the method, each in its own process, prefix
caching on (``hae_lab.conversation``).  With the method, a follow-up turn continues
from the cache the previous turn's eviction left (``hae_vllm.engine.sessions``).  Per turn: the
share of prompt tokens served from cache (``RequestOutput.num_cached_tokens``), prompt tokens
computed, median TTFT; per engine the peak KV blocks in use (read from the block pool after
every ``schedule()``).  Every request of the method's run is replayed on the HF oracle
(``SessionReplay``: one masked cache per conversation, turn after turn).

Last line: turn2_cached_frac=<x> none_turn2_cached_frac=<y> prompt_tokens_computed_ratio=<method/none>
peak_kv_blocks_ratio=<method/none> hf_oracle_match=<true|false>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def per_turn(rec: dict) -> list[dict]:
    rows = []
    for reqs in rec["turns"]:
        prompt = sum(r["prompt_tokens"] for r in reqs)
        cached = sum(r["cached_tokens"] for r in reqs)
        ttfts = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
        rows.append({"cached_frac": cached / prompt, "prompt_tokens": prompt, "computed_tokens": prompt - cached,
                     "median_ttft_s": statistics.median(ttfts) if ttfts else None,
                     "session_hits": sum(1 for r in reqs for t in r.get("trace", []) if t["kind"] == "session")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="hae")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--images", type=int, default=1, help="images per conversation (1 or 2)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32: the oracle check is exact")
    ap.add_argument("--arrivals", choices=("together", "staggered"), default="staggered",
                    help="together: turn t of every conversation is one batch (every first prompt prefilled at "
                         "once); staggered: conversation c starts at round c %% turns, so batches mix "
                         "conversations at every turn (a chat service's steady state)")
    ap.add_argument("--no-reuse", action="store_true", help="the method without conversation reuse (session_reuse off)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    from hae_lab.conversation import ConversationSpec, oracle_check, run_in_subprocess
    from hae_vllm.testing.oracle import HFOracle, Tolerance
    from hae_vllm.testing.scenario import environment_info
    from hae_lab.tiny_models import tiny_model_path

    t0 = time.time()
    common = dict(conversations=args.conversations, turns=args.turns, images=args.images, max_tokens=args.max_tokens,
                  dtype=args.dtype, stagger=args.arrivals == "staggered")
    base = run_in_subprocess(ConversationSpec(method="none", budget=None, **common))
    meth = run_in_subprocess(ConversationSpec(method=args.method, budget=args.budget, **common,
                                              extra_args={"kv_eviction_session_reuse": False} if args.no_reuse else {}))
    checks = oracle_check(meth, HFOracle(str(tiny_model_path("llava")), dtype=args.dtype), Tolerance.for_dtype(args.dtype))
    oracle_ok = bool(checks) and all(c["ok"] for c in checks)
    rows_none, rows_meth = per_turn(base), per_turn(meth)
    computed_ratio = sum(r["computed_tokens"] for r in rows_meth) / sum(r["computed_tokens"] for r in rows_none)
    peak_ratio = meth["peak_blocks_in_use"] / base["peak_blocks_in_use"]
    summary = {
        "benchmark": "multiturn", "args": vars(args),
        "per_turn": {"none": rows_none, args.method: rows_meth},
        "peak_blocks_in_use": {"none": base["peak_blocks_in_use"], args.method: meth["peak_blocks_in_use"]},
        "prompt_tokens_computed_ratio": computed_ratio, "peak_kv_blocks_ratio": peak_ratio,
        "eviction_stats": meth["eviction_stats"], "leaked_blocks": meth["free_blocks_before"] - meth["free_blocks_after"],
        "hf_oracle_match": oracle_ok, "oracle": checks, "wall_s": time.time() - t0, "machine": environment_info(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"multiturn_{args.method}{args.tag}.json").write_text(json.dumps(summary, indent=2))
    for name, rows in (("none", rows_none), (args.method, rows_meth)):
        print(name, " ".join(f"turn{t + 1}: cached {r['cached_frac']:.2f} computed {r['computed_tokens']} "
                             f"ttft {r['median_ttft_s'] * 1e3:.0f}ms" for t, r in enumerate(rows)))
    print(f"peak KV blocks: none {base['peak_blocks_in_use']} {args.method} {meth['peak_blocks_in_use']}")
    t2 = 1 if args.turns > 1 else 0
    print(f"turn2_cached_frac={rows_meth[t2]['cached_frac']:.4f} none_turn2_cached_frac={rows_none[t2]['cached_frac']:.4f} "
          f"prompt_tokens_computed_ratio={computed_ratio:.4f} peak_kv_blocks_ratio={peak_ratio:.4f} "
          f"hf_oracle_match={str(oracle_ok).lower()}")


if __name__ == "__main__":
    main()
