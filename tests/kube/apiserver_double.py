"""A Kubernetes API-server *double* for tests: an in-memory stand-in that kubectl and kube-rs talk to over
plain HTTP on loopback, on machines where no kube-apiserver, kind or k3s can run. It is not a Kubernetes
API server and must never be described as one.

What it implements, the way kube-apiserver does:
- generic storage for every registered resource, namespaced and cluster-scoped, under `/api/v1` and
  `/apis/{group}/{version}`; built-ins: v1 namespaces, configmaps, secrets, services, events, pods;
  apps/v1 deployments (with `/scale`); coordination.k8s.io/v1 leases; events.k8s.io/v1 events (the same
  storage as v1 events, fields renamed); apiextensions.k8s.io/v1 customresourcedefinitions. Creating a CRD
  serves its resources (every served version, names, scope, status and scale subresources, printer
  columns, selectable fields); deleting it removes them and their objects.
- discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{g}/{v}`) in the plain, non-aggregated form.
- get, list (`limit`/`continue`, `labelSelector` with `=`, `==`, `!=`, `in`, `notin`, exists, `!key`;
  `fieldSelector` on `metadata.name`, `metadata.namespace` and a few built-in field labels), watch
  (chunked newline-delimited events from a `resourceVersion` out of a bounded history, ERROR 410 when it
  is too old, BOOKMARK events, `sendInitialEvents`, `timeoutSeconds`), create (`generateName`, 409
  AlreadyExists), update (409 Conflict on a stale `resourceVersion`), merge patch, JSON patch (a `test`
  of a missing path against null succeeds), delete and deletecollection, the status subresource, `dryRun`.
- one global resourceVersion counter; `metadata.generation` bumped only by non-metadata, non-status
  changes; a write that changes nothing is not stored and sends no event; finalizers (DELETE sets
  `deletionTimestamp`, the object goes when its finalizers are empty); background garbage collection by
  ownerReferences; namespace deletion removes the namespace's objects; errors as meta/v1 `Status`.
- server-side printing (`as=Table`) with the CRD's printer columns evaluated by a small JSONPath subset,
  and `as=PartialObjectMetadata`.

- JSON bodies, and the protobuf bodies of Namespaces, ConfigMaps and Secrets, which kubectl's generators
  (`kubectl create namespace|configmap|secret`) send.

What it does NOT do: authentication, authorization or RBAC (every request is allowed); admission
(no webhooks, no LimitRanges or quotas, no defaulting beyond a Secret's type and a namespace's name label);
OpenAPI (`/openapi/v2` and `/openapi/v3` answer 404, so kubectl needs `--validate=false`); CRD schema
validation, pruning and defaulting; conversion webhooks (every version of a CRD is the same object with
another apiVersion); server-side apply (`application/apply-patch+yaml` is answered 415); strategic merge
patch (it is applied as a JSON merge patch after dropping `$`-directives, so lists are replaced, not merged
by key); other protobuf bodies (`kubectl create deployment` gets 415) and YAML bodies; aggregated discovery;
historical reads (a continued list shows the current objects after the last key, not a snapshot at the
first page's resourceVersion); controllers of any kind (pods never run, deployments never roll out,
services get no cluster IP, foreground deletion is treated as background, a CRD's objects go at once with
it); managedFields; priority and fairness (no 429s).

Serving: one thread per connection (`ThreadingHTTPServer`, HTTP/1.1 keep-alive) around one lock. Objects
are stored once and never changed, each with its JSON encoded once, so list pages and watch events do
not copy the store. A controller that opens thousands of connections at once (kube-rs's default unbounded
reconcile concurrency) sees some transient connection errors that kube-rs retries; bound its concurrency.
Measured: 10,000 custom objects, three writes each by a kube-rs controller at concurrency 32, in ~23 s.

Use: `ApiServerDouble(history_limit=..., bookmark_interval=...).start()`, then `.url`,
`.write_kubeconfig(path)`, `.load_crds([...])` and `.stop()`; or as a script,
`python tests/kube/apiserver_double.py --port 0 --kubeconfig-out PATH [--crds FILE_OR_DIR ...]`, which
prints its URL on the first line of stdout and exits on SIGTERM.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import collections
import datetime
import http.server
import json
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

VERSION_INFO = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-densemesh-double", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "python",
                "compiler": "python", "platform": "linux/amd64"}
RESOURCE_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SUBRESOURCE_VERBS = ["get", "patch", "update"]
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")


class ApiError(Exception):
    """A refused request, answered as the meta/v1 Status that kube-apiserver would send."""

    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self):
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            status["details"] = self.details
        return status


def bad_request(message):
    return ApiError(400, "BadRequest", message)


def invalid(view, name, message):
    return ApiError(422, "Invalid", f'{view.kind_ref} "{name}" is invalid: {message}',
                    {"name": name, "group": view.group, "kind": view.kind})


def not_found(view, name):
    return ApiError(404, "NotFound", f'{view.resource_ref} "{name}" not found',
                    {"name": name, "group": view.group, "kind": view.plural})


def conflict(view, name, why="the object has been modified; please apply your changes to the latest "
                             "version and try again"):
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {view.resource_ref} "{name}": {why}',
                    {"name": name, "group": view.group, "kind": view.plural})


def expired(message):
    # kube-apiserver answers a too-old resourceVersion with code 410 and reason Expired; clients key on 410
    return ApiError(410, "Expired", message)


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def now_rfc3339():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def human_duration(seconds: float) -> str:
    """How kubectl prints an age (k8s.io/apimachinery's duration.HumanDuration)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age_of(timestamp) -> str:
    try:
        then = datetime.datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())


# ---------------------------------------------------------------------------------------------------
# Selectors

