"""Learning regression: ``bench/learning.py --quick`` must keep learning to segment.

The quick setting trains ``configs/synthetic.yaml`` (max pooling, the method) on a small
synthetic set and scores baseline pseudo masks on the held-out test split. The floor sits
below what the setting reaches (test BPM 0.62, 0.69 after CRF, in 2.5-3.5 minutes here; the
model selected on 50 validation images moves by up to 0.1 from epoch to epoch) and far above
what a model that learned nothing scores (every pixel background: about 0.13), so it catches
a broken loss, label merge, reader or schedule without flaking on another machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 0.45


@pytest.mark.slow
def test_quick_learning_run_clears_the_floor(tmp_path: Path) -> None:
    report = tmp_path / "learning.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning.py"), "--quick", "--pooling", "max",
         "--quiet", "--json", str(report), "--workdir", str(tmp_path / "work")],
        check=True, cwd=ROOT, env=env, timeout=900,
    )  # fmt: skip
    payload = json.loads(report.read_text())
    (row,) = payload["rows"]
    assert row["pooling"] == "max"
    assert row["test_bpm_miou"] >= FLOOR, row
    assert row["test_crf_miou"] >= FLOOR, row
    # No patch-level prediction beats the true class fractions of the patch grid.
    assert row["test_bpm_miou"] <= payload["grid_oracle_test_miou"] + 1e-6, payload
