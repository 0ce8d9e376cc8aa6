"""``python -m pipeline.submit``: upload the compiled pipeline as a new version and start a run.

The Kubeflow Pipelines endpoint comes from the environment:

* ``KFP_HOST`` (required): the API endpoint, e.g. ``http://localhost:8080`` after
  ``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``.
* ``KFP_NAMESPACE``: the profile namespace the run belongs to (default ``kubeflow``).
* ``KFP_TOKEN``: a bearer token, when the endpoint requires one.
* ``KFP_SERVICE_ACCOUNT``: the ServiceAccount the run's pods use (default
  ``vitpcm-pipeline``, from ``manifests/rbac.yaml``; empty for the profile's
  ``default-editor``); ``--service-account`` overrides it.

Uploading is idempotent: the version is named after the package's content, so submitting
the same YAML twice reuses the version instead of failing on a duplicate name.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vitpcm.errors import ConfigError

HOST_ENV = "KFP_HOST"
NAMESPACE_ENV = "KFP_NAMESPACE"
TOKEN_ENV = "KFP_TOKEN"
SERVICE_ACCOUNT_ENV = "KFP_SERVICE_ACCOUNT"
DEFAULT_NAMESPACE = "kubeflow"
DEFAULT_PACKAGE = "build/vitpcm_pipeline.yaml"
DEFAULT_EXPERIMENT = "vitpcm"


@dataclass(frozen=True)
class PipelineVersion:
    """Where an uploaded package lives on the server."""

    pipeline_id: str
    version_id: str
    version_name: str


def client_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """A ``kfp.Client`` for ``KFP_HOST`` / ``KFP_NAMESPACE`` / ``KFP_TOKEN``.

    Raises:
        ConfigError: ``KFP_HOST`` is not set.
    """
    env = os.environ if environ is None else environ
    host = env.get(HOST_ENV, "").strip()
    if not host:
        raise ConfigError(
            f"{HOST_ENV} is not set: export {HOST_ENV}=<Kubeflow Pipelines API URL>, e.g. "
            "http://localhost:8080 after `kubectl port-forward -n kubeflow "
            "svc/ml-pipeline-ui 8080:80` (and KFP_TOKEN if the endpoint needs a token)"
        )
    import kfp

    return kfp.Client(
        host=host,
        namespace=env.get(NAMESPACE_ENV, "").strip() or DEFAULT_NAMESPACE,
        existing_token=env.get(TOKEN_ENV, "").strip() or None,
    )


def service_account_for(
    flag: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The ServiceAccount of the run: ``--service-account``, else ``KFP_SERVICE_ACCOUNT``, else
    the one ``manifests/rbac.yaml`` creates; an empty value means the profile's default."""
    from pipeline.cluster import SERVICE_ACCOUNT

    env = os.environ if environ is None else environ
    value = flag if flag is not None else env.get(SERVICE_ACCOUNT_ENV, SERVICE_ACCOUNT)
    return value.strip() or None


def read_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline spec of a compiled package (the first YAML document).

    Raises:
        ConfigError: Missing file or not a compiled pipeline.
    """
    package = Path(path)
    if not package.is_file():
        raise ConfigError(f"pipeline package {package} not found; run `make compile-pipeline`")
    try:
        spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    except (yaml.YAMLError, StopIteration) as exc:
        raise ConfigError(f"{package} is not a compiled pipeline YAML ({exc})") from exc
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise ConfigError(f"{package} is not a compiled pipeline (no pipelineInfo/root)")
    return spec


def _coerce(name: str, text: str, kind: str) -> Any:
    try:
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
    except ValueError:
        raise ConfigError(f"pipeline parameter {name} expects a number, got {text!r}") from None
    if kind == "BOOLEAN":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"pipeline parameter {name} expects true or false, got {text!r}")
    if kind in ("STRUCT", "LIST"):
        value = yaml.safe_load(text)
        if not isinstance(value, dict if kind == "STRUCT" else list):
            raise ConfigError(f"pipeline parameter {name} expects a {kind.lower()}, got {text!r}")
        return value
    return text


def parse_params(spec: Mapping[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> typed run parameters, checked against the package.

    Raises:
        ConfigError: Malformed item, unknown parameter, or a value of the wrong type.
    """
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    params: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--param {item!r} is not KEY=VALUE")
        if name not in declared:
            raise ConfigError(
                f"unknown pipeline parameter {name!r}; the pipeline takes: "
                f"{', '.join(sorted(declared))}"
            )
        params[name] = _coerce(name, text, declared[name].get("parameterType", "STRING"))
    check_run_params(declared, params)
    return params


