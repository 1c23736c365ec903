"""`python -m bench` end to end at tiny sizes: one JSON row per path, finite positive figures, the table printed.

A smoke test of the benchmark's plumbing, not a timed test: it asserts nothing about speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = [
    "--device", "cpu", "--ranks", "2", "--tokens", "64", "--hidden", "256", "--ll-tokens", "16",
    "--experts", "64", "--topk", "4", "--warmup", "1", "--iters", "2", "--timeout-s", "50",
]  # fmt: skip
# (path, dtype) of every row, in table order: normal mode, the same calls with the 2 ranks as 2 nodes (--nodes 2,
# the default), then low latency with and without return_recv_hook.
INTERNODE_PATHS = [("internode_dispatch", "bf16"), ("internode_dispatch", "fp8"), ("internode_combine", "bf16")]
EXPECTED_PATHS = [
    ("dispatch", "bf16"),
    ("dispatch", "fp8"),
    ("combine", "bf16"),
    ("one_copy_dispatch", "bf16"),
    ("one_copy_dispatch", "fp8"),
    ("one_copy_combine", "bf16"),
    *INTERNODE_PATHS,
    ("ll_dispatch", "fp8"),
    ("ll_dispatch+hook", "fp8"),
    ("ll_combine", "bf16"),
    ("ll_combine+hook", "bf16"),
]


# The same sizes on the CPU emulator of the kernels: the kernel rows, and with them every kernel-only path of the
# bench (one-copy path checks, copy roof, design HBM figures). A small copy-roof tensor; the emulator is slower than
# the reference and CI runs other tests beside it, so a generous timeout.
EMULATED_ARGS = [
    "--device", "emulated", "--ranks", "2", "--tokens", "64", "--hidden", "256", "--ll-tokens", "16",
    "--experts", "64", "--topk", "4", "--warmup", "1", "--iters", "2", "--timeout-s", "240", "--roof-bytes", "1048576",
    "--paths", "normal,one_copy,internode,internode_puts,low_latency,low_latency_puts",
]  # fmt: skip
# With the puts rows (asked for by name) after the internode rows and after the low-latency rows.
INTERNODE_PUTS_PATHS = [(path.replace("internode_", "internode_puts_"), dtype) for path, dtype in INTERNODE_PATHS]
EMULATED_PATHS = [
    *EXPECTED_PATHS[: EXPECTED_PATHS.index(INTERNODE_PATHS[-1]) + 1],
    *INTERNODE_PUTS_PATHS,
    *EXPECTED_PATHS[EXPECTED_PATHS.index(INTERNODE_PATHS[-1]) + 1 :],
    ("ll_puts_dispatch", "fp8"),
    ("ll_puts_combine", "bf16"),
]
EMULATED_TIMEOUT_S = 270


def _bench_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The bench's stdout lines from its first printed one. Its ranks' stdout goes to stderr (Gloo in torch 2.9 prints
    "[Gloo] Rank 0 is connected to 1 peer ranks..." from every rank as its group starts), so nothing else is there."""
    assert "[Gloo]" not in proc.stdout, proc.stdout
    lines = proc.stdout.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return lines


def _run_bench(args: list[str], json_path, timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(json_path)],
        cwd=REPO_DIR,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _check_path_figures(row: dict) -> None:
    """What a row carries by its path, at 2 ranks: send time only with the hook; network figures only internode
    (the 2 ranks as 2 nodes x 1); a ratio to the intranode rows on the same data for internode and one-copy rows."""
    if row["path"].endswith("+hook"):
        assert math.isfinite(row["send_time_us"]) and 0 < row["send_time_us"] <= row["time_us"], row
    else:
        assert row["send_time_us"] is None, row
    is_internode = (row["path"], row["dtype"]) in INTERNODE_PATHS + INTERNODE_PUTS_PATHS
    assert (row["mode"] in ("internode", "internode_puts")) == is_internode, row
    if is_internode:
        # Every token leaves its node once per other node it goes to.
        assert row["extra"]["nodes"] == 2 and row["extra"]["ranks_per_node"] == 1, row
        assert math.isfinite(row["net_gbps"]) and row["net_gbps"] > 0, row
        # Each (token, other node) pair delivers at least one received row on that node.
        assert 0 < sum(row["extra"]["per_rank_net_bytes"]) <= sum(row["per_rank_recv_bytes"]), row
    else:
        assert row["net_gbps"] is None, row
    if is_internode or row["mode"] == "one_copy":
        assert math.isfinite(row["vs_intranode"]) and row["vs_intranode"] > 0, row
    else:
        assert row["vs_intranode"] is None, row


