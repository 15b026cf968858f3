"""The floxide command: the README's main job, and its errors."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import Runner

FLOXIDE = Path(sys.executable).parent / "floxide"


def test_run_prints_the_output_as_json(run: Runner) -> None:
    result = run(
        FLOXIDE,
        "run",
        "examples/order_chain.py",
        "--input",
        '{"id": 7, "amount": 12.5, "card": "visa"}',
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"order_id":7,"status":"shipped"}\n'


def test_run_refuses_bad_input_naming_the_field(run: Runner) -> None:
    result = run(FLOXIDE, "run", "examples/order_chain.py", "--input", '{"id": 7, "amount": "x"}')
    assert result.returncode == 1
    assert (
        "workflow 'order_chain' input: Expected `float`, got `str` - at `$.amount`" in result.stderr
    )


def test_run_refuses_input_that_is_not_json(run: Runner) -> None:
    result = run(FLOXIDE, "run", "examples/fan_out_join.py", "--input", "{oops")
    assert result.returncode == 1
    assert "--input: not valid JSON" in result.stderr


def test_unknown_workflow_is_refused(run: Runner) -> None:
    result = run(FLOXIDE, "run", "examples/order_chain.py:missing")
    assert result.returncode == 2
    assert "has no Workflow named 'missing'" in result.stderr


def test_graph_draws_mermaid_and_dot(run: Runner) -> None:
    mermaid = run(FLOXIDE, "graph", "examples/fan_out_join.py")
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart LR\n")
    dot = run(FLOXIDE, "graph", "examples/branching.py", "--format", "dot")
    assert dot.returncode == 0, dot.stderr
    assert '"review" -> "open_account" [label="Approved"];' in dot.stdout