def check_run_params(declared: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Dataset, config and overrides of a run (given, else the package's defaults) fit
    together (:func:`vitpcm.run_plan.check_plan`), checked here before anything is uploaded.

    Raises:
        ConfigError: A bad config or override, or a config for another dataset.
    """
    if "dataset" not in declared:
        return

    def value(name: str) -> str:
        given = params.get(name, declared.get(name, {}).get("defaultValue", ""))
        return str(given or "")

    import shlex

    from vitpcm.run_plan import load_checked_config

    overrides = shlex.split(value("overrides"))
    pretrained = value("pretrained")
    if pretrained:
        overrides.append(
            "model.pretrained=null" if pretrained == "none" else f"model.pretrained={pretrained}"
        )
    # A local checkpoint path is one inside the training pod: not checked from here.
    load_checked_config(value("dataset"), value("config") or None, overrides, local_files=False)


def version_name_for(package: str | os.PathLike[str]) -> str:
    """``<library version>-<content hash>``: the same YAML always gets the same name."""
    from vitpcm import __version__

    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    return f"v{__version__}-{digest}"


def upload_version(
    client: Any, package: str, pipeline_name: str, version_name: str | None = None
) -> PipelineVersion:
    """Upload ``package`` as a version of ``pipeline_name`` (creating the pipeline first)."""
    import json

    version_name = version_name or version_name_for(package)
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            pipeline_package_path=package,
            pipeline_name=pipeline_name,
            description="ViT-PCM weakly supervised semantic segmentation",
        )
        pipeline_id = pipeline.pipeline_id
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": version_name}
    same_name = json.dumps({"predicates": [predicate]})
    existing = client.list_pipeline_versions(pipeline_id=pipeline_id, filter=same_name)
    versions = getattr(existing, "pipeline_versions", None) or []
    if versions:
        return PipelineVersion(pipeline_id, versions[0].pipeline_version_id, version_name)
    version = client.upload_pipeline_version(
        pipeline_package_path=package, pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    return PipelineVersion(pipeline_id, version.pipeline_version_id, version_name)


def submit(
    package: str = DEFAULT_PACKAGE,
    params: Sequence[str] = (),
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    version_name: str | None = None,
    client: Any = None,
    service_account: str | None = None,
) -> Any:
    """Upload ``package`` and start one run; returns the server's run object.

    ``service_account`` is the pods' ServiceAccount (None: the profile's default).
    """
    spec = read_package(package)
    values = parse_params(spec, params)
    client = client if client is not None else client_from_env()
    version = upload_version(client, package, spec["pipelineInfo"]["name"], version_name)
    exp = client.create_experiment(name=experiment)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=run_name or f"{spec['pipelineInfo']['name']}-{stamp}",
        params=values,
        pipeline_id=version.pipeline_id,
        version_id=version.version_id,
        service_account=service_account,
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``submit`` and ``schedule``."""
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="compiled pipeline YAML")
    parser.add_argument(
        "--param",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="pipeline parameter, e.g. epochs=10 (repeatable; typed from the package)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="Kubeflow experiment")
    parser.add_argument("--version-name", help="pipeline version name (default: content hash)")
    parser.add_argument(
        "--service-account",
        help=f"ServiceAccount of the run's pods (default: ${SERVICE_ACCOUNT_ENV}, else "
        "vitpcm-pipeline from manifests/rbac.yaml; '' for the profile's default-editor)",
    )


def run_cli(action: Any) -> int:
    """Run ``action()``, turning user-facing and connection errors into one line."""
    try:
        action()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        # The kfp client surfaces HTTP and connection failures as many types; name the host.
        host = os.environ.get(HOST_ENV, "")
        print(f"error: Kubeflow Pipelines at {host} refused the request: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.submit``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.submit",
        description="Upload the compiled pipeline (new version) and start a run.",
    )
    add_common_args(parser)
    parser.add_argument("--run-name", help="run name (default: pipeline name + UTC time)")
    args = parser.parse_args(argv)

    def action() -> None:
        run = submit(
            args.package,
            args.param,
            args.experiment,
            args.run_name,
            args.version_name,
            service_account=service_account_for(args.service_account),
        )
        host = os.environ.get(HOST_ENV, "").rstrip("/")
        print(f"started run {run.run_id}: {host}/#/runs/details/{run.run_id}")

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
