"""Typed reads from YAML nodes that record every problem with its line instead of stopping.

Split from ``loader`` so the section builders there read as a list of settings, not of type checks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.model import HostPort
from gateway.config.units import parse_duration, parse_size

NULL_TAG = "tag:yaml.org,2002:null"
BAD = object()
"""What :meth:`Reader.scalar` returns for a node that is not a scalar (already reported)."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where (``line`` 1-based, ``key`` dotted path) and what."""

    line: int | None
    key: str
    message: str


class ConfigError(Exception):
    """Raised with *every* issue found; ``str()`` gives one ``FILE:LINE: key: message`` per line."""

    def __init__(self, errors: list[ConfigIssue], source: str = "<string>") -> None:
        self.errors = errors
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(_format_issue(self.source, issue) for issue in self.errors)


def _format_issue(source: str, issue: ConfigIssue) -> str:
    where = source if issue.line is None else f"{source}:{issue.line}"
    return f"{where}: {issue.key}: {issue.message}" if issue.key else f"{where}: {issue.message}"


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


class Reader:
    """Reads typed values from YAML nodes; a bad value is recorded and read as ``None``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.issues: list[ConfigIssue] = []
        self._constructor = SafeConstructor()
        self._owners: dict[int, Node] = {}

    def owner(self, node: Node | None) -> Node | None:
        """The key node that introduced ``node``: where "required" errors of a section point."""
        return self._owners.get(id(node), node) if node is not None else None

    def error(self, node: Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.issues.append(ConfigIssue(line, key, message))

    def mapping(
        self, node: Node, key: str, allowed: Collection[str] | None
    ) -> dict[str, Node] | None:
        """Key -> value node; unknown and duplicate keys are errors, ``<<`` merges are honoured."""
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG:
            return {}  # ``backend:`` with nothing under it: all defaults
        if not isinstance(node, MappingNode):
            self.error(node, key, f"expected a mapping, not a {_shape(node)}")
            return None
        seen: set[str] = set()
        for knode, _ in node.value:
            if isinstance(knode, ScalarNode) and knode.value in seen and knode.value != "<<":
                self.error(knode, join(key, knode.value), "duplicate key")
            seen.add(knode.value if isinstance(knode, ScalarNode) else "")
        try:
            self._constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self.error(node, key, f"bad merge: {exc.problem}")
            return None
        result: dict[str, Node] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                self.error(knode, key, "keys must be plain scalars")
            elif allowed is not None and knode.value not in allowed:
                expected = ", ".join(sorted(allowed))
                self.error(knode, join(key, knode.value), f"unknown key (expected: {expected})")
            else:
                result[knode.value] = vnode  # with merges, the later (own) key wins
                self._owners[id(vnode)] = knode
        return result

    def fields(
        self, node: Node, key: str, readers: Mapping[str, Callable[[Node, str], object]]
    ) -> dict[str, Any] | None:
        """Read a section whose keys each have a reader; invalid or absent keys are left out."""
        found = self.mapping(node, key, readers.keys())
        return None if found is None else self.read_fields(found, key, readers)

    def read_fields(
        self,
        found: Mapping[str, Node],
        key: str,
        readers: Mapping[str, Callable[[Node, str], object]],
    ) -> dict[str, Any]:
        """The valid values of those ``readers`` keys present in an already-read mapping."""
        values = {
            name: readers[name](node, join(key, name))
            for name, node in found.items()
            if name in readers
        }
        return {name: value for name, value in values.items() if value is not None}

    def scalar(self, node: Node, key: str, what: str) -> object:
        """The YAML-typed value of a scalar node, or :data:`BAD` (already reported) otherwise."""
        if not isinstance(node, ScalarNode):
            self.error(node, key, f"expected {what}, not a {_shape(node)}")
            return BAD
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: Node, key: str) -> str | None:
        value = self.scalar(node, key, "a string")
        if value is BAD:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = node.value  # ``key_prefix: 123`` is meant as text
        if not isinstance(value, str) or not value.strip():
            self.error(node, key, f"expected a non-empty string, got {value!r}")
            return None
        return value

    def optional_string(self, node: Node, key: str) -> str | None:
        """``null`` is allowed and means "off"; the caller checks the node for that."""
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG:
            return None
        return self.string(node, key)

    def boolean(self, node: Node, key: str) -> bool | None:
        value = self.scalar(node, key, "true or false")
        if value is not BAD and not isinstance(value, bool):
            self.error(node, key, f"expected true or false, got {value!r}")
        return value if isinstance(value, bool) else None

    def integer(self, node: Node, key: str, minimum: int = 1) -> int | None:
        value = self.scalar(node, key, "an integer")
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(node, key, f"expected an integer >= {minimum}, got {value!r}")
            return None
        return value

    def size(self, node: Node, key: str, minimum: int = 1) -> int | None:
        value = self.scalar(node, key, "a size")
        if value is BAD:
            return None
        try:
            size = parse_size(value)
        except ValueError as exc:
            self.error(node, key, str(exc))
            return None
        if size < minimum:
            self.error(node, key, f"must be at least {minimum} bytes")
            return None
        return size

    def duration(self, node: Node, key: str) -> float | None:
        value = self.scalar(node, key, "a duration")
        if value is BAD:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(node, key, str(exc))
            return None

    def positive_duration(self, node: Node, key: str) -> float | None:
        seconds = self.duration(node, key)
        if seconds is not None and seconds <= 0:
            self.error(node, key, "must be greater than zero")
            return None
        return seconds

    def choice(self, node: Node, key: str, choices: Collection[str]) -> str | None:
        value = self.scalar(node, key, "a string")
        if value is BAD:
            return None
        if not isinstance(value, str) or value not in choices:
            self.error(node, key, f"expected one of {', '.join(choices)}, got {value!r}")
            return None
        return value

    def sequence(self, node: Node, key: str) -> list[Node] | None:
        if isinstance(node, ScalarNode) and node.tag == NULL_TAG:
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, key, f"expected a list, not a {_shape(node)}")
            return None
        return list(node.value)

    def strings(self, node: Node, key: str) -> list[tuple[str, Node]] | None:
        """A list of strings, each with its node so later checks can point at its line."""
        items = self.sequence(node, key)
        if items is None:
            return None
        out = [(self.string(item, f"{key}[{i}]"), item) for i, item in enumerate(items)]
        return [(text, item) for text, item in out if text is not None]

    def host_port(self, node: Node, key: str) -> HostPort | None:
        text = self.string(node, key)
        return None if text is None else self.parse_host_port(text, node, key)

    def parse_host_port(self, text: str, node: Node | None, key: str) -> HostPort | None:
        host, sep, port = text.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.error(node, key, f"expected host:port such as 127.0.0.1:8080, got {text!r}")
            return None
        return HostPort(host, int(port))

    def url(
        self, node: Node | None, key: str, text: str | None, schemes: Collection[str]
    ) -> str | None:
        if text is None:
            return None
        try:
            parts = urlsplit(text)
            ok = parts.scheme in schemes and bool(parts.hostname or parts.scheme == "unix")
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok:
            wanted = " or ".join(f"{s}://" for s in schemes)
            # Not quoted: a URL may carry a password (whoever has Redis's can add API keys),
            # and a malformed one cannot be trusted to show where it ends; the line says where.
            self.error(node, key, f"expected a {wanted} URL (the value is not shown)")
            return None
        return text


def _shape(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "mapping"
    return "list" if isinstance(node, SequenceNode) else "scalar"
