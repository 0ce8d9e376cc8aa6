"""GPU placement step: the scheduling settings of the training pod, decided by ``gpus``.

The GPU request, node labels and tolerations are compile-time settings
(:func:`pipeline.cluster.gpu_placement`), but whether they apply depends on the run's
``gpus``, known only when the run starts. This step passes them on when ``gpus > 0`` and
passes nothing otherwise, so a CPU-only run neither waits for GPU nodes nor lands on them.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def gpu_placement(
    gpus: int,
    resource: str = "nvidia.com/gpu",
    node_selector: dict = {},  # noqa: B006  (kfp takes the default as a constant)
    tolerations: list = [],  # noqa: B006
    distributed: str = "none",
) -> NamedTuple(
    "Placement", [("resource", str), ("count", str), ("node_selector", dict), ("tolerations", list)]
):
    """Scheduling settings of the training pod: all of them with GPUs, none without.

    Args:
        gpus: GPUs the training pod asks for.
        resource: Extended resource name of the GPUs.
        node_selector: Node labels the training pod requires when it has GPUs.
        tolerations: Tolerations of the training pod when it has GPUs.
        distributed: none, or the kind of job the training pod launches (trainjob, tfjob):
            then its workers get the GPUs, and the launching pod none.

    Returns:
        resource and count (both empty without GPUs), node_selector and tolerations (empty
        without GPUs). The count is a string on purpose: the KFP driver (2.5 through 2.17,
        ``resolvePodSpecInputRuntimeParameter``) reads a parameterised accelerator count with
        ``GetStringValue()``, so an integer parameter there resolves to "" and the GPU
        request is silently dropped.
    """
    from collections import namedtuple

    out = namedtuple("Placement", ["resource", "count", "node_selector", "tolerations"])
    if gpus <= 0 or distributed != "none":
        return out("", "", {}, [])
    return out(resource, str(gpus), dict(node_selector), list(tolerations))
