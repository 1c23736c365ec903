"""`python -m bench` end to end at tiny sizes: one JSON row per path, finite positive figures, the table printed.

A smoke test of the benchmark's plumbing, not a timed test: it asserts nothing about speed.
"""

from __future__ import annotations

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
