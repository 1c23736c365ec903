"""Many test cases of one configuration in ONE launch, each still reported on its own.

A launch costs seconds per rank (a fresh interpreter, torch, a CUDA context, a process group, often NVSHMEM), so
the GPU tier runs every table-driven case of one configuration (rank count, and whatever must differ per process,
such as an environment variable) in one :func:`~deep_ep_py.testing.launch`:

    result = launch_batch([BatchCase("random", run_case_fn, (case,), run_s=60), ...], num_ranks, device="cuda")
    result["random"].assert_passed()   # in the pytest test of that case

Each case is ``fn(ctx, *args)``, a module-level function (picklable), called on every rank with a
:class:`CaseContext`: ``ctx.group`` for the case's collectives (and the reference Buffer), ``ctx.resource_group``
for objects that are collective to build and to destroy (kernels), ``ctx.shared`` from the batch's ``setup`` (e.g.
one NvshmemContext per launch), and ``ctx.on_cleanup(fn, *args)`` for the collective teardown of what the case
built (kernels.destroy), run last in first out once every rank has left the case.

How one case is kept from disturbing the others:
- every rank runs every case; a case that raises is caught (its traceback is the outcome on that rank) and the
  next case runs;
- after the case, each rank checks that its CUDA context still works (``health_check``: a synchronize and a tiny
  kernel), then all ranks exchange their status on the default group: every rank has left the case before anyone
  runs the cleanups, which are collective (IPC unmapping, nvshmem_free);
- a case's collectives run on groups of its own (``dist.new_group``, timeout ``group_timeout_s``); after a case
  that failed on any rank they are replaced, since a rank that left early leaves them out of step; a peer that
  left a case therefore costs the others at most a device timeout (DEEP_EP_PY_TIMEOUT_S) or a group timeout,
  never a hang;
- a case that overruns its budget (``run_s`` plus the time to notice a peer that left) is a hang: faulthandler
  writes the rank's stacks and ends the process, the launch ends, and the case is reported hung with those stacks;
  the cases after it as not run with that reason;
- a CUDA context that no longer works (an illegal address is sticky) on any rank stops the batch: cleanups are
  skipped (they would wait on the broken rank) and the remaining cases are reported "not run: an earlier case
  broke the CUDA context: <first error>".

Outcomes are written by every rank as it goes (JSON lines in a temporary directory), so a launch that dies still
tells which cases passed, which one hung or crashed, and where. The launch timeout covers every case's budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

from .launcher import launch

__all__ = [
    "DEFAULT_DEVICE_TIMEOUT_S",
    "TIMEOUT_ENV",
    "BatchCase",
    "BatchResult",
    "CaseContext",
    "CaseFailedError",
    "CaseOutcome",
    "RankOutcome",
    "cuda_health_check",
    "device_timeout_s",
    "launch_batch",
    "recovery_s",
    "run_case",
    "selected_param_values",
]

TIMEOUT_ENV = "DEEP_EP_PY_TIMEOUT_S"  # deep_ep_py.config.TIMEOUT_ENV, without importing torch here
DEFAULT_DEVICE_TIMEOUT_S = 100.0  # deep_ep_py.config.DEFAULT_TIMEOUT_S
# A case's groups time out this much later than a device wait, so that a peer that left is reported by the device
# record (naming the rank) where a kernel was waiting.
GROUP_TIMEOUT_EXTRA_S = 10.0
# deep_ep_py.backends.round_kernels.HOST_WAIT_EXTRA_S: host waits give device waits this long to report first.
HOST_WAIT_EXTRA_S = 5.0
_SUMMARY_CHARS = 400

PASSED, FAILED, NOT_RUN = "passed", "failed", "not_run"


def device_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """DEEP_EP_PY_TIMEOUT_S as the children of a launch with `env` will see it (env, else this process, else 100)."""
    raw = (env or {}).get(TIMEOUT_ENV) or os.environ.get(TIMEOUT_ENV) or ""
    try:
        value = float(raw) if raw else DEFAULT_DEVICE_TIMEOUT_S
    except ValueError:
        value = DEFAULT_DEVICE_TIMEOUT_S
    return value if value > 0 else DEFAULT_DEVICE_TIMEOUT_S


def recovery_s(device_timeout: float, group_timeout: float | None = None) -> float:
    """Seconds a rank may need to leave a case after a peer left it early: its first wait that times out raises
    (a device wait: DEEP_EP_PY_TIMEOUT_S, then the host notices within HOST_WAIT_EXTRA_S; a collective of the case's
    group: group_timeout), with room for one of each."""
    group_timeout = device_timeout + GROUP_TIMEOUT_EXTRA_S if group_timeout is None else group_timeout
    return device_timeout + HOST_WAIT_EXTRA_S + group_timeout


# ------------------------------------------------------------------------------------------------ the cases


@dataclasses.dataclass(frozen=True)
class BatchCase:
    """One case: ``fn(ctx, *args)`` on every rank. ``run_s``: seconds it may take when it passes; the batch adds the
    time to notice a peer that left (:func:`recovery_s`) before it calls the case hung."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    run_s: float = 60.0