def test_bench_keeps_the_rows_of_the_modes_that_finished(tmp_path):
    """A launch that fails in a later mode (here on purpose: DEEP_EP_PY_BENCH_FAIL_MODE) still writes the JSON with
    the rows of the modes every rank finished, a note naming the failure, and exits 1: on a GPU machine's one run the
    intranode rows must not vanish with the newest path's failure."""
    json_path = tmp_path / "bench.json"
    args = [*TINY_ARGS, "--paths", "normal,low_latency"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(json_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=55,
        env=dict(os.environ, DEEP_EP_PY_BENCH_FAIL_MODE="low_latency"),
    )
    assert proc.returncode == 1, f"rc {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads(json_path.read_text())
    assert [(row["path"], row["dtype"]) for row in doc["rows"]] == EXPECTED_PATHS[:3], doc["rows"]
    failed = [note for note in doc["notes"] if "the launch failed" in note]
    assert len(failed) == 1 and failed[0].startswith("ranks=2: the launch failed (RankFailedError: "), doc["notes"]
    assert "only the rows of the modes every rank finished" in failed[0], failed
    assert "\ndispatch " in proc.stdout and "\nll_dispatch " not in proc.stdout, proc.stdout


def test_bench_tiny_end_to_end(tmp_path):
    json_path = tmp_path / "bench.json"
    proc = _run_bench(TINY_ARGS, json_path, timeout_s=55)

    doc = json.loads(json_path.read_text())
    rows = doc["rows"]
    keys = [(row["path"], row["dtype"]) for row in rows]
    assert keys == EXPECTED_PATHS, keys
    for row in rows:
        assert row["ranks"] == 2
        assert row["backend"], row
        assert math.isfinite(row["time_us"]) and row["time_us"] > 0, row
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0, row
        assert len(row["per_rank_time_us"]) == 2
        assert row["copy_roof_gbps"] is None  # no GPU roof on the CPU reference
        assert row["num_sms"] is None  # no kernels, no SMs
        _check_path_figures(row)
    env = doc["environment"]
    assert env["backend"] and env["torch_version"] and env["timestamp"]
    assert env["has_kernels"] in (True, False)

    header = _bench_lines(proc)[0]
    for column in (
        "path",
        "ranks",
        "backend",
        "dtype",
        "tokens",
        "SMs",
        "time us",
        "GB/s",
        "copy roof GB/s",
        "% of roof",
    ):
        assert column in header, header
    assert "net GB/s" in header and "vs intranode" in header, header
    for path, _ in EXPECTED_PATHS:
        assert f"\n{path} " in proc.stdout, proc.stdout
    assert "not kernels" in proc.stdout
    assert "ranks=2" in proc.stderr  # progress lines go to stderr
    # No kernels on CPU: every row from the reference, no design HBM figure, the graph rows skipped with a note.
    assert all(row["extra"]["produced_by"] == "reference fallback" for row in rows), rows
    assert all(row["hbm_bytes_per_payload_byte"] is None for row in rows), rows
    assert "ranks=2 rows from reference fallback: dispatch bf16" in proc.stdout, proc.stdout
    assert "graph replay: skipped" in proc.stdout, proc.stdout
    assert "ll_dispatch+combine graph " not in proc.stdout.split("\n# ")[0], proc.stdout


def test_bench_emulated_end_to_end(tmp_path):
    """--device emulated: every kernel row of --device cuda but the CUDA graph's, produced by the kernels on their
    CPU emulator (not the reference fallback), the one-copy rows by the one-copy path, and the figures marked as
    meaningless wherever they are printed or stored."""
    from deep_ep_py import _ext

    if not _ext.emulator_available():
        pytest.skip(f"the CPU emulator of the kernels is not built: {_ext.emulator_unavailable_reason()}")
    # The bench itself turns the kernels on for its ranks (DEEP_EP_PY_UNVERIFIED_KERNELS=1) where the environment
    # does not say otherwise: leave that, and the backend, to it.
    env = {k: v for k, v in os.environ.items() if k not in ("DEEP_EP_PY_UNVERIFIED_KERNELS", "DEEP_EP_PY_BACKEND")}
    json_path = tmp_path / "bench.json"
    proc = _run_bench(EMULATED_ARGS, json_path, timeout_s=EMULATED_TIMEOUT_S, env=env)

    doc = json.loads(json_path.read_text())
    rows = doc["rows"]
    keys = [(row["path"], row["dtype"]) for row in rows]
    assert keys == EMULATED_PATHS, keys  # no graph row: the emulator has no CUDA graphs
    for row in rows:
        assert row["ranks"] == 2 and row["backend"] == "cuda", row
        assert row["extra"]["produced_by"] == "kernels", row  # not the reference fallback
        assert row["extra"]["emulated"] is True and row["extra"]["timings_meaningful"] is False, row
        for key in ("time_us", "gbps", "copy_roof_gbps", "roof_fraction", "hbm_bytes_per_payload_byte"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["ranks_per_gpu"] == 2, row  # the emulator's one device, shared
        # Normal-mode kernels get DeepEP V1's SMs at 2 ranks in the targets (24); low latency has its own grid.
        assert row["num_sms"] == (None if row["mode"].startswith("low_latency") else 24), row
        assert len(row["per_rank_time_us"]) == 2 and all(t > 0 for t in row["per_rank_time_us"]), row
        _check_path_figures(row)
        # The one-copy rows' last timed calls went by the one-copy path on every rank (not the rounds).
        assert row["extra"]["one_copy_path"] is (True if row["mode"] == "one_copy" else None), row

    env = doc["environment"]
    assert env["device"] == "emulated" and env["emulated"] is True and env["timings_meaningful"] is False, env
    assert "timings not meaningful" in env["device_name"], env
    assert "means NOTHING" in env["timings_note"], env
    assert env["has_kernels"] is True and env["backend"] == "cuda", env
    notes = doc["notes"]
    assert "means NOTHING" in notes[0], notes
    assert not any("not kernels" in note for note in notes), notes
    assert not any("did not go by the one-copy path" in note for note in notes), notes
    one_copy_rows = "one_copy_dispatch bf16 (ranks=2), one_copy_dispatch fp8 (ranks=2), one_copy_combine bf16 (ranks=2)"
    assert f"one_copy_* rows, path of the last timed call on every rank: one-copy path: {one_copy_rows}" in notes
    assert any(note.startswith("graph replay: skipped (the CPU emulator has no CUDA graphs") for note in notes), notes
    assert any(note.startswith("ll_puts_*: ll_dispatch and ll_combine with every rank its own node") for note in notes)

    lines = _bench_lines(proc)
    assert lines[0].startswith("# CPU EMULATOR") and "means NOTHING" in lines[0], proc.stdout  # above the table
    header = lines[1]
    for column in ("path", "time us", "GB/s", "copy roof GB/s", "% of roof", "HBM B/payload B", "vs intranode"):
        assert column in header, header
    for path, _ in EXPECTED_PATHS:
        assert f"\n{path} " in proc.stdout, proc.stdout
    assert "ranks=2 rows from kernels: dispatch bf16" in proc.stdout, proc.stdout
    assert "ll_dispatch+combine graph " not in proc.stdout.split("\n# ")[1], proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-sms", "3"], "--num-sms: expected an even number >= 2"),
        (["--num-sms", "0"], "--num-sms: expected an even number >= 2"),
        (["--hidden", "100"], "--hidden: expected a multiple of 128"),
    ],
)
def test_bench_bad_arguments_name_the_option(args, message, capsys):
    from bench import run as bench_run

    with pytest.raises(SystemExit) as exc_info:
        bench_run.config_from_args(
            bench_run.build_parser().parse_args(["--device", "cpu", *args]), bench_run.build_parser()
        )
    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_num_sms_defaults_to_the_targets_deepep_counts():
    from bench.settings import num_sms_for

    assert [num_sms_for(r, None, 20) for r in (2, 4, 8)] == [24, 24, 16]  # ../shared/targets.md's DeepEP V1 runs
    assert num_sms_for(3, None, 20) == 20 and num_sms_for(8, 32, 20) == 32


