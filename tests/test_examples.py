"""The README's run command works as written."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_batch_example(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_batch.py"), "--batch", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matching scores (2, 2)" in proc.stdout
