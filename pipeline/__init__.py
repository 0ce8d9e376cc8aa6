"""Kubeflow wiring of the ViT-PCM steps: the step table, the DAG, compilation, submission,
schedules. Submodules are imported where used (``python -m pipeline.compile`` and friends).
"""