def test_bench_launch_env(monkeypatch):
    """The ranks' environment: the emulator and the kernels under --device emulated (the kernels unless the
    environment says otherwise), the emulator off for the other devices where this process has it on."""
    from bench import run as bench_run
    from bench.settings import BenchConfig

    def cfg(device: str) -> BenchConfig:
        return BenchConfig(
            tokens=1, hidden=128, topk=1, experts=8, ll_tokens=1, warmup=0, iters=1, modes=("normal",),
            device=device, backend=None, dispatch_handle="cached", roof_bytes=1, seed=0,
        )  # fmt: skip

    monkeypatch.delenv("DEEP_EP_PY_UNVERIFIED_KERNELS", raising=False)
    monkeypatch.delenv("DEEP_EP_PY_EMULATE_DEVICE", raising=False)
    emulated = {"DEEP_EP_PY_EMULATE_DEVICE": "1", "DEEP_EP_PY_UNVERIFIED_KERNELS": "1"}
    assert bench_run._launch_env(cfg("emulated")) == emulated
    assert bench_run._launch_env(cfg("cpu")) is None and bench_run._launch_env(cfg("cuda")) is None
    monkeypatch.setenv("DEEP_EP_PY_UNVERIFIED_KERNELS", "0")  # inherited by the ranks, not overridden
    assert bench_run._launch_env(cfg("emulated")) == {"DEEP_EP_PY_EMULATE_DEVICE": "1"}
    monkeypatch.setenv("DEEP_EP_PY_EMULATE_DEVICE", "1")
    assert bench_run._launch_env(cfg("cpu")) == {"DEEP_EP_PY_EMULATE_DEVICE": "0"}


