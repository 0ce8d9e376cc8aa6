"""The pipeline's first step: dataset, config and pre-trained weights fit together.

It runs before any byte of a dataset is downloaded, and names the config the other steps
use (the dataset's default when none is given), so a mismatch fails in seconds with one
clear message instead of at training, hours of download and conversion later.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def check_run(dataset: str, config: str = "", overrides: str = "", pretrained: str = "") -> str:
    """Check the run's dataset, config and overrides; return the config name to train with.

    Args:
        dataset: A registered dataset (``vitpcm.data.sources.dataset_names()``).
        config: Config name or path; empty for the dataset's default
            (its source's ``config``, ``vitpcm.data.sources``).
        overrides: Space-separated ``KEY=VALUE`` config overrides.
        pretrained: The training step's backbone checkpoint: empty keeps the config's,
            ``none`` means random weights, anything else replaces ``model.pretrained``.

    Returns:
        The config name or path the training step loads.
    """
    import shlex
    import sys

    from vitpcm.errors import ConfigError
    from vitpcm.run_plan import config_for, load_checked_config

    sets = shlex.split(overrides)
    if pretrained:
        sets.append(
            "model.pretrained=null" if pretrained == "none" else f"model.pretrained={pretrained}"
        )
    try:
        # A local checkpoint path is one inside the training pod, not this one.
        load_checked_config(dataset, config or None, sets, local_files=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise
    return config_for(dataset, config or None)
