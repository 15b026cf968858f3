"""The floxide command: the README's main job, and its errors."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from floxide_server.store import queue

from floxide_grpc import Unauthenticated, Workflow, node, subworkflow
from floxide_grpc.client import OrchestratorClient
from tests.conftest import Runner, Stack, run_to_completion
from tests.helpers import eventually, finish

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


# -- commands against a server ------------------------------------------------------------------


async def floxide(stack: Stack, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(FLOXIDE),
        "--server",
        stack.target,
        "--namespace",
        stack.namespace,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await finish(process, 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@node
def triple(x: int) -> int:
    return x * 3


TRIPLE = Workflow("triple", start=triple)


async def test_server_commands_start_list_show_and_control_runs(stack: Stack) -> None:
    await stack.client.register_workflow(TRIPLE)
    code, out, err = await floxide(stack, "start", "triple", "--input", "4")
    assert code == 0, err
    run_id = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("run"))
    code, out, _ = await floxide(stack, "runs")
    assert code == 0 and run_id in out and "running" in out
    code, out, _ = await floxide(stack, "pause", run_id)
    assert code == 0 and "paused" in out
    code, out, _ = await floxide(stack, "resume", run_id)
    assert code == 0 and "running" in out
    code, out, _ = await floxide(stack, "cancel", run_id, "--reason", "done with it")
    assert code == 0 and "cancelled" in out and "done with it" in out
    code, out, _ = await floxide(stack, "errors", run_id)
    assert code == 0
    code, out, _ = await floxide(stack, "workers")
    assert code == 0 and "session" in out
    code, out, _ = await floxide(stack, "workers", "--all")
    assert code == 0 and "session" in out and "ended" in out
    code, out, _ = await floxide(stack, "graph", "triple")
    assert code == 0 and out == TRIPLE.to_mermaid()


async def test_start_wait_follows_the_run_to_its_output(stack: Stack) -> None:
    await stack.client.register_workflow(TRIPLE)
    cli = asyncio.create_task(floxide(stack, "start", "triple", "--input", "5", "--wait"))

    async def queued() -> list[Any]:
        return await queue.ready(stack.server.kv, stack.namespace)

    [item] = await eventually(queued, within=30)
    await run_to_completion(stack, item.run_id, [15])
    code, out, err = await cli
    assert code == 0, err
    assert "completed" in out and "15" in out


async def test_start_with_a_run_timeout_waits_for_it_to_time_out(stack: Stack) -> None:
    await stack.client.register_workflow(TRIPLE)  # no worker: it can only time out
    code, out, _ = await floxide(
        stack, "start", "triple", "--input", "5", "--run-timeout", "0.2", "--wait"
    )
    assert code == 1 and "timed_out" in out and "run timeout of 0.2s" in out
    assert "0:00:00.200000" in out  # the run timeout, as the run records it


async def test_server_command_errors_are_clear(stack: Stack) -> None:
    code, _, err = await floxide(stack, "status", "01a213b2-0000-7000-8000-000000000000")
    assert code == 1 and "error: run '01a213b2-0000-7000-8000-000000000000' not found" in err
    code, _, err = await floxide(stack, "start", "nothing", "--input", "1")
    assert code == 1 and "error: workflow 'nothing' is not registered" in err


def test_floxide_dev_runs_the_whole_stack_end_to_end(run: Runner) -> None:
    result = run(FLOXIDE, "dev", timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.splitlines()[-1] == '{"order_id": 1, "status": "shipped"}'
    assert "2 workers connected" in result.stdout


def test_floxide_dev_tls_runs_the_whole_stack_over_mtls(run: Runner) -> None:
    result = run(FLOXIDE, "dev", "--tls", timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.splitlines()[-1] == '{"order_id": 1, "status": "shipped"}'
    assert "mTLS" in result.stdout


NESTING = Workflow("nesting", start=subworkflow(TRIPLE, name="inner_triple"))


async def test_status_shows_a_runs_child_runs_and_a_child_its_parent(stack: Stack) -> None:
    await stack.client.register_workflow(NESTING)
    run, _ = await stack.client.start_run("nesting", 2)  # its start item starts the child
    [child] = (await stack.client.list_runs(parent_run_id=run.run_id))[0]
    code, out, err = await floxide(stack, "status", run.run_id)
    assert code == 0, err
    assert "child runs" in out and child.run_id in out and "triple" in out
    code, out, err = await floxide(stack, "status", child.run_id)
    assert code == 0, err
    assert f"{run.run_id} (item start)" in out
    code, out, _ = await floxide(stack, "runs")
    assert run.run_id in out and child.run_id not in out
    code, out, _ = await floxide(stack, "runs", "--children")
    assert run.run_id in out and child.run_id in out
    code, out, _ = await floxide(stack, "runs", "--parent", run.run_id)
    assert run.run_id not in out and child.run_id in out


async def test_token_commands_create_list_and_revoke(stack: Stack) -> None:
    code, out, err = await floxide(
        stack, "token", "create", "ci", "--role", "client", "--allow", stack.namespace
    )
    assert code == 0, err
    token = out.strip()
    [made] = [t for t in await stack.client.tokens() if t.name == "ci"]
    assert f"token {made.id} (client, {stack.namespace})" in err
    code, out, _ = await floxide(stack, "token", "list")
    assert code == 0 and made.id in out and token not in out
    async with OrchestratorClient(stack.target, namespace=stack.namespace, token=token) as ci:
        assert await ci.list_runs() == ([], "")
        code, out, _ = await floxide(stack, "token", "revoke", made.id)
        assert code == 0 and f"revoked {made.id}" in out
        with pytest.raises(Unauthenticated):
            await ci.list_runs()
    code, _, err = await floxide(stack, "token", "revoke", made.id)
    assert code == 1 and "no token in force" in err
