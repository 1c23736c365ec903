"""scripts/gpu_check.sh's orchestration, run here with a stand-in for python: which steps run in which order with
which rank counts, --skip by step kind, --budget (steps cut to what is left, then not started), --archive and the
summary file. A lent GPU gives one command 10 minutes and a few files back, so these are what decide whether its
first run reports anything at all.

The stand-in records each call (its DEEP_EP_PY_GPU_TEST_RANKS and arguments), prints FAKE_PYTHON_OUTPUT (pytest's
progress or closing line) and sleeps FAKE_PYTHON_SLEEP_S; the steps that need a GPU machine's tools (info, mps,
build, ext) are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import report

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_DIR, "scripts", "gpu_check.sh")
MACHINE_STEPS = "info,mps,build,ext"
FIGURES_ROW = report.Row(
    path="dispatch", mode="normal", ranks=8, backend="cuda", dtype="bf16", tokens=4096, hidden=7168, topk=8,
    experts=256, time_us=1234.5, gbps=123.0, warmup=1, iters=2, num_sms=16,
)  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="no bash")


def script_command(
    tmp_path,
    *args: str,
    sleep_s: float = 0,
    output: str = "",
    pytest_rc: int = 0,
    stdin_rc: int = 0,
    bench_rc: int = 0,
    on_sigint: str = "",
    env: dict[str, str | None] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The script's command line and environment with the stand-in as its python. on_sigint: what the stand-in
    prints when SIGINT reaches it (pytest's closing report), before it exits 2. stdin_rc: its exit status for a
    script on stdin (`python - <<EOF`: the extension check). bench_rc: its exit status as the benchmark (which
    writes its JSON all the same). env: more variables (PATH, say; None unsets one)."""
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "fake_python"
    figures = tmp_path / "figures.json"
    report.write_json(str(figures), [FIGURES_ROW], {"device_name": "stand-in GPU"}, {})
    # The summary's figures table is the real `python -m bench.report`; a benchmark step "writes" a fixed file.
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        f'[ "$1 $2" = "-m bench.report" ] && exec "{sys.executable}" "$@"\n'
        f'echo "ranks=${{DEEP_EP_PY_GPU_TEST_RANKS:-}} mps=${{DEEP_EP_PY_MPS:-}} timeout=${{DEEP_EP_PY_TIMEOUT_S:-}}'
        f' omp=${{OMP_NUM_THREADS:-}} trap=${{DEEP_EP_PY_TRAP_ON_DEVICE_ERROR:-}} $*" >> "{calls}"\n'
        'printf "%b" "$FAKE_PYTHON_OUTPUT"\n'
        '[ "$2" = pytest ] && pytest_rc=${FAKE_PYTEST_RC:-0}\n'
        '[ "$1" = - ] && pytest_rc=${FAKE_PYTHON_STDIN_RC:-0}\n'
        '[ "$2" = bench ] && pytest_rc=${FAKE_BENCH_RC:-0}\n'
        f'while [ "$#" -gt 1 ]; do [ "$1" = --json ] && cp "{figures}" "$2"; shift; done\n'
        # A trap on a signal that was ignored when bash started never runs: so the output proves SIGINT's default
        # disposition there, as pytest needs it. Waited for in the background, so that the trap runs at once.
        '[ -n "$FAKE_PYTHON_ON_SIGINT" ] && trap \'printf "%b" "$FAKE_PYTHON_ON_SIGINT"; exit 2\' INT\n'
        'sleep "$FAKE_PYTHON_SLEEP_S" &\n'
        'wait "$!"\n'
        'exit "${pytest_rc:-0}"\n'
    )
    fake_python.chmod(0o755)
    # The project's variables of the environment this runs in (CI sets DEEP_EP_PY_GPU_TEST_RANKS) are not the
    # script's: what it hands its steps is what the stand-in records.
    script_env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEP_EP_PY_", "GPU_CHECK_"))}
    script_env.update(
        PYTHON=str(fake_python),
        FAKE_PYTHON_SLEEP_S=str(sleep_s),
        FAKE_PYTHON_OUTPUT=output,
        FAKE_PYTEST_RC=str(pytest_rc),
        FAKE_PYTHON_STDIN_RC=str(stdin_rc),
        FAKE_BENCH_RC=str(bench_rc),
        FAKE_PYTHON_ON_SIGINT=on_sigint,
    )
    script_env.update(env or {})
    script_env = {k: v for k, v in script_env.items() if v is not None}  # None in env: unset
    return ["bash", SCRIPT, "--log-dir", str(tmp_path / "logs"), *args], script_env


