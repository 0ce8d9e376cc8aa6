"""``python -m pipeline.schedule --cron "0 0 3 * * 1"``: a recurring run (scheduled retraining).

Kubeflow Pipelines reads cron expressions with a leading *seconds* field (six fields:
``second minute hour day-of-month month day-of-week``), so the common five-field form is
refused with the six-field expression it most likely meant. The endpoint comes from
``KFP_HOST`` / ``KFP_NAMESPACE`` / ``KFP_TOKEN`` as for ``python -m pipeline.submit``, and
the pods run as the same ServiceAccount.

A retraining schedule exists to see new data, but KFP's step cache never expires: the
download and convert steps would be served from the first run's cache forever. So the
recurring run gets a version of the package with caching off for those two steps (uploaded
as its own pipeline version); ``--cache-data`` keeps them cached (a ``data_version``
parameter then decides when they run again).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.submit import (
    DEFAULT_EXPERIMENT,
    DEFAULT_PACKAGE,
    add_common_args,
    client_from_env,
    parse_params,
    read_package,
    run_cli,
    service_account_for,
    upload_version,
)
from vitpcm.errors import ConfigError

# (name, lowest, highest, names accepted in place of numbers)
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    (
        "month",
        1,
        12,
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    ),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
# The components whose outputs depend on data outside the pipeline (the dataset's hosts).
DATA_COMPONENTS = ("comp-download-data", "comp-convert-data")
_PART = re.compile(r"^(?P<range>\*|\?|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(?P<step>[0-9]+))?$")


def _value(text: str, field: tuple[str, int, int, tuple[str, ...]], cron: str) -> int:
    name, low, high, names = field
    upper = text.upper()
    if upper in names:
        return names.index(upper) + (low if name == "month" else 0)
    if not text.isdigit() or not low <= int(text) <= high:
        raise ConfigError(
            f"cron {cron!r}: {name} value {text!r} is out of range {low}-{high}"
            + (f" (or {names[0]}-{names[-1]})" if names else "")
        )
    return int(text)


def validate_cron(cron: str) -> str:
    """Check a six-field Kubeflow cron expression and return it normalised (single spaces).

    Raises:
        ConfigError: Wrong number of fields (a five-field cron names its six-field form) or
            a field that is not a value, range, list, step, ``*`` or ``?``.
    """
    fields = cron.split()
    if len(fields) == 5:
        raise ConfigError(
            f"cron {cron!r} has 5 fields, but Kubeflow cron has 6 with seconds first "
            f"(second minute hour day-of-month month day-of-week); did you mean "
            f"'0 {' '.join(fields)}'?"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"cron {cron!r} has {len(fields)} fields; Kubeflow cron needs 6: second minute "
            "hour day-of-month month day-of-week, e.g. '0 0 3 * * 1' (Mondays 03:00)"
        )
    for text, field in zip(fields, _FIELDS, strict=True):
        for part in text.split(","):
            match = _PART.match(part)
            if not match:
                raise ConfigError(f"cron {cron!r}: cannot read the {field[0]} field {text!r}")
            span = match["range"]
            if span == "?" and field[0] not in ("day of month", "day of week"):
                raise ConfigError(f"cron {cron!r}: '?' is only allowed in the day fields")
            if span not in ("*", "?"):
                bounds = [_value(v, field, cron) for v in span.split("-")]
                if len(bounds) == 2 and bounds[0] > bounds[1]:
                    raise ConfigError(f"cron {cron!r}: {field[0]} range {span!r} is reversed")
            if match["step"] is not None and int(match["step"]) < 1:
                raise ConfigError(f"cron {cron!r}: {field[0]} step must be at least 1")
    return " ".join(fields)


def without_data_cache(package: str | os.PathLike[str]) -> Path:
    """A copy of ``package`` with caching off for the data steps: ``<stem>-recurring.yaml``
    next to it (written whole, then renamed). Every DAG's data tasks are changed.

    Raises:
        ConfigError: The package has no data step to change.
    """
    source = Path(package)
    read_package(source)  # a clear error for a missing or foreign file
    docs = list(yaml.safe_load_all(source.read_text(encoding="utf-8")))
    spec = docs[0]
    dags = [spec["root"].get("dag", {})]
    dags += [c.get("dag", {}) for c in spec.get("components", {}).values()]
    changed = 0
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            if task.get("componentRef", {}).get("name") in DATA_COMPONENTS:
                task["cachingOptions"] = {}  # how the SDK writes set_caching_options(False)
                changed += 1
    if not changed:
        raise ConfigError(f"{source} has no download/convert step to run uncached")
    target = source.with_name(f"{source.stem}-recurring{source.suffix}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.safe_dump_all(docs, handle, sort_keys=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def schedule(
    cron: str,
    package: str = DEFAULT_PACKAGE,
    params: Sequence[str] = (),
    experiment: str = DEFAULT_EXPERIMENT,
    name: str = "vitpcm-scheduled-retraining",
    version_name: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
    client: Any = None,
    service_account: str | None = None,
    cache_data: bool = False,
) -> Any:
    """Upload ``package`` and create an enabled recurring run; returns the server's object.

    Unless ``cache_data``, the uploaded version has the data steps' caching off (see the
    module docstring). ``service_account`` is the pods' ServiceAccount (None: the default).
    """
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    spec = read_package(package)
    values = parse_params(spec, params)
    client = client if client is not None else client_from_env()
    upload = str(package if cache_data else without_data_cache(package))
    version = upload_version(client, upload, spec["pipelineInfo"]["name"], version_name)
    exp = client.create_experiment(name=experiment)
    return client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name=name,
        description=f"ViT-PCM retraining on cron '{cron}'",
        cron_expression=cron,
        # Two trainings at once would compete for the same GPUs; missed slots are skipped.
        max_concurrency=max_concurrency,
        no_catchup=not catchup,
        params=values,
        pipeline_id=version.pipeline_id,
        version_id=version.version_id,
        enabled=True,
        service_account=service_account,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.schedule``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.schedule",
        description="Create a recurring run of the compiled pipeline (Kubeflow 6-field cron).",
    )
    parser.add_argument(
        "--cron",
        required=True,
        help="second minute hour day-of-month month day-of-week, e.g. '0 0 3 * * 1'",
    )
    parser.add_argument("--name", default="vitpcm-scheduled-retraining", help="recurring run")
    parser.add_argument("--max-concurrency", type=int, default=1, help="parallel runs (1)")
    parser.add_argument("--catchup", action="store_true", help="also run missed intervals")
    parser.add_argument(
        "--cache-data",
        action="store_true",
        help="keep the download/convert steps cached (default: every run fetches the data)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)

    def action() -> None:
        job = schedule(
            args.cron,
            args.package,
            args.param,
            args.experiment,
            args.name,
            args.version_name,
            args.max_concurrency,
            args.catchup,
            service_account=service_account_for(args.service_account),
            cache_data=args.cache_data,
        )
        print(f"recurring run {job.recurring_run_id} created: {validate_cron(args.cron)}")

    return run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