_LABEL_REQUIREMENT = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<absent>[\w./-]+)|(?P<key>[\w./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$")


def split_requirements(selector):
    """Splits a selector on the commas that are not inside `in (...)` sets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return [p for p in parts if p.strip()]


def parse_label_selector(selector) -> Callable[[dict], bool] | None:
    """A predicate over an object's labels, or None for an empty selector (which matches everything)."""
    if not selector:
        return None
    tests = []
    for requirement in split_requirements(selector):
        m = _LABEL_REQUIREMENT.match(requirement)
        if not m:
            raise bad_request(f"unable to parse requirement: {requirement.strip()!r} in label selector {selector!r}")
        if m["absent"]:
            tests.append(lambda labels, k=m["absent"]: k not in labels)
        elif m["op"] in ("=", "=="):
            tests.append(lambda labels, k=m["key"], v=m["value"]: labels.get(k) == v)
        elif m["op"] == "!=":
            tests.append(lambda labels, k=m["key"], v=m["value"]: labels.get(k) != v)
        elif m["set"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["set"] == "in":
                tests.append(lambda labels, k=m["key"], vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=m["key"], vs=values: labels.get(k) not in vs)
        else:
            tests.append(lambda labels, k=m["key"]: k in labels)
    return lambda obj: all(t((obj.get("metadata") or {}).get("labels") or {}) for t in tests)


def parse_field_selector(selector, view) -> Callable[[dict], bool] | None:
    """A predicate over the fields a view allows selecting on; an unknown field label is a 400 as upstream."""
    if not selector:
        return None
    allowed = {"metadata.name", "metadata.namespace"} | view.field_labels
    tests = []
    for requirement in split_requirements(selector):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not m:
            raise bad_request(f"invalid field selector: {requirement!r}")
        field, op, value = m.groups()
        if field not in allowed:
            raise bad_request(f'field label not supported: {field} (the double knows {", ".join(sorted(allowed))})')
        path = field.split(".")
        if op == "!=":
            tests.append(lambda obj, p=path, v=value: field_value(obj, p) != v)
        else:
            tests.append(lambda obj, p=path, v=value: field_value(obj, p) == v)
    return lambda obj: all(t(obj) for t in tests)


def field_value(obj, path) -> str:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    if obj is None:
        return ""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    return str(obj)


# ---------------------------------------------------------------------------------------------------
# The JSONPath subset that printer columns and selectable fields use

def compile_jsonpath(expr):
    """Steps for `.a.b`, `['a']`, `[0]`, `[*]` and `[?(@.a.b=="x")]` (also `!=` and bare `[?(@.a)]`)."""
    text = expr.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    text = text.removeprefix("$")
    steps, i = [], 0
    while i < len(text):
        if text[i] == ".":
            m = re.match(r"\.([^.\[]+)", text[i:])
            if not m:
                raise ValueError(f"unsupported JSONPath {expr!r} at {text[i:]!r}")
            steps.append(("field", m[1]))
            i += m.end()
        elif text[i] == "[":
            end = _closing_bracket(text, i)
            inner = text[i + 1:end].strip()
            i = end + 1
            if inner == "*":
                steps.append(("all",))
            elif re.fullmatch(r"-?\d+", inner):
                steps.append(("index", int(inner)))
            elif inner[:1] in "'\"" and inner[-1:] == inner[:1]:
                steps.append(("field", inner[1:-1]))
            elif inner.startswith("?(") and inner.endswith(")"):
                m = re.fullmatch(r"@((?:\.[\w-]+)+)\s*(?:(==|!=)\s*(.+?))?\s*", inner[2:-1])
                if not m:
                    raise ValueError(f"unsupported JSONPath filter {inner!r} in {expr!r}")
                literal = None if m[3] is None else json.loads(m[3].replace("'", '"'))
                steps.append(("filter", m[1].split(".")[1:], m[2], literal))
            else:
                raise ValueError(f"unsupported JSONPath subscript [{inner}] in {expr!r}")
        else:
            raise ValueError(f"unsupported JSONPath {expr!r} at {text[i:]!r}")
    return steps


def _closing_bracket(text, start):
    quote = None
    for j in range(start + 1, len(text)):
        ch = text[j]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "]":
            return j
    raise ValueError(f"unclosed [ in JSONPath {text!r}")


def eval_jsonpath(steps, obj) -> list:
    values = [obj]
    for step in steps:
        found = []
        for v in values:
            if step[0] == "field" and isinstance(v, dict) and step[1] in v:
                found.append(v[step[1]])
            elif step[0] == "index" and isinstance(v, list) and -len(v) <= step[1] < len(v):
                found.append(v[step[1]])
            elif step[0] == "all":
                found.extend(v if isinstance(v, list) else v.values() if isinstance(v, dict) else ())
            elif step[0] == "filter" and isinstance(v, list):
                found.extend(item for item in v if _filter_matches(step, item))
        values = found
    return values


def _filter_matches(step, item):
    _, path, op, literal = step
    for part in path:
        if not isinstance(item, dict) or part not in item:
            return op == "!="
        item = item[part]
    return op is None or (item == literal) == (op == "==")


# ---------------------------------------------------------------------------------------------------
# Patches

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch; `target` is caller-owned and may be changed in place."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


def strategic_as_merge(patch):
    """A strategic merge patch made into a merge patch: `$`-directives dropped, `$patch: delete` as null.
    Lists are then replaced whole, unlike real strategic merge, which merges them by key."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "delete":
            return None
        return {k: strategic_as_merge(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strategic_as_merge(v) for v in patch if not (isinstance(v, dict) and "$patch" in v)]
    return patch


class PatchFailed(Exception):
    pass


def json_patch(doc, ops):
    """RFC 6902 on a caller-owned document; returns the new document."""
    if not isinstance(ops, list):
        raise PatchFailed("a JSON patch must be a list of operations")
    for op in ops:
        if not isinstance(op, dict) or "path" not in op:
            raise PatchFailed(f"malformed JSON patch operation: {json.dumps(op)}")
        kind, path = op.get("op"), _pointer(op["path"])
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchFailed(f"JSON patch {kind} operation without a value at {op['path']}")
        if kind == "add":
            doc = _pointer_add(doc, path, op["value"])
        elif kind == "remove":
            _pointer_remove(doc, path, op["path"])
        elif kind == "replace":
            _pointer_get(doc, path, op["path"])
            if not path:
                doc = op["value"]
            else:
                _pointer_remove(doc, path, op["path"])
                doc = _pointer_add(doc, path, op["value"])
        elif kind == "test":
            try:
                actual = _pointer_get(doc, path, op["path"])
            except PatchFailed:
                # kube-apiserver's JSON patch library treats a missing path as null for `test`
                actual = None
            if not _json_equal(actual, op["value"]):
                raise PatchFailed(f"testing value {op['path']} failed: have {json.dumps(actual)}, "
                                  f"want {json.dumps(op['value'])}")
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _pointer_get(doc, source, op.get("from"))
            if kind == "move":
                _pointer_remove(doc, source, op.get("from"))
            else:
                value = json.loads(json.dumps(value))
            doc = _pointer_add(doc, path, value)
        else:
            raise PatchFailed(f"unknown JSON patch operation {kind!r}")
    return doc


def _pointer(text):
    if text == "":
        return []
    if not isinstance(text, str) or not text.startswith("/"):
        raise PatchFailed(f"invalid JSON pointer {text!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in text[1:].split("/")]


def _index(container, token, path, allow_end=False):
    if token == "-" and allow_end:
        return len(container)
    if not re.fullmatch(r"0|[1-9]\d*", token) or int(token) > len(container) - (0 if allow_end else 1):
        raise PatchFailed(f"index {token} out of range at {path}")
    return int(token)


def _pointer_get(doc, tokens, path):
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token != "-":
            doc = doc[_index(doc, token, path)]
        else:
            raise PatchFailed(f"missing path {path}")
    return doc


def _pointer_add(doc, tokens, value):
    if not tokens:
        return value
    parent = _pointer_get(doc, tokens[:-1], "/" + "/".join(tokens[:-1]))
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], "/" + "/".join(tokens), allow_end=True), value)
    else:
        raise PatchFailed(f"cannot add to a scalar at /{'/'.join(tokens)}")
    return doc


def _pointer_remove(doc, tokens, path):
    if not tokens:
        raise PatchFailed("cannot remove the whole document")
    parent = _pointer_get(doc, tokens[:-1], path)
    if isinstance(parent, dict) and tokens[-1] in parent:
        del parent[tokens[-1]]
    elif isinstance(parent, list):
        del parent[_index(parent, tokens[-1], path)]
    else:
        raise PatchFailed(f"missing path {path}")


def _json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b and (a is None) == (b is None)


# ---------------------------------------------------------------------------------------------------
# Resources

@dataclass
class Column:
    """A Table column: a JSONPath into the object, or a function for built-ins whose column is computed."""
    name: str
    type: str = "string"
    json_path: str = ""
    compute: Callable[[dict], object] | None = None
    description: str = ""
    priority: int = 0
    format: str = ""

    def __post_init__(self):
        self.steps = compile_jsonpath(self.json_path) if self.json_path else None

    def cell(self, obj):
        if self.compute:
            return self.compute(obj)
        # upstream's CRD table convertor prints the first result only
        found = eval_jsonpath(self.steps, obj)
        if not found or found[0] is None:
            return None
        value = found[0]
        if self.type == "date":
            return age_of(value) if isinstance(value, str) else None
        if self.type == "string":
            return value if isinstance(value, str) else json.dumps(value)
        if self.type == "integer":
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if self.type == "number":
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if self.type == "boolean":
            return value if isinstance(value, bool) else None
        return None


AGE = Column("Age", "date", ".metadata.creationTimestamp",
             description="CreationTimestamp is a timestamp representing the server time when this object was created")


@dataclass
class Scale:
    """Where a resource keeps what its `/scale` subresource shows."""
    spec_replicas: str
    status_replicas: str
    selector: Callable[[dict], str | None]


class Entry:
    """One stored revision of an object. Never changed after it is made, so lists, watches and the
    history share it without copying; its JSON is encoded once, when first needed."""
    __slots__ = ("obj", "_raw")

    def __init__(self, obj):
        self.obj = obj
        self._raw = None

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = dumps(self.obj)
        return self._raw

    def copy(self) -> dict:
        return json.loads(self.raw)

    @property
    def key(self):
        meta = self.obj["metadata"]
        return meta.get("namespace", ""), meta["name"]


class Store:
    """The objects of one group/resource, shared by every version that serves it, kept in key order for
    paging; the watches open on any of its versions."""

    def __init__(self, group, plural, api_version, namespaced):
        self.group, self.plural, self.api_version, self.namespaced = group, plural, api_version, namespaced
        self.entries: dict[tuple[str, str], Entry] = {}
        self.keys: list[tuple[str, str]] = []
        self.watches: set[Watch] = set()

    def put(self, entry):
        key = entry.key
        if key not in self.entries:
            bisect.insort(self.keys, key)
        self.entries[key] = entry

    def remove(self, key):
        del self.entries[key]
        del self.keys[bisect.bisect_left(self.keys, key)]

    def key_range(self, namespace):
        if namespace is None:
            return 0, len(self.keys)
        return bisect.bisect_left(self.keys, (namespace,)), bisect.bisect_left(self.keys, (namespace + "\0",))


@dataclass(eq=False)
class View:
    """One resource as served at one group/version: what discovery lists and how its objects look there."""
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    list_kind: str = ""
    short_names: tuple = ()
    categories: tuple = ()
    status: bool = False
    scale: Scale | None = None
    columns: tuple = (AGE,)
    field_labels: frozenset = frozenset()
    generation: bool = False
    unconditional_update: bool = True
    initial_status: dict | None = None
    convert_in: Callable[[dict], dict] | None = None
    convert_out: Callable[[dict], dict] | None = None
    store: Store | None = None

    def __post_init__(self):
        self.singular = self.singular or self.kind.lower()
        self.list_kind = self.list_kind or self.kind + "List"

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource_ref(self):
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_ref(self):
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def external(self, obj) -> dict:
        """The stored object as this version shows it; shares structure with `obj`, so read only."""
        if self.convert_out:
            obj = self.convert_out(obj)
        if obj.get("apiVersion") != self.api_version:
            obj = {**obj, "apiVersion": self.api_version}
        return obj

    def render(self, entry) -> bytes:
        if self.convert_out is None and entry.obj.get("apiVersion") == self.api_version:
            return entry.raw
        return dumps(self.external(entry.obj))

    def internal(self, obj) -> dict:
        """A caller-owned object from a request made into the stored form."""
        if self.convert_in:
            obj = self.convert_in(obj)
        obj["apiVersion"] = self.store.api_version
        obj["kind"] = self.kind
        return obj

    def discovery(self):
        out = [{"name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
                "kind": self.kind, "verbs": RESOURCE_VERBS,
                **({"shortNames": list(self.short_names)} if self.short_names else {}),
                **({"categories": list(self.categories)} if self.categories else {})}]
        if self.status:
            out.append({"name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                        "kind": self.kind, "verbs": SUBRESOURCE_VERBS})
        if self.scale:
            out.append({"name": f"{self.plural}/scale", "singularName": "", "namespaced": self.namespaced,
                        "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": SUBRESOURCE_VERBS})
        return out


_EVENT_RENAMES = {"involvedObject": "regarding", "message": "note", "source": "deprecatedSource",
                  "firstTimestamp": "deprecatedFirstTimestamp", "lastTimestamp": "deprecatedLastTimestamp",
                  "count": "deprecatedCount", "reportingComponent": "reportingController"}


def _rename(obj, renames):
    return {renames.get(k, k): v for k, v in obj.items()}


def owner_uids(obj):
    return {r.get("uid") for r in obj["metadata"].get("ownerReferences") or ()}


def _deployment_selector(obj):
    labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None


def builtin_views():
    """The resources every double serves from the start."""
    data_count = Column("Data", "integer", compute=lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}))
    event_fields = frozenset({"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                              "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.fieldPath",
                              "reason", "reportingComponent", "source", "type"})
    return [
        View("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), status=True,
             columns=(Column("Status", json_path=".status.phase"), AGE), initial_status={"phase": "Active"},
             field_labels=frozenset({"status.phase"})),
        View("", "v1", "configmaps", "ConfigMap", short_names=("cm",), columns=(data_count, AGE)),
        View("", "v1", "secrets", "Secret", columns=(Column("Type", json_path=".type"), data_count, AGE),
             field_labels=frozenset({"type"})),
        View("", "v1", "services", "Service", short_names=("svc",), categories=("all",), status=True,
             columns=(Column("Type", json_path=".spec.type"), Column("Cluster-IP", json_path=".spec.clusterIP"), AGE)),
        View("", "v1", "events", "Event", short_names=("ev",), field_labels=event_fields,
             columns=(Column("Type", json_path=".type"), Column("Reason", json_path=".reason"),
                      Column("Object", compute=lambda o: "{}/{}".format(
                          str((o.get("involvedObject") or {}).get("kind", "")).lower(),
                          (o.get("involvedObject") or {}).get("name", ""))),
                      Column("Message", json_path=".message"))),
        View("", "v1", "pods", "Pod", short_names=("po",), categories=("all",), status=True,
             columns=(Column("Status", json_path=".status.phase"), AGE), initial_status={"phase": "Pending"},
             field_labels=frozenset({"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                                     "spec.serviceAccountName", "status.phase", "status.podIP"})),
        View("apps", "v1", "deployments", "Deployment", short_names=("deploy",), categories=("all",), status=True,
             generation=True, scale=Scale(".spec.replicas", ".status.replicas", _deployment_selector),
             columns=(Column("Ready", compute=lambda o: f'{(o.get("status") or {}).get("readyReplicas", 0)}/'
                                                        f'{(o.get("spec") or {}).get("replicas", 1)}'), AGE)),
        View("coordination.k8s.io", "v1", "leases", "Lease",
             columns=(Column("Holder", json_path=".spec.holderIdentity"), AGE)),
        View("events.k8s.io", "v1", "events", "Event", short_names=("ev",),
             convert_in=lambda o: _rename(o, {v: k for k, v in _EVENT_RENAMES.items()}),
             convert_out=lambda o: _rename(o, _EVENT_RENAMES),
             field_labels=frozenset(f.replace("involvedObject", "regarding").replace("reportingComponent",
                                                                                     "reportingController")
                                    for f in event_fields)),
        View("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
             namespaced=False, short_names=("crd", "crds"), categories=("api-extensions",), status=True,
             generation=True, columns=(Column("Created At", json_path=".metadata.creationTimestamp"),)),
    ]


def crd_views(crd) -> list[View]:
    """The views a CustomResourceDefinition serves, one per served version; raises ValueError when the
    definition is unusable."""
    spec = crd.get("spec") or {}
    group, names = spec.get("group") or "", spec.get("names") or {}
    plural, kind = names.get("plural"), names.get("kind")
    if not group or not plural or not kind:
        raise ValueError("spec.group, spec.names.plural and spec.names.kind are required")
    if crd.get("metadata", {}).get("name") != f"{plural}.{group}":
        raise ValueError(f"metadata.name must be spec.names.plural+\".\"+spec.group: {plural}.{group}")
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        raise ValueError("spec.scope must be Namespaced or Cluster")
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        raise ValueError("spec.versions must have exactly one version marked storage")
    views = []
    for v in versions:
        if not v.get("served", True):
            continue
        subresources = v.get("subresources") or {}
        columns = tuple(Column(c["name"], c.get("type", "string"), c["jsonPath"], description=c.get("description", ""),
                               priority=c.get("priority", 0), format=c.get("format", ""))
                        for c in v.get("additionalPrinterColumns") or []) or (AGE,)
        scale = None
        if "scale" in subresources:
            s = subresources["scale"]
            selector_path = compile_jsonpath(s["labelSelectorPath"]) if s.get("labelSelectorPath") else None
            scale = Scale(s["specReplicasPath"], s["statusReplicasPath"],
                          lambda o, p=selector_path: next(iter(eval_jsonpath(p, o)), None) if p else None)
        views.append(View(
            group, v["name"], plural, kind, namespaced=spec["scope"] == "Namespaced",
            singular=names.get("singular", ""), list_kind=names.get("listKind", ""),
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            status="status" in subresources, scale=scale, columns=columns,
            field_labels=frozenset(f["jsonPath"].lstrip(".") for f in v.get("selectableFields") or ()),
            generation=True, unconditional_update=False))
    return views


def version_priority(version):
    """kube-aware ordering: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else (then by name)."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (0, 0, 0, version)
    stability = {"alpha": 1, "beta": 2, None: 3}[m[2]]
    return (1, stability, int(m[1]), int(m[3] or 0))


# ---------------------------------------------------------------------------------------------------
# Watches

_STOP = object()


class Watch:
    """One open watch: the events it starts with, then what writes push into its queue."""

    def __init__(self, view, namespace, labels, fields, bookmarks, timeout):
        self.view, self.namespace = view, namespace
        self.labels, self.fields = labels, fields
        self.bookmarks, self.timeout = bookmarks, timeout
        self.queue = queue.SimpleQueue()
        self.initial = []

    def offer(self, event):
        """Called under the double's lock for every write to the watched store."""
        if self.namespace is None or event[1].obj["metadata"].get("namespace") == self.namespace:
            self.queue.put(event)

    def matches(self, entry):
        if self.labels and not self.labels(entry.obj):
            return False
        return not self.fields or self.fields(self.view.external(entry.obj))

    def translate(self, event):
        """What the client sees of a write: a change that moves an object into or out of the selection
        is an ADDED or DELETED, as upstream's watch cache does."""
        kind, entry, old = event
        now = self.matches(entry)
        if kind == "MODIFIED" and (self.labels or self.fields) and old is not None:
            before = self.matches(old)
            if before and not now:
                return "DELETED", entry
            if now and not before:
                return "ADDED", entry
        return (kind, entry) if now else None


# ---------------------------------------------------------------------------------------------------
# The double

class ApiServerDouble:
    """The in-memory API server. Use `start()` to serve it on loopback, `write_kubeconfig()` for clients,
    and `stop()` (or a `with` block) to end it."""

    def __init__(self, history_limit=100_000, bookmark_interval=5.0, verbose=False):
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.verbose = verbose
        self._lock = threading.RLock()
        self._rv = 0
        self._compacted_rv = 0  # the newest resourceVersion dropped from the history
        self._history = collections.deque()  # (rv, store, type, entry, old entry)
        self._groups: dict[tuple[str, str], dict[str, View]] = {}
        self._stores: dict[tuple[str, str], Store] = {}
        self._by_uid: dict[str, tuple[Store, tuple]] = {}
        self._dependents: dict[str, set] = collections.defaultdict(set)
        self._namespace_objects = collections.Counter()
        # Requests by (method, User-Agent's product, resource plural, subresource), for benchmarks that
        # count a client's API writes; served at /debug/requests (not a Kubernetes path).
        self.requests = collections.Counter()
        self._requests_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None
        self.url = None
        for view in builtin_views():
            if view.plural == "events":
                # both Event APIs are views of the core v1 storage, as upstream
                self._register(view, storage_version="v1", store_key=("", "events"))
            else:
                self._register(view, storage_version=view.api_version)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.view("", "v1", "namespaces"), None, {"metadata": {"name": name}})

    # --- registry ---------------------------------------------------------------------------------

    def _register(self, view, storage_version, store_key=None):
        store_key = store_key or (view.group, view.plural)
        store = self._stores.get(store_key)
        if store is None:
            store = Store(*store_key, storage_version, view.namespaced)
            self._stores[store_key] = store
        store.api_version = storage_version
        view.store = store
        self._groups.setdefault((view.group, view.version), {})[view.plural] = view

    def _unregister(self, group, plural):
        for gv in [gv for gv in self._groups if gv[0] == group]:
            self._groups[gv].pop(plural, None)
            if not self._groups[gv]:
                del self._groups[gv]

    def view(self, group, version, plural) -> View:
        """The view serving `plural` at group/version, or a 404 ApiError."""
        with self._lock:
            view = self._groups.get((group, version), {}).get(plural)
        if view is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural} in "
                                            f"{group + '/' if group else ''}{version})")
        return view

    def _crd_written(self, old, new):
        """Serves a created or changed CRD's versions (under the lock, once the CRD is stored)."""
        spec = new["spec"]
        if old is not None:
            self._unregister(spec["group"], spec["names"]["plural"])
        storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
        for view in crd_views(new):
            self._register(view, storage_version=f"{spec['group']}/{storage}")

    def _crd_removed(self, crd):
        """Stops serving a deleted CRD and deletes its objects (at once, unlike upstream's cleanup finalizer)."""
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        self._unregister(group, plural)
        store = self._stores.pop((group, plural), None)
        if store is None:
            return
        for key in list(store.keys):
            gone = self._commit(store, "DELETED", store.entries[key].copy(), store.entries[key])
            self._removed(store, gone)
        for watch in list(store.watches):
            watch.queue.put(_STOP)

    @staticmethod
    def _prepare_crd(view, obj):
        try:
            crd_views(obj)
        except (ValueError, KeyError) as e:
            raise invalid(view, obj["metadata"].get("name", ""), str(e))
        names = dict(obj["spec"]["names"])
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
        if (obj.get("status") or {}).get("acceptedNames") == names:
            return  # unchanged names keep their conditions, so re-applying a CRD is a no-op
        stamp = now_rfc3339()
        obj["status"] = {
            "acceptedNames": names,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": stamp,
                 "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "lastTransitionTime": stamp, "message": "the initial names have been accepted"}],
            "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
        }

    def load_crds(self, documents):
        """Creates (or replaces) each CustomResourceDefinition in `documents`, a list of dicts."""
        view = self.view("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        for doc in documents:
            name = doc.get("metadata", {}).get("name", "")
            with self._lock:
                current = view.store.entries.get(("", name))
                if current is None:
                    self.create(view, None, json.loads(json.dumps(doc)))
                else:
                    body = json.loads(json.dumps(doc))
                    body.setdefault("metadata", {})["resourceVersion"] = current.obj["metadata"]["resourceVersion"]
                    self.update(view, None, name, body)

    # --- the write path ---------------------------------------------------------------------------

    def _commit(self, store, kind, obj, old):
        """Stores one write under a fresh resourceVersion, records it and tells the watches. Holds the lock."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        entry = Entry(obj)
        key = entry.key
        uid = obj["metadata"].get("uid")
        if kind == "DELETED":
            store.remove(key)
            self._by_uid.pop(uid, None)
        else:
            store.put(entry)
            self._by_uid[uid] = (store, key)
        old_owners = owner_uids(old.obj) if old else set()
        new_owners = set() if kind == "DELETED" else owner_uids(obj)
        for owner in old_owners - new_owners:
            self._dependents.get(owner, set()).discard((store, key))
        for owner in new_owners - old_owners:
            self._dependents[owner].add((store, key))
        if len(self._history) >= self.history_limit:
            self._compacted_rv = self._history.popleft()[0]
        event = (kind, entry, old)
        self._history.append((self._rv, store, *event))
        for watch in store.watches:
            watch.offer(event)
        if store.namespaced and kind in ("ADDED", "DELETED"):
            self._namespace_objects[key[0]] += 1 if kind == "ADDED" else -1
        if (store.group, store.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            if kind == "DELETED":
                self._crd_removed(obj)
            else:
                self._crd_written(old.obj if old else None, obj)
        return entry

    def _removed(self, store, entry, orphan=False):
        """What follows an object's removal: its dependents are collected, an emptied terminating
        namespace goes."""
        if not orphan:
            self._collect_dependents(entry.obj["metadata"].get("uid"))
        if store.namespaced:
            namespace = entry.key[0]
            ns_store = self._stores[("", "namespaces")]
            ns_entry = ns_store.entries.get(("", namespace))
            if ns_entry and ns_entry.obj["metadata"].get("deletionTimestamp"):
                self._finish_if_unblocked(ns_store, ns_entry)

    def _collect_dependents(self, owner_uid):
        """Background garbage collection: a dependent whose owners are all gone is deleted."""
        for store, key in list(self._dependents.pop(owner_uid, ())):
            entry = store.entries.get(key)
            if entry is None:
                continue
            owners = entry.obj["metadata"].get("ownerReferences") or ()
            if not any(r.get("uid") in self._by_uid for r in owners):
                self._delete_entry(store, entry)

    def _finish_if_unblocked(self, store, entry):
        """Removes an object being deleted once nothing holds it: no finalizers, and for a namespace, no
        objects left in it."""
        meta = entry.obj["metadata"]
        if meta.get("finalizers"):
            return entry
        if store.plural == "namespaces" and not store.group and self._namespace_objects[meta["name"]] > 0:
            return entry
        gone = self._commit(store, "DELETED", entry.copy(), entry)
        self._removed(store, gone)
        return gone

    def _delete_entry(self, store, entry, orphan=False):
        meta = entry.obj["metadata"]
        is_namespace = store.plural == "namespaces" and not store.group
        if not meta.get("finalizers") and not is_namespace:
            gone = self._commit(store, "DELETED", entry.copy(), entry)
            self._removed(store, gone, orphan)
            return gone
        if not meta.get("deletionTimestamp"):
            obj = entry.copy()
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            if is_namespace:
                obj.setdefault("status", {})["phase"] = "Terminating"
            entry = self._commit(store, "MODIFIED", obj, entry)
        if is_namespace:
            name = meta["name"]
            for other in list(self._stores.values()):
                if other.namespaced:
                    lo, hi = other.key_range(name)
                    for key in other.keys[lo:hi]:
                        if key in other.entries:
                            self._delete_entry(other, other.entries[key])
            entry = store.entries.get(("", name), entry)
            if ("", name) in store.entries:
                return self._finish_if_unblocked(store, entry)
        return entry

    def _check_body(self, view, namespace, body, name=None):
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        meta = body.get("metadata")
        if meta is None:
            meta = body["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if body.get("kind", view.kind) != view.kind or body.get("apiVersion", view.api_version) != view.api_version:
            raise bad_request(f"the body is a {body.get('apiVersion')}/{body.get('kind')}, "
                              f"not a {view.api_version}/{view.kind}")
        if view.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if name is not None and meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        meta.pop("managedFields", None)
        return body

    def _check_namespace(self, view, namespace):
        """Objects are created only in a namespace that exists and is not terminating."""
        if not view.namespaced:
            return
        ns = self._stores[("", "namespaces")].entries.get(("", namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if ns.obj["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f'{view.plural} is forbidden: unable to create new content in '
                                             f'namespace {namespace} because it is being terminated')

    def create(self, view, namespace, body, dry_run=False) -> dict:
        """POST: the created object as `view` shows it."""
        obj = self._check_body(view, namespace, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        for field in ("uid", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "creationTimestamp"):
            meta.pop(field, None)
        if view.status:
            obj.pop("status", None)
            if view.initial_status:
                obj["status"] = json.loads(json.dumps(view.initial_status))
        if view.generation:
            meta["generation"] = 1
        obj = view.internal(obj)
        meta = obj["metadata"]
        with self._lock:
            self._check_namespace(view, namespace)
            for _ in range(8):
                if not meta.get("name") and meta.get("generateName"):
                    name = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                else:
                    name = meta.get("name")
                self._validate_name(view, name)
                if (namespace or "", name) not in view.store.entries:
                    break
                if meta.get("name"):
                    raise ApiError(409, "AlreadyExists", f'{view.resource_ref} "{name}" already exists',
                                   {"name": name, "group": view.group, "kind": view.plural})
            else:
                raise ApiError(409, "AlreadyExists", f"no free name for generateName {meta['generateName']!r}")
            meta["name"] = name
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            self._prepare(view, obj)
            if dry_run:
                meta["resourceVersion"] = ""
                return view.external(obj)
            entry = self._commit(view.store, "ADDED", obj, None)
        return view.external(entry.obj)

    def _prepare(self, view, obj):
        """What the server itself writes into an object of a few built-in kinds."""
        if view.kind == "Namespace" and not view.group:
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif view.kind == "Secret" and not view.group and not obj.get("type"):
            obj["type"] = "Opaque"
        elif view.kind == "CustomResourceDefinition":
            self._prepare_crd(view, obj)

    @staticmethod
    def _validate_name(view, name):
        if not name:
            raise invalid(view, "", "metadata.name: Required value: name or generateName is required")
        label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
        pattern = label if view.kind == "Namespace" else rf"{label}(\.{label})*"
        limit = 63 if view.kind == "Namespace" else 253
        if len(name) > limit or not re.fullmatch(pattern, name):
            allowed = "alphanumeric characters or '-'" if limit == 63 else "alphanumeric characters, '-' or '.'"
            raise invalid(view, name, f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 '
                                      f'{"label" if limit == 63 else "subdomain"} must consist of lower case '
                                      f"{allowed}, and must start and end with an alphanumeric character")

    def _entry(self, view, namespace, name):
        with self._lock:
            entry = view.store.entries.get((namespace or "", name))
        if entry is None:
            raise not_found(view, name)
        return entry

    def get(self, view, namespace, name) -> Entry:
        return self._entry(view, namespace, name)

    def update(self, view, namespace, name, body, subresource=None, dry_run=False) -> dict:
        """PUT on an object or its status."""
        obj = self._check_body(view, namespace, body, name)
        with self._lock:
            current = self._entry(view, namespace, name)
            require_rv = not view.unconditional_update and subresource is None
            return self._write(view, current, view.internal(obj), subresource, require_rv, dry_run)

    def patch(self, view, namespace, name, patch, content_type, subresource=None, dry_run=False) -> dict:
        """PATCH on an object or its status, with a merge, JSON or (as merge) strategic patch."""
        media = content_type.split(";")[0].strip()
        if media == "application/apply-patch+yaml":
            raise ApiError(415, "UnsupportedMediaType",
                           "server-side apply (application/apply-patch+yaml) is not implemented by this API-server "
                           "double; use a merge patch (application/merge-patch+json) or a JSON patch")
        if media not in ("application/merge-patch+json", "application/json-patch+json",
                         "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: application/json-patch+json, "
                                                        f"application/merge-patch+json, "
                                                        f"application/apply-patch+yaml (got {media!r})")
        try:
            patch = json.loads(patch or b"null")
        except ValueError as e:
            raise bad_request(f"the patch is not JSON: {e}")
        with self._lock:
            current = self._entry(view, namespace, name)
            doc = json.loads(view.render(current))
            try:
                if media == "application/json-patch+json":
                    patched = json_patch(doc, patch)
                else:
                    if not isinstance(patch, dict):
                        raise PatchFailed("a merge patch must be a JSON object")
                    if media == "application/strategic-merge-patch+json":
                        patch = strategic_as_merge(patch)
                    patched = merge_patch(doc, patch)
            except PatchFailed as e:
                raise invalid(view, name, str(e))
            if not isinstance(patched, dict):
                raise invalid(view, name, "the patched object is not a JSON object")
            obj = self._check_body(view, namespace, patched, name)
            return self._write(view, current, view.internal(obj), subresource, False, dry_run)

    def _write(self, view, current, incoming, subresource, require_rv, dry_run):
        """An update of `current` to `incoming` (stored form, caller-owned); nothing is stored and no
        event sent when it changes nothing. Holds the lock."""
        old = current.obj
        old_meta, name = old["metadata"], old["metadata"]["name"]
        rv = (incoming.get("metadata") or {}).get("resourceVersion")
        if rv:
            if rv != old_meta["resourceVersion"]:
                raise conflict(view, name)
        elif require_rv:
            raise invalid(view, name, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        if subresource == "status":
            new = current.copy()
            if "status" in incoming:
                new["status"] = incoming["status"]
            else:
                new.pop("status", None)
        else:
            new = incoming
            meta = new["metadata"]
            for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                          "generation", "name", "namespace"):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            if view.status:
                if "status" in old:
                    new["status"] = json.loads(json.dumps(old["status"]))
                else:
                    new.pop("status", None)
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or ()) - set(old_meta.get("finalizers") or ())
                if added:
                    raise invalid(view, name, f"metadata.finalizers: Forbidden: no new finalizers can be added "
                                              f"if the object is being deleted, found new finalizers {sorted(added)}")
            ignored = ("metadata", "status") if view.status else ("metadata",)
            if view.generation and any(old.get(k) != new.get(k) for k in set(old) | set(new) if k not in ignored):
                meta["generation"] = old_meta.get("generation", 0) + 1
            self._prepare(view, new)
        new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if new == old:
            return view.external(old)
        if dry_run:
            return view.external(new)
        store = view.store
        held_by_content = store.plural == "namespaces" and not store.group and self._namespace_objects[name] > 0
        if old_meta.get("deletionTimestamp") and not new["metadata"].get("finalizers") and not held_by_content:
            # the last finalizer is gone: upstream deletes instead of storing the update, one DELETED event
            gone = self._commit(store, "DELETED", new, current)
            self._removed(store, gone)
            return view.external(gone.obj)
        return view.external(self._commit(store, "MODIFIED", new, current).obj)

    def delete(self, view, namespace, name, options, dry_run=False) -> dict:
        """DELETE: the object as it is after the request (gone, or waiting on its finalizers)."""
        if view.kind == "Namespace" and not view.group and name in UNDELETABLE_NAMESPACES:
            raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted')
        with self._lock:
            entry = self._entry(view, namespace, name)
            pre = (options or {}).get("preconditions") or {}
            meta = entry.obj["metadata"]
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise conflict(view, name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                           f"UID in object meta: {meta.get('uid')}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise conflict(view, name, "the object has been modified; please apply your changes to the "
                                           "latest version and try again")
            if dry_run:
                return view.external(entry.obj)
            orphan = (options or {}).get("propagationPolicy") == "Orphan" or (options or {}).get("orphanDependents")
            return view.external(self._delete_entry(view.store, entry, orphan=bool(orphan)).obj)

    def delete_collection(self, view, namespace, params, options, dry_run=False) -> dict:
        page = self.list(view, namespace, {k: v for k, v in params.items() if k in ("labelSelector", "fieldSelector")})
        items = [self.delete(view, e.key[0] or None, e.key[1], options, dry_run) for e in page["entries"]]
        return {"kind": view.list_kind, "apiVersion": view.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    # --- reads ------------------------------------------------------------------------------------

    def list(self, view, namespace, params) -> dict:
        """One page of a list: {"entries", "resourceVersion", "continue", "remaining"}."""
        labels = parse_label_selector(params.get("labelSelector"))
        fields = parse_field_selector(params.get("fieldSelector"), view)
        try:
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise bad_request(f"limit must be an integer, not {params.get('limit')!r}")
        with self._lock:
            rv, after = self._rv, None
            if params.get("continue"):
                rv, after = self._decode_continue(params["continue"])
            elif params.get("resourceVersionMatch") == "Exact" and params.get("resourceVersion") != str(self._rv):
                raise expired(f"the double serves only the current resourceVersion {self._rv}, "
                              f"not {params.get('resourceVersion')} exactly")
            store = view.store
            lo, hi = store.key_range(namespace if view.namespaced else None)
            start = max(lo, bisect.bisect_right(store.keys, after)) if after else lo
            entries, i, last = [], start, None
            while i < hi and not (limit and len(entries) >= limit):
                entry = store.entries[store.keys[i]]
                last = store.keys[i]
                if (not labels or labels(entry.obj)) and (not fields or fields(view.external(entry.obj))):
                    entries.append(entry)
                i += 1
            token = self._encode_continue(rv, last) if i < hi else ""
            remaining = hi - i if token and not labels and not fields else None
        return {"entries": entries, "resourceVersion": str(rv), "continue": token, "remaining": remaining}

    def _encode_continue(self, rv, key):
        return base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": list(key)}).encode()).decode()

    def _decode_continue(self, token):
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
            rv, key = int(decoded["rv"]), tuple(decoded["start"])
        except (ValueError, KeyError, TypeError):
            raise bad_request(f"invalid continue token {token!r}")
        if rv < self._compacted_rv:
            raise expired("The provided continue parameter is too old to display a consistent list result. "
                          "You can start a new list without the continue parameter.")
        return rv, key

    def open_watch(self, view, namespace, params) -> Watch:
        """Registers a watch and fills in the events it starts with (a 410 ERROR when the requested
        resourceVersion is older than the history)."""
        labels = parse_label_selector(params.get("labelSelector"))
        fields = parse_field_selector(params.get("fieldSelector"), view)
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        watch = Watch(view, namespace if view.namespaced else None, labels, fields, bookmarks, timeout)
        rv_param = params.get("resourceVersion") or ""
        initial_events = params.get("sendInitialEvents") in ("true", "1")
        with self._lock:
            store = view.store
            if rv_param in ("", "0") or initial_events:
                lo, hi = store.key_range(watch.namespace)
                watch.initial = [("ADDED", store.entries[k]) for k in store.keys[lo:hi]
                                 if watch.matches(store.entries[k])]
                if initial_events:
                    watch.initial.append(("BOOKMARK", self._bookmark(view, end_of_initial=True)))
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise bad_request(f"invalid resourceVersion {rv_param!r}")
                if since < self._compacted_rv:
                    watch.initial = [("ERROR", expired(f"too old resource version: {since} "
                                                       f"({self._compacted_rv + 1})").status())]
                    return watch
                replay = []
                for rv, ev_store, kind, entry, old in reversed(self._history):
                    if rv <= since:
                        break
                    if ev_store is store and (watch.namespace is None or entry.key[0] == watch.namespace):
                        replay.append((kind, entry, old))
                watch.initial = [t for t in map(watch.translate, reversed(replay)) if t]
            store.watches.add(watch)
        return watch

    def close_watch(self, watch):
        with self._lock:
            watch.view.store.watches.discard(watch)

    def _bookmark(self, view, end_of_initial=False):
        meta = {"resourceVersion": str(self._rv)}
        if end_of_initial:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": view.kind, "apiVersion": view.api_version, "metadata": meta}

    def watch_events(self, watch):
        """Yields (type, Entry or dict) until the watch times out or the double stops."""
        yield from watch.initial
        if watch.initial and watch.initial[0][0] == "ERROR":
            return
        deadline = time.monotonic() + watch.timeout if watch.timeout else None
        next_bookmark = time.monotonic() + self.bookmark_interval
        while not self._stopping.is_set():
            now = time.monotonic()
            wait = [next_bookmark - now] if watch.bookmarks else []
            if deadline is not None:
                if now >= deadline:
                    return
                wait.append(deadline - now)
            try:
                # stop() puts _STOP in every queue, so a watch without bookmarks or deadline blocks here
                event = watch.queue.get(timeout=max(0.0, min(wait)) if wait else None)
            except queue.Empty:
                if watch.bookmarks and time.monotonic() >= next_bookmark:
                    with self._lock:
                        # an empty queue under the lock means every write up to now has been delivered
                        bookmark = self._bookmark(watch.view) if watch.queue.empty() else None
                    if bookmark:
                        yield "BOOKMARK", bookmark
                    next_bookmark = time.monotonic() + self.bookmark_interval
                continue
            if event is _STOP:
                return
            translated = watch.translate(event)
            if translated:
                yield translated

    def current_resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    # --- discovery --------------------------------------------------------------------------------

    def discovery(self, path):
        """The discovery document at `path`, or None when `path` is not a discovery path."""
        with self._lock:
            if path == "/api":
                return {"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self._address()}]}
            if path == "/apis":
                groups = {}
                for group, version in self._groups:
                    if group:
                        groups.setdefault(group, []).append(version)
                return {"kind": "APIGroupList", "apiVersion": "v1",
                        "groups": [self._group_doc(g, vs) for g, vs in groups.items()]}
            parts = [p for p in path.split("/") if p]
            if len(parts) == 2 and parts[0] == "apis":
                versions = [v for g, v in self._groups if g == parts[1]]
                return self._group_doc(parts[1], versions) | {"kind": "APIGroup", "apiVersion": "v1"} if versions \
                    else None
            if (len(parts) == 2 and parts[0] == "api") or (len(parts) == 3 and parts[0] == "apis"):
                gv = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
                if gv not in self._groups:
                    return None
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": f"{gv[0]}/{gv[1]}" if gv[0] else gv[1],
                        "resources": [r for v in self._groups[gv].values() for r in v.discovery()]}
        return None

    @staticmethod
    def _group_doc(group, versions):
        ordered = sorted(versions, key=version_priority, reverse=True)
        docs = [{"groupVersion": f"{group}/{v}", "version": v} for v in ordered]
        return {"name": group, "versions": docs, "preferredVersion": docs[0]}

    def _address(self):
        return self.url.removeprefix("http://") if self.url else "127.0.0.1"

    # --- serving ----------------------------------------------------------------------------------

    def start(self, host="127.0.0.1", port=0):
        """Serves the double on `host:port` (0: a free port) in a background thread; `self.url` says where."""
        self._httpd = _Server((host, port), _Handler)
        self._httpd.double = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="apiserver-double",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Ends every watch, stops serving and closes the listening socket."""
        self._stopping.set()
        with self._lock:
            for store in self._stores.values():
                for watch in store.watches:
                    watch.queue.put(_STOP)
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def kubeconfig(self, namespace="default") -> str:
        """A kubeconfig (YAML) for kubectl and kube-rs: this double's URL, no credentials."""
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: apiserver-double\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: apiserver-double\n  user: {}\n"
            "contexts:\n- name: apiserver-double\n  context:\n    cluster: apiserver-double\n"
            f"    user: apiserver-double\n    namespace: {namespace}\n"
            "current-context: apiserver-double\npreferences: {}\n")

    def write_kubeconfig(self, path):
        Path(path).write_text(self.kubeconfig())
        return Path(path)


