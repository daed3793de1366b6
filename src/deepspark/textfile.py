"""Settings files in YAML or JSON (search spaces, model specs): the check both loaders share.

YAML and JSON parsers keep the last value of a key a mapping gives twice and drop the others without a
word, so an edited file can say one thing and run another (a searched learning rate fixed by a later
line, say). :func:`repeated_key` finds such a key for the loader to refuse.
"""

from __future__ import annotations

from typing import Any

__all__ = ["repeated_key"]


def repeated_key(text: str) -> tuple[str, int] | None:
    """The first key a mapping of the YAML or JSON ``text`` gives twice, with the line of the repeat;
    None if there is none, or if ``text`` is not YAML (whose own parser then says what is wrong)."""
    import yaml

    try:
        root: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
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
