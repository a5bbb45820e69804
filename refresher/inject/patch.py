"""A JSONPatch (RFC 6902) from one JSON document to another, small where injection is.

Generic, so that the webhook's patch is equal in effect to `inject_pod` by
construction rather than by a second list of what injection adds: objects are
compared key by key; a list that only grew at its end or its start becomes `add`
operations (the refresher's init container goes first, volumes and mounts go
last); any other changed list or value is replaced whole.
"""

from __future__ import annotations

from typing import Any

Operation = dict[str, Any]


def json_patch(old: Any, new: Any) -> list[Operation]:
    """Operations that turn `old` into `new` (both JSON values)."""
    operations: list[Operation] = []
    _diff(old, new, "", operations)
    return operations


def _pointer(path: str, token: str | int) -> str:
    return f"{path}/{str(token).replace('~', '~0').replace('/', '~1')}"


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values. Python's == says True == 1 and 1 == 1.0; JSON (and the API
    server) tell them apart, so the types must match too."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(value, b[key]) for key, value in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and _same_items(a, b)
    return bool(a == b)


def _same_items(a: list[Any], b: list[Any]) -> bool:
    return all(_same(x, y) for x, y in zip(a, b, strict=True))


def _diff(old: Any, new: Any, path: str, out: list[Operation]) -> None:
    if old is new:  # a part that injection did not copy: nothing changed below it
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                out.append({"op": "remove", "path": _pointer(path, key)})
        for key, value in new.items():
            if key in old:
                _diff(old[key], value, _pointer(path, key), out)
            else:
                out.append({"op": "add", "path": _pointer(path, key), "value": value})
    elif isinstance(old, list) and isinstance(new, list):
        _diff_list(old, new, path, out)
    elif not _same(old, new):
        out.append({"op": "replace", "path": path, "value": new})


def _diff_list(old: list[Any], new: list[Any], path: str, out: list[Operation]) -> None:
    grown = len(new) - len(old)
    if grown > 0 and _same_items(new[: len(old)], old):
        out.extend({"op": "add", "path": f"{path}/-", "value": item} for item in new[len(old) :])
    elif grown > 0 and _same_items(new[grown:], old):
        out.extend(
            {"op": "add", "path": f"{path}/{index}", "value": item}
            for index, item in enumerate(new[:grown])
        )
    elif grown == 0:
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            _diff(before, after, f"{path}/{index}", out)
    else:
        out.append({"op": "replace", "path": path, "value": new})
