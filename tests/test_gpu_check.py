"""benchmarks/gpu_check.sh: its CPU fallback prints the whole table with numbers, a failing, hanging or out-of-time row
is reported in its own status while the others run, and the FSDP rows report a script's exit, wall time and last
error line. No timing thresholds: only that every figure is there."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from testing_utils import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
IN_PROCESS_ROWS = [
    "AE FLUX no SE",
    "AE FLUX SE x2",
    "AE FLUX SE x4",
    "Video AE CogVideoX SE x2",
    "DiT-B/2 flow matching",
    "DiT-XL/2 flow matching",
]
FSDP_ROWS = ["FSDP train_ae_se.py", "FSDP train_dit_flow.py"]
NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_table(stdout):
    """The markdown table's header and rows (lists of cells)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], cells[1:]


def test_cpu_fallback_prints_every_row_with_numbers(tmp_path, gpu_check):
    out_json = tmp_path / "rows.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPU_CHECK_HARD_TIMEOUT_S="1200", OMP_NUM_THREADS="2")
    # A budget far above the run's needs: a loaded CI machine must not turn rows into "skipped"
    cmd = [
        "bash",
        os.path.join(ROOT, "benchmarks", "gpu_check.sh"),
        "--tiny",
        "--steps",
        "1",
        "--budget_s",
        "1000",
        "--json",
        out_json,
    ]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = parse_table(proc.stdout)
    assert header == gpu_check.HEADER
    assert [r[0] for r in rows] == IN_PROCESS_ROWS + FSDP_ROWS, proc.stdout  # one table, every row once
    by_name = {r[0]: dict(zip(header, r)) for r in rows}
    for name in IN_PROCESS_ROWS:
        row = by_name[name]
        assert row["status"] == "ok", (name, row, proc.stderr[-3000:])
        assert row["dtype"] == "fp32"
        step = re.fullmatch(rf"({NUMBER}) \(n=([0-9]+)\)", row["step ms (median)"])
        assert step and float(step[1]) > 0 and int(step[2]) >= 1, row
        unit = "clip/s" if name.startswith("Video") else "img/s"
        throughput = re.fullmatch(rf"({NUMBER}) {re.escape(unit)}", row["throughput"])
        assert throughput and float(throughput[1]) > 0, row
        assert float(row["peak mem GB"]) > 0, row
    # The SE overhead next to the paper's bound, with the FLOPs counted on the meta device
    se4 = by_name["AE FLUX SE x4"]["notes"]
    assert re.search(rf"step time [+-]{NUMBER}%", se4) and "+10.75% bound" in se4, se4
    assert re.search(rf"fwd FLOPs \+{NUMBER}%", by_name["AE FLUX SE x2"]["notes"])
    assert "LPIPS (random-init alex)" in by_name["AE FLUX no SE"]["notes"]
    for name in FSDP_ROWS:
        assert by_name[name]["status"].startswith("skipped: no CUDA device"), by_name[name]
    saved = json.loads(out_json.read_text())
    assert [r["name"] for r in saved["rows"]] == IN_PROCESS_ROWS + FSDP_ROWS
    assert all(r["step_ms"] > 0 for r in saved["rows"] if r["name"] in IN_PROCESS_ROWS)


def test_a_failing_row_is_its_status_and_the_other_rows_still_run(gpu_check, capsys):
    _, ctx, _ = gpu_check.parse_args(["--tiny"])
    Group, Row = gpu_check.Group, gpu_check.Row

    def oom(ctx, rows):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def broken(ctx, rows):
        raise ValueError("shapes do not match\nsecond line")

    def half_way(ctx, rows):
        rows["half 1"].status = "ok"
        raise KeyError("after the first row")

    def hangs(ctx, rows):
        while True:
            time.sleep(0.01)

    def fine(ctx, rows):
        (row,) = rows.values()
        row.step_ms, row.steps, row.throughput, row.status = 12.5, 3, 80.0, "ok"

    groups = [
        Group("x", [Row("oom", "1", "fp32")], oom, 30),
        Group("x", [Row("broken", "1", "fp32")], broken, 30),
        Group("x", [Row("half 1", "1", "fp32"), Row("half 2", "1", "fp32")], half_way, 30),
        Group("x", [Row("hangs", "1", "fp32")], hangs, 1.0, min_s=0.0),
        Group("x", [Row("fine", "1", "fp32")], fine, 30),
    ]
    rows = {r.name: r for r in gpu_check.run_groups(ctx, groups, budget_s=1000, start=time.monotonic())}
    assert rows["oom"].status == "OOM"
    assert rows["broken"].status == "error: ValueError: shapes do not match"
    assert rows["half 1"].status.startswith("ok, then error: KeyError")
    assert rows["half 2"].status.startswith("error: KeyError")
    assert rows["hangs"].status == "timeout after 1 s"
    assert rows["fine"].status == "ok" and rows["fine"].cells()[3:5] == ["12.5 (n=3)", "80 img/s"]
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in printed] == list(rows)  # printed as they finished


