"""`make bench`: every benchmark's CPU smoke run in turn, and one JSON of its ratios against the goals.

Each benchmark runs as its own process with the CPU command its docstring gives (SMOKE below) and
writes its figures with --json; this script reads them back, computes each goal's figure (ratios come
from both sides measured in the same benchmark run), and writes them all to one file with the load
average before and after every benchmark and its CPU seconds: on shared cores absolute speeds and wall
times move by several times, so the load is part of every figure. A benchmark that fails is reported
with its error and the rest run.

    python bench/run_all.py [--out results/bench/cpu.json] [--only targets dictionary]

The GPU commands are in each benchmark's docstring; this script runs the CPU ones only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_SECONDS = 600  # the whole of `make bench`, on 2 cores
SMOKE = {
    "sharding": ["bench/sharding.py", "--megabytes", "6", "--repeats", "3"],
    "targets": ["bench/targets.py", "--text-mb", "0.01", "--quality-tokens", "256", "--repeats", "1",
                "--device", "cpu"],
    "dictionary": ["bench/dictionary.py", "--text-mb", "1", "--tokens", "20000", "--heldout", "2000", "--atoms", "256",
                   "--batch-size", "512", "--spams-iter", "200", "--device", "cpu"],
    "pretrain": ["bench/pretrain.py", "--size", "tiny", "--batch-size", "4", "--steps", "20", "--text-mb", "0.1",
                 "--shards", "2", "--atoms", "64", "--device", "cpu"],
    "extraction": ["bench/extraction.py", "--shape", "tiny", "--sequences", "4000", "--positions", "32",
                   "--batch-size", "64", "--device", "cpu"],
}


def goals(name: str, figures: dict, seconds: float) -> list[dict]:
    """The issue's goals for one benchmark: (figure, value, goal, met) rows."""
    def row(figure, value, goal, met):
        return {"benchmark": name, "figure": figure, "value": float(f"{value:.4g}"), "goal": goal, "met": bool(met)}

    if name == "sharding":
        ratio, speedup = figures["ratio_sharding_to_plain_tokenization"], figures["parallel_speedup"]
        return [row("sharding / plain tokenization, per core", ratio, ">= 0.9", ratio >= 0.9),
                row("2 workers / 1 worker", speedup, ">= 1.6 on 2 free cores", speedup >= 1.6)]
    if name == "targets":
        quality = figures["quality"]
        return [row("smoke run seconds", seconds, "<= 120", seconds <= 120),
                row("stage fast / reference FISTA-100", figures["ratio_stage_fast_to_reference"], ">= 5",
                    figures["ratio_stage_fast_to_reference"] >= 5),
                row("objective excess over the optimum, fast (reference: "
                    f"{quality['reference']['excess']:.2e})", quality["fast"]["excess"], "< the reference's",
                    quality["fast"]["objective"] < quality["reference"]["objective"]),
                row("read-back tokens per CPU second (one core)", figures["read_tokens_per_cpu_second"], ">= 2e6",
                    figures["read_tokens_per_cpu_second"] >= 2e6)]
    if name == "dictionary":
        ours, theirs = figures["torch"], figures["spams"]
        objective, time_ratio = ours["objective"] / theirs["objective"], ours["seconds"] / theirs["seconds"]
        return [row("held-out objective torch / SPAMS", objective, "<= 1", objective <= 1),
                row("time torch / SPAMS", time_ratio, "<= 1", time_ratio <= 1)]
    if name == "pretrain":
        memory, online = figures["stage"] / figures["in_memory"], figures["stage"] / figures["online"]
        return [row("stage / in-memory", memory, ">= 0.9", memory >= 0.9),
                row("stage / online reference", online, ">= 5", online >= 5)]
    rss = figures["peak_rss_ratio_large_to_small"]
    return [row("peak RSS, 4x corpus / corpus", rss, "<= 1.05", rss <= 1.05)]


def children_cpu_seconds() -> float:
    """CPU time of the finished benchmark processes: what a run costs whatever else shares the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, out_dir: Path) -> dict:
    command = [sys.executable, *SMOKE[name]]
    record = {"command": " ".join(["python", *SMOKE[name]]), "load_before": os.getloadavg()}
    if name == "dictionary" and importlib.util.find_spec("spams") is None:
        record["error"] = "skipped: SPAMS, its reference, is not installed (pip install 'mlsm-pipeline[spams]')"
        print(f"== {name}: {record['error']}", flush=True)
        return record
    print(f"== {name}: {record['command']}  (load {record['load_before'][0]:.2f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.json"
        started, started_cpu = time.perf_counter(), children_cpu_seconds()
        with open(out_dir / f"{name}.log", "w") as log:
            result = subprocess.run([*command, "--json", str(figures_path)], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["cpu_seconds"] = round(children_cpu_seconds() - started_cpu, 1)
        record["load_after"] = os.getloadavg()
        if result.returncode != 0 or not figures_path.exists():
            tail = (out_dir / f"{name}.log").read_text().strip().splitlines()[-5:]
            record["error"] = f"exit status {result.returncode}: " + " | ".join(tail)
            print(f"   failed after {record['seconds']} s: {record['error']}", flush=True)
            return record
        record["figures"] = json.loads(figures_path.read_text())
    record["goals"] = goals(name, record["figures"], record["seconds"])
    for goal in record["goals"]:
        print(f"   {goal['figure']}: {goal['value']} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})",
              flush=True)
    print(f"   {record['seconds']} s ({record['cpu_seconds']} s of CPU), load after {record['load_after'][0]:.2f}",
          flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "bench" / "cpu.json"))
    p.add_argument("--only", nargs="+", choices=sorted(SMOKE), help="run only these benchmarks")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {name: run(name, out.parent) for name in (args.only or SMOKE)}
    total = time.perf_counter() - started
    rows = [goal for record in results.values() for goal in record.get("goals", [])]
    rows.append({"benchmark": "all", "figure": "make bench seconds", "value": round(total, 1),
                 "goal": f"<= {TOTAL_SECONDS}", "met": total <= TOTAL_SECONDS})
    report = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": results[next(iter(results))]["load_before"],
                          "load_average_at_end": os.getloadavg()},
              "seconds": round(total, 1), "goals": rows, "all_goals_met": all(r["met"] for r in rows) and
              not any("error" in r for r in results.values()), "benchmarks": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{sum(r['met'] for r in rows)} of {len(rows)} goals met in {total:.0f} s; "
          f"{sum('error' in r for r in results.values())} benchmarks failed; figures in {out}")


if __name__ == "__main__":
    main()
