"""Load and validate recipes against the shipped JSON Schema.

The schema (``compress/recipe/schema/recipe.schema.json``) is the one source of key names, types,
defaults and descriptions: this module only reads it. Every problem becomes a ``ConfigError``
whose message names the JSON path, the bad value and what is allowed.

Example:
    >>> cfg = load_config({"compression": {"algorithm": "magnitude_sparsity",
    ...                                    "params": {"sparsity_target": 0.9}}})
    >>> cfg.algorithms[0].params["schedule"], cfg.algorithms[0].params["sparsity_target"]
    ('polynomial', 0.9)
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import torch

from compress.errors import ConfigError
from compress.recipe import rules, scopes
from compress.recipe.messages import choices, hint, message

IMPLEMENTED = (
    "magnitude_sparsity",
    "rb_sparsity",
    "const_sparsity",
    "filter_pruning",
    "knowledge_distillation",
)
# NNCF algorithms this library knows by name but does not implement.
NOT_IMPLEMENTED = (
    "quantization",
    "experimental_quantization",
    "binarization",
    "movement_sparsity",
    "elasticity",
    "progressive_shrinking",
    "NoCompressionAlgorithm",
)


@cache
def schema() -> dict[str, Any]:
    """The recipe JSON Schema shipped with the package."""
    text = resources.files("compress.recipe").joinpath("schema/recipe.schema.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class AlgorithmConfig:
    """One entry of ``compression``, with every default from the schema filled in."""

    name: str
    path: str  # JSON path used in messages, e.g. "compression[1]"
    options: Mapping[str, Any]  # the algorithm-level keys (sparsity_init, ignored_scopes, ...)
    params: Mapping[str, Any]

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self)


@dataclass(frozen=True)
class Config:
    """A validated recipe. ``data`` is the whole recipe, defaults filled in."""

    data: Mapping[str, Any]
    algorithms: tuple[AlgorithmConfig, ...]
    source: str = "<dict>"

    def __reduce__(self) -> tuple[Any, ...]:
        # A read-only mapping cannot be pickled; ddp_spawn pickles the callback that holds this.
        return _reduce(self)

    def example_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """Example inputs made from ``input_info``, or None when the recipe has none."""
        info = self.data.get("input_info")
        if info is None:
            return None
        dtypes = {
            "float": torch.float32,
            "long": torch.long,
            "int": torch.int32,
            "bool": torch.bool,
        }
        out = []
        for i, item in enumerate(info if isinstance(info, list) else [info]):
            if "keyword" in item:
                raise ConfigError(
                    f"input_info[{i}].keyword: keyword inputs are not supported; "
                    "pass example_inputs to create_compressed_model instead"
                )
            shape, dtype = item["sample_size"], dtypes[item.get("type", "float")]
            filler = item.get("filler", "random")
            gen = torch.Generator().manual_seed(0)
            if filler == "zeros":
                t = torch.zeros(shape, dtype=dtype)
            elif filler == "ones":
                t = torch.ones(shape, dtype=dtype)
            elif dtype.is_floating_point:
                t = torch.rand(shape, generator=gen, dtype=dtype)
            else:
                t = torch.randint(0, 2, shape, generator=gen).to(dtype)
            out.append(t)
        return tuple(out)


def _reduce(obj: AlgorithmConfig | Config) -> tuple[Any, ...]:
    fields = {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in vars(obj).items()}
    return (_rebuild, (type(obj), fields))


def _rebuild(cls: type[Any], fields: dict[str, Any]) -> Any:
    return cls(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in fields.items()})


def load_config(recipe: str | Path | Mapping[str, Any] | Config) -> Config:
    """Reads a recipe from a JSON file or a dict, validates it and fills in the defaults.

    The caller's dict is never modified. Raises ``ConfigError`` on any problem.
    """
    if isinstance(recipe, Config):
        return recipe
    if isinstance(recipe, Mapping):
        data, source = copy.deepcopy(dict(recipe)), "<dict>"
    elif not isinstance(recipe, (str, os.PathLike)):
        raise ConfigError(
            f"recipe: got {type(recipe).__name__}; give a JSON file path, a dict or a Config"
        )
    else:
        source = str(recipe)
        data = _read_json(Path(recipe))
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a JSON object, got {type(data).__name__}")
    _check_finite(data, "")
    # No 'compression' (or an empty list): NNCF trains the model uncompressed (its published
    # baseline configs); so do we, and the controller says so.
    section = data.get("compression", [])
    items = section if isinstance(section, list) else [section]
    algorithms = []
    for i, item in enumerate(items):
        path = f"compression[{i}]" if isinstance(section, list) else "compression"
        algorithms.append(_algorithm(_with_global_params(item, data), path))
    names = [a.name for a in algorithms]
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(
                f"compression: {name!r} appears {names.count(name)} times; give it once"
            )
    rest = {k: v for k, v in data.items() if k != "compression"}
    top = {k: v for k, v in schema().items() if k != "required"}
    top["properties"] = {k: v for k, v in top["properties"].items() if k != "compression"}
    _validate(rest, top, "")
    _global_scopes(rest, algorithms)
    _check_input_info(rest.get("input_info"))
    rules.check_run_epochs(algorithms, rest.get("epochs"))
    if "compression" in data:
        data["compression"] = (
            [_as_dict(a) for a in algorithms]
            if isinstance(section, list)
            else _as_dict(algorithms[0])
        )
    return Config(data=MappingProxyType(data), algorithms=tuple(algorithms), source=source)


def _with_global_params(item: Any, top: Mapping[str, Any]) -> Any:
    """NNCF's top-level ``compression_lr_multiplier`` is the default of every algorithm that
    has the key (``get_redefinable_global_param_value_for_algo``)."""
    key = "compression_lr_multiplier"
    value = top.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return item  # absent, or wrong: the top-level check says so under its own name
    if not isinstance(item, dict) or key in item:
        return item
    properties = schema()["$defs"].get(str(item.get("algorithm")), {}).get("properties", {})
    return {**item, key: value} if key in properties else item


def _global_scopes(top: Mapping[str, Any], algorithms: list[AlgorithmConfig]) -> None:
    """NNCF's top-level ``ignored_scopes`` join every algorithm's; its top-level
    ``target_scopes`` replace them (nncf/common/compression.py does the same)."""
    ignored, target = top.get("ignored_scopes"), top.get("target_scopes")
    if ignored is None and target is None:
        return
    for key in ("ignored_scopes", "target_scopes"):
        if top.get(key) is not None:
            scopes.check_scopes(top[key], key)
    for i, a in enumerate(algorithms):
        options = dict(a.options)
        if ignored is not None:
            options["ignored_scopes"] = [*_listed(ignored), *_listed(options.get("ignored_scopes"))]
        if target is not None:
            options["target_scopes"] = _listed(target)
        algorithms[i] = AlgorithmConfig(a.name, a.path, MappingProxyType(options), a.params)


def _listed(scopes_: str | list[str] | None) -> list[str]:
    if scopes_ is None:
        return []
    return [scopes_] if isinstance(scopes_, str) else list(scopes_)


def _check_input_info(info: Any) -> None:
    items = info if isinstance(info, list) else [] if info is None else [info]
    total = sum(math.prod(item["sample_size"]) for item in items)
    if total > MAX_INPUT_ELEMENTS:
        raise ConfigError(
            f"input_info: the sample sizes hold {total} elements, more than "
            f"{MAX_INPUT_ELEMENTS}; give one small batch (e.g. [1, 3, 224, 224])"
        )


def _read_json(path: Path) -> Any:
    from compress.deploy.files import read_bytes
    from compress.errors import CompressError

    try:  # a regular file of at most MAX_RECIPE_BYTES: never /dev/zero or a FIFO
        text = read_bytes(path, MAX_RECIPE_BYTES).decode("utf-8")
    except CompressError as e:
        raise ConfigError(f"cannot read the recipe: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a JSON text file (byte {e.start} is not UTF-8: {e.reason})"
        ) from None
    duplicates: list[str] = []
    try:
        data = json.loads(text, object_pairs_hook=functools.partial(_no_repeats, duplicates))
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: the JSON is nested too deeply to be a recipe") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"{path}: a number in the recipe is too long ({e})") from None
    for key in duplicates:
        warnings.warn(
            f"{path}: key {key!r} appears more than once in one object; the last value is used "
            "(as by Python's json and NNCF); remove the other",
            stacklevel=3,
        )
    return data


def _no_repeats(duplicates: list[str], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a dict, noting keys given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    return out


MAX_INT = 2**53  # the integers a float holds exactly; beyond it schedules overflow
MAX_RECIPE_BYTES = 16 * 2**20  # a recipe is a few kB
MAX_INPUT_ELEMENTS = 2**28  # example inputs from input_info: 1 GiB of float32 at most


def _check_finite(value: Any, path: str) -> None:
    """JSON Schema bounds let NaN through (every comparison with NaN is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path or '(recipe)'}: {value} is not allowed; give a finite number")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(
            f"{path or '(recipe)'}: an integer of {len(str(abs(value)))} digits is not allowed; "
            f"numbers in a recipe are at most 2**53 ({MAX_INT})"
        )
    if isinstance(value, Mapping):
        for k, v in value.items():
            # a key that is not a plain name (a layer name with dots, a control character) is
            # quoted, so that the message shows it unambiguously
            key = k if isinstance(k, str) and k.isidentifier() else repr(k)
            _check_finite(v, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{path}[{i}]")


def _algorithm(item: Any, path: str) -> AlgorithmConfig:
    if not isinstance(item, dict):
        raise ConfigError(f"{path}: an algorithm is a JSON object, got {json.dumps(item)}")
    name = item.get("algorithm")
    if name is None:
        raise ConfigError(f"{path}: missing 'algorithm'; one of {choices(IMPLEMENTED)}")
    if name not in IMPLEMENTED:
        if name in NOT_IMPLEMENTED:
            raise ConfigError(
                f"{path}.algorithm: {name!r} is not implemented by this library; "
                f"implemented: {choices(IMPLEMENTED)}"
            )
        raise ConfigError(
            f"{path}.algorithm: unknown algorithm {json.dumps(name)}{hint(name, IMPLEMENTED)}; "
            f"implemented: {choices(IMPLEMENTED)}"
        )
    sub = schema()["$defs"][name]
    _validate(item, sub, path)
    if name == "knowledge_distillation" and item.get("type") == "mse":
        if item.get("temperature", 1.0) != 1.0:  # the default is harmless: filled-in recipes load
            raise ConfigError(
                f"{path}.temperature: only the 'softmax' type has a temperature; drop it"
            )
    params = {**_defaults(sub["properties"]["params"]), **copy.deepcopy(item.get("params", {}))}
    options = {**_defaults(sub), **{k: copy.deepcopy(v) for k, v in item.items() if k != "params"}}
    options.pop("params", None)
    rules.check_algorithm(name, options, params, path)
    for key in ("ignored_scopes", "target_scopes"):
        scopes.check_scopes(options.get(key), f"{path}.{key}")
    return AlgorithmConfig(name, path, MappingProxyType(options), MappingProxyType(params))


def _defaults(sub: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: copy.deepcopy(v["default"])
        for k, v in sub.get("properties", {}).items()
        if "default" in v and k != "params"
    }


def _as_dict(a: AlgorithmConfig) -> dict[str, Any]:
    return {**dict(a.options), "params": dict(a.params)}


# JSON Schema counts 3.0 as an integer; the code that reads integer keys (round_to, steps,
# epochs) does not, so a float is refused at validation rather than as a TypeError at build.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)
    ),
)