def _fake_rank(results: dict) -> dict:
    return {"copy_roof_gbps": 3000.0, "backend": "cuda", "num_sms": 16, "results": results, "notes": []}


def _fake_result(
    kernels_active: bool,
    num_rows: int,
    num_tokens: int,
    dtype: str,
    median_s: float = 1e-4,
    node_rows: tuple[int, int] | None = None,  # internode: (token, node) pairs, and those to other nodes
) -> dict:
    from bench import timing
    from bench.settings import BYTES_PER_CHANNEL

    recv_bytes = num_rows * 256 * BYTES_PER_CHANNEL[dtype]
    rank_result = timing.RankResult(median_s=median_s, recv_bytes=recv_bytes, iter_s=[median_s, median_s])
    return {
        "rank_result": dataclasses.asdict(rank_result),
        "hbm_reported": None,
        "kernels_active": kernels_active,
        "num_rows": num_rows,
        "num_tokens": num_tokens,
        "num_node_rows": node_rows[0] if node_rows else None,
        "num_net_rows": node_rows[1] if node_rows else None,
        "net_bytes": node_rows[1] * 256 * BYTES_PER_CHANNEL[dtype] if node_rows else None,
    }


def test_bench_rows_kernels_and_design_hbm():
    """The driver side without a GPU: design HBM figures, kernels vs reference per row, the graph row."""
    from bench import run as bench_run
    from bench.settings import GRAPH_DTYPE, GRAPH_PATH, BenchConfig, hbm_bytes_per_payload_byte

    cfg = BenchConfig(
        tokens=64, hidden=256, topk=8, experts=64, ll_tokens=16, warmup=1, iters=2, modes=("normal", "low_latency"),
        device="cpu", backend="cuda", dispatch_handle="cached", roof_bytes=1 << 20, seed=0,
    )  # fmt: skip
    results = {
        ("dispatch", "bf16", False): _fake_result(False, 100, 64, "bf16"),  # reference fallback
        ("ll_dispatch", "fp8", False): _fake_result(True, 128, 16, "fp8"),  # 8 rows a token
        ("ll_combine", "bf16", False): _fake_result(True, 128, 16, "bf16"),
        (GRAPH_PATH, GRAPH_DTYPE, False): _fake_result(True, 128, 16, GRAPH_DTYPE),
    }
    rows = bench_run._rows_for(2, cfg, [_fake_rank(results), _fake_rank(results)])
    by_path = {row.path: row for row in rows}
    assert list(by_path) == ["dispatch", "ll_dispatch", "ll_combine", GRAPH_PATH]
    assert by_path["dispatch"].hbm_bytes_per_payload_byte is None
    assert by_path["dispatch"].extra["produced_by"] == "reference fallback"
    # SMs only where the normal-mode kernels ran: not on the reference, not for low latency's own grid.
    assert [row.num_sms for row in rows] == [None, None, None, None]
    fp8 = 1 + 4 / 128
    assert math.isclose(by_path["ll_dispatch"].hbm_bytes_per_payload_byte, 4 + (1 + 2 / fp8) / 8)
    assert math.isclose(by_path["ll_combine"].hbm_bytes_per_payload_byte, 3 + 1 / 8)
    graph = by_path[GRAPH_PATH]
    want = (fp8 * (4 + (1 + 2 / fp8) / 8) + 2 * (3 + 1 / 8)) / (fp8 + 2)
    assert math.isclose(graph.hbm_bytes_per_payload_byte, want)
    assert graph.extra["produced_by"] == "kernels" and graph.dtype == GRAPH_DTYPE
    assert math.isclose(graph.gbps, 128 * 256 * (fp8 + 2) / 1e-4 / 1e9)  # dispatch bytes + combine bytes
    assert hbm_bytes_per_payload_byte("dispatch", True, 5.0) == 4.0  # intranode: each byte copied twice

    notes = bench_run._notes(cfg, rows, ["graph replay: RuntimeError: boom (capture, rank 1) [ranks 2]"])
    assert "ranks=2 rows from reference fallback: dispatch bf16; kernels: ll_dispatch, ll_combine, " + GRAPH_PATH in (
        notes
    ), notes
    assert not any("not kernels" in note for note in notes), notes
    assert notes[-1].startswith("graph replay: RuntimeError"), notes


