"""deep_ep_py.testing.launch: results in rank order, failures and hangs surface with the rank, no leftovers; and
deep_ep_py.testing.batch: many cases in one launch, each failure, hang or broken context kept to its case."""

from __future__ import annotations

import math
import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from deep_ep_py.testing import RankFailedError, launch
from deep_ep_py.testing import batch as batch_module
from deep_ep_py.testing.batch import BatchCase, CaseFailedError, launch_batch, run_case

_ENV_NAME = "DEEP_EP_PY_TEST_LAUNCHER_VAR"
# Read when a child imports this module (to unpickle fn): proves env is set before the child's imports.
_ENV_AT_IMPORT = os.environ.get(_ENV_NAME)


def _identity_and_allreduce(rank: int, num_ranks: int, tag: str):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {
        "rank": rank,
        "num_ranks": num_ranks,
        "tag": tag,
        "dist_rank": dist.get_rank(),
        "dist_world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "sum": value.item(),
        "tensor": torch.arange(rank + 1),
    }


def _write_pid(pid_dir: str, rank: int) -> None:
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def _raise_on_rank(rank: int, num_ranks: int, bad_rank: int, pid_dir: str):
    _write_pid(pid_dir, rank)
    if rank == bad_rank:
        raise ValueError(f"deliberate failure marker-{rank}")
    dist.barrier()  # never completes: the bad rank does not get here
    return rank


def _hang_on_rank(rank: int, num_ranks: int, bad_rank: int, pid_dir: str):
    _write_pid(pid_dir, rank)
    if rank == bad_rank:
        time.sleep(3600)
    return rank


def _exit_on_rank(rank: int, num_ranks: int, bad_rank: int):
    if rank == bad_rank:
        os._exit(7)
    return rank


def _read_env(rank: int, num_ranks: int):
    return os.environ.get(_ENV_NAME), _ENV_AT_IMPORT


def _fresh_tensors(rank: int, num_ranks: int):
    return torch.empty(3).tolist(), torch.empty(2, dtype=torch.int32).tolist()


def test_emulated_ranks_get_garbage_in_fresh_tensors():
    """Under the emulator, as on a GPU, a fresh tensor does not read as zeros: a kernel that reads what it never
    wrote fails the GPU tier there too. Plain CPU ranks keep torch's defaults."""
    emulated = launch(_fresh_tensors, 2, device="emulated", timeout_s=120)
    for floats, ints in emulated:
        assert all(math.isnan(v) for v in floats) and ints == [2**31 - 1] * 2, (floats, ints)
    assert not torch.are_deterministic_algorithms_enabled(), "the launch changed the parent's torch settings"


def _write_to_stdout(rank: int, num_ranks: int):
    print(f"print-from-rank-{rank}")
    os.write(1, f"fd1-from-rank-{rank}\n".encode())  # as a C++ library such as Gloo writes
    return rank


def test_rank_stdout_goes_to_stderr(capfd):
    """The caller's stdout is its own: the bench's table is parsed from it, and Gloo in torch 2.9 prints a line from
    every rank there as the group starts. What a rank writes reaches stderr instead, nothing lost."""
    assert launch(_write_to_stdout, 2, timeout_s=60) == [0, 1]
    out, err = capfd.readouterr()
    assert "from-rank-" not in out, out
    for rank in range(2):
        assert f"print-from-rank-{rank}" in err and f"fd1-from-rank-{rank}" in err, err


def _assert_all_dead(pid_dir: str, num_ranks: int) -> None:
    pids = []
    for rank in range(num_ranks):
        path = os.path.join(pid_dir, f"rank{rank}.pid")
        if os.path.exists(path):
            with open(path) as f:
                pids.append(int(f.read()))
    assert pids, "no child wrote its pid"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_results_in_rank_order(num_ranks):
    results = launch(_identity_and_allreduce, num_ranks, "hello", timeout_s=120)
    assert len(results) == num_ranks
    expected_sum = num_ranks * (num_ranks + 1) / 2
    for rank, result in enumerate(results):
        assert result["rank"] == rank
        assert result["dist_rank"] == rank
        assert result["num_ranks"] == num_ranks
        assert result["dist_world"] == num_ranks
        assert result["tag"] == "hello"
        assert result["backend"] == "gloo"
        assert result["sum"] == expected_sum
        assert torch.equal(result["tensor"], torch.arange(rank + 1))
    assert multiprocessing.active_children() == []