class CaseContext:
    """What a case function gets on its rank (see the module docstring)."""

    def __init__(self, rank: int, num_ranks: int, name: str, group: Any, resource_group: Any, shared: Any) -> None:
        self.rank = rank
        self.num_ranks = num_ranks
        self.name = name
        self.group = group
        self.resource_group = resource_group
        self.shared = shared
        self._cleanups: list[tuple[Callable[..., Any], tuple]] = []

    def on_cleanup(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) after the case (last registered first) on every rank, once all ranks have left it."""
        self._cleanups.append((fn, args))

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def run_cleanups(self) -> str | None:
        """Run every cleanup (each even when an earlier one raised); the formatted errors, or None."""
        errors = []
        while self._cleanups:
            fn, args = self._cleanups.pop()
            try:
                fn(*args)
            except Exception:
                errors.append(traceback.format_exc())
        return "\n".join(errors) if errors else None


def run_case(rank: int, num_ranks: int, fn: Callable[..., Any], *args: Any) -> Any:
    """A :func:`launch` target for a case that needs a launch of its own (its own environment, an absent peer):
    ``fn(ctx, *args)`` with ctx over the default group, then its cleanups; returns what fn returned. A raise fails
    the launch as any rank function's would (the launcher then stops every rank)."""
    import torch.distributed as dist

    ctx = CaseContext(rank, num_ranks, getattr(fn, "__name__", "case"), dist.group.WORLD, dist.group.WORLD, None)
    result = fn(ctx, *args)
    error = ctx.run_cleanups()
    if error is not None:
        raise RuntimeError(f"rank {rank}: cleanup after {ctx.name} failed:\n{error}")
    return result


def cuda_health_check() -> None:
    """Raise if this process's CUDA context no longer works: synchronize, then run a tiny kernel and read it."""
    import torch

    torch.cuda.synchronize()
    probe = torch.full((8,), 2.0, device=torch.device("cuda", torch.cuda.current_device()))
    value = float((probe * 3).sum().item())
    if value != 48.0:
        raise RuntimeError(f"CUDA health probe: expected 48.0, got {value}")


# ------------------------------------------------------------------------------------------------ the worker


@dataclasses.dataclass(frozen=True)
class _Plan:
    cases: tuple[BatchCase, ...]
    progress_dir: str
    setup: Callable[..., Any] | None
    setup_args: tuple
    teardown: Callable[..., Any] | None
    health_check: Callable[[], None] | None
    group_backend: str
    group_timeout_s: float
    recovery_s: float
    setup_s: float
    cleanup_s: float
    teardown_s: float
    exchange_grace_s: float


def _events_path(progress_dir: str, rank: int) -> str:
    return os.path.join(progress_dir, f"rank{rank}.events.jsonl")


def _hang_path(progress_dir: str, rank: int) -> str:
    return os.path.join(progress_dir, f"rank{rank}.hang.txt")


def _summary(text: str | None) -> str:
    """The exception line of a traceback (its last non-empty line), shortened."""
    if not text:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else ""
    return line if len(line) <= _SUMMARY_CHARS else line[: _SUMMARY_CHARS - 3] + "..."


class _EventLog:
    """Events of this rank: kept in memory (returned) and appended to a file as they happen (read after a crash)."""

    def __init__(self, progress_dir: str, rank: int) -> None:
        self.events: list[dict[str, Any]] = []
        self._file = open(_events_path(progress_dir, rank), "a", buffering=1)

    def write(self, **event: Any) -> None:
        event["t"] = round(time.time(), 3)
        self.events.append(event)
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()


