"""Derive the field lists a Kubeflow Pipelines backend knows from its .proto files.

The backend (API server and v2 driver) reads the compiled pipeline with Go protobuf types
generated from two files: ``api/v2alpha1/pipeline_spec.proto`` (the pipeline spec) and
``kubernetes_platform/proto/kubernetes_executor_config.proto`` (what kfp-kubernetes writes).
``protojson.Unmarshal`` rejects a field its message does not declare, so a field the SDK
writes that an older backend lacks fails the step ("unknown field"). This script reads those
two files from a kubeflow/pipelines checkout at the commits a backend release compiles
(``go.mod``: the tag itself when it has ``replace ... => ./api``, otherwise the pinned
pseudo-version commit) and writes, per message, its JSON field names and their types::

    git clone https://github.com/kubeflow/pipelines kfp
    python tests/data/kfp_backend/derive_fields.py --repo kfp --tag 2.5.0 \\
        --api 2.5.0 --platform 2.5.0 > tests/data/kfp_backend/fields-2.5.0.yaml

Only names and types are kept (data for ``tests/test_backend_compat.py``), not the files.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Sequence

import yaml

API_FILE = "api/v2alpha1/pipeline_spec.proto"
PLATFORM_FILE = "kubernetes_platform/proto/kubernetes_executor_config.proto"
SCALARS = {
    "string",
    "bool",
    "bytes",
    "double",
    "float",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "sint32",
    "sint64",
    "fixed32",
    "fixed64",
}
# Well-known types: free-form JSON (Struct/Value/ListValue) or a JSON scalar.
WELL_KNOWN = {
    "google.protobuf.Struct": "struct",
    "google.protobuf.Value": "value",
    "google.protobuf.ListValue": "list_value",
    "google.protobuf.Duration": "string",
    "google.rpc.Status": "value",
}
_TOKEN = re.compile(r'"[^"]*"|[A-Za-z_][\w.]*|\d+|[{}<>;=,\[\]()]|\S')


def _tokens(text: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return _TOKEN.findall(text)


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def parse(text: str) -> tuple[str, dict[str, list[tuple[str, str, str]]], set[str]]:
    """(package, {message full name: [(json name, type as written, kind)]}, enum names)."""
    toks = _tokens(text)
    package = ""
    messages: dict[str, list[tuple[str, str, str]]] = {}
    enums: set[str] = set()
    scope: list[tuple[str, str]] = []  # (kind, full name)
    i = 0

    def skip_statement(j: int) -> int:
        depth = 0
        while j < len(toks):
            if toks[j] == "{":
                depth += 1
            elif toks[j] == "}":
                depth -= 1
                if depth == 0:
                    return j + 1
            elif toks[j] == ";" and depth == 0:
                return j + 1
            j += 1
        return j

    while i < len(toks):
        tok = toks[i]
        prefix = scope[-1][1] if scope else package
        if tok == "package":
            package, i = toks[i + 1], i + 3
        elif tok in ("syntax", "import", "option", "reserved", "extensions"):
            i = skip_statement(i)
        elif tok in ("message", "enum"):
            full = f"{prefix}.{toks[i + 1]}"
            (messages.setdefault(full, []) if tok == "message" else enums.add(full))
            scope.append((tok, full))
            i += 3
        elif tok == "oneof":
            scope.append(("oneof", scope[-1][1]))
            i += 3
        elif tok == "}":
            scope.pop()
            i += 1
        elif scope and scope[-1][0] == "enum":
            i = skip_statement(i)
        elif tok == "map":
            # map < K , V > name = N ;
            value_type, name = toks[i + 4], toks[i + 6]
            messages[scope[-1][1]].append((_json_name(name), value_type, "map"))
            i = skip_statement(i)
        elif scope:
            kind = "single"
            if tok in ("repeated", "optional"):
                kind = "repeated" if tok == "repeated" else "single"
                i += 1
            field_type, name = toks[i], toks[i + 1]
            messages[scope[-1][1]].append((_json_name(name), field_type, kind))
            i = skip_statement(i)
        else:
            i += 1
    return package, messages, enums


def _resolve(type_name: str, scope: str, known: set[str], enums: set[str]) -> str:
    if type_name in SCALARS:
        return type_name
    if type_name in WELL_KNOWN:
        return WELL_KNOWN[type_name]
    parts = scope.split(".")
    for cut in range(len(parts), -1, -1):
        candidate = ".".join([*parts[:cut], type_name])
        if candidate in enums:
            return "enum"
        if candidate in known:
            return candidate
    raise ValueError(f"cannot resolve type {type_name!r} in {scope}")


def derive(sources: Sequence[str]) -> dict[str, dict[str, str]]:
    """{message: {json field: type}}; types are scalars, enum, struct/value/list_value or
    message names, with ``[]`` for repeated and ``map:`` for maps."""
    parsed = [parse(text) for text in sources]
    known = {name for _, messages, _ in parsed for name in messages}
    enums = {name for _, _, found in parsed for name in found}
    out: dict[str, dict[str, str]] = {}
    for _, messages, _ in parsed:
        for message, fields in messages.items():
            entry: dict[str, str] = {}
            for json_name, type_name, kind in fields:
                resolved = _resolve(type_name, message, known, enums)
                if kind == "map":
                    resolved = "map:" + resolved
                elif kind == "repeated":
                    resolved += "[]"
                entry[json_name] = resolved
            out[message] = dict(sorted(entry.items()))
    return dict(sorted(out.items()))


def _show(repo: str, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def main(argv: Sequence[str] | None = None) -> int:
    """Print the YAML field lists of one backend release."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="kubeflow/pipelines git checkout")
    parser.add_argument("--tag", required=True, help="backend release tag")
    parser.add_argument("--api", required=True, help=f"commit of {API_FILE} it compiles")
    parser.add_argument("--platform", required=True, help=f"commit of {PLATFORM_FILE}")
    args = parser.parse_args(argv)
    fields = derive(
        [_show(args.repo, args.api, API_FILE), _show(args.repo, args.platform, PLATFORM_FILE)]
    )
    sys.stdout.write(
        f"# Field lists of the Kubeflow Pipelines backend {args.tag}, derived by\n"
        f"# tests/data/kfp_backend/derive_fields.py from kubeflow/pipelines\n"
        f"#   {API_FILE} at {args.api}\n#   {PLATFORM_FILE} at {args.platform}\n"
        f"# (the commits backend {args.tag}'s go.mod compiles). Per message: JSON field -> type.\n"
    )
    yaml.safe_dump({"tag": args.tag, "messages": fields}, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
