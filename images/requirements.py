"""Write the image's pip requirements from pyproject.toml, so images and CI share one set of pins.

The CPU image installs ``[project].dependencies`` exactly as written. The GPU trainer swaps
one line: ``tensorflow-cpu==X`` becomes ``tensorflow[and-cuda]==X`` (same version), because
both distributions ship the ``tensorflow`` module and cannot be installed side by side.
Everything else stays byte-identical, so a pin changed in pyproject.toml reaches CI and both
images at once.

Run with the image's own interpreter (Python 3.11 has :mod:`tomllib`)::

    python3 requirements.py pyproject.toml --variant gpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

VARIANTS = ("cpu", "gpu")

# The distribution name at the start of a PEP 508 requirement (before extras/specifiers).
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalise(name: str) -> str:
    """PEP 503 normalised project name: ``Tensorflow_CPU`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies(pyproject: Path) -> list[str]:
    """The ``[project].dependencies`` list of a pyproject.toml, in file order.

    Raises:
        SystemExit: when the file is missing or has no dependency list.
    """
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(
            f"error: {pyproject} not found; pass the repository's pyproject.toml"
        ) from None
    deps = data.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not deps:
        raise SystemExit(f"error: {pyproject} has no [project].dependencies list")
    return [str(d) for d in deps]


def image_requirements(dependencies: Sequence[str], variant: str) -> list[str]:
    """The requirement lines for one image variant.

    Args:
        dependencies: ``[project].dependencies`` as written in pyproject.toml.
        variant: ``cpu`` (unchanged) or ``gpu`` (``tensorflow-cpu`` -> ``tensorflow[and-cuda]``,
            keeping its version specifier and any environment marker).

    Raises:
        SystemExit: for an unknown variant, or a gpu variant without a tensorflow-cpu pin.
    """
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "cpu":
        return list(dependencies)
    out: list[str] = []
    swapped = False
    for dep in dependencies:
        match = _NAME.match(dep)
        if match and _normalise(match.group(1)) == "tensorflow-cpu":
            rest = dep[match.end() :]
            out.append(f"tensorflow[and-cuda]{rest}")
            swapped = True
        else:
            out.append(dep)
    if not swapped:
        raise SystemExit(
            "error: no tensorflow-cpu requirement in pyproject.toml to swap for the GPU image; "
            "pin tensorflow-cpu there"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the requirements of one variant, one per line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, help="path to pyproject.toml")
    parser.add_argument("--variant", choices=VARIANTS, default="cpu")
    args = parser.parse_args(argv)
    lines = image_requirements(project_dependencies(args.pyproject), args.variant)
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
