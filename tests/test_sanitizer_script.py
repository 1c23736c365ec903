"""scripts/emulator_sanitizers.sh's own behaviour where it cannot run (CI runs the script itself, which builds the
sanitized emulator and runs the GPU tier on it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "emulator_sanitizers.sh"


def test_without_sanitizer_runtimes_it_skips(tmp_path: Path) -> None:
    """A compiler with no libasan/libubsan (-print-file-name echoes the bare name back) skips with exit 0 and says
    why, before it builds anything."""
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\n[ "$1" = "-print-file-name=libasan.so" ] && echo libasan.so\n'
                        '[ "$1" = "-print-file-name=libubsan.so" ] && echo libubsan.so\nexit 0\n')
    compiler.chmod(0o755)
    work = tmp_path / "work"
    env = {**os.environ, "CXX": str(compiler), "SANITIZER_WORK_DIR": str(work)}
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "has no libasan.so and libubsan.so: skipped" in run.stdout, run.stdout
    assert not work.exists(), "the script built something without the sanitizer runtimes"