def test_bench_internode_rows():
    """Internode rows on the driver side: network GB/s, speed against the intranode row of the same call, and the
    design HBM figure, which depends on how many receivers of a node share one (token, node) row."""
    from bench import run as bench_run
    from bench.settings import BenchConfig, hbm_bytes_per_payload_byte

    cfg = BenchConfig(
        tokens=64, hidden=256, topk=8, experts=64, ll_tokens=16, warmup=1, iters=2, modes=("normal", "internode"),
        device="cpu", backend="cuda", dispatch_handle="cached", roof_bytes=1 << 20, seed=0, nodes=2,
    )  # fmt: skip
    # 64 tokens, 160 rows received, 96 (token, node) pairs of which 40 to the other node; internode twice as fast.
    results = {
        ("dispatch", "bf16", False): _fake_result(True, 160, 64, "bf16", median_s=2e-4),
        ("combine", "bf16", False): _fake_result(True, 160, 64, "bf16", median_s=1e-4),
        ("internode_dispatch", "bf16", False): _fake_result(True, 160, 64, "bf16", 1e-4, node_rows=(96, 40)),
        ("internode_dispatch", "fp8", False): _fake_result(False, 160, 64, "fp8", 1e-4, node_rows=(96, 40)),
        ("internode_combine", "bf16", False): _fake_result(True, 160, 64, "bf16", 2e-4, node_rows=(96, 40)),
    }
    rows = bench_run._rows_for(4, cfg, [_fake_rank(results)] * 4)
    by_key = {(row.path, row.dtype): row for row in rows}
    assert list(by_key) == [
        ("dispatch", "bf16"), ("combine", "bf16"),
        ("internode_dispatch", "bf16"), ("internode_dispatch", "fp8"), ("internode_combine", "bf16"),
    ]  # fmt: skip
    dispatch = by_key[("internode_dispatch", "bf16")]
    assert dispatch.mode == "internode" and dispatch.extra["nodes"] == 2 and dispatch.extra["ranks_per_node"] == 2
    assert math.isclose(dispatch.net_gbps, 40 * 256 * 2 / 1e-4 / 1e9)
    assert math.isclose(dispatch.gbps, 160 * 256 * 2 / 1e-4 / 1e9)
    assert math.isclose(dispatch.vs_intranode, 2.0)
    # 2 per received row + 2 per (token, node) row: 2 + 2 * 96 / 160.
    assert math.isclose(dispatch.hbm_bytes_per_payload_byte, 2 + 2 * 96 / 160)
    combine = by_key[("internode_combine", "bf16")]
    assert math.isclose(combine.vs_intranode, 0.5)
    # 3 per row + 2 per (token, node) row + 1 per token: 3 + 2 * 96 / 160 + 64 / 160.
    assert math.isclose(combine.hbm_bytes_per_payload_byte, 3 + 2 * 96 / 160 + 64 / 160)
    fp8 = by_key[("internode_dispatch", "fp8")]
    assert fp8.vs_intranode is None  # no intranode fp8 row in this run
    assert fp8.hbm_bytes_per_payload_byte is None and fp8.extra["produced_by"] == "reference fallback"
    # The ranks' SM count on the kernel rows (the fake ranks ran with 16), none on the fallback's.
    assert dispatch.num_sms == combine.num_sms == 16 and fp8.num_sms is None
    for path in ("dispatch", "combine"):
        assert by_key[(path, "bf16")].net_gbps is None and by_key[(path, "bf16")].vs_intranode is None
    # A one-copy row is compared with the two-copy row of its call, and moves each payload byte once (2 B of HBM).
    one_copy_results = {**results, ("one_copy_dispatch", "bf16", False): _fake_result(True, 160, 64, "bf16", 5e-5)}
    one_copy = {row.path: row for row in bench_run._rows_for(4, cfg, [_fake_rank(one_copy_results)] * 4)}[
        "one_copy_dispatch"
    ]
    assert math.isclose(one_copy.vs_intranode, 4.0) and one_copy.net_gbps is None
    assert math.isclose(one_copy.hbm_bytes_per_payload_byte, 2.0)
    # One receiver per (token, node): the intranode figure; without node rows the internode figure is unknown.
    assert hbm_bytes_per_payload_byte("internode_dispatch", True, 5.0, 1.0) == 4.0
    assert hbm_bytes_per_payload_byte("internode_dispatch", True, 5.0) is None
    notes = bench_run._notes(cfg, rows, [])
    assert any(note.startswith("internode_*: the ranks play 2 nodes") for note in notes), notes
    assert not any(note.startswith("internode_puts_*") for note in notes), notes

    # The puts rows: compared with the same intranode rows; a row that crosses nodes is written into the sender's
    # send slot and put from there, 2 B more per net row: 2 + 2 * 96 / 160 + 2 * 40 / 160 for the dispatch.
    puts_results = {
        **results,
        ("internode_puts_dispatch", "bf16", False): _fake_result(True, 160, 64, "bf16", 4e-4, node_rows=(96, 40)),
        ("internode_puts_combine", "bf16", False): _fake_result(True, 160, 64, "bf16", 1e-4, node_rows=(96, 40)),
    }
    puts_rows = {row.path: row for row in bench_run._rows_for(4, cfg, [_fake_rank(puts_results)] * 4)}
    puts_dispatch, puts_combine = puts_rows["internode_puts_dispatch"], puts_rows["internode_puts_combine"]
    assert puts_dispatch.mode == "internode_puts" and puts_dispatch.extra["nodes"] == 2
    assert math.isclose(puts_dispatch.net_gbps, 40 * 256 * 2 / 4e-4 / 1e9)
    assert math.isclose(puts_dispatch.vs_intranode, 0.5) and math.isclose(puts_combine.vs_intranode, 1.0)
    assert math.isclose(puts_dispatch.hbm_bytes_per_payload_byte, 2 + 2 * 96 / 160 + 2 * 40 / 160)
    assert math.isclose(puts_combine.hbm_bytes_per_payload_byte, 3 + 2 * 96 / 160 + 2 * 40 / 160 + 64 / 160)
    assert hbm_bytes_per_payload_byte("internode_puts_dispatch", True, 5.0, 1.0) is None  # needs the net rows
    puts_notes = bench_run._notes(cfg, list(puts_rows.values()), [])
    assert any(note.startswith("internode_puts_*: the same") for note in puts_notes), puts_notes


