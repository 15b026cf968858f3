"""A/B benchmark: bench/run.py of a base and of a head, interleaved in one run.

Why: this machine's speed moves by up to 2x from one minute to the next, so two figures taken
apart measure the machine, not the change. Every change is measured against its base in one
run: for each repetition and each workload, the base runs, then the head, each in a fresh
process (``bench/run.py --only W --reps 1``), so that both sides see the same drift. Then, per
workload and for each figure run.py reports (steps/s, latency percentiles, CPU ms per step of
each process group, how busy the machine was, peak RSS), it prints the median of each side,
head/base of the medians, and the median [min-max] of the per-repetition head/base ratios
("paired": each pair ran back to back), then one JSON line with all of it. A workload whose
steps/s ratio is below 0.95 is flagged (W3 reports no steps/s: there, per-step latency above
1/0.95), and the exit status is 1; 2 when a run or git fails, 130 when interrupted.

Each side runs its own code. A ref is checked out into a temporary git worktree (removed at the
end, also on failure, Ctrl-C or SIGTERM); the head is by default the working tree of the
current directory's checkout, uncommitted changes included. The project is installed editable
into the virtual environment, pointing at one checkout, so each side puts its own package roots
(setuptools' ``where``, read from its pyproject.toml: the repository's top, ``server/``,
``worker/``) first on PYTHONPATH and runs its own bench/run.py from its own top directory.
run.py starts the servers and workers as the environment's console scripts, which inherit that
environment and so import the same code. Before benchmarking, ab.py imports every package in a
subprocess, with run.py's interpreter and the console scripts' one, that environment and no
script directory on sys.path, and stops unless each comes from the side's own directory.

    python bench/ab.py [--base REF] [--head REF] [--only W1,W3] [--reps 3] [--replicas 2]
                       [-- other bench/run.py flags]

The base defaults to ``main``. Run it with the environment's interpreter (``.venv/bin/python``):
run.py starts ``floxide-server`` and ``floxide-worker`` from that interpreter's directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

PACKAGES = ("floxide_grpc", "floxide_server", "floxide_worker")
SIDES = ("base", "head")
# Keys of run.py's JSON line that are not figures (steps is the workload's size, not a result).
NOT_FIGURES = frozenset({"system", "workload", "config", "steps"})
WORSE = 0.95  # a head/base steps/s ratio below this flags the workload
GRACE_S = 30.0  # how long run.py may take to stop its stack after SIGINT


class Failed(Exception):
    """A git command or a benchmark run failed; the message says which and why."""


@dataclass(frozen=True)
class Side:
    """One side of the comparison: where its code is, and what it is."""

    name: str  # "base" or "head"
    ref: str  # the ref asked for, or "working tree"
    root: Path
    commit: str
    dirty: bool = False

    def describe(self) -> str:
        tree = " + uncommitted changes" if self.dirty else ""
        return f"{self.name}: {self.ref} ({self.commit[:10]}{tree}) at {self.root}"


# --- pure logic: parsing and summarising (unit-tested in tests/e2e/test_bench_ab.py) -----------


def parse_figures(stdout: str, workload: str) -> dict[str, float]:
    """The figures of ``workload`` from run.py's output: one JSON line per workload.

    Each figure is ``{"median", "min", "max"}`` over run.py's repetitions (one here: its median);
    ``peak_rss_mb`` maps each process group to MB and becomes ``peak_rss_mb_<group>``.
    """
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("workload") != workload:
            continue
        figures: dict[str, float] = {}
        for key, value in record.items():
            if key in NOT_FIGURES:
                continue
            if isinstance(value, dict) and "median" in value:
                figures[key] = float(value["median"])
            elif key == "peak_rss_mb" and isinstance(value, dict):
                figures.update({f"peak_rss_mb_{group}": float(mb) for group, mb in value.items()})
            elif isinstance(value, int | float) and not isinstance(value, bool):
                figures[key] = float(value)
        return figures
    raise ValueError(f"no JSON line for {workload} in run.py's output")


def ratio(head: float, base: float) -> float | None:
    """head/base, or None when base is zero."""
    return head / base if base else None


def compare(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per figure: each side's median, head/base of the medians, and the paired ratios.

    ``samples`` holds each side's figures per repetition, in run order; repetition i of the
    base and of the head ran back to back, so their ratio is the one least moved by drift. A
    figure missing on one side (an older run.py) gets None for that side and for the ratios.
    """
    names: list[str] = []
    for side in SIDES:
        for run in samples.get(side, []):
            names.extend(k for k in run if k not in names)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        values = {s: [run[name] for run in samples.get(s, []) if name in run] for s in SIDES}
        medians = {s: statistics.median(v) if v else None for s, v in values.items()}
        paired = [
            r
            for b, h in zip(samples.get("base", []), samples.get("head", []), strict=False)
            if name in b and name in h and (r := ratio(h[name], b[name])) is not None
        ]
        base, head = medians["base"], medians["head"]
        out[name] = {
            "base": base,
            "head": head,
            "ratio": ratio(head, base) if base is not None and head is not None else None,
            "paired": paired,
        }
    return out