def test_raising_rank_surfaces_rank_and_traceback(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        launch(_raise_on_rank, 2, 1, str(tmp_path), timeout_s=60)
    assert isinstance(info.value, RuntimeError)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1" in message
    assert "deliberate failure marker-1" in message
    assert "ValueError" in message
    assert "_raise_on_rank" in message  # the traceback text, not just the message
    # The healthy rank, stuck in a barrier, was killed rather than waited for.
    assert time.monotonic() - start < 50
    _assert_all_dead(str(tmp_path), 2)


def test_hanging_rank_times_out_and_leaves_nothing(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        launch(_hang_on_rank, 2, 0, str(tmp_path), timeout_s=6)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "[0]" in message  # the hanging rank is named
    assert "[0, 1]" not in message  # rank 1 finished
    assert elapsed < 6 + 15, f"timeout took {elapsed:.1f} s"
    _assert_all_dead(str(tmp_path), 2)


def test_rank_dying_without_exception_fails_the_launch():
    with pytest.raises(RankFailedError, match=r"rank 1 .*exit(ed)? .*7") as info:
        launch(_exit_on_rank, 2, 1, timeout_s=60)
    assert info.value.rank == 1
    assert multiprocessing.active_children() == []


def test_env_reaches_children_before_imports():
    assert _ENV_NAME not in os.environ
    results = launch(_read_env, 2, env={_ENV_NAME: "forty-two"}, timeout_s=60)
    assert results == [("forty-two", "forty-two")] * 2
    assert _ENV_NAME not in os.environ  # the parent's environment is restored


def test_unpicklable_fn_is_rejected():
    with pytest.raises(TypeError, match="picklable"):
        launch(lambda rank, num_ranks: rank, 2)


def test_port_taken_between_pick_and_bind_is_retried(monkeypatch):
    """The first port handed out is held by a listening socket: rank 0's store cannot bind it; launch retries."""
    import socket

    import deep_ep_py.testing.launcher as launcher_module

    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(8)
    taken_port = blocker.getsockname()[1]
    picked = []
    real_find_free_port = launcher_module.find_free_port

    def first_taken_then_free():
        port = taken_port if not picked else real_find_free_port()
        picked.append(port)
        return port

    monkeypatch.setattr(launcher_module, "find_free_port", first_taken_then_free)
    try:
        results = launch(_identity_and_allreduce, 2, "retry", timeout_s=60)
    finally:
        blocker.close()
    assert [r["rank"] for r in results] == [0, 1]
    assert picked[0] == taken_port and len(picked) >= 2
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------------------------
# deep_ep_py.testing.batch: many cases in one launch, each reported on its own.

# Set in a child by _case_breaks_context; read by _simulated_health_check (a stand-in for a sticky CUDA error).
_SIMULATED_BROKEN: list[str] = []


def _append_line(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def _case_raise_then_collective(ctx, bad_rank: int, marker: str) -> None:
    """The bad rank raises; the others go on to a collective it never joins (bounded by the group timeout)."""
    if ctx.rank == bad_rank:
        raise ValueError(f"deliberate case failure {marker}")
    dist.barrier(group=ctx.group)


def _case_allreduce(ctx, expected_shared, out_dir: str) -> None:
    value = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(value, group=ctx.group)
    assert value.item() == ctx.num_ranks * (ctx.num_ranks + 1) / 2, value
    dist.barrier(group=ctx.resource_group)
    assert ctx.shared == {"value": expected_shared, "rank": ctx.rank}, ctx.shared
    path = os.path.join(out_dir, f"cleanup_rank{ctx.rank}.txt")
    ctx.on_cleanup(_append_line, path, "registered first")
    ctx.on_cleanup(_append_line, path, "registered second")


def _raise_in_cleanup(marker: str) -> None:
    raise RuntimeError(f"cleanup failure {marker}")


def _case_cleanup_raises(ctx, marker: str) -> None:
    ctx.on_cleanup(_raise_in_cleanup, marker)


def _setup_shared(ctx, value):
    dist.barrier(group=ctx.group)
    return {"value": value, "rank": ctx.rank}


def _teardown_shared(shared) -> None:
    _append_line(os.path.join(shared["value"], f"teardown_rank{shared['rank']}.txt"), "teardown")


def _case_ok(ctx) -> None:
    dist.barrier(group=ctx.group)


def _case_breaks_context(ctx, bad_rank: int) -> None:
    if ctx.rank == bad_rank:
        _SIMULATED_BROKEN.append("broken")
        raise RuntimeError("simulated CUDA error: an illegal memory access was encountered")


def _simulated_health_check() -> None:
    if _SIMULATED_BROKEN:
        raise RuntimeError("simulated: the CUDA context is unusable")


def _case_hang(ctx, bad_rank: int) -> None:
    if ctx.rank == bad_rank:
        time.sleep(3600)


def _case_return_rank(ctx, out_dir: str) -> int:
    ctx.on_cleanup(_append_line, os.path.join(out_dir, f"standalone_rank{ctx.rank}.txt"), "cleaned")
    ctx.barrier()
    return ctx.rank * 10


def test_batch_case_failure_does_not_stop_later_cases(tmp_path):
    out = str(tmp_path)
    cases = [
        BatchCase("raises", _case_raise_then_collective, (1, "marker-A"), run_s=10),
        BatchCase("after", _case_allreduce, (out, out), run_s=10),
        BatchCase("cleanup_raises", _case_cleanup_raises, ("marker-C",), run_s=10),
        BatchCase("after_cleanup_failure", _case_ok, (), run_s=10),
    ]
    start = time.monotonic()
    result = launch_batch(
        cases,
        2,
        env={"DEEP_EP_PY_TIMEOUT_S": "2"},
        group_timeout_s=3,
        setup=_setup_shared,
        setup_args=(out,),
        teardown=_teardown_shared,
    )
    assert time.monotonic() - start < 90
    assert result.launch_error is None, result.launch_error
    raises = result["raises"]
    assert raises.status == "failed" and not raises.passed
    by_rank = {r.rank: r for r in raises.ranks}
    assert by_rank[1].status == "failed" and "deliberate case failure marker-A" in by_rank[1].detail
    assert "_case_raise_then_collective" in by_rank[1].detail and "ValueError" in by_rank[1].detail
    # Rank 0 waited in a collective rank 1 never joined: the case's group timed out instead of hanging.
    assert by_rank[0].status == "failed", by_rank[0]
    assert "case 'raises' failed at 2 ranks" in raises.message and "rank 1 failed" in raises.message
    with pytest.raises(CaseFailedError, match="marker-A"):
        raises.assert_passed()
    # The next case runs on fresh groups, with the shared object of the setup, and its cleanups run last-in first.
    result["after"].assert_passed()
    for rank in range(2):
        with open(os.path.join(out, f"cleanup_rank{rank}.txt")) as f:
            assert f.read().splitlines() == ["registered second", "registered first"]
    cleanup = result["cleanup_raises"]
    assert cleanup.status == "failed" and "cleanup failure marker-C" in cleanup.message
    assert all(r.status == "failed" for r in cleanup.ranks)
    result["after_cleanup_failure"].assert_passed()
    for rank in range(2):
        assert os.path.exists(os.path.join(out, f"teardown_rank{rank}.txt"))
    assert multiprocessing.active_children() == []


def test_batch_stops_after_a_broken_context(tmp_path):
    cases = [
        BatchCase("before", _case_ok, (), run_s=10),
        BatchCase("breaks", _case_breaks_context, (1,), run_s=10),
        BatchCase("later", _case_ok, (), run_s=10),
        BatchCase("last", _case_ok, (), run_s=10),
    ]
    result = launch_batch(
        cases,
        2,
        env={"DEEP_EP_PY_TIMEOUT_S": "2"},
        group_timeout_s=3,
        health_check=_simulated_health_check,
        setup=_setup_shared,
        setup_args=(str(tmp_path),),
        teardown=_teardown_shared,
    )
    assert result.launch_error is None, result.launch_error
    result["before"].assert_passed()
    breaks = result["breaks"]
    assert breaks.status == "failed"
    by_rank = {r.rank: r for r in breaks.ranks}
    assert by_rank[0].status == "ok"
    assert by_rank[1].status == "failed" and "illegal memory access" in by_rank[1].detail
    assert "no longer works" in by_rank[1].detail
    for name in ("later", "last"):
        outcome = result[name]
        assert outcome.status == "not_run", outcome
        assert "not run: an earlier case broke the CUDA context:" in outcome.message, outcome.message
        assert "illegal memory access" in outcome.message and "'breaks'" in outcome.message, outcome.message
        with pytest.raises(CaseFailedError, match="not run"):
            outcome.assert_passed()
    # Cleanups and the teardown would wait on the broken rank: skipped.
    assert not any(name.startswith("teardown") for name in os.listdir(tmp_path))
    assert multiprocessing.active_children() == []


def test_batch_hanging_case_is_reported_with_its_stack():
    cases = [
        BatchCase("before", _case_ok, (), run_s=10),
        BatchCase("hangs", _case_hang, (1,), run_s=2),
        BatchCase("after", _case_ok, (), run_s=10),
    ]
    start = time.monotonic()
    result = launch_batch(
        cases, 2, env={"DEEP_EP_PY_TIMEOUT_S": "1"}, group_timeout_s=2, exchange_grace_s=3, cleanup_s=10
    )
    elapsed = time.monotonic() - start
    # Budget: 2 s + recovery (1 + 5 + 2) s; then the launch ends at once instead of waiting for its timeout.
    assert elapsed < 60, elapsed
    # The launch ends with the hung rank's exit, or with the other rank's failed exchange, whichever it sees first.
    assert result.launch_error is not None
    result["before"].assert_passed()
    hangs = result["hangs"]
    by_rank = {r.rank: r for r in hangs.ranks}
    assert by_rank[1].status == "hung" and "_case_hang" in by_rank[1].detail, by_rank[1]
    assert by_rank[0].status == "ok"
    after = result["after"]
    assert after.status == "not_run" and "rank 1 hung in case 'hangs'" in after.message, after.message
    assert multiprocessing.active_children() == []


def test_run_case_runs_cleanups_and_returns(tmp_path):
    results = launch(run_case, 2, _case_return_rank, str(tmp_path), timeout_s=60)
    assert results == [0, 10]
    for rank in range(2):
        with open(os.path.join(tmp_path, f"standalone_rank{rank}.txt")) as f:
            assert f.read() == "cleaned\n"


def test_batch_launch_failure_reports_every_case_not_run(monkeypatch):
    import deep_ep_py.testing.batch as batch_impl

    def failing_launch(*args, **kwargs):
        raise RuntimeError("launch(device='cuda'): no CUDA device visible")

    monkeypatch.setattr(batch_impl, "launch", failing_launch)
    result = launch_batch([BatchCase("a", _case_ok), BatchCase("b", _case_ok)], 2)
    for name in ("a", "b"):
        assert result[name].status == "not_run"
        assert "not run: the launch failed: RuntimeError: launch(device='cuda'): no CUDA device" in result[name].message


def test_batch_outcomes_of_a_launch_cut_short():
    """A rank killed while in a case (another rank crashed): 'killed'; cases after it: not run, with why."""
    cases = [BatchCase(name, _case_ok) for name in ("a", "b", "c")]
    crash = "Traceback (most recent call last):\nRuntimeError: rank 0 died"
    logs = [
        batch_module._RankLog(
            [
                {"event": "start", "case": 0},
                {"event": "result", "case": 0, "error": None, "broken": None},
                {"event": "cleanup_start", "case": 0},
                {"event": "cleanup", "case": 0, "error": None, "broken": None},
                {"event": "start", "case": 1},
                {"event": "abort", "error": crash},
            ],
            "",
        ),
        batch_module._RankLog(
            [
                {"event": "start", "case": 0},
                {"event": "result", "case": 0, "error": None, "broken": None},
                {"event": "cleanup_start", "case": 0},
                {"event": "cleanup", "case": 0, "error": None, "broken": None},
                {"event": "start", "case": 1},
            ],
            "",
        ),
    ]
    outcomes = batch_module._aggregate(cases, logs, "RankFailedError: rank 0 of 2 failed", 2)
    assert outcomes["a"].passed
    assert outcomes["b"].status == "failed"
    assert {r.status for r in outcomes["b"].ranks} == {"killed"}
    assert "rank 0 stopped in case 'b': RuntimeError: rank 0 died" in outcomes["b"].message
    assert outcomes["c"].status == "not_run" and "rank 0 stopped in case 'b'" in outcomes["c"].message


def test_selected_param_values_follow_the_selection():
    from types import SimpleNamespace

    module, other = object(), object()

    def item(mod, name, **params):
        return SimpleNamespace(module=mod, originalname=name, callspec=SimpleNamespace(params=params))

    items = [
        item(module, "test_case", num_ranks=2, case="a"),
        item(module, "test_case", num_ranks=4, case="a"),
        item(module, "test_case", num_ranks=2, case="b"),
        item(module, "test_case", num_ranks=2, case="a"),
        item(module, "test_other", num_ranks=2, case="c"),
        item(other, "test_case", num_ranks=2, case="d"),
        SimpleNamespace(module=module, originalname="test_case"),  # not parametrized
    ]
    values = batch_module.selected_param_values(items, module, "test_case", "case", {"num_ranks": 2})
    assert values == ["a", "b"]
    assert batch_module.selected_param_values(items, module, "test_case", "case", {"num_ranks": 8}) == []
