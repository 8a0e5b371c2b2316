"""Output-folder guard, atomic saves and checkpoints, resume, one-line input errors, the launcher's thread default."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusability_hf import files
from diffusability_hf.errors import MissingPathError, UsageError, run_script
from diffusability_hf.files import (
    _move_into_place,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    lock_output_dir,
    report_written,
)
from diffusability_hf.flow import warmup_cosine
from diffusability_hf.hub import refuse_hub_token
from diffusability_hf.training.checkpoints import (
    CHECKPOINT_MARKER,
    is_complete_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    remove_interrupted_saves,
    resolve_resume,
    resume_position,
    save_checkpoint,
)
from diffusability_hf.training.launch import GracefulStop, check_launcher, tracker_config
from diffusability_hf.training.steps import NonFiniteGuard, NonFiniteLossError, StepMeter, step_generator, step_seed

from testing_utils import ROOT, forked_processes


class FakeAccelerator:
    """What save_checkpoint / load_checkpoint use of accelerate's Accelerator, on one process."""

    is_main_process, num_processes = True, 1

    def __init__(self, fail_after=None):
        self.fail_after, self.loaded = fail_after, None

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        for i, name in enumerate(("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl")):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt("killed while saving")  # what a kill leaves: a partial folder
            with open(os.path.join(path, name), "wb") as fh:
                fh.write(b"x" * 100)

    def load_state(self, path):
        with open(os.path.join(path, "custom_checkpoint_0.pkl"), "rb") as fh:
            if len(fh.read()) < 100:
                raise EOFError("Ran out of input")
        self.loaded = path


def test_checkpoints_are_atomic_and_rotated_only_after_completion(tmp_path, caplog):
    acc = FakeAccelerator()
    for step in (10, 20, 30, 40):
        save_checkpoint(acc, str(tmp_path), step, total_limit=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert all(is_complete_checkpoint(str(tmp_path / f"checkpoint-{s}")) for s in (20, 30, 40))
    # A kill in the middle of the next save leaves no checkpoint-50 and keeps the previous three
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(fail_after=2), str(tmp_path), 50, total_limit=3)
    assert not (tmp_path / "checkpoint-50").exists() and (tmp_path / ".tmp-checkpoint-50").is_dir()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-40")
    # The next save of the same step replaces the leftover
    save_checkpoint(acc, str(tmp_path), 50, total_limit=3)
    assert not (tmp_path / ".tmp-checkpoint-50").exists()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-30", "checkpoint-40", "checkpoint-50"]


