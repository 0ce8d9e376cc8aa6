"""A fake Kubernetes API server over HTTP that validates what it receives.

The launchers talk to it through the real ``kubernetes`` Python client, so the requests
are the ones a cluster would get. It serves the custom resources it is given the CRD
schemas of (``tests/data/kube_crds/``, derived from the operators' releases), plus pod
lists and pod logs::

    api = FakeKubeAPI({"trainjobs": "trainjob-v2.3.0.json"})
    with api:
        custom, core = api.clients()
        api.script("trainjob", "my-job", ["Created", "Complete"])   # conditions, one per GET
        api.add_pod("job-node-0-0", labels={...}, log=["line 1", "line 2"])
        ...
        api.requests   # every request: method, path, query, body
        api.calls()    # {(verb, group, resource)} as RBAC names them

A created object is checked like ``kubectl apply --validate=strict`` would have the server
check it: every field known to the CRD's schema (unknown fields are errors, not pruned),
types, enums, required fields, limits; ``metadata`` as ObjectMeta. A refused object gets
422 with the reasons, an unknown resource type 404 "the server could not find the
requested resource", an existing name 409.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CRDS = Path(__file__).resolve().parents[1] / "data" / "kube_crds"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_OBJECT_META = {"name", "namespace", "labels", "annotations", "ownerReferences", "generateName"}
_OWNER_REFERENCE = {"apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion"}


def load_crd(name: str) -> dict[str, Any]:
    """One derived CRD document: group, version, kind, schema, source."""
    return json.loads((CRDS / name).read_text())


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What a strict API server would refuse in ``value`` (an empty list: accepted)."""
    errors: list[str] = []
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            errors.append(f"{path}: expected an integer or a string, got {value!r}")
        elif (
            isinstance(value, str)
            and path.split(".")[-2:-1] in (["limits"], ["requests"])
            and not _QUANTITY.match(value)
        ):
            errors.append(f"{path}: {value!r} is not a quantity")
        return errors
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            where = f"{path}.{key}"
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], where)
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, where)
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f'{where}: unknown field "{key}"')
        return errors
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
        return errors
    expected = {
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
    }.get(kind)
    if expected is not None:
        if not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool)):
            return [f"{path}: expected {kind}, got {value!r}"]
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{path}: {value!r} not one of {schema['enum']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below {schema['minimum']}")
    return errors


def metadata_errors(meta: Any, namespace: str) -> list[str]:
    """ObjectMeta checks: known fields, a DNS-label name, valid labels, owner references."""
    if not isinstance(meta, dict):
        return ["metadata: expected an object"]
    errors = [f'metadata.{k}: unknown field "{k}"' for k in meta if k not in _OBJECT_META]
    name = meta.get("name", "")
    if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS label of at most 63 characters")
    if meta.get("namespace", namespace) != namespace:
        errors.append("metadata.namespace: does not match the request's namespace")
    for group in ("labels", "annotations"):
        for key, value in (meta.get(group) or {}).items():
            if not isinstance(value, str):
                errors.append(f"metadata.{group}.{key}: values are strings, got {value!r}")
            elif group == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                errors.append(f"metadata.labels.{key}: {value!r} is not a label value")
    for ref in meta.get("ownerReferences") or []:
        if set(ref) - _OWNER_REFERENCE or not {"apiVersion", "kind", "name", "uid"} <= set(ref):
            errors.append(f"metadata.ownerReferences: bad reference {ref!r}")
    return errors


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class _Resource:
    group: str
    version: str
    plural: str
    kind: str
    schema: dict[str, Any]


@dataclass
class FakeKubeAPI:
    """The server; ``crds`` maps a plural to a file of ``tests/data/kube_crds/``."""

    crds: dict[str, str]
    namespace: str = "team-a"
    requests: list[Recorded] = field(default_factory=list)
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    log_open: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.resources: dict[str, _Resource] = {}
        for plural, name in self.crds.items():
            doc = load_crd(name)
            self.resources[plural] = _Resource(
                doc["group"], doc["version"], plural, doc["kind"], doc["schema"]
            )
        self.scripts: dict[tuple[str, str], list[str]] = {}
        self.pods: list[dict[str, Any]] = []
        self.logs: dict[str, list[str]] = {}
        self.running: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- set-up ---------------------------------------------------------------------------

    def script(self, plural: str, name: str, states: list[str]) -> None:
        """The job's conditions: each GET reveals the next state (the last one stays)."""
        self.scripts[(plural, name)] = list(states)

    def add_object(self, plural: str, body: dict[str, Any]) -> None:
        self.objects[(plural, body["metadata"]["name"])] = body

    def add_pod(
        self,
        name: str,
        labels: dict[str, str],
        log: list[str],
        running: bool = False,
        container: str = "node",
    ) -> None:
        """A pod with ``labels`` whose container log is ``log``: a ``running`` one keeps its
        followed log open (until the server stops), a finished one ends it."""
        self.pods.append(
            {
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "uid": f"uid-{name}",
                    "labels": labels,
                    "creationTimestamp": "2026-12-01T12:00:00Z",
                },
                "spec": {"containers": [{"name": container, "image": "img"}]},
                "status": {
                    "phase": "Running" if running else "Succeeded",
                    "containerStatuses": [
                        {
                            "name": container,
                            "image": "img",
                            "imageID": "img@sha256:0",
                            "ready": running,
                            "restartCount": 0,
                        }
                    ],
                },
            }
        )
        self.logs[name] = list(log)
        self.running[name] = running

    # -- server ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKubeAPI:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.log_open.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def clients(self) -> tuple[Any, Any]:
        """``(CustomObjectsApi, CoreV1Api)`` of the real client, pointed at this server."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        api_client = client.ApiClient(config)
        return client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

    def calls(self) -> set[tuple[str, str, str]]:
        """``(verb, apiGroup, resource)`` of every request, as an RBAC rule names them."""
        found = set()
        for r in self.requests:
            parts = r.path.strip("/").split("/")
            if parts[0] == "api":  # /api/v1/namespaces/NS/pods[/NAME[/log]]
                group, rest = "", parts[4:]
            else:  # /apis/G/V/namespaces/NS/PLURAL[/NAME]
                group, rest = parts[1], parts[5:]
            resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
            verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(
                r.method, "get" if len(rest) > 1 else "list"
            )
            if r.query.get("watch") == "true":
                verb = "watch"
            found.add((verb, group, resource))
        return found

    def deletes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "DELETE"]

    def created(self, plural: str) -> list[dict[str, Any]]:
        return [
            r.body for r in self.requests if r.method == "POST" and r.path.endswith("/" + plural)
        ]

    # -- request handling ------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "pods":
            if len(parts) == 5:
                return 200, self._pod_list(query.get("labelSelector", ""))
            return 404, _status(404, "NotFound", f'pods "{parts[5]}" not found')
        if parts[0] != "apis" or len(parts) < 6 or parts[3] != "namespaces":
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        group, version, namespace, plural = parts[1], parts[2], parts[4], parts[5]
        resource = self.resources.get(plural)
        if resource is None or (resource.group, resource.version) != (group, version):
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        name = parts[6] if len(parts) > 6 else None
        key = (plural, name or "")
        with self._lock:
            if method == "POST" and name is None:
                return self._create(resource, namespace, body)
            if name is None or key not in self.objects:
                return 404, _status(404, "NotFound", f'{plural}.{group} "{name}" not found')
            if method == "GET":
                return 200, self._with_status(plural, self.objects[key])
            if method == "DELETE":
                del self.objects[key]
                return 200, _status(200, "", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)

    def _create(self, resource: _Resource, namespace: str, body: Any) -> tuple[int, Any]:
        errors = metadata_errors(body.get("metadata"), namespace) if isinstance(body, dict) else []
        if not isinstance(body, dict):
            errors.append("body: expected an object")
        else:
            if body.get("apiVersion") != f"{resource.group}/{resource.version}":
                errors.append(f"apiVersion: {body.get('apiVersion')!r}")
            if body.get("kind") != resource.kind:
                errors.append(f"kind: {body.get('kind')!r}")
            rest = {k: v for k, v in body.items() if k != "metadata"}
            errors += schema_errors(rest, {**resource.schema, "required": []})
        if errors:
            return 422, _status(422, "Invalid", "; ".join(errors))
        key = (resource.plural, body["metadata"]["name"])
        if key in self.objects:
            return 409, _status(409, "AlreadyExists", f"{key[1]} already exists")
        self.objects[key] = body
        return 201, body

    def _with_status(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        states = self.scripts.get((plural, obj["metadata"]["name"]))
        if not states:
            return obj
        state = states.pop(0) if len(states) > 1 else states[0]
        condition = {"type": state, "status": "True", "message": f"job is {state}"}
        return {**obj, "status": {"conditions": [condition]}}

    def _pod_list(self, selector: str) -> dict[str, Any]:
        wanted = dict(item.split("=", 1) for item in selector.split(",") if item)
        items = [
            p
            for p in self.pods
            if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Success" if code < 400 else "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


def _handler(api: FakeKubeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            record = Recorded(self.command, url.path, query, body)
            api.requests.append(record)
            if url.path.endswith("/log") and self.command == "GET":
                record.status = 200
                self._stream_log(url.path.split("/")[-2], query)
                return
            record.status, answer = api.answer(self.command, url.path, query, body)
            data = json.dumps(answer).encode()
            self.send_response(record.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream_log(self, pod: str, query: dict[str, str]) -> None:
            """The log's lines, then (``follow``) an open stream until the test ends it."""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            for line in api.logs.get(pod, []):
                self.wfile.write(line.encode() + b"\n")
                self.wfile.flush()
                time.sleep(0.01)
            if query.get("follow") == "true" and api.running.get(pod):
                api.log_open.wait(60)
            self.close_connection = True

        do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

    return Handler