# ---------------------------------------------------------------------------------------------------
# Protobuf bodies: kubectl's generators (`kubectl create namespace|configmap|secret`) send protobuf

_PROTO_META = {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
               5: ("uid", "string"), 6: ("resourceVersion", "string"), 7: ("generation", "int"),
               11: ("labels", "map"), 12: ("annotations", "map"), 14: ("finalizers", "strings")}
PROTO_KINDS = {
    ("v1", "Namespace"): {1: ("metadata", _PROTO_META), 2: ("spec", {1: ("finalizers", "strings")}),
                          3: ("status", {1: ("phase", "string")})},
    ("v1", "ConfigMap"): {1: ("metadata", _PROTO_META), 2: ("data", "map"), 3: ("binaryData", "bytesmap"),
                          4: ("immutable", "bool")},
    ("v1", "Secret"): {1: ("metadata", _PROTO_META), 2: ("data", "bytesmap"), 3: ("type", "string"),
                       4: ("stringData", "map"), 5: ("immutable", "bool")},
}


def _proto_fields(buf):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        yield number, value


def _varint(buf, i):
    result = shift = 0
    while True:
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return result, i


def _proto_message(buf, schema, kind):
    out = {}
    for number, value in _proto_fields(buf):
        if number not in schema:
            if value in (b"", 0):
                continue  # an empty field the double does not model (selfLink, creationTimestamp, ...)
            raise ApiError(415, "UnsupportedMediaType", f"protobuf field {number} of {kind} is not understood by the "
                                                        f"API-server double; send JSON (kubectl apply -f)")
        name, type_ = schema[number]
        if isinstance(type_, dict):
            out[name] = _proto_message(value, type_, kind)
        elif type_ == "string":
            if value:
                out[name] = value.decode()
        elif type_ == "bool":
            out[name] = bool(value)  # optional bools are pointers in Go: present means set, even false
        elif type_ == "int":
            if value:
                out[name] = value
        elif type_ == "strings":
            out.setdefault(name, []).append(value.decode())
        else:
            entry = dict(_proto_fields(value))
            item = entry.get(2, b"")
            out.setdefault(name, {})[entry.get(1, b"").decode()] = \
                base64.b64encode(item).decode() if type_ == "bytesmap" else item.decode()
    return out