def test_latest_skips_incomplete_checkpoints_and_damaged_ones_fail_clearly(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4):
        save_checkpoint(acc, str(tmp_path), step)
    os.makedirs(tmp_path / "checkpoint-6")  # e.g. written by an older, non-atomic version and killed
    (tmp_path / "checkpoint-6" / "custom_checkpoint_0.pkl").write_bytes(b"")
    warnings = []
    assert resolve_resume(str(tmp_path), "latest", warnings.append) == str(tmp_path / "checkpoint-4")
    assert len(warnings) == 1 and "checkpoint-6" in warnings[0] and "incomplete" in warnings[0]
    # Named explicitly, it is tried (an older version's checkpoint may be fine); this one is damaged: one clear line
    assert resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-6"), warnings.append).endswith("checkpoint-6")
    assert "trying to load it anyway" in warnings[-1]
    with pytest.raises(UsageError, match="checkpoint-6 is damaged.*EOFError"):
        load_checkpoint(acc, str(tmp_path / "checkpoint-6"))
    with pytest.raises(MissingPathError, match="is not a folder"):
        resolve_resume(str(tmp_path), str(tmp_path / "checkpoint-99"))
    assert resolve_resume(str(tmp_path / "new"), "latest", warnings.append) is None
    assert resolve_resume(str(tmp_path), None) is None
    # `latest` with nothing to resume starts a new run, but never over a finished run's results (both scripts)
    finished = tmp_path / "finished"
    (finished / ".tmp-checkpoint-9").mkdir(parents=True)
    found = check_output_dir(str(finished), ["config.json"], False, "latest")
    assert resolve_resume(str(finished), "latest", warnings.append, found) is None and "new run" in warnings[-1]
    (finished / "config.json").write_text("{}")
    found = check_output_dir(str(finished), ["config.json"], False, "latest")
    with pytest.raises(UsageError, match="no complete checkpoint to resume.*replace the earlier run's config.json"):
        resolve_resume(str(finished), "latest", warnings.append, found)
    assert os.path.exists(finished / "config.json")
    # Complete but damaged afterwards (a truncated file): a clear message instead of a bare EOFError
    (tmp_path / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(UsageError, match="checkpoint-4 is damaged.*EOFError"):
        load_checkpoint(acc, str(tmp_path / "checkpoint-4"))
    assert load_checkpoint(acc, str(tmp_path / "checkpoint-2")) == 2 and acc.loaded.endswith("checkpoint-2")


def test_output_dir_guard(tmp_path):
    assert check_output_dir(str(tmp_path / "new"), ["config.json"], overwrite=False) == []
    (tmp_path / "notes.txt").write_text("a user's file")
    assert check_output_dir(str(tmp_path), ["config.json"], overwrite=False) == []  # nothing of a run
    (tmp_path / "config.json").write_text("{}")
    os.makedirs(tmp_path / "checkpoint-300")
    with pytest.raises(UsageError, match=r"config.json, checkpoint-300.*--overwrite_output_dir"):
        check_output_dir(str(tmp_path), ["config.json"], overwrite=False)
    assert check_output_dir(str(tmp_path), ["config.json"], overwrite=True) == ["config.json", "checkpoint-300"]
    assert check_output_dir(str(tmp_path), ["config.json"], overwrite=False, resume="latest")
    assert remove_checkpoints(str(tmp_path)) == ["checkpoint-300"] and (tmp_path / "notes.txt").exists()


def test_atomic_save_keeps_the_old_model_on_failure_and_moves_index_files_last(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"old": 1}')
    (tmp_path / "weights.safetensors").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_save(str(tmp_path)) as tmp:
            (open(os.path.join(tmp, "weights.safetensors"), "wb")).write(b"half")
            raise RuntimeError("killed while writing the weights")
    assert (tmp_path / "weights.safetensors").read_bytes() == b"old" and (tmp_path / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "weights.safetensors"]  # no temporary folder left
    moves = []
    real = _move_into_place
    monkeypatch.setattr(files, "_move_into_place", lambda a, b: (moves.append(os.path.basename(b)), real(a, b)))
    with atomic_save(str(tmp_path)) as tmp:
        for name in ("config.json", "weights.safetensors", "zz.json"):
            open(os.path.join(tmp, name), "w").write("new")
        os.makedirs(os.path.join(tmp, "vae"))
        open(os.path.join(tmp, "vae", "config.json"), "w").write("new")
    assert moves[-1] == "config.json" and set(moves) == {"config.json", "weights.safetensors", "zz.json", "vae"}
    assert (tmp_path / "weights.safetensors").read_text() == "new" and (tmp_path / "vae" / "config.json").exists()
    with atomic_save(str(tmp_path)) as tmp:  # a folder replaces a folder
        os.makedirs(os.path.join(tmp, "vae"))
        open(os.path.join(tmp, "vae", "other.json"), "w").write("newer")
    assert os.listdir(tmp_path / "vae") == ["other.json"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


SCRIPT = """
import sys
from diffusability_hf.errors import UsageError, run_script

def main(kind):
    if kind == "usage":
        raise UsageError("--resolution 34 is not divisible by 8:\\nuse 32 or 40.")
    if kind == "toolkit":
        from diffusability_hf.losses import downsample
        import torch
        downsample(torch.zeros(1, 3, 6, 6), 4, "bilinear")
    if kind == "bug":
        import json
        json.loads("{not json")
    print("done")

run_script(main, lambda: sys.argv[1])
"""


@pytest.mark.parametrize("kind", ["usage", "toolkit", "bug", "ok"])
def test_run_script_turns_input_errors_into_one_line(tmp_path, kind):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(path), kind], capture_output=True, text=True, cwd=ROOT)
    if kind == "ok":
        assert proc.returncode == 0 and proc.stdout.strip() == "done"
    elif kind == "bug":  # an error of third-party code keeps its traceback
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "JSONDecodeError" in proc.stderr
    else:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert ("use 32 or 40" in lines[0]) if kind == "usage" else ("not divisible" in lines[0])
    if kind == "usage":
        traced = subprocess.run(
            [sys.executable, str(path), kind], capture_output=True, text=True, cwd=ROOT,
            env=dict(os.environ, DIFFUSABILITY_TRACEBACK="1"),
        )  # fmt: skip
        assert "Traceback" in traced.stderr and "UsageError" in traced.stderr


