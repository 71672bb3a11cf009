"""``modeldeploy-runtime``: the runtime image's commands.

- ``fetch``: the init container; fetches the model and lays out Triton's repository.
- ``serve``: the sidecar; proxies inference to Triton and exports metrics.
- ``activate``: the activator; holds requests for models scaled to zero, wakes them, forwards.
- ``profile``: turns a sample of training data into a drift reference profile.
- ``package``: turns a Triton model folder into a model archive and pushes it to a registry.
- ``digest``: prints the digest ``spec.model.digest`` wants for a file or folder.

Every ``serve`` flag is also a ``MODELDEPLOY_RUNTIME_<NAME>`` variable; flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import traceback
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from modeldeploy_runtime.archive import ArchiveError, BlobCache, Metadata, Reference, package, push
from modeldeploy_runtime.fetch import (
    Fetched,
    FetchError,
    content_digest,
    fetch_to,
    first_line,
    install,
    read_credentials,
    verify,
)
from modeldeploy_runtime.model_repository import FORMATS, default_file_name

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
    fetch.add_argument("--plain-http", action="store_true", help="oci://: the registry's http")
    fetch.add_argument("--cache-dir", type=Path, help="the node-local cache (a hostPath)")
    fetch.add_argument("--cache-max-bytes", type=int, default=100 * 2**30)
    fetch.add_argument(
        "--termination-log",
        type=Path,
        default=TERMINATION_LOG,
        help="where Kubernetes picks up the failure message",
    )
    pack = commands.add_parser("package", help="make a model archive from a Triton model folder")
    pack.add_argument("source", type=Path, help="a Triton model folder (config.pbtxt, 1/, ...)")
    pack.add_argument("--name", required=True, help="the model's name")
    pack.add_argument("--version", required=True, help="the version folder to archive")
    pack.add_argument("--format", required=True, choices=sorted(FORMATS))
    pack.add_argument("--framework", action="append", default=[], metavar="KEY=VALUE")
    pack.add_argument(
        "--training",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training references: run, dataset, commit, ...",
    )
    pack.add_argument("--metrics", type=Path, help="evaluation metrics: a JSON object")
    pack.add_argument("--reference-profile", type=Path, help="from modeldeploy-runtime profile")
    pack.add_argument("--output", type=Path, required=True, help="the archive folder to write")
    pack.add_argument("--push", help="oci://registry/repository:tag to push the archive to")
    pack.add_argument("--plain-http", action="store_true", help="the registry speaks http")
    pack.add_argument("--credentials-dir", type=Path, help="username and password files")
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
    # The sidecar's flags, from its settings, only when serving: pydantic stays out of the
    # fetcher's start (the first thing a cold pod runs).
    fields = serve_fields() if list(argv[:1]) == ["serve"] else {}
    for name, info in fields.items():
        serve.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=info.description
        )
    serve.add_argument("--log-level", default="info")
    add_activate(commands)
    return parser.parse_args(argv)


def add_activate(commands: Any) -> None:
    """``activate``'s flags (argparse's subparsers action has no public type)."""
    activate = commands.add_parser(
        "activate", help="hold requests for models scaled to zero, wake them and forward"
    )
    activate.add_argument("--http-port", type=int, default=8080)
    activate.add_argument("--grpc-port", type=int, default=8081)
    activate.add_argument("--metrics-port", type=int, default=9090, help="/metrics, /healthz")
    activate.add_argument("--namespace", help="only this namespace's ModelDeployments")
    activate.add_argument("--api-url", help="the API server (default: the in-cluster one)")
    activate.add_argument("--token-file", type=Path, help="default: the ServiceAccount's token")
    activate.add_argument("--ca-file", type=Path, help="default: the ServiceAccount's CA")
    activate.add_argument(
        "--grace-seconds",
        type=float,
        default=20.0,
        help="on SIGTERM, for held and forwarded requests to finish",
    )
    activate.add_argument(
        "--upstream-timeout-seconds", type=float, default=60.0, help="for a pod to answer"
    )
    activate.add_argument("--log-level", default="info")


def serve_fields() -> dict[str, Any]:
    from modeldeploy_runtime.settings import RuntimeSettings  # noqa: PLC0415

    return dict(RuntimeSettings.model_fields)


def run_profile(args: argparse.Namespace) -> int:
    from modeldeploy_runtime.drift import Profile, load_rows, profile_features  # noqa: PLC0415

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
    import prometheus_client  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    from modeldeploy_runtime.server import serve  # noqa: PLC0415
    from modeldeploy_runtime.settings import RuntimeSettings  # noqa: PLC0415

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
    # No ``_created`` series: in the text format Prometheus stores each as a series of its
    # own, which doubles every counter's and histogram's cardinality for a timestamp.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    run_loop(serve(settings))
    return 0


def run_activate(args: argparse.Namespace) -> int:
    import prometheus_client  # noqa: PLC0415

    from modeldeploy_runtime.activator import ActivatorOptions, activate  # noqa: PLC0415
    from modeldeploy_runtime.kube import KubeError  # noqa: PLC0415

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    options = ActivatorOptions(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        namespace=args.namespace,
        api_url=args.api_url,
        token_file=args.token_file,
        ca_file=args.ca_file,
        grace_seconds=args.grace_seconds,
        upstream_timeout_seconds=args.upstream_timeout_seconds,
    )
    try:
        run_loop(activate(options))
    except KubeError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when it is installed (the runtime image has it: about half the proxy's cost
    is the event loop), else asyncio's own loop."""
    import asyncio  # noqa: PLC0415 - the sidecar's only

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
        cache = open_cache(args.cache_dir, args.cache_max_bytes)
        fetched = fetch_to(
            args.storage_uri,
            staging,
            model_format=args.format,
            credentials=read_credentials(args.credentials_dir),
            pvc_root=args.pvc_root,
            plain_http=args.plain_http,
            cache=cache,
        )
        digest = fetched.digest
        if args.digest and digest is not None and digest != args.digest:
            raise FetchError(
                f"digest mismatch: spec.model.digest is {args.digest}, the archive's is {digest}"
            )
        if args.digest and digest is None:
            try:
                verify(staging, args.digest, default_file_name(args.format))
            except FetchError:
                shutil.rmtree(staging, ignore_errors=True)  # never resumed from bad bytes
                raise
            digest = args.digest
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
    except Exception as error:  # a bug or an answer no one expected: still a clear status
        traceback.print_exc()
        message = f"fetching {args.storage_uri} failed unexpectedly: {first_line(error)}"
        report_failure(
            f"{message} ({type(error).__name__}; the fetcher's log has the trace)",
            args.termination_log,
        )
        return 1
    summary = fetch_summary(fetched, digest, cached=cache is not None and fetched.layers > 0)
    files = sorted(str(p.relative_to(args.repository)) for p in model.rglob("*") if p.is_file())
    print(json.dumps({"fetched": args.storage_uri, "model": str(model), "files": files, **summary}))
    with contextlib.suppress(OSError):  # not in a pod
        # The operator reads it from the pod's status: the digest served, warm or cold.
        args.termination_log.write_text(json.dumps(summary, separators=(",", ":")))
    return 0


