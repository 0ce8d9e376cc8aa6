"""Derive the KServe InferenceService schema the fake Kubernetes API server validates against.

The same reduction as ``derive.py`` (the served version's ``openAPIV3Schema`` without its
descriptions), from a git clone of kserve/kserve at the release Kubeflow 1.10 ships:

    python tests/data/kube_crds/derive_inferenceservice.py /path/to/kserve/kserve/clone
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from derive import HERE, strip

TAG = "v0.14.1"
PATH = "config/crd/full/serving.kserve.io_inferenceservices.yaml"


def main(clone: str) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", clone, *args], capture_output=True, text=True, check=True
        ).stdout

    crd = yaml.safe_load(git("show", f"{TAG}:{PATH}"))
    version = next(v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage"))
    doc = {
        "source": f"kserve/kserve {TAG} ({git('rev-list', '-n1', TAG).strip()}) {PATH}",
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
        "schema": strip(version["schema"]["openAPIV3Schema"]),
    }
    out = HERE / f"inferenceservice-{TAG}.json"
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