def test_run_script_frees_the_runs_reference_cycles_before_returning():
    """What a run leaves in reference cycles (an accelerator with its DDP module and process group) is freed while
    the interpreter is alive, not at interpreter finalization (where gloo's threads can abort the process)."""
    import gc

    freed = []

    class Held:
        def __del__(self):
            freed.append(True)

    def main(_):
        cycle = {"held": Held()}
        cycle["self"] = cycle

    gc.disable()  # no automatic collection can free the cycle; only run_script's own
    try:
        run_script(main, lambda: None)
        assert freed == [True]
    finally:
        gc.enable()


def test_run_script_writes_each_line_in_one_write(monkeypatch):
    """The processes of a launch share one log: a ``stopped:`` or ``error:`` line goes out in one write, newline
    included, so that two processes' lines cannot run together (``print`` writes the text and the newline apart)."""
    import signal

    from diffusability_hf.errors import TrainingStopped

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())

    def stops(_):
        raise TrainingStopped("Stopped by SIGTERM after step 2", signal.SIGTERM)

    def fails(_):
        raise UsageError("bad input")

    for main, code in ((stops, 128 + signal.SIGTERM), (fails, 2)):
        with pytest.raises(SystemExit) as exit_:
            run_script(main, lambda: None)
        assert exit_.value.code == code
    assert writes == ["stopped: Stopped by SIGTERM after step 2\n", "error: bad input\n"]


def test_run_script_leaves_what_existed_before_it_to_the_caller():
    """Objects that exist when run_script starts (the imported modules) are frozen during the run, so that its
    collection and the collector's full passes skip them; after the run, a success or an input error, the caller
    collects them as before."""
    import gc

    freed, frozen = [], []

    class Held:
        def __del__(self):
            freed.append(True)

    def fails(_):
        frozen.append(gc.get_freeze_count())
        raise UsageError("bad input")

    old = {"held": Held()}
    old["self"] = old
    del old
    gc.disable()
    try:
        run_script(lambda _: frozen.append(gc.get_freeze_count()), lambda: None)
        with pytest.raises(SystemExit):
            run_script(fails, lambda: None)
        assert freed == [] and len(frozen) == 2 and min(frozen) > 1000  # the older cycle outlived both runs
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert freed == [True]
    finally:
        gc.enable()


