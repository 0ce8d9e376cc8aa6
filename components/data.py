"""Data steps: fetch (or synthesise) a dataset, then convert it to sharded TFRecords.

Component bodies are copied verbatim into the compiled pipeline and run in a fresh
interpreter, so each imports what it needs inside the function.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def download_data(
    raw: Output[Dataset],
    dataset: str = "synthetic",
    mirror: str = "",
    skip_checksum: bool = False,
    keep_archives: bool = False,
    synthetic_train: int = 200,
    synthetic_val: int = 50,
    synthetic_test: int = 50,
    synthetic_size: int = 128,
    seed: int = 0,
    data_version: str = "",
):
    """Download and unpack a dataset, or generate the synthetic one, into ``raw``.

    Args:
        raw: Output folder: ``VOCdevkit/`` (voc12, synthetic) or ``coco2014/`` (coco14).
        dataset: A registered dataset (``vitpcm.data.sources.dataset_names()``).
        mirror: Base URL serving the official archive names; empty for the official hosts.
        skip_checksum: Warn instead of failing when an archive does not match its MD5.
        keep_archives: Keep the downloaded archives next to the unpacked data.
        synthetic_train: Synthetic training images.
        synthetic_val: Synthetic validation images.
        synthetic_test: Synthetic test images (unlabelled).
        synthetic_size: Synthetic image side in pixels.
        seed: Seed of the synthetic generator.
        data_version: Any label of the dataset's version (e.g. a date): part of the step's
            cache key, so a new value downloads again instead of reusing a cached copy.
    """
    import os
    import shutil

    if dataset == "synthetic":
        from vitpcm.data.synth import make_synthetic

        make_synthetic(
            raw.path,
            train=synthetic_train,
            val=synthetic_val,
            test=synthetic_test,
            size=synthetic_size,
            seed=seed,
            progress=False,
        )
    else:
        from vitpcm.data.download import DOWNLOADS_DIR, download_dataset

        download_dataset(
            dataset, raw.path, mirror=mirror or None, skip_checksum=skip_checksum, progress=False
        )
        if not keep_archives:
            # The archives double the artifact's size in the object store and are not read
            # again: a repeated run is served from the step cache.
            shutil.rmtree(os.path.join(raw.path, DOWNLOADS_DIR), ignore_errors=True)
    raw.metadata["dataset"] = dataset
    raw.metadata["data_version"] = data_version


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def convert_data(
    raw: Input[Dataset],
    tfrecords: Output[Dataset],
    dataset: str = "synthetic",
    shards: int = 0,
    workers: int = 0,
    skip_bad: bool = False,
    data_version: str = "",
) -> str:
    """Convert a downloaded dataset to sharded TFRecords plus ``dataset.json``.

    Args:
        raw: Folder written by download_data.
        tfrecords: Output folder of ``<split>-<shard>-of-<n>.tfrecord`` files.
        dataset: A registered dataset (``vitpcm.data.sources.dataset_names()``).
        shards: Shards per split; 0 for about 1000 images per shard.
        workers: Encoding processes; 0 for all CPU cores.
        skip_bad: Skip unreadable samples (listed in dataset.json) instead of failing.
        data_version: The download's data_version, part of this step's cache key too.

    Returns:
        The URI of ``tfrecords``, which the train step reads the shards from.
    """
    from vitpcm.data.convert import convert_dataset

    info = convert_dataset(
        "voc12" if dataset == "synthetic" else dataset,
        raw.path,
        tfrecords.path,
        shards=shards or None,
        workers=workers or None,
        skip_bad=skip_bad,
        progress=False,
    )
    # Shown next to the artifact in the Kubeflow UI.
    tfrecords.metadata["dataset"] = dataset
    tfrecords.metadata["data_version"] = data_version
    tfrecords.metadata["num_classes"] = int(info["num_classes"])
    for split, entry in info["splits"].items():
        tfrecords.metadata[f"{split}_examples"] = int(entry["num_examples"])
    tfrecords.metadata["skipped"] = len(info.get("skipped") or [])
    # The train step reads the shards from the artifact store itself (KFP would download an
    # input artifact into its pod, unused when the step only launches a distributed job).
    return tfrecords.uri
