"""Model registry: registering versions and the ``champion`` gate.

A recurring (cron) run retrains on schedule, and a new model becomes the registered model's
``champion`` only if its mIoU beats the current champion's on the same split (DESIGN.md,
"What users do with it"). Every version carries its score as tags (``miou``, ``miou_split``),
so the gate compares like with like and a person can see why a version was or was not
promoted (``champion_comparison``, ``promoted``, ``previous_champion``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MIOU_TAG = "miou"
SPLIT_TAG = "miou_split"
COMPARISON_TAG = "champion_comparison"
PROMOTED_TAG = "promoted"
PREVIOUS_TAG = "previous_champion"
RECORD_TAG = "vitpcm.record_id"


@dataclass(frozen=True)
class ChampionDecision:
    """Outcome of :func:`promote_if_better`.

    Attributes:
        promoted: whether ``version`` is now the champion.
        model_name: the registered model.
        version: the candidate version.
        miou: its mIoU on ``split``.
        split: the split both scores refer to.
        previous_version: the champion before the decision (``None``: there was none).
        previous_miou: that champion's mIoU on ``split`` (``None``: none or not comparable).
        comparison: the human-readable reason, also stored as the ``champion_comparison`` tag.
    """

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

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChampionDecision:
        return cls(**raw)


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def current_champion(client: Any, model_name: str) -> Any | None:
    """The model version aliased ``champion``, or ``None`` when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise


def _scores(miou: float, other: float | None = None) -> tuple[str, str]:
    """``miou`` and ``other`` with enough decimals to show their difference (4 to 8).

    Three decimals showed "0.081 > 0.081" for a real improvement; the digits grow until the
    two and their difference are visibly distinct (equal values stay at 4).
    """

    def blurred(digits: int) -> bool:
        same = f"{miou:.{digits}f}" == f"{other:.{digits}f}"
        return same or float(f"{miou - other:.{digits}f}") == 0.0

    digits = 4
    if other is not None and miou != other:
        while digits < 8 and blurred(digits):
            digits += 1
    return f"{miou:.{digits}f}", "" if other is None else f"{other:.{digits}f}"


def comparison_text(miou: float, previous: float, split: str) -> str:
    """The ``champion_comparison`` text of a candidate against a champion.

    E.g. ``"0.6120 > 0.5800 (val, +0.0320)"``, ``"0.08127 > 0.08122 (val, +0.00005)"``.
    """
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
    """Make ``version`` the ``champion`` if it beats the current one on ``split``.

    The first version ever gated becomes champion. A later one is promoted only if its mIoU
    is strictly greater than the champion's, and only when the champion was scored on the
    same split (a champion without a comparable score keeps its alias: promote by hand if
    the evaluation protocol changed on purpose). Calling it again for the current champion
    is a no-op that reports ``promoted=True``, so replays are safe.

    The candidate's score and the outcome are recorded as tags on the version: ``miou``,
    ``miou_split``, ``champion_comparison`` (e.g. ``"0.6120 > 0.5800 (val, +0.0320)"``, see
    :func:`comparison_text`), ``promoted``
    (``true``/``false``) and ``previous_champion``.

    Args:
        client: an ``mlflow.MlflowClient``.
        model_name: the registered model.
        version: the candidate version.
        miou: its mIoU (0..1) on ``split``.
        split: the split it was measured on, e.g. ``val``.

    Returns:
        The decision.
    """
    version = str(version)
    miou = float(miou)
    client.set_model_version_tag(model_name, version, MIOU_TAG, f"{miou:.6f}")
    client.set_model_version_tag(model_name, version, SPLIT_TAG, split)
    champion = current_champion(client, model_name)
    previous_version = None if champion is None else str(champion.version)
    previous_miou = None
    if champion is None:
        promoted = True
        comparison = f"{_scores(miou)[0]} ({split}), first champion"
    elif previous_version == version:
        promoted = True
        previous_miou = _tag_float(champion.tags, MIOU_TAG)
        comparison = f"{_scores(miou)[0]} ({split}), already champion"
    else:
        champion_split = champion.tags.get(SPLIT_TAG)
        previous_miou = _tag_float(champion.tags, MIOU_TAG) if champion_split == split else None
        if previous_miou is None:
            promoted = False
            comparison = (
                f"{_scores(miou)[0]} ({split}) not comparable: champion v{previous_version} has no "
                f"mIoU on {split!r} (its tags: miou={champion.tags.get(MIOU_TAG)}, "
                f"miou_split={champion_split})"
            )
        else:
            promoted = miou > previous_miou
            comparison = comparison_text(miou, previous_miou, split)
    if promoted and previous_version != version:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(model_name, version, COMPARISON_TAG, comparison)
    client.set_model_version_tag(model_name, version, PROMOTED_TAG, str(promoted).lower())
    if previous_version is not None:
        client.set_model_version_tag(model_name, version, PREVIOUS_TAG, previous_version)
    decision = ChampionDecision(
        promoted=promoted,
        model_name=model_name,
        version=version,
        miou=miou,
        split=split,
        previous_version=previous_version,
        previous_miou=previous_miou,
        comparison=comparison,
    )
    log.info(
        "%s v%s: %s -> %s",
        model_name,
        version,
        comparison,
        "champion" if promoted else "champion unchanged",
    )
    return decision


def ensure_registered_model(client: Any, model_name: str) -> None:
    """Create the registered model unless it exists (safe when two runs race)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def register_version(
    client: Any,
    model_name: str,
    *,
    model_id: str,
    run_id: str | None,
    record_id: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Register a logged model as a new version, once per ``record_id``.

    A replay after a lost acknowledgement finds the version created the first time (tagged
    with ``vitpcm.record_id``) instead of adding a duplicate.

    Returns:
        The version number, as a string.
    """
    ensure_registered_model(client, model_name)
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
