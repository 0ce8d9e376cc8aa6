"""The MLflow dashboard shows a tracked run's mIoU: headless Chromium against a real server.

Needs the Debian ``chromium`` package (CI installs it); skipped with a reason when absent.
The screenshot is for people (kept under the test's tmp folder); the check reads the DOM.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.mlflow_server import MlflowServer, mlflow_server, s3_server  # noqa: F401
from helpers.tiny import tiny_config
from vitpcm.tracking import RunTracker

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str:
    for name in _BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "headless Chromium not found (tried: " + ", ".join(_BROWSERS) + "); install it with "
        "`apt-get install -y chromium` to check the MLflow UI"
    )


def _chromium_args(browser: str, profile: Path, height: int = 1000) -> list[str]:
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # The UI is a single-page app: let its scripts fetch and render before capturing.
        "--virtual-time-budget=15000",
        f"--window-size=1400,{height}",
    ]


@pytest.mark.slow
def test_run_page_shows_the_miou(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    browser = _chromium()
    cfg = tiny_config("mlflow.experiment=test-ui")
    with RunTracker(cfg, tmp_path / "out", tracking_uri=mlflow_server.uri) as tracker:
        for epoch in range(3):
            tracker.epoch_callback(epoch, {"loss": 1.0 - 0.2 * epoch, "val_miou": 0.2 * epoch})
        tracker.log_results({"miou": 0.6875, "pixel_accuracy": 0.9375}, "val")
        run_id = tracker.run_id
    assert run_id
    experiment_id = mlflow_server.client().get_run(run_id).info.experiment_id
    url = f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/{run_id}"

    screenshot = tmp_path / "run-page.png"
    shot = subprocess.run(
        # Tall enough that the metrics table is in the picture, below tags and params.
        [
            *_chromium_args(browser, tmp_path / "profile-shot", 1800),
            f"--screenshot={screenshot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 20_000, "the screenshot looks blank"

    dom = subprocess.run(
        [*_chromium_args(browser, tmp_path / "profile-dom"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert run_id in page or tracker.run_name in page
    assert "miou_val" in page
    assert "0.6875" in page