def regression(figures: dict[str, dict[str, Any]]) -> str | None:
    """Why a workload is flagged, or None: its steps/s ratio is below WORSE.

    W3 reports no steps/s (one run at a time); its per-step latency is the same thing inverted
    (steps/s of a lone chain = 1000 / per_step_ms), so it is flagged when that grows past
    1 / WORSE.
    """
    throughput = figures.get("steps_per_s", {}).get("ratio")
    if throughput is not None:
        return f"steps/s x{throughput:.3f} < {WORSE}" if throughput < WORSE else None
    per_step = figures.get("per_step_ms", {}).get("ratio")
    if per_step is not None and per_step > 1 / WORSE:
        return f"per-step ms x{per_step:.3f} > {1 / WORSE:.3f} (steps/s x{1 / per_step:.3f})"
    return None


def _num(value: float | None, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    digits = 0 if abs(value) >= 100 else 2 if abs(value) >= 1 else 3
    return f"{value:>{width}.{digits}f}"


def table(workload: str, figures: dict[str, dict[str, Any]], reps: int) -> list[str]:
    """Plain-text rows for one workload."""
    flag = regression(figures)
    lines = [
        f"{workload}: median of {reps} reps per side" + (f"  ** WORSE: {flag} **" if flag else ""),
        f"  {'figure':<24} {'base':>10} {'head':>10} {'head/base':>10}   paired [min-max]",
    ]
    for name, f in figures.items():
        paired = f["paired"]
        spread = (
            f"{statistics.median(paired):.3f} [{min(paired):.3f}-{max(paired):.3f}]"
            if paired
            else "-"
        )
        r = f["ratio"]
        lines.append(
            f"  {name:<24} {_num(f['base'], 10)} {_num(f['head'], 10)} "
            f"{'-' if r is None else f'{r:.3f}':>10}   {spread}"
        )
    return lines


# --- sides: git worktrees, environments, the import check --------------------------------------


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise Failed(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def package_roots(root: Path) -> list[Path]:
    """The directories holding the side's packages (setuptools' ``where``), top first."""
    try:
        config = tomllib.loads((root / "pyproject.toml").read_text())
        where = config["tool"]["setuptools"]["packages"]["find"]["where"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        where = [".", "server", "worker"]
    return [(root / w).resolve() for w in where]


def side_env(root: Path) -> dict[str, str]:
    """This environment, with the side's package roots first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(p) for p in package_roots(root)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# -P: no script or current directory on sys.path, as for the console scripts run.py starts.
_WHERE = (
    "import importlib, json; "
    f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {list(PACKAGES)!r}}}))"
)
SCRIPTS = ("floxide-server", "floxide-worker")  # what run.py starts, from python's directory


def interpreters(python: str) -> list[str]:
    """``python``, and the interpreters of the console scripts run.py starts beside it."""
    found = [python]
    for script in SCRIPTS:
        try:
            with (Path(python).parent / script).open() as f:
                first = f.readline()
        except OSError:
            continue
        if first.startswith("#!") and (shebang := first[2:].split()[0]) not in found:
            found.append(shebang)
    return found


def check_imports(side: Side, python: str, env: dict[str, str]) -> dict[str, str]:
    """Import every package as the side's processes will; fail unless all are the side's own.

    Checked with ``python`` (run.py itself) and with each console script's interpreter (the
    servers and workers), with the side's environment and no script directory on sys.path.
    """
    files: dict[str, str] = {}
    root = side.root.resolve()
    for interpreter in interpreters(python):
        done = subprocess.run(
            [interpreter, "-P", "-c", _WHERE],
            cwd=side.root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise Failed(f"{side.name}: {interpreter} cannot import its packages:\n{done.stderr}")
        files = json.loads(done.stdout)
        strays = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(root)}
        if strays:
            raise Failed(
                f"{side.name} ({interpreter}) would import code from outside {root}: {strays}"
            )
    return files


@contextlib.contextmanager
def checked_out(repo: Path, ref: str, name: str) -> Iterator[Side]:
    """``ref`` in a temporary detached worktree of ``repo``, removed on the way out."""
    commit = git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}")
    parent = Path(tempfile.mkdtemp(prefix=f"floxide-ab-{name}-"))
    path = parent / "tree"
    try:
        git(repo, "worktree", "add", "--detach", str(path), commit)
        yield Side(name, ref, path, commit)
    finally:
        with contextlib.suppress(Failed):
            git(repo, "worktree", "remove", "--force", str(path))
        with contextlib.suppress(Failed):
            git(repo, "worktree", "prune")
        shutil.rmtree(parent, ignore_errors=True)


def working_tree(start: Path) -> Side:
    """The checkout ``start`` is in, uncommitted changes included."""
    root = Path(git(start, "rev-parse", "--show-toplevel"))
    dirty = bool(git(root, "status", "--porcelain"))
    return Side("head", "working tree", root, git(root, "rev-parse", "HEAD"), dirty)


# --- running --------------------------------------------------------------------------------


def run_once(side: Side, python: str, env: dict[str, str], workload: str, extra: list[str]) -> str:
    """One repetition of one workload with the side's own bench/run.py; its stdout.

    run.py runs in a session of its own, with the servers and workers it starts: on Ctrl-C (or
    SIGTERM) the whole group gets SIGINT, GRACE_S to stop its stack, then SIGKILL.
    """
    command = [python, "bench/run.py", "--only", workload, "--reps", "1", *extra]
    process = subprocess.Popen(
        command,
        cwd=side.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        raise
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        raise Failed(f"{side.name} {workload}: run.py exited {process.returncode}:\n{tail}")
    return stdout


def interleave(
    sides: dict[str, Side],
    python: str,
    workloads: list[str],
    reps: int,
    extra: list[str],
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Every workload ``reps`` times per side, base then head; figures per workload per side."""
    envs = {name: side_env(side.root) for name, side in sides.items()}
    for name, side in sides.items():
        files = check_imports(side, python, envs[name])
        print(f"# {side.describe()}")
        for module, file in files.items():
            print(f"#   {module} <- {file}")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        w: {s: [] for s in SIDES} for w in workloads
    }
    total, n = reps * len(workloads) * len(SIDES), 0
    for rep in range(1, reps + 1):
        for workload in workloads:
            for name in SIDES:
                n += 1
                started = time.monotonic()
                stdout = run_once(sides[name], python, envs[name], workload, extra)
                figures = parse_figures(stdout, workload)
                samples[workload][name].append(figures)
                main_figure = next(
                    (f"{k} {figures[k]:.1f}" for k in ("steps_per_s", "p50_ms") if k in figures),
                    "",
                )
                print(
                    f"# [{n}/{total}] rep {rep} {workload} {name}: {main_figure} "
                    f"({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    return samples


def report(
    sides: dict[str, Side],
    samples: dict[str, dict[str, list[dict[str, float]]]],
    reps: int,
    extra: list[str],
) -> bool:
    """Print the tables and the JSON summary line; True when some workload is flagged."""
    summary: dict[str, Any] = {}
    flagged: list[str] = []
    print(
        "\n# head/base > 1: head is higher (better for steps/s, worse for ms and MB)\n"
        "# paired: median [min-max] of each rep's head/base, the two run back to back"
    )
    for workload, by_side in samples.items():
        figures = compare(by_side)
        flag = regression(figures)
        if flag:
            flagged.append(workload)
        summary[workload] = {"flag": flag, "figures": _rounded(figures)}
        print("\n".join(table(workload, figures, reps)))
    load = os.getloadavg()
    print(f"# {os.cpu_count()} cpus, loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")
    print(
        json.dumps(
            {
                "system": "floxide-grpc-ab",
                **{
                    name: {"ref": s.ref, "commit": s.commit, "dirty": s.dirty}
                    for name, s in sides.items()
                },
                "reps": reps,
                "run_py_args": extra,
                "workloads": summary,
                "flagged": flagged,
            }
        ),
        flush=True,
    )
    return bool(flagged)


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits, for a JSON line one can read."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Other arguments (or all after --) go to bench/run.py.",
        allow_abbrev=False,  # a prefix of one of run.py's flags is run.py's
    )
    parser.add_argument("--base", default="main", help="the ref to compare with (main)")
    parser.add_argument("--head", help="a ref to measure (default: this working tree)")
    parser.add_argument("--only", default="W1,W2,W3,W4", help="workloads, e.g. W1,W3")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side (3)")
    parser.add_argument("--replicas", type=int, help="servers on one etcd (run.py's default: 1)")
    parser.add_argument(
        "--python", default=sys.executable, help="the environment's interpreter (this one)"
    )
    args, unknown = parser.parse_known_args(ours)
    extra = [*unknown, *extra]
    if any(a.split("=")[0] in ("--only", "--reps") for a in extra):
        parser.error("--only and --reps are ab.py's own; run.py gets one workload, one rep a time")
    if args.replicas is not None:
        extra = ["--replicas", str(args.replicas), *extra]
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    workloads = [w.strip().upper() for w in args.only.split(",") if w.strip()]

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            here = working_tree(Path.cwd())
            repo = here.root
            base = stack.enter_context(checked_out(repo, args.base, "base"))
            head = (
                here
                if args.head is None
                else stack.enter_context(checked_out(repo, args.head, "head"))
            )
            sides = {"base": base, "head": head}
            if base.commit == head.commit and not head.dirty:
                print("# base and head are the same commit: an A/A run, the noise alone")
            samples = interleave(sides, args.python, workloads, args.reps, extra)
            return 1 if report(sides, samples, args.reps, extra) else 0
    except Failed as e:
        print(f"ab.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ab.py: interrupted; worktrees removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