GROUP_PROGRAM = """
import os, sys, types
from diffusability_hf.errors import TrainingStopped, run_script

def main(ending):
    import torch
    from diffusability_hf.training.launch import make_accelerator
    args = types.SimpleNamespace(gradient_accumulation_steps=1, mixed_precision="no", report_to=None,
                                 output_dir=sys.argv[1], logging_dir="logs", max_grad_norm=1.0)
    accelerator = make_accelerator(args)  # creates the process group
    model = accelerator.prepare(torch.nn.Linear(4, 4))  # DDP
    model(torch.ones(2, 4)).sum().backward()
    import torch.distributed.nn  # what a late import of diffusers does (eval_dit.py imports it inside main)
    accelerator.unwrap_model(model)  # imports DeepSpeed where it is installed
    accelerator.wait_for_everyone()
    if ending == "stop":  # a stopped run never reaches end_training
        raise TrainingStopped("Stopped by SIGTERM after step 1", 15)
    accelerator.end_training()

code = 0
try:
    run_script(main, lambda: sys.argv[2])
except SystemExit as stop:
    code = stop.code
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
gloo = sorted(n for n in names if "gloo" in n)
sys.stdout.write(f"exit {code}, deepspeed {'deepspeed' in sys.modules}, gloo threads {gloo}\\n")  # one write per process
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from /proc (Linux)")
@pytest.mark.parametrize("ending", ["end_training", "stop"])
def test_a_launched_run_leaves_no_process_group_threads_to_interpreter_exit(tmp_path, ending):
    """After a 2-process launch's run, the process group is gone with its gloo threads: after ``end_training`` even
    when modules that bind the group into default arguments (torch.distributed.nn, DeepSpeed) are first needed after
    the group exists (``run_script`` imports them before it), and after a stopped run, which never reaches
    ``end_training`` (``run_script`` destroys the group). Threads left to interpreter finalization can abort a
    process (SIGABRT) or hang it after all its work is done."""
    import importlib.util

    from testing_utils import torchrun

    program = tmp_path / "prog.py"
    program.write_text(GROUP_PROGRAM)
    port = 29581 if ending == "stop" else 29582
    proc = subprocess.run(torchrun(port) + [str(program), str(tmp_path / "out"), ending], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, installed = 143 if ending == "stop" else 0, importlib.util.find_spec("deepspeed") is not None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("exit")]
    assert lines == [f"exit {code}, deepspeed {installed}, gloo threads []"] * 2, proc.stdout


FORKED = """
import os, sys, time
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MINE")
print(" ".join(f"{k}={os.environ[k]}" for k in keys), sys.argv[1:], os.getcwd() == sys.argv[2], flush=True)
if sys.argv[1] == "fail" and os.environ["RANK"] == "1":
    sys.exit(3)
if sys.argv[1] == "fail":
    time.sleep(600)  # as a process waiting in a collective for the one that failed
