"""Derive the CRD schemas the fake Kubernetes API server validates against.

Reads the CustomResourceDefinitions of kubeflow/trainer at release tags from a git clone and
writes, per kind and release, the served version's ``openAPIV3Schema`` without its
descriptions (types, properties, required, enums, limits): what an API server checks.

    python tests/data/kube_crds/derive.py /path/to/kubeflow/trainer/clone
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
# (file written, tag, CRD path in the repository)
SOURCES = (
    ("trainjob-v2.0.0.json", "v2.0.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml"),
    ("trainjob-v2.3.0.json", "v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml"),
    (
        "trainingruntime-v2.0.0.json",
        "v2.0.0",
        "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml",
    ),
    (
        "trainingruntime-v2.3.0.json",
        "v2.3.0",
        "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml",
    ),
    ("tfjob-v1.9.3.json", "v1.9.3", "manifests/base/crds/kubeflow.org_tfjobs.yaml"),
)
KEEP = {
    "type",
    "required",
    "enum",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "maxLength",
    "minimum",
    "maxItems",
}


def strip(node: dict[str, Any]) -> dict[str, Any]:
    """The schema without descriptions, defaults and CEL rules."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strip(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = strip(value)
        elif key in KEEP or key == "additionalProperties":
            out[key] = value
    return out


def main(clone: str) -> None:
    for name, tag, path in SOURCES:
        text = subprocess.run(
            ["git", "-C", clone, "show", f"{tag}:{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        commit = subprocess.run(
            ["git", "-C", clone, "rev-list", "-n1", tag], capture_output=True, text=True, check=True
        ).stdout.strip()
        crd = yaml.safe_load(text)
        version = next(v for v in crd["spec"]["versions"] if v.get("served"))
        doc = {
            "source": f"kubeflow/trainer {tag} ({commit}) {path}",
            "group": crd["spec"]["group"],
            "version": version["name"],
            "kind": crd["spec"]["names"]["kind"],
            "schema": strip(version["schema"]["openAPIV3Schema"]),
        }
        (HERE / name).write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
