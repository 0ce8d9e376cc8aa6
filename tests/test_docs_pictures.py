"""``make docs-pictures``: the pipeline graph from the compiled YAML, and its refusals.

The screenshots themselves need Chromium and a finished run (``tests/test_mlflow_ui.py``
photographs a run page with the same helpers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from localrun import docs_pictures
from pipeline.compile import compile_pipeline


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("graph") / "p.yaml", "single-node")


def test_graph_has_every_task_and_dependency_of_the_package(package: Path, tmp_path) -> None:
    spec = next(yaml.safe_load_all(package.read_text()))
    tasks = docs_pictures.pipeline_tasks(spec)
    root = spec["root"]["dag"]["tasks"]
    # No condition here: the graph's tasks and edges are the root DAG's, read independently.
    assert set(tasks) == set(root)
    for name, task in root.items():
        producers = {
            a["taskOutputArtifact"]["producerTask"]
            for a in task.get("inputs", {}).get("artifacts", {}).values()
            if "taskOutputArtifact" in a
        }
        assert producers <= set(tasks[name][1]), name
        assert set(task.get("dependentTasks", [])) == set(tasks[name][1]), name
    assert tasks["check-run"] == ("check dataset and config", [])
    assert "check-run" in tasks["download-data"][1] and "check-run" in tasks["train-model"][1]

    out = docs_pictures.draw_pipeline_graph(package, tmp_path / "graph.png")
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 400
    assert not list(tmp_path.glob(".*partial*"))


def test_condition_branches_are_drawn_as_their_tasks(tmp_path: Path) -> None:
    spec = {
        "root": {
            "dag": {
                "tasks": {
                    "a": {"taskInfo": {"name": "A"}, "componentRef": {"name": "comp-a"}},
                    "cond": {"componentRef": {"name": "comp-cond"}, "dependentTasks": ["a"]},
                    "z": {"componentRef": {"name": "comp-z"}, "dependentTasks": ["cond"]},
                }
            }
        },
        "components": {
            "comp-cond": {
                "dag": {"tasks": {"b": {"componentRef": {"name": "comp-b"}}}},
            }
        },
    }
    tasks = docs_pictures.pipeline_tasks(spec)
    assert tasks == {"a": ("A", []), "b": ("b", ["a"]), "z": ("z", ["b"])}


def test_refusals_name_what_to_run_first(tmp_path: Path, capsys) -> None:
    assert docs_pictures.main(["graph", "--package", str(tmp_path / "none.yaml")]) == 2
    assert "run `make compile-pipeline`" in capsys.readouterr().err
    assert docs_pictures.main(["screenshots", "--root", str(tmp_path)]) == 2
    assert "run `make run-local` first" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tab_urls_keep_the_view_query() -> None:
    url = "http://h/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert docs_pictures.tab_url(url, "model-metrics") == (
        "http://h/#/experiments/1/runs/abc/model-metrics?workflowType=machine_learning"
    )
    assert docs_pictures.tab_url(url, "") == url
