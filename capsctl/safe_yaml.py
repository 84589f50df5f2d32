"""Reading a YAML file that may be hostile: ``read_yaml(path)`` is the one implementation.

Whatever the file, the result is the parsed data or one ConfigError line, in bounded time and
memory, and nothing is executed:

- only a regular file is opened (a FIFO, a device such as /dev/zero or a socket is refused after
  an ``os.stat`` and the open does not block), at most ``MAX_FILE_BYTES`` of it is read;
- the safe loader builds plain data only (no ``!!python/...`` tags);
- before anything is constructed, the size of the document with every alias expanded is counted
  (each distinct node once, so a "billion laughs" is measured, never built): aliases may add at
  most ``MAX_ALIAS_NODES`` nodes, and a recursive alias is refused;
- a key given twice in one mapping is an error naming the key and both lines.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from capsctl.errors import ConfigError

MAX_FILE_BYTES = 256 << 10     # a config is a few KB; the pure-Python parser takes ~4 s for this
MAX_ALIAS_NODES = 10_000     # nodes that aliases may add to the document when expanded
COUNT_CAP = 10 ** 12         # expanded sizes are counted up to this (no huge integers)
SPECIAL_KEY_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")  # <<, =


class AliasBombError(yaml.YAMLError):
    """The document's aliases expand to too many nodes, or refer to themselves."""


class DuplicateKeyError(ConstructorError):
    """A mapping names the same key twice."""

    def __init__(self, key: Any, where: str, first: str):
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.where, self.first = key, where, first


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def distinct_nodes(root: Node) -> list[Node]:
    """Every node of the document once (an alias is the node it names), parents first."""
    seen, order, stack = set(), [], [root]
    while stack:  # iterative: a deep document cannot overflow the stack here
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            order.append(node)
            stack.extend(reversed(_children(node)))
    return order


def expanded_size(nodes: list[Node]) -> int:
    """Nodes of the document (``nodes`` from ``distinct_nodes``) with every alias expanded,
    counted without expanding anything: each distinct node's expanded size once, children before
    parents, saturating at COUNT_CAP. AliasBombError for a node that contains itself (a
    recursive alias)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(nodes[0], False)]
    while stack:
        node, done = stack.pop()
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in _children(node)), COUNT_CAP)
        elif id(node) in on_path:
            raise AliasBombError("a recursive alias (a node that contains itself)")
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(nodes[0])]


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks the composed document before constructing anything:
    alias bombs and duplicate keys are refused (see the module doc)."""

    def get_single_data(self) -> Any:
        """The document's data (None when empty), after the checks."""
        root = self.get_single_node()
        if root is None:
            return None
        nodes = distinct_nodes(root)
        extra = expanded_size(nodes) - len(nodes)
        if extra > MAX_ALIAS_NODES:
            shown = extra if extra < COUNT_CAP - len(nodes) else f"more than {COUNT_CAP}"
            raise AliasBombError(f"its aliases expand the document by {shown} nodes, more than "
                                 f"the {MAX_ALIAS_NODES} allowed (an alias bomb?)")
        for node in nodes:
            if isinstance(node, MappingNode):
                self._check_keys(node)
        return self.construct_document(root)

    def _check_keys(self, node: MappingNode) -> None:
        """DuplicateKeyError when two scalar keys of the mapping construct to equal values
        (merge ``<<`` and value ``=`` keys are not keys; non-scalar keys are left to the
        constructor)."""
        first: dict[Any, str] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag in SPECIAL_KEY_TAGS:
                continue
            key = self.construct_object(key_node)
            mark = key_node.start_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}"
            try:
                earlier = first.get(key)
            except TypeError:  # unhashable: the constructor reports it
                continue
            if earlier is not None:
                raise DuplicateKeyError(key, where, earlier)
            first[key] = where


def _read_bytes(path: Path) -> bytes:
    """At most MAX_FILE_BYTES of a regular file; ConfigError for anything else."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise ConfigError(f"config file not found: {path}") from None
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"config path is a folder, not a YAML file: {path}")
    _check_regular(path, st)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            _check_regular(path, os.fstat(f.fileno()))  # replaced since the stat: check again
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_FILE_BYTES} bytes; a config is "
                          "a few KB, pass the right file")
    return raw


def _check_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: config file is {st.st_size} bytes, more than the "
                              f"{MAX_FILE_BYTES} allowed; a config is a few KB, pass the right "
                              "file")
        return
    kind = next((name for test, name in (
        (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket")) if test(st.st_mode)), "not a regular file")
    raise ConfigError(f"config path is {kind}, not a YAML file: {path}")


def read_yaml(path: str | Path) -> Any:
    """The data of the YAML file ``path`` (never None: an empty file is an error), or one
    ConfigError line saying what is wrong and where."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: duplicate key {_short(e.key)} at {e.where} (first at "
                          f"{e.first}); keep one of them") from None
    except AliasBombError as e:
        raise ConfigError(f"{path}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read; a config is a few levels "
                          "deep") from None
    except (ValueError, TypeError, IndexError, OverflowError) as e:
        # the safe loader's constructors reject some values outright (2001-02-30, "!!float ")
        raise ConfigError(f"{path}: invalid YAML value ({type(e).__name__}: "
                          f"{str(e)[:100]})") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; copy one from configs/")
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- command-line values: YAML 1.2 ------------------------------------------------------------

class Yaml12Loader(BoundedSafeLoader):
    """The safe loader with the YAML 1.2 core schema's scalars: ``010`` is ten (octal needs
    ``0o10``), ``1:30`` and ``1_000`` are strings (no sexagesimal numbers, no digit
    separators), only ``true``/``false`` (any case of the first letter, or all capitals) are
    booleans (``yes``, ``on`` are strings), and no timestamps; ``1e-3`` is a float."""

    yaml_implicit_resolvers: dict = {}


_RESOLVERS_1_2 = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$",
     "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
]
for _tag, _pattern, _first in _RESOLVERS_1_2:
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_int_1_2(loader: yaml.SafeLoader, node: ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _construct_float_1_2(loader: yaml.SafeLoader, node: ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int_1_2)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float_1_2)


def parse_value(text: str) -> Any:
    """A value given on the command line (``--set``, ``--vary``) parsed as YAML 1.2 (see
    Yaml12Loader): a scalar, or a flow list or mapping. Raises yaml.YAMLError (or the
    constructors' ValueError) for text that is not YAML; the caller words the message."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