def test_rows_beyond_the_budget_are_skipped_and_later_rows_keep_their_share(gpu_check):
    _, ctx, _ = gpu_check.parse_args(["--tiny"])
    seen = []

    def record(ctx, rows):
        seen.append(list(rows))
        for r in rows.values():
            r.status = "ok"

    Group, Row = gpu_check.Group, gpu_check.Row
    spent = gpu_check.run_groups(ctx, [Group("x", [Row("late", "1", "fp32")], record, 30)], 10, time.monotonic() - 20)
    assert spent[0].status.startswith("skipped: time budget") and not seen
    # 30 s left, 25 s reserved for the next group: the first one may use 5 s, and the second still runs
    groups = [Group("x", [Row("a", "1", "fp32")], record, 60), Group("x", [Row("b", "1", "fp32")], record, 60, 25)]
    out = gpu_check.run_groups(ctx, groups, 30, time.monotonic())
    assert [r.status for r in out] == ["ok", "ok"] and seen == [["a"], ["b"]]


@pytest.mark.parametrize(
    "output, line",
    [
        ("loading\r 10%|#  | 1/3\r100%|###| 3/3\nerror: FSDP is not supported by this script yet\nE1202 api.py failed\n",
         "error: FSDP is not supported by this script yet"),
        ("Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory\n",
         "torch.OutOfMemoryError: CUDA out of memory"),
        ("step 1\nstep 2\n\n", "step 2"),
        ("", ""),
    ],
)  # fmt: skip
def test_last_error_line(gpu_check, output, line):
    assert gpu_check.last_error_line(output) == line


def test_script_runs_report_exit_wall_time_error_line_and_peak(gpu_check, tmp_path):
    Row = gpu_check.Row
    failing = "import sys; print('Peak memory: 1.25 GiB (CUDA allocated)'); print('error: no FSDP'); sys.exit(2)"
    result = gpu_check.run_subprocess([sys.executable, "-c", failing], 60)
    row = Row("FSDP x", "", "bf16")
    gpu_check.describe_run(result, row, None)
    assert row.status == "failed (exit 2)" and row.peak_gb == 1.25
    assert re.fullmatch(rf"wall {NUMBER} s", row.notes[0]) and row.notes[1] == "last error line: error: no FSDP"

    row = Row("FSDP y", "", "bf16")
    gpu_check.describe_run(gpu_check.run_subprocess([sys.executable, "-c", "pass"], 60), row, str(tmp_path / "x.json"))
    assert row.status == "failed: exit 0 but no x.json"
    (tmp_path / "x.json").write_text("{}")
    row = Row("FSDP z", "", "bf16")
    gpu_check.describe_run(gpu_check.run_subprocess([sys.executable, "-c", "pass"], 60), row, str(tmp_path / "x.json"))
    assert row.status == "ok" and len(row.notes) == 1


def test_a_timed_out_script_is_killed_with_its_children(gpu_check, tmp_path):
    pid_file = tmp_path / "child.pid"
    # The launcher starts a worker and both sleep, as `accelerate launch` and its torchrun worker would
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)"
    )
    result = gpu_check.run_subprocess([sys.executable, "-c", code], 3)
    row = gpu_check.Row("FSDP slow", "", "bf16")
    gpu_check.describe_run(result, row, None)
    assert result["timed_out"] and row.status.startswith("timeout (")
    assert row.notes[1] == "last error line: started"
    child = int(pid_file.read_text())
    for _ in range(100):  # reaped by init once killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with open(f"/proc/{child}/stat") as f:
            assert f.read().split()[2] == "Z", "the worker outlived the timeout"
