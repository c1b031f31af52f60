"""Wall time of an experiment's default command, `dreambooth-offset experiment NAME` (the goal of
issues 3 and 13: at most 5 minutes on 2 CPU cores), start-up and report included.

Runs the command once per `--jobs` value (fine-tunes at once; "auto" is the command's default)
into a temporary folder and prints the wall time, each run's training seconds and its first
prompt's mean luminance (the black prompt for black-image), so a faster setting can be checked
for the same result.

    python benchmarks/experiment_wall_time.py [--experiment black-image] [--jobs auto 1] [-- any experiment flags]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 300.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="black-image", choices=("black-image", "brightness-range", "subject"))
    p.add_argument("--jobs", nargs="+", default=["auto"], help='values of --jobs to time ("auto": the default)')
    p.add_argument("extra", nargs="*", help="flags passed on to the experiment (after --)")
    args = p.parse_args()
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-c", "import sys; from dreambooth_offset.cli import main; sys.exit(main(sys.argv[1:]))",
                       "experiment", args.experiment,
                       "--output_dir", tmp, *([] if jobs == "auto" else ["--jobs", jobs]), *args.extra]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            results = json.loads((Path(tmp) / "results.json").read_text())
        prompt = results.get("black_prompt") or next(iter(results["runs"][0]["prompts"]))
        runs = "; ".join(f"{r['name']} seed {r['seed']}: train {r['train_seconds']:.0f} s, "
                         f"'{prompt}' {r['prompts'][prompt]['mean_luminance']:.3f}"
                         for r in results["runs"] if r["train_seconds"])
        verdict = "meets" if seconds <= GOAL_SECONDS else "misses"
        print(f"{args.experiment} --jobs {jobs} ({results['settings']['jobs']} at once): {seconds:.1f} s, {verdict} "
              f"the {GOAL_SECONDS:.0f} s goal | {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
