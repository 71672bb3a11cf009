"""A real S3-compatible server for the fetcher's tests (see stores_support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stores_support import Registry, S3Server, start_registry, start_s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    proc, server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    proc, server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    proc.terminate()
    proc.wait(timeout=10)
