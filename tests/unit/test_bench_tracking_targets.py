"""bench_tracking's verdict on the <= 1% target is given only where the runs are quieter than the target."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_tracking import targets_of  # noqa: E402


def rows(off: list[int], sqlite: list[int]) -> list[dict]:
    pairs = sorted(1 - s / o for s, o in zip(sqlite, off))
    return [{"shape": "seed", "mode": "off", "runs": off, "overhead": None},
            {"shape": "seed", "mode": "sqlite", "runs": sqlite, "overhead": pairs[len(pairs) // 2]}]


def test_quiet_runs_get_a_verdict_either_way():
    (met,) = targets_of(rows([1000, 1002], [996, 998]))
    assert met["met"] is True and met["result"].startswith("+0.40%")
    (missed,) = targets_of(rows([1000, 1002], [980, 982]))
    assert missed["met"] is False and "spread 0.2%" in missed["result"]


def test_one_run_or_noisy_runs_get_none():
    (single,) = targets_of(rows([1000], [1030]))
    assert single["met"] is None and "no noise figure" in single["result"]
    (noisy,) = targets_of(rows([1000, 1040], [1003, 1041]))
    assert noisy["met"] is None and "spread 3.9%" in noisy["result"]
