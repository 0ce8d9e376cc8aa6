"""README's pictures, made from real outputs so they can be made again: ``make docs-pictures``.

* ``screenshots``: the MLflow run page of the last ``make run-local`` (its ``summary.json``
  names the run), served from the run folder as ``make mlflow-ui`` serves it, photographed
  with headless Chromium in the model-training layout: the overview (description, metrics,
  datasets), the model-metrics tab (charts grouped by section) and the test step's
  before/after-CRF chart among the artifacts.
* ``graph``: the pipeline's DAG drawn from the compiled YAML (``make compile-pipeline``), one
  box per task, an arrow per dependency, tasks in layers by their longest path from a
  source; matplotlib only, no graphviz.

The Chromium helpers are shared with ``tests/test_mlflow_ui.py``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localrun import DEFAULT_ROOT
from pipeline.compile import DEFAULT_OUT as DEFAULT_PACKAGE
from vitpcm.errors import ConfigError, VitpcmError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEFAULT_OUT = "docs"
# (file in docs/, run page tab or artifact path, window height)
SHOTS: tuple[tuple[str, str, int], ...] = (
    ("mlflow-run.png", "", 1500),
    # Taller windows leave the charts loading in headless Chromium: the first sections only.
    ("mlflow-run-metrics.png", "model-metrics", 2200),
    ("mlflow-run-crf.png", "artifacts/test/class_iou_before_after_crf.png", 1100),
)


def find_chromium() -> str:
    """The headless browser's path.

    Raises:
        ConfigError: none installed (with how to install it).
    """
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "headless Chromium not found (tried: " + ", ".join(BROWSERS) + "); install it with "
        "`make system-deps` (Debian: apt-get install -y chromium)"
    )


def _browser_command(
    browser: str, profile: Path, width: int, height: int, budget_ms: int
) -> list[str]:
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        # No --disable-background-networking & co.: with them the charts never render.
        f"--user-data-dir={profile}",
        # The UI is a single-page app: let its scripts fetch and render before capturing.
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={width},{height}",
    ]


def _run_browser(extra: list[str], url: str, size: tuple[int, int], budget_ms: int) -> str:
    browser = find_chromium()
    with tempfile.TemporaryDirectory(prefix="vitpcm-chromium-") as profile:
        command = [*_browser_command(browser, Path(profile), *size, budget_ms), *extra, url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise VitpcmError(f"chromium failed on {url}: {done.stderr.strip()[-500:]}")
    return done.stdout


def page_dom(url: str, *, width: int = 1400, height: int = 1200, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    return _run_browser(["--dump-dom"], url, (width, height), budget_ms)


def page_text(dom: str) -> str:
    """The visible text of a DOM dump: tags and scripts removed, spaces collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def screenshot(
    url: str, path: str | os.PathLike[str], *, width: int = 1400, height: int = 1500,
    budget_ms: int = 60000,
) -> Path:  # fmt: skip
    """Photograph ``url`` into the PNG ``path`` (written under a temporary name first).

    The charts of the model-metrics tab render late: below about 60 s of virtual time the
    picture shows their spinners.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial.png")
    _run_browser([f"--screenshot={partial}"], url, (width, height), budget_ms)
    if not partial.is_file() or not partial.read_bytes().startswith(b"\x89PNG"):
        partial.unlink(missing_ok=True)
        raise VitpcmError(f"chromium wrote no screenshot of {url}")
    os.replace(partial, target)
    return target


def tab_url(run_url: str, tab: str) -> str:
    """A run page URL opened on another tab (``model-metrics``, ``artifacts/<path>``)."""
    if not tab:
        return run_url
    page, sep, query = run_url.partition("?")
    return f"{page.rstrip('/')}/{tab}{sep}{query}"


def run_screenshots(root: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Photograph the run of the last ``make run-local`` in ``root`` into ``out_dir``.

    Raises:
        ConfigError: no finished run there (run ``make run-local`` first).
    """
    from localrun.mlflow_store import serve_ui
    from localrun.services import free_port
    from vitpcm.tracking.naming import ui_run_url

    summary_path = Path(root) / "summary.json"
    try:
        mlflow = json.loads(summary_path.read_text(encoding="utf-8")).get("mlflow") or {}
    except (OSError, ValueError):
        mlflow = {}
    run_id, experiment_id = mlflow.get("run_id"), mlflow.get("experiment_id")
    if not (run_id and experiment_id):
        raise ConfigError(
            f"{summary_path} names no MLflow run: run `make run-local` first (with MLflow)"
        )
    find_chromium()
    server = serve_ui(root, port=free_port())
    try:
        url = ui_run_url(server.uri, str(experiment_id), str(run_id))
        return [
            screenshot(tab_url(url, tab), Path(out_dir) / name, height=height)
            for name, tab, height in SHOTS
        ]
    finally:
        server.stop()


