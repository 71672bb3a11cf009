"""The API models and the CRD generated from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from modeldeploy_operator.api import crd
from modeldeploy_operator.api.v1alpha1 import DEFAULT_TRITON_IMAGE, ModelDeployment

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "serving.modeldeploy.io_modeldeployments.yaml"


def test_crds_folder_is_up_to_date() -> None:
    assert CRD_FILE.read_text() == crd.render(), "crds/ is stale: run `make crds`"


def walk(node: Any, path: str = "") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"$ref", "anyOf", "allOf", "oneOf", "$defs", "title"} and not path.endswith(
                "properties"
            ):
                found.append((path, key))
            found += walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += walk(value, f"{path}[{i}]")
    return found


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert walk(schema) == []


def test_scale_subresource_and_printer_columns() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    default = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    wide = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")]
    assert default == ["Model", "Version", "Ready", "Phase", "GPUs", "Age"]
    assert wide == ["Stable", "Canary", "Weight"]


@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_parse(example: Path) -> None:
    md = ModelDeployment.model_validate(yaml.safe_load(example.read_text()))
    assert md.spec.model.storage_uri
    assert md.spec.server.image  # defaulted when absent


def test_minimal_example_defaults() -> None:
    md = ModelDeployment.model_validate(
        yaml.safe_load((ROOT / "examples/minimal.yaml").read_text())
    )
    assert md.spec.server.image == DEFAULT_TRITON_IMAGE
    assert md.spec.desired_replicas() == 1
    assert md.spec.monitoring.runtime.enabled
    assert md.metadata.namespace == "default"


def test_python_parsing_rejects_unknown_spec_fields() -> None:
    doc = yaml.safe_load((ROOT / "examples/minimal.yaml").read_text())
    doc["spec"]["model"]["storageURI"] = "s3://typo"
    with pytest.raises(ValidationError, match="storageURI"):
        ModelDeployment.model_validate(doc)
