"""benchmarks/paper_claims.py --smoke: every part on a tiny setting, in a subprocess (CI runs
only this setting; the benchmark itself is not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_claims.py"


@pytest.mark.slow
def test_smoke_runs_every_part_and_ends_with_one_key_value_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SCM_RUN_DIR", None)
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--seeds", "0", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    pairs = dict(token.split("=", 1) for token in last.split())
    assert all("=" in token for token in last.split()), last
    assert {"claims_held", "wall_s", "scd_nfe2_fd", "teacher_best_fd"} <= set(pairs), last
    # every part left its traces: teacher rows, student/dsCM/ablation runs, the report, plots
    runs = out / "runs"
    for entry in ("teacher", "scd", "sct", "dscm_n16", "dscm_n1024", "no_adaptive_weighting"):
        assert any((runs / entry).glob("seed0/summary.json")), entry
    report = (out / "paper_claims.md").read_text()
    assert "### Claims" in report and "continuous beats every N" in report
    for png in ("dscm_vs_n.png", "precision_recall.png", "cost.png", "ablations.png"):
        assert (out / png).stat().st_size > 0
    if not (Path(__file__).resolve().parents[1] / "conf" / "loss" / "vsd.yaml").is_file():
        assert "skipped: loss=vsd" in report  # the harness says why VSD did not run
