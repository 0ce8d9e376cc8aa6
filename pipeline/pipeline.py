"""The ViT-PCM DAG: download -> convert -> train -> evaluate -> infer + CRF -> register.

One builder, :func:`build_pipeline`, makes every pipeline from the step table
(:data:`pipeline.steps.STEPS`) and the run form's fields (:data:`FIELDS`):

* :data:`vitpcm_pipeline` (``vitpcm-wsss``), the one to upload: training runs in the step's
  own GPU pod, or, with ``distributed``, the same step launches a Kubeflow Trainer v2
  TrainJob or a Training Operator TFJob and waits for it; one step either way, so no branch.
* :data:`vitpcm_single_node_pipeline` (``vitpcm-wsss-single-node``): training in the step's
  pod only, so ``kfp.local`` can run it (``make run-local``). It returns every step's outputs.
* :func:`prepared_data_pipeline`: the single-node DAG starting from a dataset folder on disk.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from pipeline import cluster
from pipeline.steps import BY_TASK, STEPS, Dag, add_step
from vitpcm.data.sources import dataset_names, get_source

PIPELINE_NAME = "vitpcm-wsss"
SINGLE_NODE_PIPELINE_NAME = "vitpcm-wsss-single-node"


class Field(NamedTuple):
    """A field of the run form (a pipeline parameter): its type, default and help."""

    type: type
    default: Any
    help: str


FIELDS: dict[str, Field] = {
    "dataset": Field(str, "voc12", f"One of {', '.join(dataset_names())} (voc12: VOC 2012 + "
                     "SBD; synthetic: a small built-in set)."),
    "config": Field(str, "", "Config name from configs/; empty follows the dataset ("
                    + ", ".join(f"{n}: {get_source(n).config}" for n in dataset_names()) + ")."),
    "pretrained": Field(str, "", "Backbone checkpoint: empty for the config's (the public "
                        "Google ViT .npz of the paper configs), a path, s3:// or https:// URI, "
                        "or none for random weights."),
    "epochs": Field(int, 0, "Fine-tuning epochs; 0 keeps the config's value."),
    "overrides": Field(str, "", 'Space-separated KEY=VALUE config overrides, e.g. '
                       '"train.lr=3e-4".'),
    "gpus": Field(int, 1, "GPUs of the training pod (of each worker when distributed): 0, 1, "
                  "2, 4, 8, 16."),
    "distributed": Field(str, "none", "none (train in the step's pod), trainjob (Kubeflow "
                         "Trainer v2 TrainJob, manifests/trainer/ applied) or tfjob (Training "
                         "Operator v1 TFJob)."),
    "workers": Field(int, 2, "Worker pods of a distributed job."),
    "mirror": Field(str, "", "Base URL serving the official dataset archives; empty for the "
                    "official hosts."),
    "crf": Field(bool, True, "Refine the pseudo masks with the dense CRF."),
    "mlflow_tracking_uri": Field(str, cluster.DEFAULT_MLFLOW_URI, "MLflow server; empty to "
                                 "skip MLflow."),
    "experiment": Field(str, "vitpcm", "MLflow experiment."),
    "registered_model": Field(str, "", "MLflow registered model name; empty for the "
                              "config's (mlflow.registered_model: vitpcm-voc12, vitpcm-coco14, "
                              "vitpcm-synthetic)."),
    "checkpoint_root": Field(str, "", "s3:// prefix for training checkpoints (resume after "
                             "a restart); required when distributed."),
    "shards": Field(int, 0, "TFRecord shards per split; 0 for about 1000 images per shard."),
    "convert_workers": Field(int, cluster.CONVERT_WORKERS, "TFRecord encoding processes; 0 "
                             "for every core of the machine."),
    "crf_workers": Field(int, cluster.CRF_WORKERS, "CRF processes; 0 keeps the config's "
                         "crf.workers."),
    # = vitpcm data synth's defaults (vitpcm.data.synth)
    "synthetic_train": Field(int, 2000, "Synthetic training images (dataset=synthetic)."),
    "synthetic_val": Field(int, 100, "Synthetic validation images."),
    "synthetic_test": Field(int, 200, "Synthetic test images."),
    "synthetic_size": Field(int, 128, "Synthetic image side in pixels."),
    "data_version": Field(str, "", "Any label of the dataset's version (e.g. 2026-12): a new "
                          "value makes the data steps fetch and convert again instead of "
                          "reusing their cached outputs."),
    "deploy": Field(bool, False, 'Point the KServe InferenceService "vitpcm" at the model '
                    "when this run makes it the champion (manifests/serving/ applied); off: "
                    "MLflow only."),
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One pipeline: the run form it shows, and the steps of the table it leaves out.

    Attributes:
        leaves_out: steps of :data:`pipeline.steps.STEPS` not in this pipeline.
        fields: the form's fields, in order (:data:`FIELDS`).
        defaults: defaults of this form that differ from the field's.
        fixed: run values that are not on this form (a step's argument that names neither
            is left to the component's default).
        returns: the pipeline returns every step's outputs (kfp.local reads them).
    """

    name: str
    description: str
    summary: str
    leaves_out: tuple[str, ...]
    fields: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    returns: bool = False

    @property
    def steps(self) -> tuple[str, ...]:
        """The task names of the pipeline's steps, in the table's order."""
        return tuple(step.task for step in STEPS if step.task not in self.leaves_out)


