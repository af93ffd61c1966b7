"""Reads an official CosyVoice yaml (hyperpyyaml dialect) into a plain tree.

The official `cosyvoice2.yaml` describes its object graph with four tags:

    !new:pkg.Class {kwargs}      construct an object
    !name:pkg.function {kwargs}  a function with bound keyword arguments
    !ref <key> [arithmetic]      the value of another top-level key, e.g. `!ref <a> * <b>`
    !apply:pkg.function [args]   call at load time (only the seeding calls use it)

We never import or construct what the tags name. Parsing keeps them as `New`, `Name`, `Ref`
and `Apply` records; `YamlConfig.resolve(key)` replaces references by their values, and
`cosyvoice.loading.registry` later maps the upstream class paths to our own classes. `!apply`
is never executed: the seeding it does is upstream's business, not ours.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The yaml cannot be read or does not describe a model this runtime supports."""


@dataclass(frozen=True)
class New:
    """`!new:path` — an object to construct from `kwargs` (or positional `args`)."""
    path: str
    kwargs: dict = field(default_factory=dict)
    args: list = field(default_factory=list)


@dataclass(frozen=True)
class Name:
    """`!name:path` — a callable with bound keyword arguments, not called."""
    path: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ref:
    """`!ref <key> ...` — another key's value, optionally inside simple arithmetic."""
    expr: str


@dataclass(frozen=True)
class Apply:
    """`!apply:path [args]` — a load-time call; recorded, never executed."""
    path: str
    args: list = field(default_factory=list)


class _Loader(yaml.SafeLoader):
    """SafeLoader plus the hyperpyyaml tags, and floats written like `1e-06`."""


# YAML 1.1 (PyYAML) reads `1e-06` as a string; hyperpyyaml's yaml reads it as a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _node_contents(loader: yaml.Loader, node: yaml.Node) -> tuple[dict, list]:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True), []
    if isinstance(node, yaml.SequenceNode):
        return {}, loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return {}, ([] if value in ("", None) else [value])


def _construct_new(loader, suffix, node):
    kwargs, args = _node_contents(loader, node)
    return New(suffix, kwargs, args)


def _construct_name(loader, suffix, node):
    kwargs, args = _node_contents(loader, node)
    if args:
        raise ConfigError(f"!name:{suffix} takes keyword arguments only")
    return Name(suffix, kwargs)


def _construct_apply(loader, suffix, node):
    kwargs, args = _node_contents(loader, node)
    return Apply(suffix, args or [kwargs])


def _construct_ref(loader, node):
    return Ref(loader.construct_scalar(node))


_Loader.add_multi_constructor("!new:", _construct_new)
_Loader.add_multi_constructor("!name:", _construct_name)
_Loader.add_multi_constructor("!apply:", _construct_apply)
_Loader.add_constructor("!ref", _construct_ref)

_REF_KEY = re.compile(r"<([^<>]+)>")
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
               ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval_arithmetic(expr: str) -> Any:
    """Evaluates numbers combined with + - * / // % ** and parentheses; nothing else."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](walk(node.operand))
        raise ConfigError(f"unsupported expression in !ref: {expr!r}")
    try:
        return walk(ast.parse(expr, mode="eval"))
    except SyntaxError as exc:
        raise ConfigError(f"unsupported expression in !ref: {expr!r}") from exc


class YamlConfig:
    """A parsed yaml whose top-level keys can be resolved on demand.

    Only the keys a caller asks for are resolved, so training-only sections (which name
    classes we do not have) are never touched.
    """

    def __init__(self, tree: dict, source: str, overrides: dict | None = None):
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        self.tree = {**tree, **(overrides or {})}
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict | None = None) -> "YamlConfig":
        path = Path(path)
        try:
            tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid yaml ({exc})") from exc
        return cls(tree, str(path), overrides)

    def __contains__(self, key: str) -> bool:
        return key in self.tree

    def resolve(self, key: str) -> Any:
        """The value of a top-level key with every `!ref` inside it replaced."""
        return self._resolve_key(key, ())

    def _resolve_key(self, key: str, chain: tuple) -> Any:
        if key in chain:
            raise ConfigError(f"{self.source}: circular !ref through {' -> '.join(chain + (key,))}")
        if key not in self.tree:
            where = f" (referenced from {chain[-1]})" if chain else ""
            raise ConfigError(f"{self.source}: missing key '{key}'{where}")
        return self._resolve_value(self.tree[key], chain + (key,))

    def _resolve_value(self, value: Any, chain: tuple) -> Any:
        if isinstance(value, Ref):
            return self._resolve_ref(value.expr, chain)
        if isinstance(value, New):
            return New(value.path, self._resolve_value(value.kwargs, chain),
                       self._resolve_value(value.args, chain))
        if isinstance(value, Name):
            return Name(value.path, self._resolve_value(value.kwargs, chain))
        if isinstance(value, dict):
            return {k: self._resolve_value(v, chain) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_value(v, chain) for v in value]
        return value

    def _resolve_ref(self, expr: str, chain: tuple) -> Any:
        keys = _REF_KEY.findall(expr)
        if not keys:
            raise ConfigError(f"{self.source}: !ref {expr!r} names no <key>")
        if _REF_KEY.fullmatch(expr.strip()):  # a plain reference: the value itself
            return self._resolve_key(keys[0], chain)
        values = {k: self._resolve_key(k, chain) for k in keys}
        for k, v in values.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{self.source}: !ref {expr!r} does arithmetic on non-number <{k}>")
        return _eval_arithmetic(_REF_KEY.sub(lambda m: repr(values[m.group(1)]), expr))
