"""The README's main job (the engine benchmark, --quick) runs and its verdicts are right.

Timings are not asserted here (the machine is shared and noisy): the script prints them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_engine_benchmark_runs_and_catches_its_planted_bugs(tmp_path: Path) -> None:
    output = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_engine.py", "--quick", "--json", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Table 1" in result.stdout and "Table 2" in result.stdout
    rows = {row["label"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["d. gradwatch full"]["verdict"] == "ok"
    assert rows["d. gradwatch full  [bug]"]["verdict"] == "alert"
    # bug-dominated distances agree with the hand-written recipe to many digits
    seed_bug = rows["a. seed loop (numpy reference)  [bug]"]["distance"]
    assert abs(rows["d. gradwatch full  [bug]"]["distance"] - seed_bug) <= 1e-6 * seed_bug
    clean, bug = rows["clean"], rows["row bug (row 17 of 2.weight)"]
    assert clean["verdict"] == "ok" and bug["verdict"] == "alert"
    assert clean["evaluations"] <= 2000 and bug["evaluations"] <= 2000
    assert "[17," in result.stdout.split("row bug (row 17 of 2.weight)")[1].splitlines()[0]


def test_quick_detection_benchmark_catches_every_planted_bug_at_the_first_check() -> None:
    """bench_detect's smoke run on the two quickest architectures (the full run's table is in
    the README): every planted one-row bug alerts at the first check after it, on its tensor,
    and the clean twins neither warn nor alert."""
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_detect.py", "--quick", "--only", "cnn,lstm"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("Summary: ")[1].splitlines()[0]
    assert summary.startswith("6/6 bugs (100%) alert at the first check"), summary
    assert "6/6 (100%) blame the right tensor" in summary
    assert "0 warns, 0 alerts, 0 errors" in summary


def test_quick_flat_loss_benchmark_reads_no_warn_or_alert_on_a_correct_model() -> None:
    """bench_flat's smoke run (3,000 steps of the memorising MLP): its table prints, and the
    script itself exits non-zero if a correct model read warn or alert."""
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_flat.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("| all |"))
    checks, ok, warn, alert, error = (int(cell) for cell in total.strip("|").split("|")[1:])
    assert checks == 31 and warn == 0 and alert == 0 and ok + error == checks