def fetch_summary(fetched: Fetched, digest: str | None, *, cached: bool) -> dict[str, Any]:
    """What the operator reads back from a fetch that worked (the termination message);
    ``cached``: the node cache holds the model now (the operator labels the node)."""
    summary: dict[str, Any] = {}
    if digest is not None:
        summary["digest"] = digest
    if fetched.downloaded_bytes is not None:
        summary["downloaded_bytes"] = fetched.downloaded_bytes
    if fetched.layers:
        summary["layers"] = fetched.layers
        summary["cached_layers"] = fetched.cached_layers
        summary["warm"] = fetched.cached_layers == fetched.layers
        summary["cache"] = cached
    if fetched.archive is not None:
        summary["archive"] = {
            k: fetched.archive.get(k) for k in ("name", "version", "format", "platform")
        }
    return summary


def open_cache(directory: Path | None, max_bytes: int) -> BlobCache | None:
    """The node-local cache, or None (with a warning) when it is absent or not writable: a
    cache never fails a fetch."""
    if directory is None:
        return None
    try:
        return BlobCache(directory, max_bytes)
    except OSError as error:
        print(
            f"warning: the model cache {directory} is not usable ({error}); fetching without it",
            file=sys.stderr,
        )
        return None


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ArchiveError(f"{flag} takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def run_package(args: argparse.Namespace) -> int:
    try:
        metrics = json.loads(args.metrics.read_text()) if args.metrics else {}
        profile = json.loads(args.reference_profile.read_text()) if args.reference_profile else None
        if profile is not None:
            from modeldeploy_runtime.drift import Profile  # noqa: PLC0415

            Profile.from_json(profile)  # a profile the sidecar can load, or an error now
        metadata = Metadata(
            name=args.name,
            version=args.version,
            format=args.format,
            framework=parse_pairs(args.framework, "--framework"),
            training=parse_pairs(args.training, "--training"),
            metrics=metrics,
            reference_profile=profile,
        )
        manifest = package(args.source, args.output, metadata)
        print(
            f"wrote {args.output}: {len(manifest['files'])} files,"
            f" {len(manifest['inputs'])} inputs, {len(manifest['outputs'])} outputs"
        )
        if args.push:
            reference = Reference.parse(args.push)
            with tempfile.TemporaryDirectory() as config_dir:
                digest = push(
                    args.output,
                    reference,
                    read_credentials(args.credentials_dir),
                    plain_http=args.plain_http,
                    config_dir=Path(config_dir),
                )
            print(f"pushed {reference} as {digest}")
            print(f"storageUri: oci://{reference.registry}/{reference.repository}@{digest}")
    except (ArchiveError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "fetch":
        return run_fetch(args)
    commands = {
        "serve": run_serve,
        "activate": run_activate,
        "profile": run_profile,
        "package": run_package,
    }
    if args.command in commands:
        return commands[args.command](args)
    if args.command == "digest":
        print(content_digest(args.path))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
