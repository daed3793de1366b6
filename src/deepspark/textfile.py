"""Settings files in YAML or JSON (search spaces, model specs): the reading both loaders share.

YAML and JSON parsers keep the last value of a key a mapping gives twice and drop the others without a
word, so an edited file can say one thing and run another (a searched learning rate fixed by a later
line, say). :func:`repeated_key` finds such a key for the loader to refuse.

A file may come from anyone (a checkpoint's ``spec.json``): :func:`load` also refuses what the parsers
turn into exceptions other than their own (nesting too deep, an integer of thousands of digits) and YAML
aliases that expand to a billion values (each alias is a reference when parsed, a copy once the value is
printed or written as JSON) or refer to the node holding them.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_VALUES", "SettingsError", "load", "repeated_key"]

#: The most values (mappings, lists, scalars, keys) a settings file may hold with its aliases expanded.
MAX_VALUES = 1_000_000


class SettingsError(ValueError):
    """A settings file that cannot be taken as one; the message (``is not valid YAML: ...``) follows the
    file's name in the caller's error."""


def load(text: str, *, yaml_syntax: bool) -> Any:
    """The value of settings ``text`` (YAML when ``yaml_syntax``, else JSON), or :class:`SettingsError`."""
    import yaml

    try:
        data = yaml.safe_load(text) if yaml_syntax else json.loads(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"is not valid YAML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SettingsError(f"is not valid JSON: {exc}") from exc
    except RecursionError:  # the parsers recurse per nesting level
        raise SettingsError("is nested too deeply") from None
    except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
        raise SettingsError(f"holds a value that cannot be read ({exc})") from None
    try:
        root: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # JSON that YAML does not read: it has no aliases, and the JSON parser took it
        return data
    repeated = _repeated(root)
    if repeated is not None:
        raise SettingsError(
            f"gives the key {repeated[0]!r} twice (again at line {repeated[1]}); only the last would count: "
            "keep one"
        )
    size = _expanded_size(root)
    if size < 0:
        raise SettingsError("holds a YAML alias inside the value it names (a value that contains itself)")
    if size > MAX_VALUES:
        raise SettingsError(f"expands its YAML aliases to more than {MAX_VALUES:,} values")
    return data


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expanded_size(root: Any) -> int:
    """How many nodes ``root`` stands for with every alias expanded; -1 when a node contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the current path: a node met again on it contains itself
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > MAX_VALUES:
                return sizes[id(node)]
        elif id(node) in open_nodes:
            return -1
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return sizes.get(id(root), 0)


def repeated_key(text: str) -> tuple[str, int] | None:
    """The first key a mapping of the YAML or JSON ``text`` gives twice, with the line of the repeat;
    None if there is none, or if ``text`` is not YAML (whose own parser then says what is wrong)."""
    import yaml

    try:
        root: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    return _repeated(root)


def _repeated(root: Any) -> tuple[str, int] | None:
    import yaml

    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:  # an alias may point back at a node already seen
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        return key.value, key.start_mark.line + 1
                    keys.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None
