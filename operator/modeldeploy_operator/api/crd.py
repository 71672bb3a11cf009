"""Generate the ModelDeployment CRD from the pydantic models.

Pydantic emits JSON Schema (``$ref``, ``anyOf`` with ``null``, 2020-12 exclusive bounds);
Kubernetes wants a structural OpenAPI v3 schema. :func:`structural` converts one into the
other; :func:`build_crd` adds names, subresources and printer columns.

``python -m modeldeploy_operator.api.crd`` prints the YAML (``make crds`` writes ``crds/``).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from modeldeploy_operator.api import v1alpha1

# JSON Schema keywords that carry over to OpenAPI v3 unchanged.
KEPT = {
    "type",
    "description",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
}
SCALAR_TYPES = {"string", "integer", "number", "boolean"}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:
        return structural_union(schema, defs)

    out: dict[str, Any] = {k: v for k, v in schema.items() if k in KEPT}
    # 2020-12 exclusive bounds are numbers; OpenAPI v3.0 wants booleans beside minimum/maximum.
    if "exclusiveMinimum" in schema:
        out |= {"minimum": schema["exclusiveMinimum"], "exclusiveMinimum": True}
    if "exclusiveMaximum" in schema:
        out |= {"maximum": schema["exclusiveMaximum"], "exclusiveMaximum": True}
    default = schema.get("default")
    if default is not None and out.get("type") in SCALAR_TYPES:
        out["default"] = default
    if "const" in schema:
        out["enum"] = [schema["const"]]

    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        return out
    if "properties" in schema:
        out["type"] = "object"
        out["properties"] = {
            name: structural(prop, defs) for name, prop in schema["properties"].items()
        }
        required = schema.get("required", [])
        if required:
            out["required"] = list(required)
    elif isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(schema["additionalProperties"], defs)
    if "items" in schema:
        out["items"] = structural(schema["items"], defs)
    return out


def structural_union(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``X | None`` becomes X (optional = not required); ``int | str`` becomes int-or-string."""
    options = [s for s in schema["anyOf"] if s.get("type") != "null"]
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    if schema.get("x-kubernetes-int-or-string"):
        return {k: v for k, v in structural(rest, defs).items() if k != "type"}
    if len(options) == 1:
        return structural({**options[0], **rest}, defs)
    raise ValueError(f"cannot express a union in a structural schema: {schema}")


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return structural(schema, schema.get("$defs", {}))


PRINTER_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Version", "type": "string", "jsonPath": ".spec.model.version"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Stable", "type": "string", "jsonPath": ".status.stable.version", "priority": 1},
    {"name": "Canary", "type": "string", "jsonPath": ".status.canary.version", "priority": 1},
    {"name": "Weight", "type": "integer", "jsonPath": ".status.canary.weight", "priority": 1},
)


# Served versions, oldest first; the schema is one (``None`` conversion: the API server only
# rewrites apiVersion), and objects are stored as the last. v1alpha1 stays served: operators
# and manifests written for it go on working (docs/api.md, "Versions").
VERSIONS = ("v1alpha1", "v1beta1")


def build_crd(group: str = v1alpha1.GROUP, versions: tuple[str, ...] = VERSIONS) -> dict[str, Any]:
    """The CustomResourceDefinition object: ``versions`` served, the last one stored. (Another
    ``group`` or fewer versions: the upgrade tests' CRD before an upgrade.)"""
    spec_schema = openapi_schema(v1alpha1.ModelDeploymentSpec)
    status_schema = openapi_schema(v1alpha1.ModelDeploymentStatus)
    root = {
        "type": "object",
        "description": "A model served by NVIDIA Triton on GPU nodes, with judged canaries.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            v1alpha1.cel(
                f"size(self.metadata.name) <= {v1alpha1.MAX_NAME_LENGTH}",
                f"metadata.name must be at most {v1alpha1.MAX_NAME_LENGTH} characters: child"
                " objects and pods append suffixes to it",
                ".metadata.name",
            ),
            v1alpha1.cel(
                f"self.metadata.name.matches('{v1alpha1.NAME_PATTERN}')",
                "metadata.name must be lowercase letters, digits and '-', starting with a letter"
                " (no dots): the ModelDeployment's Service takes its name",
                ".metadata.name",
            ),
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{v1alpha1.PLURAL}.{group}",
            "labels": {"app.kubernetes.io/name": "modeldeploy"},
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": v1alpha1.KIND,
                "plural": v1alpha1.PLURAL,
                "singular": v1alpha1.SINGULAR,
                "shortNames": list(v1alpha1.SHORT_NAMES),
                "categories": ["all", "modeldeploy"],
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": version == versions[-1],
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": list(PRINTER_COLUMNS),
                }
                for version in versions
            ],
        },
    }


class _Plain(yaml.SafeDumper):
    """Every repeated part written out: no YAML anchors and aliases for a reader to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    header = "# Generated by `make crds` from operator/modeldeploy_operator/api. Do not edit.\n"
    return header + yaml.dump(build_crd(), Dumper=_Plain, sort_keys=False, width=100)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
