"""Model registry: registering versions and the ``champion`` gate.

A recurring (cron) run retrains on schedule, and a new model becomes the registered model's
``champion`` only if its mIoU beats the current champion's on the same split (DESIGN.md).
Every version carries its score as tags (``miou``, ``miou_split``), so the gate compares
like with like and a person can see why a version was or was not promoted
(``champion_comparison``, ``promoted``, ``previous_champion``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
RECORD_TAG = "vitpcm.record_id"


@dataclass(frozen=True)
class ChampionDecision:
    """Outcome of :func:`promote_if_better`: whether ``version`` is now the champion, the
    champion before (``previous_version``, its ``previous_miou`` on ``split``; ``None``:
    none or not comparable) and the ``comparison`` text also tagged on the version."""

    promoted: bool
    model_name: str
    version: str
    miou: float
    split: str
    previous_version: str | None
    previous_miou: float | None
    comparison: str

    def to_dict(self) -> dict[str, Any]:
        """The decision as plain JSON values."""
        return asdict(self)


def _scores(miou: float, other: float | None = None) -> tuple[str, str]:
    """``miou`` and ``other`` with enough decimals (4 to 8) to show their difference:
    three decimals showed "0.081 > 0.081" for a real improvement."""
    digits = 4
    while (
        other is not None
        and miou != other
        and digits < 8
        and (
            f"{miou:.{digits}f}" == f"{other:.{digits}f}"
            or float(f"{miou - other:.{digits}f}") == 0
        )
    ):
        digits += 1
    return f"{miou:.{digits}f}", "" if other is None else f"{other:.{digits}f}"


def comparison_text(miou: float, previous: float, split: str) -> str:
    """E.g. ``"0.6120 > 0.5800 (val, +0.0320)"``, ``"0.08127 > 0.08122 (val, +0.00005)"``."""
    new, old = _scores(miou, previous)
    digits = len(new.partition(".")[2])
    sign = ">" if miou > previous else "<="
    return f"{new} {sign} {old} ({split}, {miou - previous:+.{digits}f})"


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def promote_if_better(
    client: Any, model_name: str, version: str | int, miou: float, split: str
) -> ChampionDecision:
    """Make ``version`` the ``champion`` if its mIoU on ``split`` beats the champion's.

    The first version gated becomes champion; a later one only with a strictly greater
    mIoU, and only against a champion scored on the same split (otherwise the champion
    keeps its alias: promote by hand if the protocol changed on purpose). Gating the
    current champion again (a replay) reports ``promoted=True`` and changes nothing. The
    score and the outcome are tagged on the version.

    Args:
        client: an ``mlflow.MlflowClient``.
        model_name: the registered model.
        version: the candidate version.
        miou: its mIoU (0..1) on ``split``.
        split: the split it was measured on, e.g. ``val``.
    """
    from mlflow.exceptions import MlflowException

    version, miou = str(version), float(miou)
    client.set_model_version_tag(model_name, version, "miou", f"{miou:.6f}")
    client.set_model_version_tag(model_name, version, "miou_split", split)
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        if not missing and "not found" not in str(exc).lower():
            raise
        champion = None
    previous_version = None if champion is None else str(champion.version)
    tags = {} if champion is None else champion.tags
    previous_miou = _tag_float(tags, "miou") if tags.get("miou_split") == split else None
    if champion is None:
        promoted, comparison = True, f"{_scores(miou)[0]} ({split}), first champion"
    elif previous_version == version:
        promoted, comparison = True, f"{_scores(miou)[0]} ({split}), already champion"
    elif previous_miou is None:
        promoted = False
        comparison = (
            f"{_scores(miou)[0]} ({split}) not comparable: champion v{previous_version} has no "
            f"mIoU on {split!r} (its tags: miou={tags.get('miou')}, "
            f"miou_split={tags.get('miou_split')})"
        )
    else:
        promoted, comparison = miou > previous_miou, comparison_text(miou, previous_miou, split)
    if promoted and previous_version != version:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(model_name, version, "champion_comparison", comparison)
    client.set_model_version_tag(model_name, version, "promoted", str(promoted).lower())
    if previous_version is not None:
        client.set_model_version_tag(model_name, version, "previous_champion", previous_version)
    outcome = "champion" if promoted else "champion unchanged"
    log.info("%s v%s: %s -> %s", model_name, version, comparison, outcome)
    return ChampionDecision(
        promoted, model_name, version, miou, split, previous_version, previous_miou, comparison
    )


def register_version(
    client: Any,
    model_name: str,
    model_id: str,
    run_id: str | None,
    record_id: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Register a logged model as a new version, once per ``record_id``: a replay after a
    lost acknowledgement finds the version tagged with it instead of adding a duplicate."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:  # it exists (perhaps created by a run racing this one)
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    query = f"name = '{model_name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    for existing in client.search_model_versions(query):
        if existing.tags.get(RECORD_TAG) == record_id:
            return str(existing.version)
    version = client.create_model_version(
        model_name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags={**(tags or {}), RECORD_TAG: record_id},
        model_id=model_id,
    )
    return str(version.version)