def recorded_calls(tmp_path) -> list[str]:
    """The stand-in's calls, one line each: "ranks=N mps=M timeout=S omp=T trap=P ARGS"."""
    calls = tmp_path / "calls.txt"
    return calls.read_text().splitlines() if calls.exists() else []


def run_script(tmp_path, *args: str, timeout_s: float = 120, **stand_in):
    argv, env = script_command(tmp_path, *args, **stand_in)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc, recorded_calls(tmp_path), tmp_path / "logs"


def summary_rows(log_dir) -> dict[str, tuple[str, str]]:
    """step -> (status, details), from summary.txt in the order the steps ran."""
    rows = {}
    for line in (log_dir / "summary.txt").read_text().splitlines()[2:]:
        if line.startswith("overall:"):
            break
        parts = line.split(None, 3)
        rows[parts[0]] = (parts[1], parts[3] if len(parts) > 3 else "")
    return rows


def test_steps_run_every_path_first_with_the_most_ranks_benchmark_then_more_ranks(tmp_path):
    # An earlier run's files in the log directory must not pass for this run's.
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "bench_r9.json").write_text("{}")
    (tmp_path / "logs" / "42_tests_r9.log").write_text("old")
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", MACHINE_STEPS, "--ranks", "2 4 8", "--internode-ranks", "4,8", "--archive",
        str(tmp_path / "out" / "gpu_check.tar.gz"), output="....s\n5 passed, 1 skipped in 2.0s\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    ran = [step for step, (status, _) in rows.items() if status == "PASS"]
    assert ran == [
        "tests_r2",
        "bench_r8",
        "tests_internode_r4",
        "bench_r2",
        "bench_r4",
        "tests_r4",
        "tests_r8",
        "tests_internode_r8",
        "bench_internode_r4",
        "bench_internode_r8",
    ]
    # Each test step runs pytest at its own rank count, the internode modules apart from the rest.
    pytest_calls = [call for call in calls if " -m pytest " in f" {call} "]
    assert [call.split()[0] for call in pytest_calls] == ["ranks=2", "ranks=4", "ranks=4", "ranks=8", "ranks=8"]
    assert all(call.split()[1] == "mps=" for call in calls), calls  # MPS skipped, not failed: nothing forced
    intranode_files = [arg for arg in pytest_calls[0].split() if arg.endswith(".py")]
    internode_files = [arg for arg in pytest_calls[1].split() if arg.endswith(".py")]
    assert internode_files == ["tests/gpu/test_internode_gpu.py", "tests/gpu/test_buffer_internode_gpu.py"]
    # The foundation first; last the modules that launch kernels in the pytest process (a client of MPS from then
    # on). A new module of the tier fails this until it has its place in the script's list.
    assert intranode_files == [
        "tests/gpu/test_runtime_gpu.py",
        "tests/gpu/test_intranode_gpu.py",
        "tests/gpu/test_low_latency_gpu.py",
        "tests/gpu/test_buffer_cuda_gpu.py",
        "tests/gpu/test_trap_gpu.py",
        "tests/gpu/test_layout_gpu.py",
        "tests/test_extension.py",
    ]
    gpu_modules = {
        os.path.relpath(path, REPO_DIR)
        for path in Path(REPO_DIR, "tests").rglob("test_*.py")
        if re.search(r"^(pytestmark = |@)pytest\.mark\.gpu$", path.read_text(), re.MULTILINE)
    }
    assert set(intranode_files + internode_files) == gpu_modules
    assert rows["tests_r2"][1] == rows["tests_internode_r8"][1] == "passed=5 failed=0 skipped=1 error=0"
    bench_calls = [call.split() for call in calls if " -m bench " in f" {call} "]
    assert [args[args.index("--ranks") + 1] for args in bench_calls] == ["8", "2", "4", "4", "8"]
    assert all(args[args.index("--device") + 1] == "cuda" for args in bench_calls)
    # The archive holds every log and the summary, under the log directory's name.
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
    assert "logs/summary.txt" in names
    assert sum(name.endswith(".log") for name in names) == len(list(log_dir.glob("*.log"))) == len(ran)
    # The figures of every benchmark step in one table, then the summary, last.
    out = proc.stdout
    assert out.index("gpu_check figures") < out.index("gpu_check summary") < out.index("overall: PASS"), out
    figure_lines = [line for line in out.splitlines() if line.startswith("dispatch ")]
    assert len(figure_lines) == 5 and all("1234.5" in line for line in figure_lines), out  # 3 + 2 bench steps
    assert "bench_r8.json: stand-in GPU" in out
    assert not (log_dir / "bench_r9.json").exists() and not (log_dir / "42_tests_r9.log").exists()
    assert (log_dir / "figures.txt").read_text().count("1234.5") == 5


