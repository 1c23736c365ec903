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

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = [
    "--device", "cpu", "--ranks", "2", "--tokens", "64", "--hidden", "256", "--ll-tokens", "16",
    "--experts", "64", "--topk", "4", "--warmup", "1", "--iters", "2", "--timeout-s", "50",
]  # fmt: skip
# (path, dtype) of every row, in table order: normal mode, then low latency with and without return_recv_hook.
EXPECTED_PATHS = [
    ("dispatch", "bf16"),
    ("dispatch", "fp8"),
    ("combine", "bf16"),
    ("ll_dispatch", "fp8"),
    ("ll_dispatch+hook", "fp8"),
    ("ll_combine", "bf16"),
    ("ll_combine+hook", "bf16"),
]


def test_bench_tiny_end_to_end(tmp_path):
    json_path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *TINY_ARGS, "--json", str(json_path)],
        cwd=REPO_DIR,
        check=False,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert proc.returncode == 0, f"bench failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"

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
        assert (row["send_time_us"] is not None) == row["path"].endswith("+hook"), row
    env = doc["environment"]
    assert env["backend"] and env["torch_version"] and env["timestamp"]
    assert env["has_kernels"] in (True, False)

    header = proc.stdout.splitlines()[0]
    for column in ("path", "ranks", "backend", "dtype", "tokens", "time us", "GB/s", "copy roof GB/s", "% of roof"):
        assert column in header, header
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


def _fake_rank(results: dict) -> dict:
    return {"copy_roof_gbps": 3000.0, "backend": "cuda", "results": results, "notes": []}


def _fake_result(kernels_active: bool, num_rows: int, num_tokens: int, dtype: str) -> dict:
    from bench import timing
    from bench.settings import BYTES_PER_CHANNEL

    recv_bytes = num_rows * 256 * BYTES_PER_CHANNEL[dtype]
    rank_result = timing.RankResult(median_s=1e-4, recv_bytes=recv_bytes, iter_s=[1e-4, 1e-4])
    return {
        "rank_result": dataclasses.asdict(rank_result),
        "hbm_reported": None,
        "kernels_active": kernels_active,
        "num_rows": num_rows,
        "num_tokens": num_tokens,
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


def test_bench_kernels_active_detection():
    import torch

    from bench.worker import _kernels_active

    class Backend:
        intranode = object()
        low_latency = None

    class FakeBuffer:
        backend = "cuda"
        _backend = Backend()

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _kernels_active(FakeBuffer(), "normal", cuda)
    assert not _kernels_active(FakeBuffer(), "low_latency", cuda)
    assert not _kernels_active(FakeBuffer(), "normal", cpu)
    reference = FakeBuffer()
    reference.backend = "reference"
    assert not _kernels_active(reference, "normal", cuda)
