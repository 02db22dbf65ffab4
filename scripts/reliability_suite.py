#!/usr/bin/env python
"""Run the reliability suite (tests/reliability/) and print its totals as JSON.

    python scripts/reliability_suite.py            # every case, the slow kill -9 ones included
    python scripts/reliability_suite.py --fast     # skip the cases marked slow
    python scripts/reliability_suite.py --subprocess   # run each script case as a real `python scripts/...`

The suite builds every file it uses (malicious pickles, damaged checkpoints, bad PLYs, broken
subject folders) and checks that each bad input gives a non-zero exit, no traceback and a message
naming the file, and that no malicious file runs anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--fast", action="store_true", help="skip the cases marked slow (kill -9 during training)")
    ap.add_argument("--subprocess", action="store_true", help="run script cases in a fresh Python process each")
    ap.add_argument("-k", default="", help="pytest -k expression to select cases")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.subprocess:
        env["REL_SUBPROCESS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "reliability"), "-q", "-p", "no:cacheprovider",
               "-m", "not slow" if args.fast else "slow or not slow", f"--junitxml={report}"]
        if args.k:
            cmd += ["-k", args.k]
        proc = subprocess.run(cmd, cwd=str(REPO), env=env)
        if not report.is_file():
            print(json.dumps({"error": "pytest produced no report", "exit_code": proc.returncode}))
            return proc.returncode or 1
        totals: Counter = Counter()
        groups: dict = {}
        failed = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            totals[outcome] += 1
            group = case.get("classname", "").split(".")[-1]
            groups.setdefault(group, Counter())[outcome] += 1
            if outcome == "failed":
                failed.append(f"{group}::{case.get('name')}")
    summary = {"cases": sum(totals.values()), **{k: totals.get(k, 0) for k in ("passed", "failed", "skipped")},
               "by_file": {g: dict(c) for g, c in sorted(groups.items())}, "failed_cases": failed}
    print(json.dumps(summary, indent=2))
    return 0 if not failed and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
