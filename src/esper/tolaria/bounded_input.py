"""Bounded user input: size limits on config documents, and errors that quote input only in part.

A config file is read only up to :data:`MAX_CONFIG_BYTES`, and a YAML document (a file or an
override value) may expand to at most :data:`MAX_YAML_NODES` nodes once its aliases are followed:
a few hundred bytes of nested aliases (a "billion laughs" document) would otherwise expand to
millions of values, gigabytes of memory and megabytes of error message. Every error that echoes
what the user gave quotes it through :func:`excerpt`, which never builds more than a bounded repr.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from esper.errors import ConfigurationError

MAX_CONFIG_BYTES = 64 * 1024
"""Largest config file read (the presets are under 1 KiB)."""

MAX_YAML_NODES = 10_000
"""Most nodes a YAML document may expand to, aliases followed (the presets have about 100)."""

EXCERPT_CHARS = 80
"""Default length of an input quoted in an error message."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``3e-3`` and ``1E5`` as numbers: YAML 1.1 wants a dot
    and a signed exponent (``3.0e-3``), so without this ``lr: 3e-3`` would load as text."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT_CHARS


def excerpt(value: Any, *, limit: int = EXCERPT_CHARS) -> str:
    """A repr of ``value`` for an error message, at most about ``limit`` characters.

    Large nested values are abbreviated while the repr is built (``reprlib``), so quoting a huge
    input costs no more than quoting a small one.
    """
    text = repr(value) if isinstance(value, str) and len(value) <= limit else _REPR.repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def clip(text: str, *, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_config_text(path: str | Path) -> str:
    """The text of the config file at ``path`` (UTF-8, at most :data:`MAX_CONFIG_BYTES`).

    Raises:
        FileNotFoundError: there is no such file (the caller names the presets).
        ConfigurationError: ``path`` is a folder, unreadable, too large or not UTF-8 text.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigurationError(
            f"config {path} is a folder, not a file; pass one of its .yaml files, "
            f"e.g. --config {path / 'digits.yaml'}"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigurationError(
            f"config file {path} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigurationError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a run config is a "
            "few sections of settings (see configs/digits.yaml)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"config file {path} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); "
            "save it as UTF-8 YAML"
        ) from None


def load_yaml(text: str, *, source: str) -> Any:
    """Parse one YAML document safely (``yaml.SafeLoader``, plus numbers such as ``3e-3``) with
    its expansion bounded.

    Args:
        text: the document.
        source: what it is, for error messages (``config file configs/x.yaml``).

    Raises:
        ConfigurationError: not valid YAML, recursive aliases, or more than
            :data:`MAX_YAML_NODES` nodes once aliases are expanded.
    """
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except ConfigurationError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            f"{source} is not valid YAML: {excerpt(str(exc), limit=300)}"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits; deep nesting
        raise ConfigurationError(
            f"{source} has a value YAML cannot hold: {excerpt(str(exc))}"
        ) from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a node graph that expands to more than :data:`MAX_YAML_NODES` nodes or loops."""
    sizes: dict[int, int] = {}  # expanded size of each node already counted (aliases share nodes)
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigurationError(
                f"{source} has a recursive alias (an anchor used inside itself)"
            )
        open_nodes.add(key)
        total = 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise ConfigurationError(
                    f"{source} expands to more than {MAX_YAML_NODES} values once its aliases are "
                    "followed; a run config has a few dozen (write the values out, or drop the "
                    "anchors and aliases)"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)
