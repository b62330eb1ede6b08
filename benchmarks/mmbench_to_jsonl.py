"""Convert an MMBench-style TSV (index, question, hint, A..D, answer, image as base64) into the
accuracy harness's JSONL format.

    python benchmarks/mmbench_to_jsonl.py MMBench_DEV_EN.tsv mmbench_dev.jsonl [--limit 500]
    python benchmarks/accuracy.py --model /models/llava-1.5-7b-hf --dataset mmbench_dev.jsonl \\
        --dtype bfloat16 --budgets 0.1,0.2,0.4

Each row becomes a multiple-choice question ("Answer with the option's letter from the given
choices directly.", the LLaVA-1.5 evaluation prompt) scored ``exact`` on the letter; the image
stays inline as base64.  Rows without an answer (test splits) are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

OPTIONS = ("A", "B", "C", "D", "E", "F")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _present(v: str | None) -> bool:
    return v is not None and v.strip() not in ("", "nan", "NaN", "None")


def convert_row(row: dict[str, str]) -> dict | None:
    if not _present(row.get("answer")) or not _present(row.get("image")):
        return None
    lines = []
    if _present(row.get("hint")):
        lines.append(row["hint"].strip())
    lines.append(row["question"].strip())
    lines += [f"{o}. {row[o].strip()}" for o in OPTIONS if _present(row.get(o))]
    lines.append(INSTRUCTION)
    return {"id": str(row.get("index", "")), "image": row["image"].strip(), "question": "\n".join(lines),
            "answer": row["answer"].strip(), "scoring": "exact", "task": row.get("category") or "mmbench",
            "max_tokens": 4}


def convert(tsv_path: str, out_path: str, limit: int | None = None) -> int:
    csv.field_size_limit(sys.maxsize)  # images are inline base64
    n = 0
    with open(tsv_path, newline="") as f, open(out_path, "w") as out:
        for row in csv.DictReader(f, delimiter="\t"):
            item = convert_row(row)
            if item is None:
                continue
            out.write(json.dumps(item) + "\n")
            n += 1
            if limit and n >= limit:
                break
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tsv")
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    n = convert(args.tsv, args.out, args.limit)
    print(f"wrote {n} items to {args.out}")


if __name__ == "__main__":
    main()