_SINGLE_NODE_FIXED = {"distributed": "none", "workers": 2}
CLUSTER = Variant(
    PIPELINE_NAME,
    "ViT-PCM weakly supervised semantic segmentation (ECCV 2022): data, training on GPUs "
    "(optionally multi-worker), evaluation, CRF pseudo masks, MLflow registration.",
    "Train and evaluate ViT-PCM, and register the model in MLflow.",
    leaves_out=("importer",),
    fields=(
        "dataset", "config", "pretrained", "epochs", "overrides", "gpus", "distributed",
        "workers", "mirror", "crf", "mlflow_tracking_uri", "experiment", "registered_model",
        "checkpoint_root", "shards", "data_version", "deploy",
    ),
    fixed={"convert_workers": cluster.CONVERT_WORKERS, "crf_workers": cluster.CRF_WORKERS},
)  # fmt: skip
SINGLE_NODE = Variant(
    SINGLE_NODE_PIPELINE_NAME,
    "ViT-PCM on one node (kfp.local, or a cluster without the Training Operator).",
    "Train and evaluate ViT-PCM on one node, and register the model in MLflow.",
    leaves_out=("importer", "deploy-model"),
    fields=(
        "dataset", "config", "pretrained", "epochs", "overrides", "gpus", "mirror", "crf",
        "mlflow_tracking_uri", "experiment", "registered_model", "checkpoint_root", "shards",
        "convert_workers", "crf_workers", "synthetic_train", "synthetic_val",
        "synthetic_test", "synthetic_size", "data_version",
    ),
    defaults={"dataset": "synthetic", "mlflow_tracking_uri": ""},
    fixed=_SINGLE_NODE_FIXED,
    returns=True,
)  # fmt: skip
PREPARED_DATA = Variant(
    f"{SINGLE_NODE_PIPELINE_NAME}-prepared-data",
    "ViT-PCM on one node from a dataset folder already on disk.",
    "Train and evaluate ViT-PCM on one node from a dataset folder, and register the model.",
    leaves_out=("download-data", "deploy-model"),
    fields=(
        "dataset", "config", "pretrained", "epochs", "overrides", "gpus", "crf",
        "mlflow_tracking_uri", "experiment", "registered_model", "checkpoint_root", "shards",
        "convert_workers", "crf_workers",
    ),
    defaults={"mlflow_tracking_uri": ""},
    fixed={**_SINGLE_NODE_FIXED, "data_version": ""},
    returns=True,
)  # fmt: skip


def outputs_of(variant: Variant) -> dict[str, tuple[str, str]]:
    """What the pipeline returns: output name -> (task, the task's output)."""
    if not variant.returns:
        return {}
    return {
        name: (task, key) for task in variant.steps for name, key in BY_TASK[task].outputs.items()
    }


def _output_type(task: str, key: str) -> type:
    """The artifact class of a step's output (``Output[Dataset]`` -> ``Dataset``)."""
    hints = typing.get_type_hints(BY_TASK[task].component.python_func, include_extras=True)
    return typing.get_args(hints[key])[0]


def build_pipeline(variant: Variant, **fixed: Any) -> GraphComponent:
    """The pipeline of ``variant``: its form, then every step of the table it names.

    Args:
        variant: which pipeline.
        **fixed: more run values that are not on the form (e.g. ``source_dir``).
    """
    form = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=variant.defaults.get(name, FIELDS[name].default),
            annotation=FIELDS[name].type,
        )
        for name in variant.fields
    ]
    returned = outputs_of(variant)
    returns: Any = inspect.Signature.empty
    if returned:
        returns = NamedTuple(  # type: ignore[misc]
            "SingleNodeOutputs", [(n, _output_type(*where)) for n, where in returned.items()]
        )

    def dag(*args: Any) -> Any:
        built = Dag({**variant.fixed, **fixed, **dict(zip(variant.fields, args, strict=True))})
        for task in variant.steps:
            add_step(built, BY_TASK[task])
        if returned:
            return returns(*(built.tasks[t].outputs[k] for t, k in returned.values()))
        return None

    dag.__signature__ = inspect.Signature(form, return_annotation=returns)  # type: ignore[attr-defined]
    # kfp takes each field's help from the docstring's Args section.
    args = "\n".join(f"    {name}: {FIELDS[name].help}" for name in variant.fields)
    dag.__doc__ = f"{variant.summary}\n\nArgs:\n{args}\n"
    return dsl.pipeline(name=variant.name, description=variant.description)(dag)


vitpcm_pipeline = build_pipeline(CLUSTER)
vitpcm_single_node_pipeline = build_pipeline(SINGLE_NODE)


def prepared_data_pipeline(source_dir: str) -> GraphComponent:
    """A single-node pipeline that starts from an already downloaded dataset folder.

    The folder (holding ``VOCdevkit/`` or ``coco2014/``) enters through ``dsl.importer``
    instead of the download step; everything after it is the single-node DAG.
    """
    return build_pipeline(PREPARED_DATA, source_dir=source_dir)
