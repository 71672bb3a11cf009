"""The two packages and their source roots, as ARCHITECTURE.md lays them out."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from modeldeploy_runtime.settings import RuntimeSettings

ROOT = Path(__file__).resolve().parents[2]

BLOCK_KOPF_AND_KUBERNETES = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"kopf", "kubernetes"}:
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Block())
import modeldeploy_runtime
assert "kopf" not in sys.modules and "kubernetes" not in sys.modules
print("ok")
"""


def test_runtime_imports_without_kopf_or_kubernetes() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_KOPF_AND_KUBERNETES],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_source_roots_are_not_packages() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "runtime" / "__init__.py").exists()
    assert (ROOT / "operator" / "modeldeploy_operator" / "__init__.py").is_file()
    assert (ROOT / "runtime" / "modeldeploy_runtime" / "__init__.py").is_file()


def test_operator_folder_does_not_shadow_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.add(2, 3), operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    value, origin = result.stdout.split()
    assert value == "5"
    assert not origin.startswith(str(ROOT))


def test_runtime_image_requirements_cover_what_the_runtime_imports() -> None:
    """Every third-party module the runtime imports is in runtime/requirements.txt."""
    names = {
        line.split(">=")[0].split("[")[0].split(";")[0].strip().replace("-", "_")
        for line in (ROOT / "runtime" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    provided = names | {"grpc", "google"}  # grpcio and protobuf come with tritonclient[grpc]
    imported = set()
    for path in (ROOT / "runtime" / "modeldeploy_runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {
        m for m in imported if m not in sys.stdlib_module_names and m != "modeldeploy_runtime"
    }
    optional = {"pyarrow"}  # .parquet profiles, when installed
    assert third_party - optional <= {
        n.replace("prometheus_client", "prometheus_client") for n in provided
    }


def test_every_runtime_setting_is_documented() -> None:
    page = (ROOT / "docs" / "runtime.md").read_text()
    for name in RuntimeSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in page, name
        assert f"`MODELDEPLOY_RUNTIME_{name.upper()}`" in page, name
