"""bench/step_time.py and bench/ab_inprocess.py end to end at toy sizes: the JSON carries every
ratio whose two sides ran, its interval and the raw times; bad input is refused before anything
runs or is written."""

import json
import os
import shutil
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


def _ab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "ab_inprocess.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_in_process_ab_pairs_a_commit_with_the_working_tree(tmp_path):
    """Both versions of the eager full step in one process, reseeded per step. The "commit" is
    this working tree's library, committed to a scratch repository, so the two sides must stay
    bit-identical (same weights, same frozen fraction)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "oscqat", repo / "oscqat", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "step_time.py", repo / "bench" / "step_time.py")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], check=True)
    out = tmp_path / "ab.json"
    res = _ab("--before", "HEAD", "--repo", str(repo), "--variants", "lsq,full", "--rounds", "6", "--warmup", "1",
              "--batch", "4", "--size", "16", "--threads", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert set(data["median_ms"]) == {"before lsq", "after lsq", "before full", "after full"}
    assert set(data["after_over_before"]) == {"lsq", "full"}
    assert set(data["over_first_variant"]) == {"before full", "after full"}
    lo, hi = data["after_over_before"]["full"]["ci95"]
    assert lo <= data["after_over_before"]["full"]["paired"] <= hi
    assert "after full / before full" in res.stdout
    assert data["identical"]["full"]["max_weight_gap"] == 0.0
    frac_before, frac_after = data["identical"]["full"]["frozen_frac"]
    assert frac_before == frac_after


def test_in_process_ab_refuses_an_unknown_commit_or_variant_and_writes_nothing(tmp_path):
    out = tmp_path / "ab.json"
    res = _ab("--before", "no-such-ref", "--repo", str(ROOT), "--variants", "lsq", "--json", str(out))
    assert res.returncode != 0
    assert "cannot read 'no-such-ref' from git" in res.stderr
    assert not out.exists()
    res = _ab("--before", "HEAD", "--variants", "lsq,nope", "--json", str(out))
    assert res.returncode != 0
    assert "unknown variants ['nope']" in res.stderr and "compiled full" in res.stderr
    assert not out.exists()
