"""Benchmark report: the result rows, the stdout table and the JSON file.

Kept free of any benchmark logic so that other drivers (the GPU check script) can build rows and reuse the
same table and JSON layout.

A row's ``roof_fraction`` compares the payload the GPU moves with its copy roof: ranks sharing the GPU x GB/s per
rank x 2 bytes (each payload byte read once and written once, the least any implementation must move) over the
copy roof (bytes read + written per second). ``hbm_bytes_per_payload_byte`` is the HBM traffic per payload byte
the producing kernels move by design (bench/settings.py HBM_BYTES_BY_DESIGN; DeepEP V1's intranode path and ours:
about 4), or what the backend reports where it does; None for the reference fallback. Internode rows (the ranks
emulating several nodes) also carry ``net_gbps``, the bytes that cross nodes per rank per second, and
``vs_intranode``, the intranode row's time over theirs on the same data (>= 1: no slower).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# Each payload byte must be read once and written once at least: the one-copy traffic per payload byte.
MIN_HBM_BYTES_PER_PAYLOAD_BYTE = 2.0

CPU_NOTE = "reference backend (CPU, gloo): figures measure the reference all-to-all, not kernels"


@dataclass
class Row:
    """One measured path at one rank count."""

    path: str  # "dispatch", "combine", "internode_dispatch", "internode_combine", "ll_dispatch", "ll_combine", ...
    mode: str  # a bench.settings mode: "normal", "one_copy", "internode", "internode_puts" or "low_latency"
    ranks: int
    backend: str
    dtype: str  # payload dtype on the wire: "bf16" or "fp8"
    tokens: int  # tokens per rank
    hidden: int
    topk: int
    experts: int
    time_us: float  # slowest rank's median time
    gbps: float  # mean over ranks of received bytes / median time, 1e9 B/s
    warmup: int
    iters: int
    send_time_us: float | None = None  # return_recv_hook only: time until the call returned
    num_sms: int | None = None  # normal-mode rows: SMs per rank the kernels were given (Buffer.set_num_sms)
    copy_roof_gbps: float | None = None
    ranks_per_gpu: int | None = None
    roof_fraction: float | None = None
    hbm_bytes_per_payload_byte: float | None = None
    net_gbps: float | None = None  # internode rows: mean over ranks of bytes crossing nodes / median time
    vs_intranode: float | None = None  # internode rows: intranode time / this time, same data and rank count
    per_rank_time_us: list[float] = field(default_factory=list)
    per_rank_gbps: list[float] = field(default_factory=list)
    per_rank_recv_bytes: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def fill_roof(self) -> None:
        """Set roof_fraction from gbps, copy_roof_gbps and ranks_per_gpu (when all are known)."""
        if self.copy_roof_gbps and self.ranks_per_gpu:
            payload_gbps = self.gbps * self.ranks_per_gpu
            self.roof_fraction = payload_gbps * MIN_HBM_BYTES_PER_PAYLOAD_BYTE / self.copy_roof_gbps


TABLE_COLUMNS = (
    ("path", "path"),
    ("ranks", "ranks"),
    ("backend", "backend"),
    ("dtype", "dtype"),
    ("tokens", "tokens"),
    ("SMs", "num_sms"),
    ("time us", "time_us"),
    ("send us", "send_time_us"),
    ("GB/s", "gbps"),
    ("net GB/s", "net_gbps"),
    ("copy roof GB/s", "copy_roof_gbps"),
    ("% of roof", "roof_fraction"),
    ("HBM B/payload B", "hbm_bytes_per_payload_byte"),
    ("vs intranode", "vs_intranode"),
)


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "roof_fraction":
        return f"{100.0 * float(value):.1f}%"
    if key in ("time_us", "send_time_us"):
        return f"{float(value):.1f}"
    if key == "vs_intranode":
        return f"{float(value):.2f}x"
    if key in ("gbps", "net_gbps", "copy_roof_gbps"):
        return f"{float(value):.3g}" if float(value) < 100 else f"{float(value):.0f}"
    if key == "hbm_bytes_per_payload_byte":
        return f"{float(value):.2f}"
    return str(value)


def format_table(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """A fixed-width table, one line per row, then the notes."""
    header = [title for title, _ in TABLE_COLUMNS]
    body = [[_cell(key, getattr(row, key)) for _, key in TABLE_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    text_cols = {0, 2, 3}  # left-aligned: path, backend, dtype

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(line) for line in body]
    lines += [f"# {note}" for note in notes]
    return "\n".join(lines)


def git_commit(repo_dir: str) -> str | None:
    """HEAD's commit hash (with "-dirty" when the tree has changes), or None outside git / before a commit."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def environment(*, device_name: str, backend: str, has_kernels: bool, repo_dir: str, extra: dict | None = None) -> dict:
    """What a figure needs next to it to be read later: versions, device, backend, commit, time."""
    import torch

    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "device_name": device_name,
        "backend": backend,
        "has_kernels": has_kernels,
        # A copy of the tree without .git (a lent GPU machine's) names its commit through the GPU script's variable.
        "git_commit": git_commit(repo_dir) or os.environ.get("GPU_CHECK_COMMIT"),
    }
    try:
        import deep_ep_py

        env["deep_ep_py_version"] = getattr(deep_ep_py, "__version__", None)
    except ImportError:
        env["deep_ep_py_version"] = None
    env.update(extra or {})
    return env


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str, rows: Sequence[Row], env: dict, settings: dict, notes: Sequence[str] = ()) -> None:
    """Write {environment, settings, notes, rows} to ``path`` (parent folders created)."""
    doc = {
        "environment": env,
        "settings": settings,
        "notes": list(notes),
        "rows": [asdict(row) for row in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(doc), f, indent=2)
        f.write("\n")


def read_json(path: str) -> tuple[list[Row], dict, list[str]]:
    """(rows, environment, notes) of a file write_json wrote."""
    with open(path) as f:
        doc = json.load(f)
    return [Row(**row) for row in doc["rows"]], doc.get("environment", {}), list(doc.get("notes", []))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.report FILE...``: one table of the rows of every file (the GPU check's summary prints the
    figures of its benchmark steps this way), each file's device and notes under it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="JSON files of python -m bench --json")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    notes: list[str] = []
    for path in args.files:
        try:
            file_rows, env, file_notes = read_json(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench.report: {path}: not a benchmark JSON file ({exc})", file=sys.stderr)
            return 2
        rows += file_rows
        name = os.path.basename(path)
        notes.append(f"{name}: {env.get('device_name', '?')}, commit {env.get('git_commit') or '?'}")
        notes += [f"{name}: {note}" for note in file_notes]
    print(format_table(rows, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