def decode_protobuf(body) -> dict:
    """A Namespace, ConfigMap or Secret from Kubernetes' protobuf envelope (magic `k8s\\0`, runtime.Unknown)."""
    if not body.startswith(b"k8s\x00"):
        raise bad_request("a protobuf body must start with the k8s envelope magic")
    envelope = dict(_proto_fields(body[4:]))
    type_meta = dict(_proto_fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    schema = PROTO_KINDS.get((api_version, kind))
    if schema is None:
        raise ApiError(415, "UnsupportedMediaType",
                       f"the API-server double decodes protobuf only for {', '.join(k for _, k in PROTO_KINDS)}, "
                       f"not {api_version}/{kind}; send JSON (kubectl apply -f or create -f)")
    return {"apiVersion": api_version, "kind": kind, **_proto_message(envelope.get(2, b""), schema, kind)}


# ---------------------------------------------------------------------------------------------------
# HTTP

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # a controller without a concurrency limit opens thousands of connections at once


def negotiate(accept):
    """('Table' | 'PartialObjectMetadata' | 'json', meta.k8s.io version) from an Accept header, taking the
    first alternative the double can answer, as upstream does."""
    for alternative in (accept or "").split(","):
        params = dict(p.strip().split("=", 1) for p in alternative.split(";")[1:] if "=" in p)
        as_ = params.get("as")
        if as_ == "Table":
            return "Table", params.get("v", "v1")
        if as_ in ("PartialObjectMetadata", "PartialObjectMetadataList"):
            return "PartialObjectMetadata", params.get("v", "v1")
        if as_ is None and alternative.split(";")[0].strip() in ("application/json", "*/*", "application/*", ""):
            return "json", None
    return "json", None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "densemesh-apiserver-double"

    def setup(self):
        super().setup()
        # small responses and watch events go out at once instead of waiting on delayed ACKs
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        if self.server.double.verbose:
            sys.stderr.write(f"apiserver-double: {self.address_string()} {format % args}\n")

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code, payload, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else dumps(payload)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(body)

    def _serve(self, method):
        double = self.server.double
        body = self._read_body()
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            self._route(double, method, url.path.rstrip("/") or "/", params, body)
        except ApiError as e:
            self._send(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in the double: say so to the client instead of dropping the connection
            traceback.print_exc()
            self._send(500, ApiError(500, "InternalError", f"the API-server double failed: {e!r}").status())

    def _route(self, double, method, path, params, body):
        if path == "/version":
            return self._send(200, VERSION_INFO)
        if path in ("/healthz", "/readyz", "/livez"):
            return self._send(200, b"ok", "text/plain")
        if path == "/debug/requests":
            with double._requests_lock:
                counts = [{"method": m, "agent": a, "resource": r, "subresource": sub, "count": n}
                          for (m, a, r, sub), n in sorted(double.requests.items())]
            return self._send(200, {"requests": counts})
        if method == "GET":
            doc = double.discovery(path)
            if doc is not None:
                return self._send(200, doc)
        view, namespace, name, subresource = self._resolve(double, path)
        agent = (self.headers.get("User-Agent") or "").split("/")[0]
        with double._requests_lock:
            double.requests[(method, agent, view.plural, subresource or "")] += 1
        if subresource and not ((subresource == "status" and view.status) or (subresource == "scale" and view.scale)):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        dry_run = params.get("dryRun") == "All"
        fmt, meta_version = negotiate(self.headers.get("Accept"))
        if method == "GET" and params.get("watch") in ("1", "true", "True"):
            if name:
                selector = params.get("fieldSelector")
                params["fieldSelector"] = f"metadata.name={name}" + (f",{selector}" if selector else "")
            return self._stream_watch(double, view, namespace, params, fmt, meta_version)
        if method == "GET" and name is None:
            page = double.list(view, namespace, params)
            return self._send_list(view, page, fmt, meta_version, params)
        if method == "POST" and name is None and subresource is None:
            if view.namespaced and namespace is None:
                raise ApiError(405, "MethodNotAllowed", f"{view.resource_ref} are namespaced: POST to "
                                                        f".../namespaces/{{namespace}}/{view.plural}")
            return self._send(201, double.create(view, namespace, self._json(body), dry_run))
        if name is None:
            if method == "DELETE":
                return self._send(200, double.delete_collection(view, namespace, params,
                                                                self._json(body) if body else {}, dry_run))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        if subresource == "scale":
            return self._serve_scale(double, method, view, namespace, name, body, dry_run)
        if method == "GET":
            entry = double.get(view, namespace, name)
            if fmt == "Table":
                return self._send(200, table(view, [entry], entry.obj["metadata"]["resourceVersion"], "",
                                             params.get("includeObject", "Metadata"), meta_version))
            if fmt == "PartialObjectMetadata":
                return self._send(200, partial(view, entry, meta_version))
            return self._send(200, view.render(entry))
        if method == "PUT":
            return self._send(200, double.update(view, namespace, name, self._json(body), subresource, dry_run))
        if method == "PATCH":
            return self._send(200, double.patch(view, namespace, name, body, self.headers.get("Content-Type", ""),
                                                subresource, dry_run))
        if method == "DELETE" and subresource is None:
            return self._send(200, double.delete(view, namespace, name, self._json(body) if body else {}, dry_run))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _json(self, body):
        media = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if media == "application/vnd.kubernetes.protobuf":
            return decode_protobuf(body)
        if media not in ("application/json", ""):
            raise ApiError(415, "UnsupportedMediaType",
                           f"the API-server double reads JSON bodies only, not {media}")
        try:
            return json.loads(body or b"null")
        except ValueError as e:
            raise bad_request(f"the request body is not JSON: {e}")

    @staticmethod
    def _resolve(double, path):
        """(view, namespace, name, subresource) for a resource path, or a 404."""
        parts = [p for p in path.split("/") if p]
        unknown = ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise unknown
        namespace = None
        # /api/v1/namespaces/{ns}/status is the namespace's own status; /namespaces/{ns}/{plural}... is scoped
        if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and not group and rest[2] in
                                                                ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise unknown
        view = double.view(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        if (namespace is not None and not view.namespaced) or (view.namespaced and namespace is None and name):
            raise unknown
        return view, namespace, name, rest[2] if len(rest) > 2 else None

    def _send_list(self, view, page, fmt, meta_version, params):
        if fmt == "Table":
            return self._send(200, table(view, page["entries"], page["resourceVersion"], page["continue"],
                                         params.get("includeObject", "Metadata"), meta_version))
        meta = {"resourceVersion": page["resourceVersion"]}
        if page["continue"]:
            meta["continue"] = page["continue"]
        if page["remaining"] is not None:
            meta["remainingItemCount"] = page["remaining"]
        if fmt == "PartialObjectMetadata":
            items = [partial(view, e, meta_version) for e in page["entries"]]
            return self._send(200, {"kind": "PartialObjectMetadataList", "apiVersion": f"meta.k8s.io/{meta_version}",
                                    "metadata": meta, "items": items})
        head = dumps({"kind": view.list_kind, "apiVersion": view.api_version, "metadata": meta})[:-1]
        self._send(200, head + b',"items":[' + b",".join(view.render(e) for e in page["entries"]) + b"]}")

    def _stream_watch(self, double, view, namespace, params, fmt, meta_version):
        watch = double.open_watch(view, namespace, params)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            for kind, item in double.watch_events(watch):
                if isinstance(item, Entry):
                    if fmt == "Table":
                        obj = dumps(table(view, [item], item.obj["metadata"]["resourceVersion"], "",
                                          params.get("includeObject", "Metadata"), meta_version))
                    elif fmt == "PartialObjectMetadata":
                        obj = dumps(partial(view, item, meta_version))
                    else:
                        obj = view.render(item)
                else:
                    obj = dumps(item)
                line = b'{"type":"' + kind.encode() + b'","object":' + obj + b"}\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            double.close_watch(watch)

    def _serve_scale(self, double, method, view, namespace, name, body, dry_run):
        """The autoscaling/v1 Scale of a resource: only its spec.replicas can be written."""
        spec_path = compile_jsonpath(view.scale.spec_replicas)
        status_path = compile_jsonpath(view.scale.status_replicas)

        def scale_of(obj):
            meta = obj["metadata"]
            return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                    "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                      "creationTimestamp") if k in meta},
                    "spec": {"replicas": next(iter(eval_jsonpath(spec_path, obj)), 0)},
                    "status": {"replicas": next(iter(eval_jsonpath(status_path, obj)), 0),
                               **({"selector": s} if (s := view.scale.selector(obj)) else {})}}

        if method == "GET":
            return self._send(200, scale_of(view.external(double.get(view, namespace, name).obj)))
        if method not in ("PUT", "PATCH"):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on scale")
        with double._lock:
            current = double.get(view, namespace, name)
            scale = scale_of(view.external(current.obj))
            if method == "PUT":
                scale = self._json(body)
            else:
                media = self.headers.get("Content-Type", "").split(";")[0].strip()
                try:
                    patch = json.loads(body or b"null")
                    scale = json_patch(scale, patch) if media == "application/json-patch+json" \
                        else merge_patch(scale, strategic_as_merge(patch))
                except (ValueError, PatchFailed) as e:
                    raise invalid(view, name, str(e))
            replicas = (scale.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                raise invalid(view, name, "spec.replicas: must be a non-negative integer")
            obj = json.loads(view.render(current))
            target = obj
            keys = [s[1] for s in spec_path]
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = replicas
            obj["metadata"]["resourceVersion"] = (scale.get("metadata") or {}).get("resourceVersion") \
                or current.obj["metadata"]["resourceVersion"]
            result = double._write(view, current, view.internal(obj), None, False, dry_run)
        return self._send(200, scale_of(result))


def partial(view, entry, meta_version="v1"):
    return {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{meta_version or 'v1'}",
            "metadata": entry.obj["metadata"]}


def table(view, entries, resource_version, continue_token, include_object, meta_version="v1"):
    """A meta.k8s.io Table: Name, then the view's columns, one row per object."""
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    columns += [{"name": c.name, "type": c.type, "format": c.format,
                 "priority": c.priority, "description": c.description} for c in view.columns]
    rows = []
    for entry in entries:
        obj = view.external(entry.obj)
        row = {"cells": [obj["metadata"]["name"]] + [c.cell(obj) for c in view.columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = partial(view, entry, meta_version)
        rows.append(row)
    meta = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    return {"kind": "Table", "apiVersion": f"meta.k8s.io/{meta_version or 'v1'}", "metadata": meta,
            "columnDefinitions": columns, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# The command line

def read_documents(path) -> list[dict]:
    """The objects in a JSON file (an object, a list, or a v1 List) or a multi-document YAML file; a
    folder is read file by file. YAML needs PyYAML, which the project's .venv has (through moto)."""
    path = Path(path)
    if path.is_dir():
        return [doc for p in sorted(path.iterdir()) if p.suffix in (".yaml", ".yml", ".json")
                for doc in read_documents(p)]
    text = path.read_text()
    if text.lstrip()[:1] in ("{", "["):
        data = json.loads(text)
        docs = data if isinstance(data, list) else [data]
    else:
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"--crds {path}: YAML needs PyYAML, which is not installed; pass JSON instead")
        docs = [d for d in yaml.safe_load_all(text) if d]
    out = []
    for doc in docs:
        out.extend(doc.get("items", []) if doc.get("kind", "").endswith("List") else [doc])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="An in-memory Kubernetes API-server double for tests "
                                                 "(no auth, no admission, no OpenAPI, no server-side apply).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument("--kubeconfig-out", help="write a kubeconfig for this double here")
    parser.add_argument("--crds", action="append", default=[],
                        help="a file or folder of CustomResourceDefinitions (YAML or JSON) to serve from the start")
    parser.add_argument("--history", type=int, default=100_000,
                        help="watch events kept for resuming watches; older resourceVersions get 410")
    parser.add_argument("--bookmark-interval", type=float, default=5.0,
                        help="seconds between BOOKMARK events on watches that allow them")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)

    double = ApiServerDouble(history_limit=args.history, bookmark_interval=args.bookmark_interval,
                             verbose=args.verbose)
    for path in args.crds:
        docs = read_documents(path)
        for i, doc in enumerate(docs):
            if doc.get("kind") != "CustomResourceDefinition":
                raise SystemExit(f"--crds {path}: document {i + 1} is a {doc.get('kind')}, "
                                 f"not a CustomResourceDefinition")
        try:
            double.load_crds(docs)
        except ApiError as e:
            raise SystemExit(f"--crds {path}: {e.message}")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    double.start(args.host, args.port)
    if args.kubeconfig_out:
        double.write_kubeconfig(args.kubeconfig_out)
    print(double.url, flush=True)
    stopped.wait()
    double.stop()


if __name__ == "__main__":
    main()
