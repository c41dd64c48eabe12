"""``scripts/gpu_check.sh --dry-run``: the device check end to end on this machine, without CUDA (CI runs it).

The dry run installs nothing, runs a few of the ``gpu`` tests (the rest skip without CUDA), and the GPU
benchmark in its dry mode (tiny shapes, our kernels under the Triton interpreter), writing what a
lent GPU would write under $OUT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRY_RUN_TIMEOUT_S = 300
# The device tool brings back at most 8 files from $OUT.
MAX_FILES_BACK = 8


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for expected in ("gpu_check --dry-run", "tests: ", "passed", "bench: ok", "ours/fp16", "ours/bnb", "tokens/s"):
        assert expected in summary, summary
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_FILES_BACK, files
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary prints last