def test_bench_sizes_the_nvshmem_heap_for_its_largest_buffer(monkeypatch):
    """Where NVSHMEM's heap cannot grow (no CUDA VMM, and the emulator), the first Buffer that starts NVSHMEM sizes
    it for the process: the bench's ranks size it for the largest of their modes' Buffers first (the low-latency
    one at the standard sizes, 1.8 GB, after an internode one of 72 MB would not fit), and leave a size the
    environment gives alone."""
    from bench.settings import STANDARD, BenchConfig
    from bench.worker import _size_nvshmem_heap
    from deep_ep_py.config import low_latency_rdma_size_hint
    from deep_ep_py.runtime import NVSHMEM_SYMMETRIC_MARGIN_BYTES

    sizes = {key: STANDARD[key] for key in ("tokens", "hidden", "topk", "experts", "ll_tokens")}
    cfg = BenchConfig(
        **sizes, warmup=1, iters=2, modes=("normal", "internode", "low_latency"), device="cuda", backend="cuda",
        dispatch_handle="cached", roof_bytes=1 << 20, seed=0, nodes=2,
    )  # fmt: skip
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE", raising=False)
    _size_nvshmem_heap(cfg, 8)
    low_latency = low_latency_rdma_size_hint(STANDARD["ll_tokens"], STANDARD["hidden"], 8, STANDARD["experts"])
    assert int(os.environ["NVSHMEM_SYMMETRIC_SIZE"]) >= low_latency + NVSHMEM_SYMMETRIC_MARGIN_BYTES
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "3G")
    _size_nvshmem_heap(cfg, 8)
    assert os.environ["NVSHMEM_SYMMETRIC_SIZE"] == "3G"