def test_skip_names_a_step_kind_at_every_rank_count(tmp_path):
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},tests,bench_internode", "--ranks", "2 4", "--internode-ranks", "4"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    assert rows["tests_r2"][0] == rows["tests_r4"][0] == rows["bench_internode_r4"][0] == "SKIP"
    assert rows["tests_internode_r4"][0] == rows["bench_r2"][0] == rows["bench_r4"][0] == "PASS"
    assert not any("--ignore=" in call for call in calls)


def test_a_failed_benchmark_step_still_reports_the_rows_it_wrote(tmp_path):
    """The benchmark writes the rows of the modes that finished when a later one fails: the step FAILs, and its
    JSON is named in its details and its figures come in the table."""
    proc, _, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},tests,tests_internode,bench_internode", "--ranks", "2", bench_rc=1
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, details = summary_rows(log_dir)["bench_r2"]
    assert status == "FAIL" and f"{log_dir}/bench_r2.json" in details, details
    assert (log_dir / "figures.txt").read_text().count("1234.5") == 1


def test_a_test_step_that_selects_no_test_is_skipped_not_failed(tmp_path):
    """pytest's exit code 5 (nothing collected: --tests-k picked none of the step's modules) is no failure; without
    --tests-k it is one (the tier lost its tests)."""
    proc, _, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},bench,bench_internode", "--ranks", "2", "--internode-ranks", "2",
        "--tests-k", "layout", pytest_rc=5,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    for step in ("tests_r2", "tests_internode_r2"):
        assert rows[step] == ("SKIP", 'no test selected by --tests-k "layout"'), rows
    proc, _, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},bench,bench_internode", "--ranks", "2", "--internode-ranks", "2",
        pytest_rc=5,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert summary_rows(log_dir)["tests_r2"][0] == "FAIL"


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is not None, reason="MPS can start here")
def test_without_mps_the_ranks_run_time_sliced(tmp_path):
    """Where the MPS daemon cannot start, the check goes on with the ranks time-sliced (DEEP_EP_PY_MPS=0 in every
    later step) and says so, instead of failing every multi-rank test on the missing daemon."""
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", "info,build,ext,bench_internode", "--ranks", "2", "--internode-ranks", "2"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the mps step itself failed
    status, details = summary_rows(log_dir)["mps"]
    assert status == "FAIL" and "time-sliced (DEEP_EP_PY_MPS=0)" in details, details
    assert calls and all(call.split()[1] == "mps=0" for call in calls), calls
    assert all(call.split()[2] == "timeout=30" for call in calls), calls
    assert "device waits time out after 30 s" in details, details


@pytest.mark.parametrize("user_timeout", [None, "7"])
def test_under_mps_device_waits_time_out_sooner(tmp_path, user_timeout):
    """With MPS up the ranks' kernels run concurrently: 10 s of device wait is ample, unless the user says otherwise."""
    env = fake_tools(tmp_path, **{"nvidia-cuda-mps-control": "exit 0"})  # a daemon that answers
    if user_timeout:
        env["DEEP_EP_PY_TIMEOUT_S"] = user_timeout
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", "info,build,ext,bench_internode", "--ranks", "2", "--internode-ranks", "2", env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = user_timeout or "10"
    assert calls and all(call.split()[1:3] == ["mps=", f"timeout={want}"] for call in calls), calls
    status, details = summary_rows(log_dir)["mps"]
    assert status == "PASS" and f"device waits time out after {want} s" in details, details


