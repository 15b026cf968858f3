"""Every example runs as a real process and prints exactly what it should."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Runner

EXPECTED = {
    "order_chain.py": """\
order 1: shipped
  trail: ['validated 1', 'charged 1 on attempt 2', 'shipped 1']
  failed attempts: [('charge', 1, 'ConnectionError: payment gateway timed out')]
order 2: declined
  trail: ['validated 2', 'declined 2']
  failed attempts: [('charge', 1, 'card declined for order 2')]
""",
    "branching.py": """\
ada: account opened with a limit of 7200
bob: refused, score 540 is below 600
""",
    "fan_out_join.py": """\
squares: [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]
sum: 385
odd branches: 5
empty fan-out: {'squares': [], 'sum': 0}
""",
    "retry_backoff.py": """\
backoff schedule (ms): [10.0, 20.0, 40.0]
https://example.test/data: 200 OK on attempt 4
attempt 1 failed: TimeoutError: https://example.test/data did not answer
attempt 2 failed: TimeoutError: https://example.test/data did not answer
attempt 3 failed: TimeoutError: https://example.test/data did not answer
waited at least 70 ms: True
""",
    "nested.py": """\
hello world
{'the': 2, 'cat': 1, 'saw': 1, 'dog': 1}
""",
    "timeout_cancel.py": """\
user:1: cached
errors: [('slow_lookup', "node 'slow_lookup' timed out after 0.05s")]
cancelled: RunCancelled, the node saw it: True
""",
}


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_prints_its_exact_output(
    run: Runner, python: str, repo_root: Path, example: str
) -> None:
    result = run(python, repo_root / "examples" / example, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED[example]


CHECKPOINT = "examples/checkpoint_resume.py"


def _uninterrupted(run: Runner, python: str, tmp_path: Path) -> str:
    result = run(python, CHECKPOINT, "run", tmp_path / "clean", "r1", timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("kill_at", [1, 3, 6])
def test_checkpointed_run_killed_with_sigkill_resumes_to_the_same_result(
    run: Runner, python: str, repo_root: Path, tmp_path: Path, kill_at: int
) -> None:
    expected = _uninterrupted(run, python, tmp_path)
    assert expected == "result: 121\n"
    store, log = tmp_path / "store", tmp_path / "steps.log"
    args = [CHECKPOINT, "run", str(store), "r2", "--pause-at", str(kill_at), "--log", str(log)]
    process = subprocess.Popen(
        [python, *args], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the step announces itself
        assert line == f"paused at step {kill_at}\n", process.stderr and process.stderr.read()
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()

    resumed = run(python, CHECKPOINT, "resume", store, "r2", "--log", log, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == expected
    # Steps before the kill ran once; the step killed mid-way ran again; the rest ran once.
    ran = log.read_text().split()
    assert ran == [f"step{n}" for n in range(1, kill_at + 1)] + [
        f"step{n}" for n in range(kill_at, 7)
    ]
    again = run(python, CHECKPOINT, "resume", store, "r2", timeout=60)
    assert again.returncode == 1
    assert "AlreadyCompleted: run 'r2' is already completed" in again.stderr


def test_resume_of_a_run_never_started_is_refused(run: Runner, python: str, tmp_path: Path) -> None:
    result = run(python, CHECKPOINT, "resume", tmp_path / "none", "r3", timeout=60)
    assert result.returncode == 1
    assert "NotStarted: run 'r3' has no checkpoint" in result.stderr
    assert not (tmp_path / "none").exists()


def test_examples_do_not_import_private_modules(repo_root: Path) -> None:
    for path in (repo_root / "examples").glob("*.py"):
        assert "_proto" not in path.read_text(), path