def test_bench_node_traffic():
    import torch

    from bench.settings import BenchConfig
    from bench.worker import _node_traffic, internode_skip_reason

    # 4 ranks as 2 nodes of 2; rank 2 (node 1) sends token 0 to ranks 0 and 1 (node 0 once), token 1 to rank 3
    # (its own node), token 2 to ranks 1 and 2 (both nodes), token 3 nowhere.
    in_rank = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    traffic = _node_traffic(in_rank, num_nodes=2, rank=2)
    assert (traffic.num_node_rows, traffic.num_net_rows) == (4, 2)
    cfg = BenchConfig(
        tokens=1, hidden=128, topk=1, experts=8, ll_tokens=1, warmup=0, iters=1, modes=("internode",),
        device="cpu", backend=None, dispatch_handle="cached", roof_bytes=1, seed=0, nodes=2,
    )  # fmt: skip
    assert internode_skip_reason(cfg, 2) is None and internode_skip_reason(cfg, 8) is None
    assert "3 ranks" in internode_skip_reason(cfg, 3)


def test_bench_kernels_active_detection(monkeypatch):
    import torch

    from bench.worker import _kernels_active

    class Backend:
        intranode = object()
        internode = None
        low_latency = None

    class FakeBuffer:
        backend = "cuda"
        _backend = Backend()

    monkeypatch.delenv("DEEP_EP_PY_EMULATE_DEVICE", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _kernels_active(FakeBuffer(), "normal", cuda)
    assert not _kernels_active(FakeBuffer(), "low_latency", cuda)
    assert not _kernels_active(FakeBuffer(), "internode", cuda)
    internode = FakeBuffer()
    internode._backend = Backend()
    internode._backend.internode = object()
    assert _kernels_active(internode, "internode", cuda)
    assert not _kernels_active(FakeBuffer(), "normal", cpu)
    reference = FakeBuffer()
    reference.backend = "reference"
    assert not _kernels_active(reference, "normal", cuda)
    # Under the CPU emulator of the kernels (--device emulated) their tensors are CPU tensors.
    monkeypatch.setenv("DEEP_EP_PY_EMULATE_DEVICE", "1")
    assert _kernels_active(FakeBuffer(), "normal", cpu)
    assert not _kernels_active(FakeBuffer(), "normal", cuda)
    assert not _kernels_active(reference, "normal", cpu)


def test_bench_json_names_the_commit_of_a_tree_without_git(tmp_path, monkeypatch):
    """A lent GPU machine gets the tree without .git: the figures name the commit gpu_check.sh was given."""
    from bench import report

    monkeypatch.setenv("GPU_CHECK_COMMIT", "abc1234")
    env = report.environment(device_name="x", backend="reference", has_kernels=False, repo_dir=str(tmp_path))
    assert env["git_commit"] == "abc1234"
    monkeypatch.delenv("GPU_CHECK_COMMIT")
    assert report.environment(device_name="x", backend="reference", has_kernels=False, repo_dir=str(tmp_path))[
        "git_commit"
    ] is None
