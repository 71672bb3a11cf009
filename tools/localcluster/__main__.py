"""``python -m localcluster build|bin-dir|images|up|down|status|demo``: what ``make`` runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from localcluster import demo
from localcluster.cluster import DEFAULT_NAME, Cluster, ClusterError, ClusterState
from localcluster.images import ImageError
from localcluster.realnode import NodeError, RealNodeSpec
from localcluster.toolchain import Toolchain, ToolchainError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    parser.add_argument(
        "command",
        choices=["build", "bin-dir", "images", "up", "down", "status", "demo"],
        help="build: the pinned binaries; bin-dir: where they are; images: our container images;"
        " up/down/status: the cluster; demo: a model answering inference, then a canary",
    )
    parser.add_argument(
        "--no-real-node",
        action="store_true",
        help="only simulated nodes (no containerd, kubelet or images; a second cluster)",
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
        real_node = None if args.no_real_node else RealNodeSpec()
        cluster = Cluster(toolchain, ClusterState(state.root, args.name), real_node=real_node)
        if args.command == "images":
            for image in cluster.image_builder().ensure_built().values():
                print(image.reference)
        elif args.command == "demo":
            demo.run(cluster)
            print_env(cluster)
        elif args.command == "up":
            cluster.up()
            print_env(cluster)
        elif args.command == "down":
            cluster.down()
        elif cluster.is_running():
            pids = ", ".join(f"{p.component}={p.pid}" for p in cluster.processes())
            node = cluster.node
            if node is not None:
                pids += "".join(f", {d.name}={d.pid}" for d in node.daemons())
            print(f"cluster {args.name!r} is running: {pids}")
            print_env(cluster)
        else:
            print(f"cluster {args.name!r} is not running (make cluster-up starts it)")
            return 1
    except (ClusterError, ToolchainError, ImageError, NodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