def test_diagnostics_the_mps_logs_the_commit_and_the_ranks_threads(tmp_path):
    """The MPS daemon's logs come back in the archive (the server's names the clients that faulted), the summary
    names the commit of a copy without .git (GPU_CHECK_COMMIT), and the ranks get 2 intra-op threads unless set."""
    mps_logs = tmp_path / "mps_log"
    mps_logs.mkdir()
    (mps_logs / "server.log").write_text("[server] client 1234 faulted\n")
    env = fake_tools(tmp_path, **{"nvidia-cuda-mps-control": "exit 0"})
    env.update(CUDA_MPS_LOG_DIRECTORY=str(mps_logs), CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "pipe"))
    env.update(GPU_CHECK_COMMIT="abc1234")
    env["OMP_NUM_THREADS"] = None
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", "info,build,ext,tests_internode,bench,bench_internode", "--ranks", "2", "--archive",
        str(tmp_path / "out" / "gpu_check.tar.gz"), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        assert archive.extractfile("logs/mps/server.log").read() == b"[server] client 1234 faulted\n"
    assert "commit: abc1234" in (tmp_path / "out" / "summary.txt").read_text()
    assert calls and all(call.split()[3] == "omp=2" for call in calls), calls


def test_budget_cuts_a_step_short_then_starts_no_more(tmp_path):
    # 72 s less the 45 s kept for the closing steps: the first step gets 27 s of its 1200, the stand-in sleeps past
    # that and is killed; nothing is left for the next steps.
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", MACHINE_STEPS, "--ranks", "2 4", "--internode-ranks", "4", "--budget", "72",
        "--archive", str(tmp_path / "gpu_check.tar.gz"), sleep_s=300, output="..F.\n..s",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    status, details = rows["tests_r2"]
    assert status == "FAIL" and "what was left of --budget 72" in details, details
    seconds_limit = int(details.split("timed out after ")[1].split()[0])
    assert 20 <= seconds_limit <= 27
    # pytest's totals never came: the progress it printed says how far it got.
    assert "killed before its totals, so far: passed=5 failed=1 skipped=1 error=0" in details
    steps = list(rows)
    later = steps[steps.index("tests_r2") + 1 :]
    assert later and all(rows[step][0] == "SKIP" and "budget" in rows[step][1] for step in later), rows
    overall = next(line for line in proc.stdout.splitlines() if line.startswith("overall: "))
    assert f"{len(later)} not started for the budget" in overall, proc.stdout
    assert len(calls) == 1
    assert tarfile.open(tmp_path / "gpu_check.tar.gz").getnames()


def test_under_a_budget_the_benchmark_and_internode_tests_get_limits_of_their_own(tmp_path):
    # Their limits stand in for the 150 s and 180 s they get under a budget; the other test steps keep --step-timeout.
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},bench_internode", "--ranks", "2", "--internode-ranks", "4",
        "--budget", "600", "--step-timeout", "4", sleep_s=30,
        env={"GPU_CHECK_BENCH_STEP_S": "2", "GPU_CHECK_INTERNODE_TEST_STEP_S": "3"},
    )  # fmt: skip
    rows = summary_rows(log_dir)
    for step, limit in (("tests_r2", 4), ("bench_r2", 2), ("tests_internode_r4", 3)):
        status, details = rows[step]
        assert status == "FAIL" and f"timed out after {limit} s" in details, (step, details)
    # Graph cases record their errors instead of trapping, which under MPS would end every rank on the GPU.
    assert calls and all(call.split()[4] == "trap=never" for call in calls), calls


