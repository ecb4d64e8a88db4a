"""`make bench`: run every benchmark, print one table of ratios, save each result as JSON.

Each benchmark module exposes `main() -> dict`: either one row itself (`name`, `ratio`, `target`,
`note`) or several under `rows`. Timings are only ever compared against a baseline measured in the
same run, because absolute times on shared machines mislead. The table is printed and also written
as markdown to `bench/results/table.md` (the README's Benchmarks section shows it).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = ["scoring", "evaluate", "train", "packing", "quantize", "gguf", "flow"]
RESULTS = Path(__file__).parent / "results"


def _environment() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "commit": commit,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


_TARGET = re.compile(r"^\s*(>=|<=|>|<)?\s*([0-9.]+)\s*(x|%)?")


def target_met(ratio: object, target: object) -> str:
    """"yes"/"no" when the target reads like `>= 1.5x`, `<= 10%` or `50%` (at least), else ""."""
    m = _TARGET.match(str(target))
    if m is None:
        return ""
    op, bound, unit = m.group(1) or ">=", float(m.group(2)), m.group(3)
    if isinstance(ratio, str) and ratio.endswith("%"):
        value = float(ratio[:-1])
        if unit != "%":
            return ""
    elif isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        value = float(ratio) * (100 if unit == "%" else 1)
    else:
        return ""
    ok = {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
    return "yes" if ok else "no"


def row_met(row: dict) -> str:
    """A row's own verdict (`met`: a bool, for a target that is not a bound on the ratio), else `target_met`."""
    if isinstance(row.get("met"), bool):
        return "yes" if row["met"] else "no"
    return target_met(row.get("ratio"), row.get("target"))


def _ratio_text(ratio: object) -> str:
    return f"{ratio:.2f}x" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else str(ratio)


def markdown_table(rows: list[dict], env: dict) -> str:
    """The rows as a markdown table, with the commit, date and machine under it."""
    lines = ["| benchmark | ratio | target | met | note |", "|---|---:|---|---|---|"]
    for r in rows:
        note = str(r.get("note", "")).replace("|", "/")
        lines.append(
            f"| {r.get('name', '?')} | {_ratio_text(r.get('ratio'))} | {r.get('target', '')} "
            f"| {row_met(r)} | {note} |"
        )
    lines.append("")
    lines.append(
        f"{env['when'][:10]}, commit {env['commit']}, {env['cores']} cores ({env['processor']}), "
        f"torch {env['torch']}, transformers {env['transformers']}"
    )
    return "\n".join(lines) + "\n"


def main(names: list[str] | None = None) -> int:
    """Run the named benchmarks (default: all) and print the table."""
    env = _environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for name in names or BENCHMARKS:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                print(f"[bench] {name}: not written yet, skipped", flush=True)
                continue
            raise
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = module.main()
        except Exception:  # noqa: BLE001 - a broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        result = {"benchmark": name, "seconds": round(time.perf_counter() - start, 1), **result, "environment": env}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        rows.extend(result.get("rows", [result]))
    print()
    print(f"{'benchmark':<38} {'ratio':>8}  {'target':<13} {'met':<4} note")
    print("-" * 110)
    for r in rows:
        met = row_met(r)
        print(f"{r.get('name', '?'):<38} {_ratio_text(r.get('ratio')):>8}  {r.get('target', '')!s:<13} {met:<4} {r.get('note', '')}")
    if rows:
        (RESULTS / "table.md").write_text(markdown_table(rows, env), encoding="utf-8")
    print(f"\nresults: {RESULTS}/ (commit {env['commit']}, {env['cores']} cores)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
