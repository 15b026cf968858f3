"""bench/ab.py's own logic: run.py's JSON lines, medians, ratios, the flag (no benchmark)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ab", ROOT / "bench" / "ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_py_line(workload: str, steps_per_s: float, p50: float) -> str:
    """A JSON line shaped like bench/run.py's, for one repetition."""

    def fig(v: float) -> dict[str, float]:
        return {"median": v, "min": v, "max": v}

    return json.dumps(
        {
            "system": "floxide-grpc",
            "workload": workload,
            "steps": fig(2000),
            "steps_per_s": fig(steps_per_s),
            "p50_ms": fig(p50),
            "cpu_ms_per_step_server": fig(0.5),
            "peak_rss_mb": {"server": 80.5, "workers": 120.0},
            "config": {"workers": 2, "slots": 4, "replicas": 1, "reps": 1},
        }
    )


def test_parse_takes_the_workloads_line_among_the_table(ab: ModuleType) -> None:
    stdout = "\n".join(
        [
            run_py_line("W2", 1.0, 1.0),
            run_py_line("W1", 800.0, 250.0),
            "",
            "# medians of 1 reps [min-max]",
            "W1  4  800 [800-800]",
        ]
    )
    assert ab.parse_figures(stdout, "W1") == {
        "steps_per_s": 800.0,
        "p50_ms": 250.0,
        "cpu_ms_per_step_server": 0.5,
        "peak_rss_mb_server": 80.5,
        "peak_rss_mb_workers": 120.0,
    }
    with pytest.raises(ValueError, match="W3"):
        ab.parse_figures(stdout, "W3")


def test_compare_medians_ratio_and_pairs(ab: ModuleType) -> None:
    samples = {
        "base": [{"steps_per_s": 100.0, "p50_ms": 10.0}, {"steps_per_s": 50.0, "p50_ms": 20.0}],
        "head": [{"steps_per_s": 90.0}, {"steps_per_s": 60.0}, {"steps_per_s": 30.0}],
    }
    figures = ab.compare(samples)
    assert figures["steps_per_s"]["base"] == 75.0
    assert figures["steps_per_s"]["head"] == 60.0
    assert figures["steps_per_s"]["ratio"] == pytest.approx(0.8)
    # Pairs are the repetitions that ran back to back; the head's third has no partner.
    assert figures["steps_per_s"]["paired"] == pytest.approx([0.9, 1.2])
    # A figure one side does not report (an older run.py) has no head and no ratio.
    assert figures["p50_ms"] == {"base": 15.0, "head": None, "ratio": None, "paired": []}
    assert any("p50_ms" in line and " - " in line for line in ab.table("W1", figures, 2))


def test_flag_on_steps_per_s_or_w3s_per_step_latency(ab: ModuleType) -> None:
    def figures(**ratios: float) -> dict[str, dict[str, float]]:
        return {name: {"ratio": r} for name, r in ratios.items()}

    assert ab.regression(figures(steps_per_s=0.94)) is not None
    assert ab.regression(figures(steps_per_s=0.96, p50_ms=2.0)) is None
    assert ab.regression(figures(per_step_ms=1.10)) is not None  # W3: 1/1.10 = 0.91 steps/s
    assert ab.regression(figures(per_step_ms=1.02)) is None
    assert ab.regression({}) is None
