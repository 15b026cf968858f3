"""Side by side: our benchmark, the peer benchmarks (Celery, Dask, DBOS) and the etcd ceiling.

Runs, one after another on this machine: ``bench/run.py``, then each of
``shared/bench/peers/{celery,dask,dbos}_bench.py`` with the peers' venv (made by their
``setup.sh``), then ``shared/bench/etcd_ceiling.py``; collects their JSON lines and prints one
table with the ratio of ours to the best peer for each figure.

    python bench/compare.py [--reps 3] [--peers celery,dask,dbos] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# figure -> (label, higher is better)
FIGURES = {
    "steps_per_s": ("steps/s", True),
    "p50_ms": ("p50 ms", False),
    "per_step_ms": ("per-step ms", False),
}


def json_lines(command: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    print(f"# running: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{command[1]} failed with {done.returncode}")
    found = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    for line in done.stdout.splitlines():
        if line.startswith("#"):
            print(f"#   {line}", file=sys.stderr)
    return found


def cpu_total(result: dict[str, Any]) -> float:
    return float(sum(v["median"] for k, v in result.items() if k.startswith("cpu_ms_per_step_")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default="celery,dask,dbos")
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    parser.add_argument(
        "--peer-venv", type=Path, default=Path(os.environ.get("PEER_VENV", "/tmp/bench-peers-venv"))
    )
    args = parser.parse_args()

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for line in json_lines([sys.executable, str(HERE / "run.py"), "--reps", str(args.reps)]):
        results.setdefault(line["workload"], {})["floxide-grpc"] = line
    peers_dir = args.shared / "bench" / "peers"
    for peer in [p for p in args.peers.split(",") if p]:
        script = peers_dir / f"{peer}_bench.py"
        for line in json_lines(
            [str(args.peer_venv / "bin" / "python"), str(script), "--reps", str(args.reps)]
        ):
            results.setdefault(line["workload"], {})[line["system"]] = line

    from floxide_server.embedded import etcd_binary  # noqa: PLC0415 - only to find etcd

    env = {**os.environ, "PATH": f"{etcd_binary().parent}:{os.environ['PATH']}"}
    ceiling = subprocess.run(
        [sys.executable, str(args.shared / "bench" / "etcd_ceiling.py")],  # it needs aetcd: ours
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip

    for systems in results.values():  # the raw lines first, for the record
        for line in systems.values():
            print(json.dumps(line))
    names = sorted({n for systems in results.values() for n in systems if n != "floxide-grpc"})
    print(f"\n# side by side, medians of {args.reps} reps; ratio = floxide-grpc / best peer")
    header = " ".join(f"{n[:16]:>16}" for n in names)
    print(f"{'workload':<10} {'figure':<12} {'floxide-grpc':>13} {header} {'ratio':>7}")
    for workload in ("W1", "W2", "W3", "W4"):
        systems = results.get(workload, {})
        ours = systems.get("floxide-grpc")
        if ours is None:
            continue
        for key, (label, higher) in FIGURES.items():
            if key not in ours:
                continue
            peers = {
                n: r[key]["median"] for n, r in systems.items() if n != "floxide-grpc" and key in r
            }
            best = (max if higher else min)(peers.values()) if peers else None
            mine = ours[key]["median"]
            ratio = f"{mine / best:.2f}" if best else "-"
            cells = " ".join(f"{peers.get(n, float('nan')):>16.1f}" for n in names)
            print(f"{workload:<10} {label:<12} {mine:>13.1f} {cells} {ratio:>7}")
        cpu = {n: cpu_total(r) for n, r in systems.items()}
        cells = " ".join(f"{cpu.get(n, float('nan')):>16.2f}" for n in names)
        print(f"{workload:<10} {'cpu ms/step':<12} {cpu['floxide-grpc']:>13.2f} {cells}")
        rss = {n: sum(r["peak_rss_mb"].values()) for n, r in systems.items() if "peak_rss_mb" in r}
        cells = " ".join(f"{rss.get(n, float('nan')):>16.0f}" for n in names)
        ours_rss = rss.get("floxide-grpc", float("nan"))
        print(f"{workload:<10} {'peak RSS MB':<12} {ours_rss:>13.0f} {cells}")
    print("\n# etcd ceiling on this machine (shared/bench/etcd_ceiling.py):")
    print(
        "\n".join(f"#   {line}" for line in (ceiling.stdout or ceiling.stderr).splitlines()[-12:])
    )
    load = os.getloadavg()
    print(f"# loadavg at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
