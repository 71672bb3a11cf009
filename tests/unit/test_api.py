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


def test_two_versions_one_schema_stored_as_the_newest() -> None:
    """v1beta1 beside v1alpha1, no conversion webhook: the same schema, subresources and
    columns (``None`` conversion only rewrites apiVersion); v1beta1 is stored."""
    versions = crd.build_crd()["spec"]["versions"]
    assert [(v["name"], v["served"], v["storage"]) for v in versions] == [
        ("v1alpha1", True, False),
        ("v1beta1", True, True),
    ]
    first, second = (
        {k: v for k, v in version.items() if k not in ("name", "storage")} for version in versions
    )
    assert first == second
    assert "conversion" not in crd.build_crd()["spec"]


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


def schema_at(*path: str) -> dict[str, Any]:
    node: dict[str, Any] = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for key in ("spec", *path):
        node = node["properties"][key]
    return node


def messages(node: dict[str, Any]) -> dict[str, str]:
    return {v["message"]: v["rule"] for v in node.get("x-kubernetes-validations", [])}


@pytest.mark.parametrize(
    "path",
    [
        ("rollout", "analysis", "interval"),
        ("autoscaling", "interval"),
        ("autoscaling", "scaleToZero", "idleAfter"),
    ],
    ids=".".join,
)
def test_loop_intervals_have_a_floor_of_one_second(path: tuple[str, ...]) -> None:
    field = "spec." + ".".join(path)
    floor = {m: r for m, r in messages(schema_at(*path)).items() if "at least" in m}
    assert len(floor) == 1, messages(schema_at(*path))
    message, rule = floor.popitem()
    assert message.startswith(f"{field} must be at least 1s")
    assert rule.endswith("duration(self) >= duration('1s')")
    assert rule.startswith("!self.matches(")  # a malformed duration gets the format message only


@pytest.mark.parametrize(
    ("path", "field", "rule"),
    [
        (("rollout",), "spec.rollout.analysis", "self.strategy == 'Canary' || !has(self.analysis)"),
        (
            ("autoscaling",),
            "spec.autoscaling.interval",
            "self.engine != 'hpa' || !has(self.interval)",
        ),
        (
            ("autoscaling",),
            "spec.autoscaling.behavior.tolerancePercent",
            "self.engine == 'builtin'",
        ),
        (("monitoring",), "spec.monitoring.auth", "self.runtime.enabled"),
        (("monitoring", "runtime"), "spec.monitoring.runtime.referenceProfile", "self.enabled"),
        (("rollout", "analysis"), "spec.rollout.analysis.metrics", "size(self.metrics) > 0"),
    ],
)
def test_fields_that_would_be_ignored_are_rejected(
    path: tuple[str, ...], field: str, rule: str
) -> None:
    found = {m: r for m, r in messages(schema_at(*path)).items() if m.startswith(field + " ")}
    assert any(rule in r for r in found.values()), found


def test_defaults_that_apply_to_one_engine_are_not_in_the_schema() -> None:
    """A schema default would make every object set them, and the CEL rules above reject
    them for engines that ignore them: the operator applies them instead."""
    assert "default" not in schema_at("autoscaling", "interval")
    assert "default" not in schema_at("autoscaling", "behavior", "tolerancePercent")
    doc = yaml.safe_load((ROOT / "examples/minimal.yaml").read_text())
    doc["spec"]["autoscaling"] = {
        "maxReplicas": 2,
        "metrics": [{"type": "RPSPerReplica", "target": 5}],
    }
    scaling = ModelDeployment.model_validate(doc).spec.autoscaling
    assert scaling is not None
    assert scaling.interval_seconds() == 15.0
    assert scaling.behavior.tolerance() == 0.1
