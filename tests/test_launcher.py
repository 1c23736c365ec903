"""deep_ep_py.testing.launch: results in rank order, failures and hangs surface with the rank, no leftovers."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from deep_ep_py.testing import RankFailedError, launch

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