# --------------------------------------------------------------------------- pipeline graph


def pipeline_tasks(spec: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Task name -> (shown name, names of the tasks it runs after), branches included.

    A task inside a condition sub-DAG depends on what that sub-DAG's task depends on; the
    condition tasks themselves are left out (their tasks stand for them).
    """
    components = spec.get("components", {})
    tasks: dict[str, tuple[str, list[str]]] = {}

    def walk(dag: dict[str, Any], inherited: list[str]) -> None:
        for name, task in dag.get("tasks", {}).items():
            deps = [*inherited, *task.get("dependentTasks", [])]
            ref = task.get("componentRef", {}).get("name", "")
            inner = components.get(ref, {}).get("dag")
            if inner is not None:
                walk(inner, deps)
                continue
            shown = task.get("taskInfo", {}).get("name", name)
            tasks[name] = (shown, deps)

    walk(spec["root"]["dag"], [])
    # Dependencies on a condition task point at the tasks inside it.
    inside: dict[str, list[str]] = {}
    for name, task in spec["root"]["dag"].get("tasks", {}).items():
        ref = task.get("componentRef", {}).get("name", "")
        inner = components.get(ref, {}).get("dag")
        if inner is not None:
            inside[name] = [t for t in inner.get("tasks", {}) if t in tasks]
    for name, (shown, deps) in list(tasks.items()):
        resolved = [d for dep in deps for d in inside.get(dep, [dep]) if d in tasks]
        tasks[name] = (shown, sorted(set(resolved)))
    return tasks


def _layers(tasks: dict[str, tuple[str, list[str]]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in depth:
            if name in seen:
                raise ValueError(f"the pipeline has a cycle through {name}")
            deps = tasks[name][1]
            depth[name] = 1 + max((of(d, (*seen, name)) for d in deps), default=-1)
        return depth[name]

    for name in tasks:
        of(name)
    return depth


def draw_pipeline_graph(package: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Draw the compiled pipeline ``package`` (YAML) as a PNG at ``path``."""
    import yaml
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(package, encoding="utf-8") as handle:
        spec = next(yaml.safe_load_all(handle))
    tasks = pipeline_tasks(spec)
    depth = _layers(tasks)
    rows: dict[int, list[str]] = {}
    for name in sorted(tasks, key=lambda n: (depth[n], n)):
        rows.setdefault(depth[name], []).append(name)
    width = max(len(r) for r in rows.values())
    fig = Figure(figsize=(2.6 * width + 1, 1.1 * len(rows) + 0.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    where: dict[str, tuple[float, float]] = {}
    for level, names in rows.items():
        for i, name in enumerate(names):
            where[name] = ((i + 0.5) * width / len(names), -level)
    for name, (_shown, deps) in tasks.items():
        for dep in deps:
            (x0, y0), (x1, y1) = where[dep], where[name]
            ax.annotate(
                "", xy=(x1, y1 + 0.22), xytext=(x0, y0 - 0.22),
                arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 1.2},
            )  # fmt: skip
    for name, (x, y) in where.items():
        ax.text(
            x, y, tasks[name][0], ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.5", "fc": "#e8f0fb", "ec": "#4c72b0"},
        )  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    title = spec.get("pipelineInfo", {}).get("name", "pipeline")
    ax.set_title(f"{title}: {len(tasks)} tasks (from {Path(package).name})", fontsize=10)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial.png")
    fig.savefig(partial, format="png", dpi=110)
    os.replace(partial, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m localrun.docs_pictures {screenshots,graph}``."""
    parser = argparse.ArgumentParser(
        prog="python -m localrun.docs_pictures", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    shots = sub.add_parser("screenshots", help="MLflow run page of the last make run-local")
    shots.add_argument("--root", default=DEFAULT_ROOT, help=f"run folder ({DEFAULT_ROOT})")
    shots.add_argument("--out", default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    graph = sub.add_parser("graph", help="the pipeline graph from the compiled YAML")
    graph.add_argument("--package", default=DEFAULT_PACKAGE, help=f"({DEFAULT_PACKAGE})")
    graph.add_argument("--out", default=f"{DEFAULT_OUT}/pipeline-graph.png", help="PNG path")
    args = parser.parse_args(argv)
    try:
        if args.what == "screenshots":
            written = run_screenshots(args.root, args.out)
        else:
            if not Path(args.package).is_file():
                raise ConfigError(f"{args.package} does not exist: run `make compile-pipeline`")
            written = [draw_pipeline_graph(args.package, args.out)]
    except VitpcmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