class _Watchdog:
    """faulthandler's timer: past the deadline it writes every thread's stack to the hang file and ends the process
    (from a C thread, so even a call that holds the GIL cannot stop it)."""

    def __init__(self, progress_dir: str, rank: int) -> None:
        self._file = open(_hang_path(progress_dir, rank), "w")

    def arm(self, seconds: float) -> None:
        faulthandler.dump_traceback_later(max(1.0, seconds), exit=True, file=self._file)

    def cancel(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with contextlib.suppress(Exception):
            self._file.close()


def _exchange(status: Any, num_ranks: int) -> list[Any]:
    """Every rank's status, on the default group (all ranks in step: one exchange per phase)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * num_ranks
    dist.all_gather_object(gathered, status)
    return gathered


def _new_groups(plan: _Plan) -> tuple[Any, Any]:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=plan.group_timeout_s)
    return (
        dist.new_group(backend=plan.group_backend, timeout=timeout),
        dist.new_group(backend=plan.group_backend, timeout=timeout),
    )


def _probe(health_check: Callable[[], None] | None) -> str | None:
    if health_check is None:
        return None
    try:
        health_check()
    except Exception:
        return traceback.format_exc()
    return None


def _broken_reason(statuses: Sequence[Any], case_name: str) -> str | None:
    """statuses: per rank (error, broken). The reason the batch stops, from the first broken rank, or None."""
    for rank, (error, broken) in enumerate(statuses):
        if broken:
            first = _summary(error) or _summary(broken)
            return f"an earlier case broke the CUDA context: {first} (rank {rank}, case {case_name!r})"
    return None


def _batch_worker(rank: int, num_ranks: int, plan: _Plan) -> list[dict[str, Any]]:
    import torch.distributed as dist

    log = _EventLog(plan.progress_dir, rank)
    watchdog = _Watchdog(plan.progress_dir, rank)
    try:
        shared = None
        stopped = False
        if plan.setup is not None:
            log.write(event="setup_start")
            watchdog.arm(plan.setup_s)
            ctx = CaseContext(rank, num_ranks, "setup", dist.group.WORLD, dist.group.WORLD, None)
            error = None
            try:
                shared = plan.setup(ctx, *plan.setup_args)
            except Exception:
                error = traceback.format_exc()
            log.write(event="setup", error=error)
            watchdog.arm(plan.setup_s + plan.exchange_grace_s)
            failed = [(r, e) for r, e in enumerate(_exchange(error, num_ranks)) if e]
            if failed:
                stopped = True
                log.write(
                    event="stop", reason=f"the batch setup failed on rank {failed[0][0]}: {_summary(failed[0][1])}"
                )

        groups = None
        for index, case in enumerate(plan.cases):
            if stopped:
                break
            if groups is None:
                groups = _new_groups(plan)
            budget = case.run_s + plan.recovery_s
            started = time.monotonic()
            log.write(event="start", case=index, budget_s=budget)
            watchdog.arm(budget)
            ctx = CaseContext(rank, num_ranks, case.name, groups[0], groups[1], shared)
            error = None
            try:
                case.fn(ctx, *case.args)
            except Exception:
                error = traceback.format_exc()
            broken = _probe(plan.health_check)
            log.write(
                event="result", case=index, error=error, broken=broken, seconds=round(time.monotonic() - started, 3)
            )
            # A peer still in the case reaches its own deadline first and is the one reported hung.
            watchdog.arm(max(0.0, started + budget - time.monotonic()) + plan.exchange_grace_s)
            statuses = _exchange((error, broken), num_ranks)
            reason = _broken_reason(statuses, case.name)
            if reason is not None:
                log.write(event="stop", reason=reason)
                stopped = True
                break

            log.write(event="cleanup_start", case=index)
            watchdog.arm(plan.cleanup_s)
            cleanup_error = ctx.run_cleanups()
            cleanup_broken = _probe(plan.health_check)
            log.write(event="cleanup", case=index, error=cleanup_error, broken=cleanup_broken)
            watchdog.arm(plan.cleanup_s + plan.exchange_grace_s)
            cleanup_statuses = _exchange((cleanup_error, cleanup_broken), num_ranks)
            reason = _broken_reason(cleanup_statuses, case.name)
            if reason is not None:
                log.write(event="stop", reason=reason)
                stopped = True
                break
            if any(e for e, _ in statuses) or any(e for e, _ in cleanup_statuses):
                groups = None  # the case's collectives may be out of step across ranks: fresh groups next

        if plan.teardown is not None and not stopped:
            log.write(event="teardown_start")
            watchdog.arm(plan.teardown_s)
            error = None
            try:
                plan.teardown(shared)
            except Exception:
                error = traceback.format_exc()
            log.write(event="teardown", error=error)
        watchdog.cancel()
        log.write(event="end")
        return log.events
    except BaseException:
        watchdog.cancel()
        log.write(event="abort", error=traceback.format_exc())
        raise
    finally:
        watchdog.cancel()
        log.close()


# ------------------------------------------------------------------------------------------------ outcomes


class CaseFailedError(AssertionError):
    """A batch case that did not pass (failed, hung, or not run); the message says which ranks and why."""


@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """One rank's part of a case. status: "ok", "failed", "hung", "killed" (still running when the launch ended)
    or "not_run"; detail: the traceback, the stacks of a hang, or the reason."""

    rank: int
    status: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class CaseOutcome:
    name: str
    status: str  # PASSED, FAILED or NOT_RUN
    ranks: tuple[RankOutcome, ...]
    message: str = ""
    seconds: float = 0.0  # the slowest rank's time in the case (cleanup not included)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def assert_passed(self) -> None:
        __tracebackhide__ = True  # pytest: report the case's message, not this frame
        if not self.passed:
            raise CaseFailedError(self.message)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    outcomes: dict[str, CaseOutcome]
    num_ranks: int
    launch_error: str | None = None
    seconds: float = 0.0

    def __getitem__(self, name: str) -> CaseOutcome:
        if name not in self.outcomes:
            raise KeyError(f"no case {name!r} in this batch (its cases: {list(self.outcomes)})")
        return self.outcomes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.outcomes


@dataclasses.dataclass
class _RankLog:
    events: list[dict[str, Any]]
    hang: str

    def of_case(self, kind: str, index: int) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("event") == kind and event.get("case") == index:
                return event
        return None

    def first(self, kind: str) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("event") == kind:
                return event
        return None

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1] if self.events else {}


def _read_events(progress_dir: str, rank: int) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(OSError), open(_events_path(progress_dir, rank)) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _read_hang(progress_dir: str, rank: int) -> str:
    with contextlib.suppress(OSError), open(_hang_path(progress_dir, rank)) as f:
        return f.read().strip()
    return ""


def _where(log: _RankLog, cases: Sequence[BatchCase]) -> str:
    """What the rank was doing when its log ends."""
    last = log.last
    kind, index = last.get("event"), last.get("case")
    name = repr(cases[index].name) if isinstance(index, int) and 0 <= index < len(cases) else "?"
    return {
        "start": f"in case {name}",
        "result": f"waiting for the other ranks after case {name}",
        "cleanup_start": f"in the cleanup of case {name}",
        "cleanup": f"waiting for the other ranks after the cleanup of case {name}",
        "setup_start": "in the batch setup",
        "setup": "waiting for the other ranks after the batch setup",
        "teardown_start": "in the batch teardown",
    }.get(kind, "before the batch began" if not last else f"after event {kind!r}")


def _end_reason(logs: Sequence[_RankLog], cases: Sequence[BatchCase], launch_error: str | None) -> str:
    """Why the batch ended early (for cases that did not run or did not finish)."""
    hung = [rank for rank, log in enumerate(logs) if log.hang]
    # A rank still inside a phase is the cause; one waiting for the others after it only noticed.
    hung.sort(key=lambda rank: logs[rank].last.get("event") not in ("start", "cleanup_start", "setup_start"))
    if hung:
        return f"rank {hung[0]} hung {_where(logs[hung[0]], cases)} (over its budget)"
    for rank, log in enumerate(logs):
        abort = log.first("abort")
        if abort is not None:
            return f"rank {rank} stopped {_where(_RankLog(log.events[:-1], ''), cases)}: {_summary(abort.get('error'))}"
    if launch_error:
        return f"the launch failed: {_summary(launch_error)}"
    return "the batch ended before it"


def _aggregate(
    cases: Sequence[BatchCase], logs: Sequence[_RankLog], launch_error: str | None, num_ranks: int
) -> dict[str, CaseOutcome]:
    end_reason = _end_reason(logs, cases, launch_error)
    stop_reason = None
    for log in logs:
        stop = log.first("stop")
        if stop is not None:
            stop_reason = stop.get("reason")
            break
    outcomes: dict[str, CaseOutcome] = {}
    last_run = None
    for index, case in enumerate(cases):
        per_rank = []
        for rank, log in enumerate(logs):
            start = log.of_case("start", index)
            result = log.of_case("result", index)
            if start is None:
                per_rank.append(RankOutcome(rank, NOT_RUN, stop_reason or end_reason))
                continue
            if result is None:
                if log.hang and log.last.get("event") == "start" and log.last.get("case") == index:
                    budget = start.get("budget_s", 0.0)
                    detail = f"hung: still in the case after its budget of {budget:.0f} s; its stacks:\n{log.hang}"
                    per_rank.append(RankOutcome(rank, "hung", detail))
                else:
                    per_rank.append(RankOutcome(rank, "killed", f"did not finish the case: {end_reason}"))
                continue
            errors = []
            if result.get("error"):
                errors.append(result["error"])
            if result.get("broken"):
                errors.append(f"the CUDA context no longer works after the case:\n{result['broken']}")
            cleanup = log.of_case("cleanup", index)
            if cleanup is not None:
                if cleanup.get("error"):
                    errors.append(f"the case's cleanup failed:\n{cleanup['error']}")
                if cleanup.get("broken"):
                    errors.append(f"the CUDA context no longer works after the cleanup:\n{cleanup['broken']}")
            elif log.of_case("cleanup_start", index) is not None:
                how = f"hung; its stacks:\n{log.hang}" if log.hang else end_reason
                errors.append(f"the case's cleanup did not finish: {how}")
            per_rank.append(RankOutcome(rank, "failed" if errors else "ok", "\n".join(errors)))
        results = [log.of_case("result", index) for log in logs]
        seconds = max((float(r.get("seconds", 0.0)) for r in results if r), default=0.0)
        outcomes[case.name] = dataclasses.replace(_case_outcome(case.name, per_rank, num_ranks), seconds=seconds)
        if any(r.status != NOT_RUN for r in per_rank):
            last_run = case.name

    teardown_errors = [
        (rank, event.get("error")) for rank, log in enumerate(logs) for event in [log.first("teardown")] if event
    ]
    teardown_errors = [(rank, error) for rank, error in teardown_errors if error]
    if teardown_errors and last_run is not None:
        before = outcomes[last_run]
        text = "\n".join(f"--- rank {rank}: the batch teardown failed ---\n{error}" for rank, error in teardown_errors)
        outcomes[last_run] = dataclasses.replace(
            before, status=FAILED, message=(before.message + "\n" if before.message else "") + text
        )
    return outcomes


def _only_waited(outcome: RankOutcome) -> bool:
    """Whether a failed rank's error is a timeout (waiting for a peer), not an error of its own."""
    line = _summary(outcome.detail).lower()
    return outcome.status == "failed" and ("timed out" in line or "timeouterror" in line)


def _case_outcome(name: str, per_rank: Sequence[RankOutcome], num_ranks: int) -> CaseOutcome:
    if all(r.status == "ok" for r in per_rank):
        return CaseOutcome(name, PASSED, tuple(per_rank))
    if all(r.status == NOT_RUN for r in per_rank):
        return CaseOutcome(name, NOT_RUN, tuple(per_rank), f"case {name!r}: not run: {per_rank[0].detail}")
    # Ranks whose own error it is first; ranks that timed out waiting for a peer that had left the case last.
    bad = sorted((r for r in per_rank if r.status != "ok"), key=lambda r: (_only_waited(r), r.rank))
    good = [r.rank for r in per_rank if r.status == "ok"]
    lines = [
        f"case {name!r} failed at {num_ranks} ranks: "
        + ", ".join(f"rank {r.rank} {r.status}" for r in bad)
        + (f"; ranks {good} passed" if good else "")
    ]
    for r in bad:
        lines.append(f"--- rank {r.rank} ({r.status}) ---\n{r.detail}")
    return CaseOutcome(name, FAILED, tuple(per_rank), "\n".join(lines))


# ------------------------------------------------------------------------------------------------ the launch


def launch_batch(
    cases: Sequence[BatchCase],
    num_ranks: int,
    *,
    device: str = "cpu",
    env: Mapping[str, str] | None = None,
    backend: str = "gloo",
    mps: bool | None = None,
    setup: Callable[..., Any] | None = None,
    setup_args: tuple = (),
    teardown: Callable[[Any], None] | None = None,
    health_check: Callable[[], None] | str | None = "auto",
    group_timeout_s: float | None = None,
    startup_s: float = 120.0,
    setup_s: float = 120.0,
    cleanup_s: float = 60.0,
    teardown_s: float = 60.0,
    exchange_grace_s: float = 15.0,
) -> BatchResult:
    """Run every case on num_ranks ranks in one launch; a :class:`BatchResult` with a :class:`CaseOutcome` per case.

    setup(ctx, *setup_args) runs once per rank before the cases (collective; what it returns is ctx.shared),
    teardown(shared) after them (skipped once a CUDA context broke). health_check: "auto" (cuda_health_check
    with device="cuda", none on the CPU), None, or a module-level function that raises when the context is broken.
    group_timeout_s: timeout of the cases' groups (default DEEP_EP_PY_TIMEOUT_S + 10). The launch may take
    startup_s + setup_s + teardown_s + the sum over cases of (run_s + recovery + cleanup_s + 2 exchange graces).
    Never raises for what happens in the ranks: a failed launch becomes the outcomes of the cases it cut short.
    """
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"launch_batch: case names must be distinct, got {names}")
    if not cases:
        return BatchResult({}, num_ranks)
    env = dict(env or {})
    timeout = device_timeout_s(env)
    group_timeout = timeout + GROUP_TIMEOUT_EXTRA_S if group_timeout_s is None else float(group_timeout_s)
    if health_check == "auto":
        health_check = cuda_health_check if device == "cuda" else None
    progress_dir = tempfile.mkdtemp(prefix="deep_ep_batch_")
    plan = _Plan(
        cases=tuple(cases),
        progress_dir=progress_dir,
        setup=setup,
        setup_args=tuple(setup_args),
        teardown=teardown,
        health_check=health_check,  # type: ignore[arg-type]
        group_backend="gloo",
        group_timeout_s=group_timeout,
        recovery_s=recovery_s(timeout, group_timeout),
        setup_s=setup_s,
        cleanup_s=cleanup_s,
        teardown_s=teardown_s,
        exchange_grace_s=exchange_grace_s,
    )
    per_case = [case.run_s + plan.recovery_s + cleanup_s + 2 * exchange_grace_s for case in cases]
    launch_timeout = startup_s + setup_s + exchange_grace_s + sum(per_case) + teardown_s
    started = time.monotonic()
    launch_error = None
    try:
        try:
            per_rank_events = launch(
                _batch_worker,
                num_ranks,
                plan,
                timeout_s=launch_timeout,
                backend=backend,
                env=env,
                device=device,
                mps=mps,
            )
        except Exception:
            launch_error = traceback.format_exc()
            per_rank_events = [_read_events(progress_dir, rank) for rank in range(num_ranks)]
        logs = [_RankLog(list(per_rank_events[rank]), _read_hang(progress_dir, rank)) for rank in range(num_ranks)]
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    outcomes = _aggregate(cases, logs, launch_error, num_ranks)
    return BatchResult(outcomes, num_ranks, launch_error, time.monotonic() - started)


# ------------------------------------------------------------------------------------------------ pytest glue


def selected_param_values(
    items: Iterable[Any], module: Any, test_name: str, argname: str, fixed: Mapping[str, Any] | None = None
) -> list[Any]:
    """The values of parameter `argname` of the collected (selected) items of test function `test_name` in
    `module` whose other parameters equal `fixed`, in collection order and without repeats: what a batch must run
    so that every selected test of a case finds its outcome, and nothing deselected (-k, -m) runs."""
    values: list[Any] = []
    for item in items:
        if getattr(item, "module", None) is not module or getattr(item, "originalname", None) != test_name:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if argname not in params or any(params.get(key) != value for key, value in (fixed or {}).items()):
            continue
        if not any(params[argname] is v or params[argname] == v for v in values):
            values.append(params[argname])
    return values
