"""HAE ablations in one engine: each variant of a YAML sweep is applied per request.

    python benchmarks/ablation.py benchmarks/configs/ablations/hae_r_sweep.yaml
    python benchmarks/ablation.py benchmarks/configs/ablations/hae_per_layer_overlap.yaml

A sweep file has ``base`` (settings shared by all variants) and ``variants`` (a list of
overrides); a plain preset file is one variant.  For each variant: logical eviction (share of
prompt tokens chosen), physical eviction (blocks freed), and the per-layer overlap diagnostics
when the variant measures it.  Results go to ``benchmarks/results/ablation_<name>.json``.

Last line: ``variants=<n> evicted_frac=<v1>,<v2>,... [layer_overlap_mean=<x>]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.config import REQUEST_FIELDS  # noqa: E402
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, environment_info, run_in_subprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("--num-images", type=int, default=4, help="image requests per variant")
    ap.add_argument("--model", default="llava")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.sweep).read_text())
    base = spec.get("base", {k: v for k, v in spec.items() if k != "variants"})
    variants = spec.get("variants") or [{}]
    method = base.get("method", "hae")
    reqs, owners = [], []
    for vi, var in enumerate(variants):
        knobs = {"kv_eviction": method}
        for k, v in {**base, **var}.items():
            if k in REQUEST_FIELDS:
                knobs[f"kv_eviction_{k}"] = v
        for i in range(args.num_images):
            reqs.append(RequestSpec(text="What is in the top left corner?", images=[70 + i], max_tokens=4, extra_args=knobs))
            owners.append(vi)
    rec = run_in_subprocess(ScenarioSpec(model=args.model, requests=reqs, eviction=method))
    rows = []
    for vi, var in enumerate(variants):
        mine = [r for r, o in zip(rec["results"], owners) if o == vi]
        prompt = sum(len(r["prompt_token_ids"]) for r in mine)
        chosen = sum(len(r["eviction"]["evicted_positions"]) if r["eviction"] else 0 for r in mine)
        holes = sum(len(r["eviction"]["hole_blocks"]) if r["eviction"] else 0 for r in mine)
        overlaps = [r["eviction"]["diagnostics"].get("hae_layer_overlap") for r in mine if r["eviction"]]
        overlaps = [o for o in overlaps if o]
        per_layer = [sum(col) / len(col) for col in zip(*overlaps)] if overlaps else None
        rows.append({"variant": var, "evicted_frac": chosen / prompt, "blocks_freed": holes, "layer_overlap": per_layer})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.sweep).stem
    (out / f"ablation_{name}.json").write_text(json.dumps(
        {"sweep": spec, "rows": rows, "num_images": args.num_images, "model": args.model, "machine": environment_info()}, indent=2))
    for r in rows:
        lo = "" if r["layer_overlap"] is None else " layer_overlap=" + ",".join(f"{x:.3f}" for x in r["layer_overlap"])
        print(f"{json.dumps(r['variant'])}: evicted_frac={r['evicted_frac']:.3f} blocks_freed={r['blocks_freed']}{lo}")
    last = f"variants={len(rows)} evicted_frac=" + ",".join(f"{r['evicted_frac']:.3f}" for r in rows)
    ov = [x for r in rows if r["layer_overlap"] for x in r["layer_overlap"][1:]]
    if ov:
        last += f" layer_overlap_mean={sum(ov) / len(ov):.3f}"
    print(last)


if __name__ == "__main__":
    main()
