"""DLP accuracy on the generated labelled corpus: recall and precision per rule.

    python benchmarks/dlp_accuracy.py [--seed 1] [--per-rule 300] [--chunk-size 4096]
                                      [--json out.json] [--check]

All documents are concatenated into ONE stream (blank line between documents) and
fed through the engine in ``--chunk-size`` pieces, exactly like a connection
through the sidecar; a finding counts as a true positive only when its rule and
its exact byte span match the label.  Prints a table and a JSON document;
``--check`` exits 1 when payment cards, SSN or IBAN fall below 99.5 % recall or
precision (the goal of issue 5).  Only masked values and document kinds are ever
printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlp_corpus import corpus  # noqa: E402

from firewall.dlp.engine import DlpEngine  # noqa: E402

GOAL = 0.995
GOAL_GROUPS = {"payment cards": lambda r: r.startswith("card."), "ssn": lambda r: r == "us.ssn",
               "iban": lambda r: r == "eu.iban"}


def _ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


def measure(seed: int, per_rule: int, chunk_size: int, rules: str | None = None,
            cache_dir: str | None = None) -> dict:
    docs = corpus(seed, per_rule)
    engine = DlpEngine.load(rules, cache_dir=cache_dir)
    expected: set[tuple[str, int, int]] = set()
    kind_at: dict[tuple[int, int], str] = {}
    parts = []
    off = 0
    for d in docs:
        for rule, s, e in d.labels:
            expected.add((rule, off + s, off + e))
        kind_at[(off, off + len(d.text))] = d.kind
        parts.append(d.text)
        off += len(d.text) + 2
    data = b"\n\n".join(parts)
    found = {(f.rule_id, f.start, f.end) for f in engine.scan_bytes(data, chunk_size)}
    starts = sorted(kind_at)

    def kind_of(pos: int) -> str:
        import bisect
        i = bisect.bisect_right(starts, (pos, 1 << 62)) - 1
        return kind_at[starts[i]] if i >= 0 else "?"

    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    fp_kinds: dict[str, Counter[str]] = defaultdict(Counter)
    fn_kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for item in found:
        if item in expected:
            tp[item[0]] += 1
        else:
            fp[item[0]] += 1
            fp_kinds[item[0]][kind_of(item[1])] += 1
    for item in expected - found:
        fn[item[0]] += 1
        fn_kinds[item[0]][kind_of(item[1])] += 1
    rules_seen = sorted(set(tp) | set(fp) | set(fn))
    per_rule_rows = {}
    for r in rules_seen:
        per_rule_rows[r] = {"tp": tp[r], "fp": fp[r], "fn": fn[r],
                            "recall": round(_ratio(tp[r], tp[r] + fn[r]), 5),
                            "precision": round(_ratio(tp[r], tp[r] + fp[r]), 5),
                            "fp_kinds": dict(fp_kinds[r].most_common(5)),
                            "fn_kinds": dict(fn_kinds[r].most_common(5))}
    groups = {}
    for name, pred in GOAL_GROUPS.items():
        t = sum(v for k, v in tp.items() if pred(k))
        f_p = sum(v for k, v in fp.items() if pred(k))
        f_n = sum(v for k, v in fn.items() if pred(k))
        groups[name] = {"tp": t, "fp": f_p, "fn": f_n, "recall": round(_ratio(t, t + f_n), 5),
                        "precision": round(_ratio(t, t + f_p), 5)}
    negatives = sum(1 for d in docs if not d.labels)
    return {"seed": seed, "per_rule": per_rule, "chunk_size": chunk_size, "documents": len(docs),
            "negative_documents": negatives, "bytes": len(data), "rules": per_rule_rows,
            "goal_groups": groups, "goal": GOAL,
            "goal_met": all(g["recall"] >= GOAL and g["precision"] >= GOAL for g in groups.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-rule", type=int, default=300)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--rules", help="rule directory (default: the repo's dlp_rules)")
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--check", action="store_true", help="exit 1 if the 99.5%% goal is not met")
    args = ap.parse_args(argv)
    res = measure(args.seed, args.per_rule, args.chunk_size, args.rules)
    print(f"DLP accuracy: {res['documents']} documents ({res['negative_documents']} hard negatives), "
          f"{res['bytes']} bytes, one stream, chunk {res['chunk_size']}")
    print(f"{'rule':<28} {'tp':>6} {'fp':>5} {'fn':>5} {'recall':>8} {'precision':>9}")
    for r, row in res["rules"].items():
        print(f"{r:<28} {row['tp']:>6} {row['fp']:>5} {row['fn']:>5} {row['recall']:>8.2%} {row['precision']:>9.2%}"
              + (f"  fp:{row['fp_kinds']}" if row["fp"] else "") + (f"  fn:{row['fn_kinds']}" if row["fn"] else ""))
    print("-" * 66)
    for name, g in res["goal_groups"].items():
        print(f"{name:<28} {g['tp']:>6} {g['fp']:>5} {g['fn']:>5} {g['recall']:>8.2%} {g['precision']:>9.2%}")
    print(f"goal >= {GOAL:.1%} recall and precision on cards, SSN, IBAN: {'met' if res['goal_met'] else 'NOT met'}")
    doc = json.dumps(res, indent=2)
    print(doc)
    if args.json:
        Path(args.json).write_text(doc + "\n")
    return 1 if args.check and not res["goal_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
