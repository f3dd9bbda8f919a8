"""Run every benchmark in bench/ and rewrite bench/RESULTS.md from their JSON results.

Each ``bench/bench_*.py`` is a standalone script that prints its figures and writes
``bench/results/<name>.json``: ``{"name", "figures": {...}, "command", "date", "notes"}``.
Usage: ``python bench/run_all.py [--only NAME ...] [--skip NAME ...] [--no-run]`` (``--no-run`` only
rewrites RESULTS.md from the existing JSON files). Scripts that need a trained model or a long run
(``overfit_check.py``, ``bf16_accuracy.py``, ``compare_predict_commits.py``) are run by hand with the
command their result records; RESULTS.md includes their results too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def machine_summary() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results_md() -> Path:
    lines = [
        "# Benchmark results",
        "",
        ("Written by `make bench` (`python bench/run_all.py`); each section comes from "
         "`bench/results/<name>.json`, written by the script named in its command."),
        "Ratios are measured side by side in one run on this (noisy) machine; each script says how many",
        "repetitions it ran and reports the median.",
        "",
        f"Rewritten on: {machine_summary()}. Each section keeps the figures of the run that wrote it (its date);",
        "the CPU varied between runs (an Intel Xeon with AMX or an AMD EPYC without), named in a section's notes",
        "where it matters.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        lines += [f"## {result.get('name', path.stem)}", ""]
        lines += [f"- command: `{result.get('command', '')}`", f"- date: {result.get('date', '')}"]
        if result.get("notes"):
            lines.append(f"- notes: {result['notes']}")
        lines += ["", "| figure | value |", "|---|---|"]
        for key, value in result.get("figures", {}).items():
            lines.append(f"| {key} | {format_value(value)} |")
        lines.append("")
    out = BENCH / "RESULTS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks (names without .py)")
    parser.add_argument("--skip", nargs="*", default=[], help="skip these benchmarks")
    parser.add_argument("--no-run", action="store_true", help="only rewrite RESULTS.md")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    failures = []
    if not args.no_run:
        for script in sorted(BENCH.glob("bench_*.py")):
            name = script.stem
            if (args.only is not None and name not in args.only) or name in args.skip:
                continue
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(script)], check=False, cwd=BENCH.parent)
            print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
            if proc.returncode != 0:
                failures.append(name)
    print(f"wrote {write_results_md()}")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