"""


@pytest.mark.slow  # starts the preloaded server (about 7 s) where no other test of the worker has
def test_forked_launch_gives_each_process_torchruns_environment_and_a_failure_ends_the_others(tmp_path):
    """``testing_utils.Forked``, which most multi-process tests launch with: each process has torchrun's variables
    with its own rank, the caller's environment, the clone as its folder and its own argv, and the outputs come back
    in rank order; a process that fails ends the other one and gives the launch its exit code."""
    program = tmp_path / "prog.py"
    program.write_text(FORKED)
    env = dict(os.environ, MINE="x")
    ok = forked_processes(2, 29591, [str(program), "ok", ROOT], env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.splitlines() == [
        f"RANK={r} LOCAL_RANK={r} WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29591 MINE=x "
        f"['ok', {ROOT!r}] True"
        for r in (0, 1)
    ]
    # Process 1's exit code, not the time limit's -9: its failure was seen while process 0 still slept
    failed = forked_processes(2, 29592, [str(program), "fail", ROOT], env, timeout=300)
    assert failed.returncode == 3 and len(failed.stdout.splitlines()) == 2, failed


THREADS = "import torch; from diffusability_hf.cpu import use_all_cpu_cores; use_all_cpu_cores(); "
THREADS += "print('threads', torch.get_num_threads())"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell one thread from all")
def test_launcher_one_thread_default_is_undone_but_a_users_choice_is_kept(tmp_path):
    path = tmp_path / "threads.py"
    path.write_text(THREADS)
    cores = len(os.sched_getaffinity(0))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no"]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def threads(cmd, **extra):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(base, **extra), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split("threads")[-1])

    assert threads(launch + [str(path)]) == cores  # the launcher exported OMP_NUM_THREADS=1 by itself
    assert threads(launch + [str(path)], OMP_NUM_THREADS="1") == 1  # the user asked for one thread
    assert threads(launch[:3] + ["--num_cpu_threads_per_process", "1"] + launch[3:] + [str(path)]) == 1
    assert threads([sys.executable, str(path)], OMP_NUM_THREADS="1") == 1  # not under the launcher


def test_atomic_json_and_report(tmp_path, capsys):
    atomic_write_json(str(tmp_path / "m.json"), {"a": torch.tensor(1.5).item()})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5} and os.listdir(tmp_path) == ["m.json"]
    text = report_written(str(tmp_path), ["m.json", "missing.png"])
    assert text == f"Wrote to {tmp_path}: m.json" and text in capsys.readouterr().out


def test_step_generator_depends_on_seed_step_rank_and_micro_batch_only():
    draw = lambda *key: torch.randn(4, generator=step_generator("cpu", *key))  # noqa: E731
    assert torch.equal(draw(3, 10, 0, 0), draw(3, 10, 0, 0))  # a resumed run draws what a straight one does
    keys = [(3, 10, 0, 0), (4, 10, 0, 0), (3, 11, 0, 0), (3, 10, 1, 0), (3, 10, 0, 1)]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
    seeds = {step_seed(s, step, r, m) for s in range(3) for step in range(200) for r in range(64) for m in range(4)}
    assert len(seeds) == 3 * 200 * 64 * 4  # no two (seed, step, process, micro-batch) share noise
    step_generator("cpu", 3, 10, 0, 0)
    a = torch.rand(3)
    step_generator("cpu", 3, 10, 0, 0)
    assert torch.equal(a, torch.rand(3))  # torch's own RNG (dropout) is seeded from the same key
    assert not torch.equal(a, torch.rand(3, generator=step_generator("cpu", 3, 10, 0, 0)))


def test_warmup_cosine_is_app_b_schedule():
    f = [warmup_cosine(s, 10, 110, 1e-4, 1e-6) for s in range(0, 121)]
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx((1e-6 + 0.5 * (1e-4 - 1e-6)) / 1e-4)  # half way through the cosine
    assert f[110] == pytest.approx(1e-2) and f[120] == pytest.approx(1e-2)  # ends at lr_end / peak, and stays
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_resume_position_and_tracker_config(tmp_path):
    acc = FakeAccelerator()
    assert resume_position(acc, None, 7, 2) == (0, 0, 0) and acc.loaded is None
    path = save_checkpoint(acc, str(tmp_path), 23)
    assert resume_position(acc, path, 7, 2) == (23, 3, 4) and acc.loaded == path  # 23 = 3 * 7 + 2 steps

    class Args:
        pass

    args = Args()
    args.lr, args.name, args.flag, args.scales, args.hub_token, args.obj = 1e-4, "x", True, [2, 4], "secret", {}
    assert tracker_config(args) == {"lr": 1e-4, "name": "x", "flag": True, "scales": "2 4"}


def test_launcher_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for version in (None, "1"):  # accelerate's default is FSDP1
        if version is None:
            monkeypatch.delenv("FSDP_VERSION", raising=False)
        else:
            monkeypatch.setenv("FSDP_VERSION", version)
        with pytest.raises(UsageError, match="fsdp_version: 2"):
            check_launcher()
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_launcher()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    check_launcher()
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--hub_token")
    with pytest.raises(SystemExit):
        refuse_hub_token(parser, parser.parse_args(["--hub_token", "hf_x"]))
    refuse_hub_token(parser, parser.parse_args([]))
    for name in (".tmp-checkpoint-5", ".tmp-save-1", "checkpoint-4", "snapshots/.old-2", "snapshots/step-2"):
        os.makedirs(tmp_path / name)
    assert remove_interrupted_saves(str(tmp_path), ["snapshots"]) == [
        ".tmp-checkpoint-5",
        ".tmp-save-1",
        os.path.join("snapshots", ".old-2"),
    ]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "snapshots"] and os.listdir(tmp_path / "snapshots") == [
        "step-2"
    ]


class FakeClock:
    """A clock the test moves by hand (``StepMeter``'s timings are then exact)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_step_meter_times_steps_and_data_waits_and_leaves_logging_out():
    meter = StepMeter(samples_per_step=32, device=torch.device("cpu"), warmup_steps=1)
    clock = meter._clock = FakeClock()
    meter.restart()

    def slow_loader(waits):
        for wait in waits:
            clock.now += wait  # time spent producing the batch
            yield wait

    figures = []
    batches = meter.batches(slow_loader([0.5, 0.25, 0.0, 1.0]))  # two micro-batches per optimizer step
    for _ in range(2):
        for _ in range(2):
            next(batches)
            clock.now += 1.0  # forward + backward of a micro-batch
        figures.append(meter.step())
        clock.now += 10.0  # logging, checkpoint, validation: not training time
        meter.restart()
    assert figures[0]["train/step_time_s"] == pytest.approx(2.75) and figures[0]["train/data_wait_s"] == 0.75
    assert figures[1]["train/step_time_s"] == pytest.approx(3.0) and figures[1]["train/data_wait_s"] == 1.0
    assert figures[0]["train/samples_per_second"] == pytest.approx(32 / 2.75)
    assert figures[0]["train/peak_memory_gb"] > 0
    summary = meter.summary()  # the first step is warm-up: left out
    assert summary["steps_measured"] == 1 and summary["samples_per_second"] == pytest.approx(32 / 3.0)
    assert summary["median_step_time_s"] == 3.0 and summary["data_wait_fraction"] == pytest.approx(1 / 3)
    assert summary["first_step_time_s"] == pytest.approx(2.75)
    with pytest.raises(StopIteration):
        next(batches)


class OneProcess:
    from accelerate.utils import DistributedType

    num_processes, gradient_accumulation_steps, distributed_type = 1, 2, DistributedType.NO


def test_non_finite_guard_skips_counts_and_stops_after_n_in_a_row():
    guard, acc = NonFiniteGuard(max_in_a_row=3), OneProcess()
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    assert guard.finite(ok, acc) and not guard.step_is_bad and guard.step_done(1) is False
    # A step with one non-finite micro-batch (of two) is skipped as a whole
    assert guard.finite(ok, acc) and not guard.finite(torch.tensor([1.0, float("inf")]), acc)
    assert guard.step_is_bad and guard.step_done(2) is True and (guard.skipped, guard.in_a_row) == (1, 1)
    assert not guard.step_is_bad  # the next step starts clean
    assert guard.finite(ok, acc) and guard.step_done(3) is False and guard.in_a_row == 0  # a finite step resets
    guard.finite(nan, acc)
    guard.step_done(4)
    guard.finite(nan, acc)
    guard.step_done(5)
    guard.finite(nan, acc)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(up to step 6; 4 skipped in all\)"):
        guard.step_done(6)
    never = NonFiniteGuard(max_in_a_row=0)  # 0: skip and count, never stop
    for step in range(20):
        never.finite(nan, acc)
        assert never.step_done(step)
    assert never.skipped == 20


class Payload:
    """A pickle that runs code when loaded (what a crafted checkpoint file would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code_and_a_planted_payload_is_one_line(tmp_path):
    """Every file of a real checkpoint (accelerate's model, optimizer, scheduler, sampler and RNG states, the
    toolkit's EMA), replaced in turn by a pickle that would run a command: resuming refuses it in one line and the
    command never runs. The EMA is saved without pickle; an older checkpoint's pickled EMA still loads, as data."""
    import pickle
    import shutil

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.fsdp import load_ema_state, save_ema_state

    def setup():
        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loader = torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=2, shuffle=True)
        model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        return acc, model, opt, EMA(model.parameters(), 3.0)

    acc, model, opt, ema = setup()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    ema.update(model.parameters(), 1)
    good = save_checkpoint(acc, str(tmp_path / "run"), 1, extra=lambda f: save_ema_state(ema, f, acc))
    files = sorted(os.listdir(good))
    assert "ema.safetensors" in files and not any(f.startswith("custom_checkpoint") for f in files)
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(files)

    acc, model, opt, fresh = setup()
    load_checkpoint(acc, good)
    load_ema_state(fresh, good, acc)
    assert fresh.num_updates == 1 and all(torch.equal(a, b) for a, b in zip(fresh.shadow, ema.shadow))

    marker = tmp_path / "pwned"
    for name in [f for f in files if f != CHECKPOINT_MARKER]:
        bad = tmp_path / f"bad-{name}" / "checkpoint-1"
        shutil.copytree(good, bad)
        (bad / name).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(ValueError) as err:
            load_checkpoint(acc, str(bad))
            load_ema_state(fresh, str(bad), acc)
        assert not marker.exists(), name
        message = str(err.value)
        assert "\n" not in message and f"Checkpoint {bad} is damaged" in message and len(message) < 600, name

    # An older version's checkpoint: the EMA pickled by accelerate. Plain data loads; a payload is refused
    legacy = tmp_path / "legacy" / "checkpoint-1"
    shutil.copytree(good, legacy)
    for name in ("ema.safetensors", "ema.json"):
        (legacy / name).unlink()
    torch.save(ema.state_dict(), legacy / "custom_checkpoint_0.pkl")
    again = EMA(model.parameters(), 3.0)
    load_ema_state(again, str(legacy), acc)
    assert all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    (legacy / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="is damaged: its EMA cannot be loaded"):
        load_ema_state(again, str(legacy), acc)
    assert not marker.exists()


def test_atomic_writes_leave_the_mode_a_plain_write_would(tmp_path):
    """Files written through a temporary file (cards, metadata.json, metrics, plots, reference statistics) get
    0o666 less the umask, as open() would give them, not mkstemp's 0600."""
    import numpy as np
    from PIL import Image

    from diffusability_hf.figures import save_png
    from diffusability_hf.metrics import FeatureStatistics

    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            folder = tmp_path / f"m{mask:o}"
            atomic_write_text(str(folder / "README.md"), "card")
            atomic_write_json(str(folder / "metadata.json"), {"a": 1})
            save_png(Image.new("RGB", (4, 4)), str(folder / "grid.png"))
            stats = FeatureStatistics()
            stats.update(torch.randn(4, 3))
            stats.save(str(folder / "ref.npz"))
            with atomic_save(str(folder / "model")) as tmp:
                with open(os.path.join(tmp, "config.json"), "w") as fh:
                    fh.write("{}")
            with open(folder / "plain.txt", "w") as fh:
                fh.write("the reference: a plain write")
            for name in ("README.md", "metadata.json", "grid.png", "ref.npz", "model/config.json", "plain.txt"):
                assert (os.stat(folder / name).st_mode & 0o777) == mode, (name, oct(mask))
            assert np.isfinite(np.load(folder / "ref.npz")["mu"]).all()
    finally:
        os.umask(old)


def test_one_run_at_a_time_in_an_output_dir(tmp_path):
    """A second run into a folder that a running one holds is refused in one line; the lock goes with its holder."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffusability_hf.files import lock_output_dir; "
         f"lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=r"is in use by another run that is still going: wait for it"):
            lock_output_dir(str(out))
    finally:
        holder.kill()
        holder.wait()
    lock_output_dir(str(out))  # the holder is gone (killed): the lock went with it
    assert os.listdir(out) == []  # nothing left behind


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    acc = FakeAccelerator()
    path = save_checkpoint(acc, str(tmp_path), 2)
    assert json.loads(open(os.path.join(path, CHECKPOINT_MARKER)).read())["num_processes"] == 1
    acc.num_processes = 2
    with pytest.raises(UsageError, match=r"written by 1 process\(es\) and this launch has 2.*--num_processes 1"):
        load_checkpoint(acc, path)
    assert acc.loaded is None
    acc.num_processes = 1
    assert load_checkpoint(acc, path) == 2


def test_graceful_stop_first_signal_asks_a_second_ctrl_c_interrupts():
    import signal

    class One:
        num_processes = 1

    stop = GracefulStop()
    try:
        assert not stop.requested(One())
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a request, no exception
        assert stop.requested(One()) and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
        err = stop.stopped(7, "out/checkpoint-7")
        assert err.exit_code == 130 and "Stopped by Ctrl-C (SIGINT) after step 7, with out/checkpoint-7" in str(err)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own handler is back


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_resume_equals_the_straight_run(tmp_path, run_script):
    """The real script, killed politely: SIGTERM mid-run gives a complete checkpoint of the step it was in, one line
    and exit code 143; resuming from it ends with the uninterrupted run's weights. (The signalled run is its own
    process; the latents, the straight run and the resume run in this one.)"""
    import signal
    import time

    from safetensors.torch import load_file

    def args(out, *extra):
        return ["--output_dir", str(out), "--model", "DiT-tiny/2", "--train_batch_size", "8", "--report_to", "none",
                "--num_inference_steps", "2", "--validation_steps", "100000", "--checkpointing_steps", "100000",
                "--lr_warmup_steps", "2", "--max_train_steps", "150", "--learning_rate", "1e-3", "--latents_dir",
                str(latents), *extra]  # fmt: skip

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    latents = tmp_path / "latents"
    run_script("extract_latents.py", ["--output_dir", latents, "--resolution", 64, "--max_samples", 32])
    run_script("train_dit_flow.py", args(tmp_path / "straight"))
    log = open(tmp_path / "stopped.log", "w+")
    script = os.path.join(ROOT, "train_scripts", "train_dit_flow.py")
    proc = subprocess.Popen([sys.executable, script, *args(tmp_path / "stopped")], env=env, cwd=ROOT, stderr=log,
                            stdout=log)  # fmt: skip
    deadline = time.time() + 300
    while "loss=" not in (tmp_path / "stopped.log").read_text():  # in the training loop
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    text = (tmp_path / "stopped.log").read_text()
    lines = [line for line in text.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    step = int(lines[0].split("after step ")[1].split(",")[0])
    assert 0 < step < 150 and "--resume_from_checkpoint latest" in lines[0]
    assert is_complete_checkpoint(str(tmp_path / "stopped" / f"checkpoint-{step}"))
    assert not (tmp_path / "stopped" / "model_index.json").exists()
    run_script("train_dit_flow.py", args(tmp_path / "stopped", "--resume_from_checkpoint", "latest"))
    name = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "stopped" / name)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_full_disk_gives_one_line_and_leaves_no_temporary_folder(tmp_path):
    """No space left while saving a checkpoint or a model: one line, the temporary folder removed, what was there
    before intact (a SafetensorError 'os error 28' or an OSError ENOSPC, as the writers raise them)."""
    import errno

    from safetensors import SafetensorError

    acc = FakeAccelerator()
    save_checkpoint(acc, str(tmp_path), 1)

    class Full(FakeAccelerator):
        def save_state(self, path):
            os.makedirs(path, exist_ok=True)
            (open(os.path.join(path, "model.safetensors"), "wb")).write(b"x")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  '"No space left on device" }) os error 28')  # fmt: skip

    with pytest.raises(UsageError, match=r"No space left on the device while writing checkpoint-2") as err:
        save_checkpoint(Full(), str(tmp_path), 2)
    assert "\n" not in str(err.value) and sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")

    model = tmp_path / "model"
    with atomic_save(str(model)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("old")
    with pytest.raises(UsageError, match="No space left on the device while writing the results"):
        with atomic_save(str(model)) as tmp:
            open(os.path.join(tmp, "weights.bin"), "w").write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(os.listdir(model)) == ["config.json"] and (model / "config.json").read_text() == "old"
    with pytest.raises(KeyError):  # other errors pass through as they were
        with atomic_save(str(model)):
            raise KeyError("a bug")