def _validate(instance: Any, sub: Mapping[str, Any], path: str) -> None:
    root = schema()
    resolver_schema = {**sub, "$defs": root["$defs"]}
    validator = _Validator(resolver_schema)
    errors = sorted(
        validator.iter_errors(instance), key=lambda e: (len(e.path), list(map(str, e.path)))
    )
    if errors:
        raise ConfigError(message(errors[0], path))


def keys_markdown() -> str:
    """The recipe keys of every algorithm as a Markdown table, generated from the schema (the
    README's key list is this text; a test keeps them equal)."""
    lines = ["| algorithm | key | default | description |", "| --- | --- | --- | --- |"]
    defs = schema()["$defs"]
    for algo in IMPLEMENTED:
        props = defs[algo]["properties"]
        keys = [(k, v) for k, v in props.items() if k not in ("algorithm", "params")]
        keys += [(f"params.{k}", v) for k, v in props["params"]["properties"].items()]
        for key, spec in keys:
            if "$ref" in spec:
                spec = {**_resolve(spec["$ref"]), **{k: v for k, v in spec.items() if k != "$ref"}}
            default = json.dumps(spec["default"]) if "default" in spec else ""
            allowed = " / ".join(json.dumps(v) for v in spec.get("enum", ()))
            text = spec.get("description", "").replace("|", "\\|")
            if allowed:
                text = f"One of {allowed}. {text}"
            lines.append(f"| {algo} | `{key}` | {default} | {text} |")
    return "\n".join(lines)


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    if "$ref" in node:
        return {**_resolve(node["$ref"]), **{k: v for k, v in node.items() if k != "$ref"}}
    return dict(node)
