"""``--help`` of every script in train_scripts/, benchmarks/ and experiments/ prints its usage and exits 0."""

import glob
import json
import os
import subprocess
import sys

from testing_utils import ROOT

SCRIPTS = sorted(
    glob.glob(os.path.join(ROOT, "train_scripts", "*.py"))
    + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
    + glob.glob(os.path.join(ROOT, "experiments", "*", "*.py"))
)

# One interpreter runs every script as __main__ with --help (the heavy imports are paid once); it reports, per
# script, the exit code and the start of what it printed, or the exception that escaped.
RUNNER = """
import contextlib, io, json, runpy, sys, traceback
report = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
        report[path] = {"code": None, "output": out.getvalue()}  # returned without exiting: not argparse
    except SystemExit as exit:
        report[path] = {"code": exit.code, "output": out.getvalue()}
    except BaseException:
        report[path] = {"code": "exception", "output": out.getvalue()[-1000:] + traceback.format_exc()[-2000:]}
print(json.dumps(report))
"""


def test_every_script_has_a_working_help():
    assert len(SCRIPTS) >= 13, SCRIPTS  # the six scripts, the benchmarks and the experiments
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *SCRIPTS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {
        os.path.relpath(path, ROOT): r
        for path, r in report.items()
        if r["code"] != 0 or not r["output"].startswith("usage:") or "show this help message" not in r["output"]
    }
    assert not failed, json.dumps(failed, indent=1)[-4000:]