def test_a_step_past_its_timeout_gets_sigint_and_keeps_pytests_report(tmp_path):
    """pytest writes its failures, totals and junit XML only at the session's end: SIGINT gets it there, SIGTERM
    (timeout's default) would leave the progress characters only."""
    closing = "=== FAILURES ===\\nAssertionError: value details here\\nFAILED test_x - boom\\n1 failed, 2 passed in 3.0s\\n"
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", f"{MACHINE_STEPS},tests_internode,bench,bench_internode", "--ranks", "2",
        "--step-timeout", "3", sleep_s=60, output="..F", on_sigint=closing, timeout_s=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, details = summary_rows(log_dir)["tests_r2"]
    assert status == "FAIL" and details.startswith("timed out after 3 s; "), details
    assert details.endswith("passed=2 failed=1 skipped=0 error=0"), details  # from the closing line, not "so far"
    log = next(log_dir.glob("*_tests_r2.log")).read_text()
    assert "AssertionError: value details here" in log and "1 failed, 2 passed" in log, log


def wait_for(predicate, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.1)


def test_an_interrupted_run_passes_sigint_on_and_still_reports(tmp_path):
    """A SIGTERM to the script (a command limit) ends the running step with SIGINT, so that its log keeps pytest's
    report, then prints the summary and packs the archive."""
    argv, env = script_command(
        tmp_path, "--skip", MACHINE_STEPS, "--ranks", "2", "--archive", str(tmp_path / "out.tar.gz"), sleep_s=60,
        on_sigint="1 failed, 4 passed in 9.0s\\n",
    )  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: recorded_calls(tmp_path))  # the first test step runs
        time.sleep(0.5)  # the stand-in's trap is set
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    rows = summary_rows(tmp_path / "logs")
    assert rows["tests_r2"][0] == "FAIL" and rows["tests_r2"][1] == "interrupted", rows
    assert "1 failed, 4 passed" in next((tmp_path / "logs").glob("*_tests_r2.log")).read_text()
    assert "logs/summary.txt" in tarfile.open(tmp_path / "out.tar.gz").getnames()


def fake_tools(tmp_path, **scripts: str) -> dict[str, str]:
    """PATH with the given bash stand-ins (name -> body) first and no nvcc of this machine's on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    path = [str(bin_dir)] + [d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(f"{d}/nvcc")]
    return {"PATH": os.pathsep.join(path)}


@pytest.mark.parametrize("cmake_says", ["no toolkit", "nothing", "error"])
def test_a_build_without_the_extension_fails_and_skips_the_rest(tmp_path, cmake_says):
    """Where CMake builds no extension it only warns, and both cmake commands succeed: that must fail the build and
    leave the steps that need the extension unstarted (a retry needs the time they would burn). nvcc is found in
    CUDA_HOME's bin where PATH has none, and named to CMake."""
    if cmake_says == "nothing" and list((Path(REPO_DIR) / "deep_ep_py").glob("_C.*.so")):
        pytest.skip("deep_ep_py/_C is built in this tree: a build that adds nothing still leaves one")
    cuda_bin = tmp_path / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    (cuda_bin / "nvcc").write_text("#!/bin/sh\n")
    (cuda_bin / "nvcc").chmod(0o755)
    body = {
        "no toolkit": 'echo "CMake Warning: deep_ep_py: NOT building the CUDA extension deep_ep_py._C: no nvcc"',
        "nothing": "true",
        "error": 'echo "CMake Error: boom"; exit 1',
    }[cmake_says]
    env = fake_tools(tmp_path, cmake=f'echo "$*" >> "{tmp_path}/cmake_calls.txt"\n{body}')
    env["CUDA_HOME"] = str(tmp_path / "cuda")
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", "info,mps", "--ranks", "2 4", "--archive", str(tmp_path / "out.tar.gz"), env=env
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    assert rows["build"][0] == "FAIL", rows
    reason = {"no toolkit": "CMake builds no extension here", "nothing": "produced no deep_ep_py/_C.*.so"}
    assert reason.get(cmake_says, "exit code 1") in rows["build"][1], rows
    later = list(rows)[list(rows).index("build") + 1 :]
    assert "tests_r4" in later and "bench_internode_r8" in later
    assert all(rows[step] == ("SKIP", "no extension (the build failed)") for step in later), rows
    assert calls == []  # neither pytest nor the benchmark started
    cmake_calls = (tmp_path / "cmake_calls.txt").read_text().splitlines()
    assert f"-DCMAKE_CUDA_COMPILER={cuda_bin}/nvcc" in cmake_calls[0].split(), cmake_calls
    assert len(cmake_calls) == (1 if cmake_says != "nothing" else 2), cmake_calls  # configure, build
    build_log = next(log_dir.glob("*_build.log")).read_text()
    assert reason.get(cmake_says, "CMake Error: boom") in build_log, build_log


