"""``kubectl modeldeploy``: rollout status and control from the command line.

    kubectl modeldeploy status NAME [-n NS] [-w] [-o json]
    kubectl modeldeploy promote|abort|pause|resume|rollback NAME [-n NS]
    kubectl modeldeploy history NAME [-n NS] [-o json]

Commands set the ``serving.modeldeploy.io/command`` annotation, which the operator consumes;
they never edit status or children themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND, ModelDeployment
from modeldeploy_operator.k8s.client import ApiError, KubeApi, KubernetesApi, load_api_client
from modeldeploy_operator.rollout.plan import COMMAND_ANNOTATION, COMMANDS, steps_of

BAR = 20


def progress_bar(weight: int) -> str:
    filled = round(BAR * max(0, min(100, weight)) / 100)
    return "[" + "#" * filled + "-" * (BAR - filled) + f"] {weight}%"


def render_status(md: ModelDeployment) -> str:
    """A human summary of one ModelDeployment's rollout (pure)."""
    status = md.status
    name = f"{md.metadata.namespace}/{md.metadata.name}"
    lines = [f"{name}: {status.phase or 'Unknown'}, ready {status.ready or '-'}"]
    stable = status.stable
    if stable is not None:
        lines.append(
            f"  stable   version {stable.version}  revision {stable.revision}"
            f"{short_digest(stable.digest, '  ')}"
        )
    canary = status.canary
    if canary is not None:
        steps = steps_of(md)
        step = (canary.step or 0) + 1
        paused = "  (paused)" if canary.paused else ""
        traffic = (
            f"shadow: {canary.shadow}% of requests copied, no user served"
            if canary.shadow
            else progress_bar(canary.weight or 0)
        )
        lines.append(
            f"  canary   version {canary.version}  revision {canary.revision}"
            f"{short_digest(canary.digest, '  ')}  step {step}/{len(steps)}"
            f"  {traffic}{paused}"
        )
    if status.warm_replicas:
        lines.append(f"  cache    {status.warm_replicas} replicas started from the node cache")
    if status.rollback is not None:
        lines.append(f"  held     revision {status.rollback.revision}: {status.rollback.reason}")
    for result in status.analysis:
        bounds = " ".join(
            part
            for part in (
                f">= {result.min:g}" if result.min is not None else "",
                f"<= {result.max:g}" if result.max is not None else "",
            )
            if part
        )
        value = "no data" if result.value is None else f"{result.value:.4g}"
        detail = f"  ({result.detail})" if result.detail else ""
        lines.append(
            f"  analysis {result.name:<12} {value:>10}  {bounds:<14} {result.result}{detail}"
        )
    scaling = status.autoscaling
    if scaling is not None:
        capacity = (
            f"  GPUs hold {scaling.capacity_replicas}"
            if scaling.capacity_replicas is not None
            else ""
        )
        lines.append(f"  scaling  {scaling.engine}  desired {scaling.desired_replicas}{capacity}")
        if scaling.last_decision is not None:
            last = scaling.last_decision
            lines.append(
                f"  last     {last.reason} {last.from_replicas} -> {last.to_replicas}"
                f" at {last.time}: {last.message}"
            )
    for condition in status.conditions:
        lines.append(
            f"  {condition.type:<11} {condition.status:<6} {condition.reason}: {condition.message}"
        )
    return "\n".join(lines)


def short_digest(digest: str | None, prefix: str = "") -> str:
    """``sha256:`` and the first 12 hex digits, as ``docker images`` shows them."""
    return f"{prefix}{digest[:19]}" if digest else ""


def render_history(md: ModelDeployment) -> str:
    rows = ["VERSION  REVISION    DIGEST              RESULT      FINISHED              REASON"]
    for entry in md.status.history:
        finished = entry.finished or "-"
        digest = short_digest(entry.digest) or "-"
        rows.append(
            f"{entry.version:<8} {entry.revision:<11} {digest:<19} {entry.result:<11}"
            f" {finished:<21} {entry.reason or ''}"
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubectl modeldeploy", description=__doc__)
    parser.add_argument("command", choices=["status", "history", *COMMANDS])
    parser.add_argument("name")
    parser.add_argument(
        "-n", "--namespace", default=os.environ.get("KUBECTL_PLUGINS_CURRENT_NAMESPACE", "default")
    )
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument(
        "-w", "--watch", action="store_true", help="status: follow until the rollout settles"
    )
    parser.add_argument("--kubeconfig", default=None)
    return parser.parse_args(argv)


def fetch(api: KubeApi, namespace: str, name: str) -> tuple[ModelDeployment, dict[str, Any]]:
    body = api.get(API_VERSION, KIND, namespace, name)
    if body is None:
        raise LookupError(f"modeldeployment {namespace}/{name} not found")
    return ModelDeployment.model_validate(body), body


def run(args: argparse.Namespace, api: KubeApi) -> int:
    md, body = fetch(api, args.namespace, args.name)
    if args.command in COMMANDS:
        patch = {"metadata": {"annotations": {COMMAND_ANNOTATION: args.command}}}
        api.merge_patch(API_VERSION, KIND, args.namespace, args.name, patch)
        print(f"modeldeployment.serving.modeldeploy.io/{args.name} {args.command} requested")
        return 0
    if args.output == "json":
        key = "history" if args.command == "history" else None
        status = body.get("status", {})
        print(json.dumps(status.get(key, []) if key else status, indent=2))
        return 0
    if args.command == "history":
        print(render_history(md))
        return 0
    print(render_status(md))
    while args.watch and (md.status.canary is not None or md.status.phase == "Progressing"):
        time.sleep(2)
        md, _ = fetch(api, args.namespace, args.name)
        print("\n" + render_status(md))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, KubernetesApi(load_api_client(args.kubeconfig)))
    except (LookupError, ApiError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
