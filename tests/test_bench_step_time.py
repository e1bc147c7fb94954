"""bench/step_time.py end to end at toy sizes: the JSON carries every ratio whose two sides ran,
its interval and the raw times; a bad --variants is refused before anything runs or is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "step_time.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_subset_run_writes_ratios_intervals_and_raw_times(tmp_path):
    out = tmp_path / "bench.json"
    res = _bench("--variants", "lsq,full", "--rounds", "6", "--warmup", "1", "--batch", "4", "--size", "16",
                 "--threads", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert set(data["ratios"]) == {"full_over_lsq"}  # only ratios whose two sides both ran
    lo, hi = data["ratios_ci95"]["full_over_lsq"]  # six rounds: the smallest n with a 95% interval
    assert lo <= data["ratios"]["full_over_lsq"] <= hi
    assert [len(data["step_s_per_round"][name]) for name in ("lsq", "full")] == [6, 6]
    assert all(len(steps) == 6 for steps in data["phase_s_per_step"]["full"].values())
    assert data["median_phase_s"]["full"]["tracker"] > 0 and data["median_phase_s"]["lsq"]["tracker"] < 1e-3
    assert "95% CI" in res.stdout and "full_over_lsq" in res.stdout


def test_unknown_variant_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "bench.json"
    res = _bench("--variants", "lsq,nope", "--json", str(out))
    assert res.returncode == 2
    assert "unknown ['nope']" in res.stderr and "compiled lsq+track" in res.stderr
    assert not out.exists()