def test_a_failed_extension_check_skips_the_rest(tmp_path):
    proc, calls, log_dir = run_script(
        tmp_path, "--skip", "info,mps,build", "--ranks", "2", "--internode-ranks", "2", stdin_rc=1
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    assert rows["ext"][0] == "FAIL" and rows["tests_r2"] == ("SKIP", "no extension (the extension check failed)")
    assert len(calls) == 1  # the check itself


def test_the_archive_and_a_partial_summary_come_after_every_step(tmp_path):
    """A command killed outright (SIGKILL: no trap runs) still leaves the archive of every step that finished, with a
    partial summary inside and next to it."""
    out = tmp_path / "out"
    argv, env = script_command(
        tmp_path, "--skip", MACHINE_STEPS, "--ranks", "2", "--archive", str(out / "gpu_check.tar.gz"), sleep_s=5,
        output="..F\\n1 failed, 2 passed in 2.0s\\n", pytest_rc=1,
    )  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # The first step ran; the next one sleeps for 5 s.
        wait_for(lambda: "passed=2" in ((out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "overall: RUNNING (partial: written after step tests_r2 at " in summary, summary
    assert "1 of 6 steps failed so far" in summary, summary
    assert summary_rows(out)["tests_r2"] == ("FAIL", "exit code 1; passed=2 failed=1 skipped=0 error=0")
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
        packed_summary = archive.extractfile("logs/summary.txt").read().decode()
    assert packed_summary == summary and "logs/06_tests_r2.log" in names, names


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--budget", "ten", "--budget expects a whole number of seconds"),
        ("--ranks", "2 x", "--ranks expects positive integers"),
        ("--step-timeout", "0", "--step-timeout expects a positive integer"),
        ("--device", "gpu", "--device expects cuda or emulated"),
        ("--skip", "tests_r2", "--skip expects step kinds among"),
    ],
)
def test_bad_options_name_the_option_and_value(tmp_path, option, value, message):
    proc, calls, _ = run_script(tmp_path, option, value)
    assert proc.returncode == 2
    assert message in proc.stderr and value in proc.stderr
    assert calls == []


def test_dry_run_on_the_emulator(tmp_path):
    """The script's own commands, for real, on the CPU emulator of the kernels (--device emulated): the extension
    check, a test step (two quick GPU-tier tests) and both benchmark kinds at tiny sizes, whose figures the summary
    prints. What the stand-in cannot show: that pytest and the benchmark accept what the script passes them."""
    from deep_ep_py import _ext

    if not _ext.emulator_available():
        pytest.skip(f"the CPU emulator of the kernels is not built: {_ext.emulator_unavailable_reason()}")
    log_dir = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEP_EP_PY_", "GPU_CHECK_"))}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", SCRIPT, "--device", "emulated", "--log-dir", str(log_dir), "--skip", "build", "--ranks", "2",
         "--internode-ranks", "2", "--tests-k", "host_counters or device_timeout_becomes"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = summary_rows(log_dir)
    assert rows["mps"][0] == "SKIP" and rows["ext"][0] == "PASS", rows
    status, counts = rows["tests_r2"]
    assert status == "PASS" and counts.startswith("passed=2 failed=0 ") and counts.endswith(" error=0"), rows
    assert rows["tests_internode_r2"][0] == "SKIP", rows  # -k selects no internode test
    for step in ("bench_r2", "bench_internode_r2"):
        assert rows[step][0] == "PASS" and f"{step}.json" in rows[step][1], rows
    figures = (log_dir / "figures.txt").read_text()
    for path in ("one_copy_dispatch", "ll_combine+hook", "internode_combine", "internode_puts_combine"):
        assert f"\n{path} " in figures, figures
    assert "internode_puts vs intranode: 2 ranks dispatch bf16" in rows["bench_internode_r2"][1], rows
