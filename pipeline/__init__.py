"""Kubeflow wiring of the ViT-PCM steps: DAG, compilation, submission, schedules, local runs.

Submodules are imported where used (``python -m pipeline.compile`` and friends); this
package imports nothing itself, so ``pipeline.images`` stays cheap for the Makefile.
"""
