"""``python -m localcluster build|bin-dir|up|down|status|demo``: what ``make`` runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from localcluster import demo
from localcluster.cluster import DEFAULT_NAME, Cluster, ClusterError, ClusterState
from localcluster.toolchain import Toolchain, ToolchainError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    parser.add_argument(
        "command",
        choices=["build", "bin-dir", "up", "down", "status", "demo"],
        help="build: the pinned binaries; bin-dir: where they are; up/down/status: the cluster;"
        " demo: cluster, CRD, operator and an example",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the cluster keeps its state (default: .cluster/ in the repository)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="the cluster's name")
    return parser.parse_args(argv)


def print_env(cluster: Cluster) -> None:
    print("# Use the local cluster from your shell:")
    print(f"export KUBECONFIG={shlex.quote(str(cluster.state.kubeconfig))}")
    print(f'export PATH={shlex.quote(str(cluster.toolchain.bin_dir))}:"$PATH"')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        toolchain = Toolchain.locate()
        if args.command == "build":
            if not toolchain.ensure_built():
                print(f"[toolchain] up to date in {toolchain.bin_dir}", file=sys.stderr)
            return 0
        if args.command == "bin-dir":
            print(toolchain.bin_dir)
            return 0
        state = ClusterState.default() if args.state_dir is None else ClusterState(args.state_dir)
        cluster = Cluster(toolchain, ClusterState(state.root, args.name))
        if args.command == "demo":
            demo.run(cluster)
            print_env(cluster)
        elif args.command == "up":
            cluster.up()
            print_env(cluster)
        elif args.command == "down":
            cluster.down()
        elif cluster.is_running():
            pids = ", ".join(f"{p.component}={p.pid}" for p in cluster.processes())
            print(f"cluster {args.name!r} is running: {pids}")
            print_env(cluster)
        else:
            print(f"cluster {args.name!r} is not running (make cluster-up starts it)")
            return 1
    except (ClusterError, ToolchainError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
