"""The printed MLflow run link opens the model-training view and shows the run's charts:
headless Chromium against a real server.

Needs the Debian ``chromium`` package (``make system-deps``; CI installs it); skipped with a
reason when absent. The link is the one ``make run-local`` prints (``localrun.summary``); the
page is read from the DOM after the UI's scripts ran. The same link without its
``workflowType`` query opens MLflow 3's GenAI layout, which the last test shows, so the
checks cannot pass on a page that ignores the query.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import tiny_config
from localrun import docs_pictures
from localrun.summary import _mlflow_part
from vitpcm.errors import ConfigError
from vitpcm.tracking import RunTracker

NAMES = ["background", "disc", "triangle", "square", "ring", "star"]
# What only the model-training layout's side bar shows, and what only the GenAI one does.
TRAINING_VIEW = "Model registry"
GENAI_VIEW = ("Evaluation runs", "Judges")


def _chromium() -> None:
    try:
        docs_pictures.find_chromium()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def printed_run(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str]:
    """(the run URL make run-local prints, run id) of a run with curves and results."""
    _chromium()
    cfg = tiny_config("mlflow.experiment=test-ui")
    out = tmp_path_factory.mktemp("ui-run")
    with RunTracker(cfg, out, tracking_uri=mlflow_server.uri) as tracker:
        for epoch in (1, 2, 3):
            tracker.epoch_callback(
                epoch, {"loss": 1.0 - 0.2 * epoch, "val_miou": 0.2 * epoch, "lr": 1e-3}
            )
        tracker.log_metrics({"best/val_miou": 0.6, "best/epoch": 3})
        tracker.log_results({"miou": 0.6875, "pixel_accuracy": 0.9375}, "val", per_class=False)
        tracker.log_results(
            {
                "miou": 0.7,
                "miou_crf": 0.75,
                "class_iou": [0.9, 0.5, 0.6, 0.7, 0.8, 0.6],
                "class_iou_crf": [0.95, 0.6, 0.6, 0.8, 0.8, 0.7],
                "class_names": NAMES,
            },
            "test",
            stage="test",
        )
        run_id = tracker.run_id
    assert run_id
    part = _mlflow_part({"run_id": run_id}, mlflow_server.uri, "")
    assert part is not None and part["run_url"]
    return part["run_url"], run_id


@pytest.mark.slow
def test_printed_link_opens_the_run_in_the_model_training_view(
    printed_run: tuple[str, str], tmp_path: Path
) -> None:
    url, run_id = printed_run
    assert url.endswith("?workflowType=machine_learning")
    text = docs_pictures.page_text(docs_pictures.page_dom(url))
    assert TRAINING_VIEW in text
    assert not [marker for marker in GENAI_VIEW if marker in text], text[:2000]
    # The overview: the run's description and its metrics, best-epoch value included.
    assert "ViT-PCM weakly supervised segmentation on synthetic" in text
    for key, value in (
        ("eval/miou", "0.6875"),
        ("test/miou_crf", "0.75"),
        ("best/val_miou", "0.6"),
    ):
        assert re.search(rf"{re.escape(key)} {re.escape(value)}\b", text), key
    shot = docs_pictures.screenshot(url, tmp_path / "run-page.png", height=1200)
    assert shot.stat().st_size > 20_000, "the screenshot looks blank"


@pytest.mark.slow
def test_model_metrics_tab_groups_the_charts_by_section(
    mlflow_server: MlflowServer,  # noqa: F811
    printed_run: tuple[str, str],
) -> None:
    url, run_id = printed_run
    text = docs_pictures.page_text(
        docs_pictures.page_dom(docs_pictures.tab_url(url, "model-metrics"), height=2400)
    )
    assert TRAINING_VIEW in text
    # One section per key group, with as many charts as the run has metrics in the group.
    logged = Counter(
        key.split("/")[0] for key in mlflow_server.client().get_run(run_id).data.metrics
    )
    assert set(logged) == {"train", "val", "best", "eval", "test", "class_iou", "class_iou_crf"}
    shown = {name: int(n) for name, n in re.findall(r"\b([a-z_]+) \((\d+)\)", text)}
    assert {name: shown.get(name) for name in logged} == dict(logged), text[:3000]


@pytest.mark.slow
def test_without_the_query_the_same_page_is_the_genai_layout(
    printed_run: tuple[str, str],
) -> None:
    url, _run_id = printed_run
    text = docs_pictures.page_text(docs_pictures.page_dom(url.split("?")[0]))
    assert any(marker in text for marker in GENAI_VIEW), text[:2000]
    assert TRAINING_VIEW not in text
