"""`make bench`: run every benchmark, print one table of ratios, save each result as JSON.

Each benchmark module exposes `main() -> dict` with at least `name`, `ratio`, `baseline`, `target`
and `note`; timings are only ever compared against a baseline measured in the same run, because
absolute times on shared machines mislead.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = ["scoring", "evaluate", "train", "quantize", "flow"]
RESULTS = Path(__file__).parent / "results"


def _environment() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
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
        except Exception:  # a broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        result = {"benchmark": name, "seconds": round(time.perf_counter() - start, 1), **result, "environment": env}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        rows.extend(result.get("rows", [result]))
    print()
    print(f"{'benchmark':<34} {'ratio':>8}  {'target':<10} note")
    print("-" * 96)
    for r in rows:
        ratio = r.get("ratio")
        ratio_s = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else str(ratio)
        print(f"{r.get('name', '?'):<34} {ratio_s:>8}  {str(r.get('target', '')):<10} {r.get('note', '')}")
    print(f"\nresults: {RESULTS}/ (commit {env['commit']}, {env['cores']} cores)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
