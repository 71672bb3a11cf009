"""``modeldeploy-runtime``: the runtime image's commands.

- ``fetch``: the init container; fetches the model and lays out Triton's repository.
- ``serve``: the sidecar; proxies inference to Triton and exports metrics.
- ``profile``: turns a sample of training data into a drift reference profile.

Every ``serve`` flag is also a ``MODELDEPLOY_RUNTIME_<NAME>`` variable; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from modeldeploy_runtime.drift import Profile, load_rows, profile_features
from modeldeploy_runtime.fetch import (
    FetchError,
    content_digest,
    fetch_to,
    install,
    read_credentials,
    verify,
)
from modeldeploy_runtime.model_repository import FORMATS, default_file_name
from modeldeploy_runtime.server import serve
from modeldeploy_runtime.settings import RuntimeSettings

TERMINATION_LOG = Path("/dev/termination-log")  # Kubernetes shows it in the pod's status


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modeldeploy-runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch a model into a Triton model repository")
    fetch.add_argument("--storage-uri", required=True)
    fetch.add_argument("--model-name", required=True)
    fetch.add_argument("--model-version", required=True)
    fetch.add_argument("--format", required=True, choices=sorted(FORMATS))
    fetch.add_argument("--repository", type=Path, required=True)
    fetch.add_argument("--config-overrides", default="{}", help="spec.model.config as JSON")
    fetch.add_argument("--credentials-dir", type=Path, help="a mounted Secret, one file per key")
    fetch.add_argument("--digest", help="sha256:<hex> the fetched content must have")
    fetch.add_argument("--pvc-root", type=Path, default=Path("/mnt/model-source"))
    fetch.add_argument(
        "--termination-log",
        type=Path,
        default=TERMINATION_LOG,
        help="where Kubernetes picks up the failure message",
    )
    digest = commands.add_parser("digest", help="print the sha256 digest spec.model.digest wants")
    digest.add_argument("path", type=Path, help="the model file, or its folder")
    profile = commands.add_parser("profile", help="build a drift reference profile from samples")
    profile.add_argument("--inputs", type=Path, required=True, help=".npy, .csv or .parquet rows")
    profile.add_argument("--input-tensor", required=True, help="the model input they feed")
    profile.add_argument("--outputs", type=Path, help="model outputs for the same rows")
    profile.add_argument("--output-tensor", help="the model output they come from")
    profile.add_argument("--bins", type=int, default=10)
    profile.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    serve = commands.add_parser("serve", help="proxy inference to Triton and export metrics")
    for name, info in RuntimeSettings.model_fields.items():
        serve.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=info.description
        )
    serve.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def run_profile(args: argparse.Namespace) -> int:
    rows, names = load_rows(args.inputs)
    inputs = {args.input_tensor: profile_features(args.input_tensor, rows, args.bins, names)}
    outputs = {}
    if args.outputs is not None:
        out_rows, out_names = load_rows(args.outputs)
        tensor = args.output_tensor or "output"
        outputs[tensor] = profile_features(tensor, out_rows, args.bins, out_names)
    args.out.write_text(json.dumps(Profile(inputs, outputs).to_json(), indent=1))
    print(
        f"wrote {args.out}: {sum(len(f) for f in inputs.values())} input features,"
        f" {sum(len(f) for f in outputs.values())} output features from {len(rows)} rows"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    given = {
        k: v for k, v in vars(args).items() if k in RuntimeSettings.model_fields and v is not None
    }
    try:
        settings = RuntimeSettings(**given)
    except ValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    run_loop(serve(settings))
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when it is installed (the runtime image has it: about half the proxy's cost
    is the event loop), else asyncio's own loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def report_failure(message: str, termination_log: Path) -> None:
    print(f"error: {message}", file=sys.stderr)
    with contextlib.suppress(OSError):  # not in a pod
        termination_log.write_text(message[:4000])


def run_fetch(args: argparse.Namespace) -> int:
    try:
        args.repository.mkdir(parents=True, exist_ok=True)
        # Stage beside the repository (the same volume; the root filesystem is read-only), in
        # a folder named by what is fetched: a fetch killed halfway (OOM, eviction, a node
        # restart that keeps the emptyDir) finds its partial files there and resumes them.
        # Stagings of anything else are stale and go.
        key = hashlib.sha256(
            "\0".join((args.storage_uri, args.model_name, args.model_version)).encode()
        ).hexdigest()[:16]
        staging = args.repository / f".staging-{key}"
        for stale in args.repository.glob(".staging-*"):
            if stale != staging:
                shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(exist_ok=True)
        downloaded = fetch_to(
            args.storage_uri,
            staging,
            model_format=args.format,
            credentials=read_credentials(args.credentials_dir),
            pvc_root=args.pvc_root,
        )
        if args.digest:
            try:
                verify(staging, args.digest, default_file_name(args.format))
            except FetchError:
                shutil.rmtree(staging, ignore_errors=True)  # never resumed from bad bytes
                raise
        model = install(
            staging,
            args.repository,
            name=args.model_name,
            version=args.model_version,
            model_format=args.format,
            overrides=json.loads(args.config_overrides),
        )
        shutil.rmtree(staging, ignore_errors=True)
    except FetchError as error:
        report_failure(f"fetching {args.storage_uri} failed: {error}", args.termination_log)
        return 1
    files = sorted(str(p.relative_to(args.repository)) for p in model.rglob("*") if p.is_file())
    report = {"fetched": args.storage_uri, "model": str(model), "files": files}
    if downloaded is not None:
        report["downloaded_bytes"] = downloaded
    print(json.dumps(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "fetch":
        return run_fetch(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "profile":
        return run_profile(args)
    if args.command == "digest":
        print(content_digest(args.path))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
