"""Hostile input: generated and mutated recipes, damaged and foreign files, pickle payloads, and
a writer killed mid-write.

- Recipes are generated with hypothesis-jsonschema from each algorithm's ``$defs`` entry of the
  shipped schema. Schema-valid recipes load (or fail on one of the documented cross-key rules)
  and build, schedule, strip and verify on a small CNN; mutations raise only ``ConfigError``;
  ``compress validate`` exits 0 or 2 and never prints a traceback.
- Files: every corruption in ``corruptions()`` is tried on each loader; each either raises a
  ``CompressError`` that names the file, or loads exactly the original content (a flipped byte
  in zip padding changes nothing). The numbers tried are in docs/reliability.md.

Example counts: ``EXAMPLES`` per algorithm and per property in the default run; under
``pytest -m slow`` (or COMPRESS_SLOW=1) ``SLOW_EXAMPLES``. Both runs are derandomized, so the
figures are reproducible; ``COMPRESS_HYPOTHESIS_EXAMPLES`` overrides the slow count.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ConvBNNet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as _cu
from torch import nn

import compress
from compress import cli
from compress.algorithms import ALGORITHMS
from compress.deploy.export import export, load_sparse, save_sparse
from compress.deploy.files import atomic_write
from compress.errors import CompressError, ConfigError
from compress.recipe.config import IMPLEMENTED, Config, load_config, schema


class _Many:
    """hypothesis-jsonschema 0.23.1 (the latest) calls ``many.more()``, which recent Hypothesis
    replaced by iterating the ``many`` object. This adapter gives it the old interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._many = _cu.many(*args, **kwargs)
        self._many.__enter__()
        self._iter = iter(self._many)

    def more(self) -> bool:
        try:
            next(self._iter)
            return True
        except StopIteration:
            self._many.__exit__(None, None, None)
            return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


import hypothesis_jsonschema._from_schema as _hjs  # noqa: E402
from hypothesis_jsonschema import from_schema  # noqa: E402

if not hasattr(_cu.many, "more"):
    _hjs.cu = types.SimpleNamespace(**{**vars(_cu), "many": _Many})  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parent.parent
TRIED: collections.Counter[str] = collections.Counter()  # figures for docs/reliability.md
COUNTS: dict[str, dict[str, int]] = {}
EXAMPLES = 25
SLOW_EXAMPLES = int(os.environ.get("COMPRESS_HYPOTHESIS_EXAMPLES", 0)) or 300


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the small model every recipe is built on (conftest.ConvBNNet) and its input -------------

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

# --- recipes ---------------------------------------------------------------------------------

# Schema-valid recipes that break one of the cross-key rules compress/recipe/rules.py enforces, or
# one of the bounds load_config adds (integers up to 2**53, input_info size, safe regexes).
CROSS_KEY_RULES = re.compile(
    r"levels for \d+ steps|must be in ascending order|are both set; give only one|"
    r"'learned_ranking' \(LeGR\) is not supported|'uniform' contradicts all_weights|"
    r"pruning_init: .* is above pruning_target|only the 'softmax' type has a temperature|"
    r"an integer of \d+ digits is not allowed|"
    r"input_info: the sample sizes hold|scopes: .*(not a valid regex|variable length|unbounded)"
)
# A ConfigError from building is acceptable only when the recipe names layers.
SCOPE_ERRORS = re.compile(r"scope|no layer to compress|layer_ratios|prune_channels|no group")
# Filter pruning options that exclude every group of the test model: an error naming the flags.
NOTHING_PRUNABLE = re.compile(
    r"filter_pruning can prune nothing: .*; set (prune_|ignored_|a smaller)"
)


@functools.cache
def recipes(name: str, *, on_model: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Generated ``compression`` entries of one algorithm (building a strategy is slow)."""
    return from_schema(algorithm_schema(name, on_model=on_model))


def algorithm_schema(name: str, *, on_model: bool = False) -> dict[str, Any]:
    """The shipped schema of one algorithm, with 'algorithm' required. ``on_model`` narrows the
    keys that name layers to names of ``ConvBNNet`` (and one that is not there), so that generated
    recipes build instead of all failing on a random scope string."""
    defs = copy.deepcopy(schema()["$defs"])
    if on_model:
        names = ["conv1", "conv2", "fc", "conv*", "{re}conv[12]", "missing_layer"]
        defs["scopes"] = {
            "oneOf": [
                {"enum": names},
                {"type": "array", "items": {"enum": names}, "maxItems": 3},
            ]
        }
        params = defs["filter_pruning"]["properties"]["params"]["properties"]
        params["prune_channels"] = {
            "type": "object",
            "properties": {"conv1": {"enum": ["0", "1-2", "0, 3"]}},
            "additionalProperties": False,
        }
        params["layer_ratios"] = {
            "type": "object",
            "properties": {"conv2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
            "additionalProperties": False,
        }
        params["calibration_batches"] = {"type": "integer", "minimum": 1, "maximum": 2}
    required = sorted({"algorithm", *defs[name].get("required", [])})
    return {**defs[name], "required": required, "$defs": defs}


def _names_layers(section: Any) -> bool:
    items = section if isinstance(section, list) else [section]
    for a in items:
        p = a.get("params", {})
        if a.get("ignored_scopes") or a.get("target_scopes") is not None:
            return True
        if p.get("prune_channels") or p.get("layer_ratios"):
            return True
    return False


def build_and_verify(recipe: dict[str, Any]) -> None:
    """Builds on ConvBNNet, trains a few scheduled steps, and checks strip() equals the masked
    model."""
    torch.manual_seed(0)
    ctrl, model = compress.create_compressed_model(ConvBNNet(), recipe, X)
    for algo in ctrl.algorithms:
        if getattr(algo, "needs_calibration", False):
            algo.calibrate([X])  # type: ignore[attr-defined]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        ctrl.scheduler.epoch_step()
        for _ in range(2):
            loss = model(X).square().mean() + ctrl.loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
            ctrl.scheduler.step()
    level = ctrl.compression_level
    assert math.isfinite(level) and 0.0 <= level < 1.0
    ctrl.statistics().to_dict()
    state = ctrl.state_dict()
    if not all(bool(t.isfinite().all()) for t in (*model.parameters(), *model.buffers())):
        # A distillation scale in the hundreds can make these few SGD steps diverge: strip()
        # must then refuse the weights, naming the layer, rather than write them.
        with pytest.raises(CompressError, match=r"holds NaN or Inf; the weights diverged"):
            ctrl.strip()
        return
    with torch.no_grad():
        finite = bool(model.eval()(X).isfinite().all())
    model.train()
    if not finite:  # finite weights large enough to overflow: nothing to compare strip() with
        with pytest.raises(CompressError, match=r"output 0 holds NaN or Inf .*outputs overflow"):
            ctrl.strip()
        return
    plain = ctrl.strip()
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(X), model(X), atol=1e-5, rtol=1e-4)
    ctrl.load_state_dict(state)


def _skip_unlanded(name: str) -> None:
    if name not in ALGORITHMS:
        pytest.skip(f"{name} not landed")


def _valid_loads(section: dict[str, Any]) -> bool:
    try:
        load_config({"compression": section})
    except ConfigError as e:
        assert CROSS_KEY_RULES.search(str(e)), f"schema-valid recipe refused: {e}"
        return False
    return True


def _check_generated_recipe_builds(section: dict[str, Any]) -> None:
    TRIED["generated recipes built"] += 1
    if not _valid_loads(section):
        TRIED["... refused by a cross-key rule"] += 1
        return
    try:
        build_and_verify({"compression": section})
    except ConfigError as e:
        if NOTHING_PRUNABLE.search(str(e)):  # the options leave ConvBNNet no group to prune
            TRIED["... nothing prunable, the flag named"] += 1
            return
        assert _names_layers(section) and SCOPE_ERRORS.search(str(e)), (
            f"recipe without layer names failed to build: {e}\n{json.dumps(section)}"
        )


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_schema_valid_recipes_load(name: str) -> None:
    """Straight from the shipped schema (scopes are arbitrary strings here): loading succeeds
    or fails only on a documented cross-key rule."""

    @_settings(EXAMPLES * 2)
    @given(recipes(name))
    def check(section: dict[str, Any]) -> None:
        TRIED["schema-valid recipes loaded"] += 1
        if _valid_loads(section):
            cfg = load_config({"compression": section})
            assert cfg.algorithms[0].name == name
            load_config(json.loads(json.dumps(dict(cfg.data))))  # defaults filled in: still valid

    check()


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_generated_recipes_build_schedule_and_strip(name: str) -> None:
    _skip_unlanded(name)
    _settings(EXAMPLES)(given(recipes(name, on_model=True))(_check_generated_recipe_builds))()


@pytest.mark.slow
@pytest.mark.parametrize("name", IMPLEMENTED)
def test_generated_recipes_build_long(name: str) -> None:
    _skip_unlanded(name)
    _settings(SLOW_EXAMPLES)(given(recipes(name, on_model=True))(_check_generated_recipe_builds))()


def test_generated_combined_lists_build() -> None:
    names = [n for n in IMPLEMENTED if n in ALGORITHMS]
    pairs = st.sampled_from(names).flatmap(
        lambda a: st.tuples(
            recipes(a, on_model=True),
            st.sampled_from([n for n in names if n != a]).flatmap(
                lambda b: recipes(b, on_model=True)
            ),
        )
    )

    @_settings(EXAMPLES)
    @given(pairs)
    def check(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
        TRIED["generated combined lists built"] += 1
        section = list(pair)
        if not all(_valid_loads(a) for a in section):
            return
        try:
            build_and_verify({"compression": section})
        except ConfigError as e:
            assert _names_layers(section) and SCOPE_ERRORS.search(str(e)), str(e)

    check()


# --- mutations ---------------------------------------------------------------------------------

WRONG_TYPES = ["a string", [1, 2], {"k": 1}, True, None, -3]
OUT_OF_RANGE = [-1.0, 1.0, 1.5, 1e308, -1e-9, float("nan"), float("inf"), float("-inf")]
RANGED = {  # key -> where it lives ("" = algorithm level)
    "sparsity_init": "",
    "pruning_init": "",
    "sparsity_target": "params",
    "pruning_target": "params",
}


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=12,
    )


def _any_valid_section() -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(IMPLEMENTED).flatmap(lambda n: recipes(n))


def _leaf_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict) and obj:
        return [p for k, v in obj.items() for p in _leaf_paths(v, (*prefix, k))] + [prefix]
    if isinstance(obj, list) and obj:
        return [p for i, v in enumerate(obj) for p in _leaf_paths(v, (*prefix, i))] + [prefix]
    return [prefix]


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def _loads_or_config_error(recipe: Any) -> Config | None:
    try:
        return load_config(recipe)
    except ConfigError as e:
        assert str(e) and "Traceback" not in str(e)
        return None


def _has_huge_integer(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_huge_integer(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_integer(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53


def _check_mutation(data: st.DataObject) -> None:
    section = data.draw(_any_valid_section(), label="valid")
    # Integers above 2**53 are schema-valid but refused by load_config (a bound of its own):
    # the mutated key's error must be the one that shows.
    assume(not _has_huge_integer(section))
    kind = data.draw(st.sampled_from(["unknown key", "wrong type", "out of range", "random"]))
    TRIED["mutated recipes"] += 1
    recipe: Any = {"compression": copy.deepcopy(section)}
    if kind == "unknown key":
        where = data.draw(st.sampled_from(["algorithm", "params"]))
        props = schema()["$defs"][section["algorithm"]]["properties"]
        known = props["params"]["properties"] if where == "params" else props
        key = data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in known))
        target = recipe["compression"]
        if where == "params":
            target = target.setdefault("params", {})
        target[key] = data.draw(_json_values())
        with pytest.raises(ConfigError, match=re.escape(repr(key)[1:-1])):
            load_config(recipe)
        return
    if kind == "wrong type":
        name = section["algorithm"]
        props = schema()["$defs"][name]["properties"]
        typed = [k for k, v in props.items() if v.get("type") in ("number", "boolean")]
        typed += [f"params.{k}" for k, v in props["params"]["properties"].items() if "enum" in v]
        if not typed:
            return
        key = data.draw(st.sampled_from(typed))
        value = data.draw(st.sampled_from(WRONG_TYPES))
        if key.startswith("params."):
            recipe["compression"].setdefault("params", {})[key[7:]] = value
        else:
            recipe["compression"][key] = value
        with pytest.raises(ConfigError, match=re.escape(key.split(".")[-1])):
            load_config(recipe)
        return
    if kind == "out of range":
        key, where = data.draw(st.sampled_from(sorted(RANGED.items())))
        props = schema()["$defs"][section["algorithm"]]["properties"]
        scope = props["params"]["properties"] if where else props
        if key not in scope:
            return
        target = recipe["compression"].setdefault("params", {}) if where else recipe["compression"]
        target[key] = data.draw(st.sampled_from(OUT_OF_RANGE))
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(recipe)
        return
    # random JSON anywhere in the recipe (or the whole recipe)
    path = data.draw(st.sampled_from(_leaf_paths(recipe)))
    recipe = _set(recipe, path, data.draw(_json_values()))
    cfg = _loads_or_config_error(recipe)
    if cfg is not None:
        try:
            compress.create_compressed_model(ConvBNNet(), cfg, X)
        except CompressError:
            pass


def test_mutated_recipes_raise_only_config_error() -> None:
    _settings(EXAMPLES * 4)(given(st.data())(_check_mutation))()


@pytest.mark.slow
def test_mutated_recipes_raise_only_config_error_long() -> None:
    _settings(SLOW_EXAMPLES * 4)(given(st.data())(_check_mutation))()


def test_non_finite_numbers_are_refused_with_the_path() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"compression\.params\.sparsity_target: .* finite"):
            load_config(
                {
                    "compression": {
                        "algorithm": "magnitude_sparsity",
                        "params": {"sparsity_target": value},
                    }
                }
            )


def _validate_cli(text: bytes) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.json"
        path.write_bytes(text)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["validate", str(path)])
        output = out.getvalue() + err.getvalue()
        assert code in (0, 2), output
        assert "Traceback" not in output
        if code == 2:
            assert err.getvalue().startswith("error: "), output
            assert err.getvalue().count("\n") == 1  # one line
        else:
            assert ": valid: " in out.getvalue()
        return code, output


def test_validate_cli_never_prints_a_traceback() -> None:
    texts = st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64).map(str.encode),
        _json_values().map(lambda v: json.dumps(v).encode()),
        _any_valid_section().map(lambda s: json.dumps({"compression": s}).encode()),
        st.just(b"[" * 100_000),
    )

    @_settings(EXAMPLES * 4)
    @given(texts)
    def check(text: bytes) -> None:
        TRIED["files given to compress validate"] += 1
        _validate_cli(text)

    check()
    code, out = _validate_cli(b"\xff\xfe{")
    assert code == 2 and "not UTF-8" in out
    code, out = _validate_cli(b"[" * 100_000)
    assert code == 2 and "nested too deeply" in out
    code, out = _validate_cli(
        b'{"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": NaN}}'
    )
    assert code == 2 and "compression.sparsity_init: nan is not allowed" in out


# --- damaged, foreign and malicious files ----------------------------------------------------


def corruptions(data: bytes, *, flips: int = 40, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Truncations, byte flips, zeroed blocks and garbage around the file, deterministically."""
    n = len(data)
    for frac in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95):
        yield f"truncated to {int(frac * n)} bytes", data[: int(frac * n)]
    yield "last byte cut", data[:-1]
    yield "zip end record cut", data[:-22]
    rng = random.Random(seed)
    for pos in sorted(rng.sample(range(n), min(flips, n))):
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8)
        yield f"bit flipped at {pos}", bytes(b)
    for i in range(6):
        start = (i * n) // 6
        yield f"64 bytes zeroed at {start}", data[:start] + bytes(64) + data[start + 64 :]
    yield "garbage prepended", b"\x00garbage" + data
    yield "second half doubled", data + data[n // 2 :]


def foreign_files(tmp: Path) -> Iterator[tuple[str, bytes]]:
    """Files of other formats, some written by this library or by torch."""
    yield "empty", b""
    yield "json", b'{"format": "compress.sparse", "version": 1, "tensors": {}}'
    yield "text", b"weights go here\n"
    yield "random bytes", random.Random(1).randbytes(4096)
    buf = io.BytesIO()
    np.save(buf, np.ones(10))
    yield "numpy .npy", buf.getvalue()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("model/data.pkl", b"not a pickle")
    yield "zip of other content", zbuf.getvalue()
    torch.save(ConvBNNet().state_dict(), tmp / "dense.pt")
    yield "dense state_dict", (tmp / "dense.pt").read_bytes()
    torch.save(torch.ones(3), tmp / "tensor.pt")
    yield "a bare tensor", (tmp / "tensor.pt").read_bytes()
    torch.save({"format": "compress.sparse", "version": 1, "tensors": 5}, tmp / "wrong.pt")
    yield "sparse tag, wrong content", (tmp / "wrong.pt").read_bytes()
    torch.save(
        {"format": "compress.sparse", "tensors": {"fc.weight": {"shape": [2, 16]}}}, tmp / "k.pt"
    )
    yield "sparse tag, missing fields", (tmp / "k.pt").read_bytes()
    torch.save(torch.ones(3), tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    yield "legacy torch format", (tmp / "legacy.pt").read_bytes()
    program = torch.export.export(ConvBNNet().eval(), (X,))
    torch.export.save(program, tmp / "net.pt2")
    yield "torch.export program", (tmp / "net.pt2").read_bytes()


def _try_all(
    name: str,
    tmp: Path,
    original: Path,
    load: Callable[[Path], Any],
    same: Callable[[Any], bool],
    cases: list[tuple[str, bytes]],
) -> dict[str, int]:
    """Runs ``load`` on every damaged copy of ``original``; each must raise a CompressError
    naming the file, or give exactly what the original gives."""
    counts = {"tried": 0, "refused": 0, "harmless": 0}
    for i, (what, data) in enumerate(cases):
        path = tmp / f"case{i}{''.join(original.suffixes)}"
        path.write_bytes(data)
        counts["tried"] += 1
        try:
            result = load(path)
        except CompressError as e:
            assert str(path) in str(e), f"{what}: the error does not name the file: {e}"
            counts["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover - this is the failure the test looks for
            raise AssertionError(f"{name}, {what}: {type(e).__name__}: {e}") from e
        assert same(result), f"{name}, {what}: loaded without error but differs"
        counts["harmless"] += 1
    COUNTS[name] = counts
    return counts


def _sparse_file(tmp: Path) -> tuple[Path, nn.Module]:
    ctrl, _ = compress.create_compressed_model(
        ConvBNNet(), {"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.7}}, X
    )
    plain = ctrl.strip()
    return save_sparse(plain, tmp / "good.sparse.pt", [X]), plain


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_and_foreign_files_for_load_sparse(tmp_path: Path) -> None:
    good, plain = _sparse_file(tmp_path)
    cases = list(corruptions(good.read_bytes())) + list(foreign_files(tmp_path))
    counts = _try_all(
        "load_sparse",
        tmp_path,
        good,
        lambda p: load_sparse(p, ConvBNNet()).state_dict(),
        lambda state: _state_equal(state, plain.state_dict()),
        cases,
    )
    assert counts["tried"] == len(cases) >= 60
    assert counts["refused"] >= 0.75 * counts["tried"], counts
    # Of a different model: names the file and the first mismatching key.
    with pytest.raises(CompressError, match=rf"{re.escape(str(good))}: .*different model: fc"):
        load_sparse(good, ConvBNNet(classes=3))
    with pytest.raises(CompressError, match=rf"{re.escape(str(good))}: .*different model"):
        load_sparse(good, nn.Sequential(nn.Linear(4, 4)))


def _pruned_file(tmp: Path) -> tuple[Path, nn.Module]:
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "pruning_init": 0.5,
            "params": {"pruning_target": 0.5, "prune_first_conv": True, "round_to": 1},
        }
    }
    ctrl, _ = compress.create_compressed_model(ConvBNNet(), recipe, X)
    ctrl.scheduler.epoch_step()
    plain = ctrl.strip()
    path = export(plain, tmp / "good", ["pruned"], example_inputs=X)["pruned"]
    return path, plain


def _pruned_cases(tmp: Path, good: Path, *, silent: bool) -> list[tuple[str, bytes]]:
    """silent: the corruptions only a checksum finds (flipped or zeroed bytes)."""
    found = [
        c
        for c in corruptions(good.read_bytes(), flips=20)
        if ("flipped" in c[0] or "zeroed" in c[0])
    ]
    if silent:
        return found
    rest = [c for c in corruptions(good.read_bytes(), flips=0) if "zeroed" not in c[0]]
    return rest + list(foreign_files(tmp))


@pytest.mark.skipif("filter_pruning" not in ALGORITHMS, reason="filter_pruning not landed")
def test_truncated_and_foreign_files_for_load_pruned(tmp_path: Path) -> None:
    from compress.deploy.pruned_file import load_pruned

    good, plain = _pruned_file(tmp_path)
    cases = _pruned_cases(tmp_path, good, silent=False)
    counts = _try_all(
        "load_pruned",
        tmp_path,
        good,
        lambda p: load_pruned(ConvBNNet(), p).state_dict(),
        lambda state: _state_equal(state, plain.state_dict()),
        cases,
    )
    assert counts["tried"] == len(cases) >= 20 and counts["refused"] >= 0.75 * counts["tried"]
    # Another model with the same layer names, and another architecture.
    with pytest.raises(CompressError, match=rf"{re.escape(str(good))}: does not fit this model"):
        load_pruned(ConvBNNet(classes=3), good)
    with pytest.raises(CompressError, match=re.escape(str(good))):
        load_pruned(nn.Sequential(nn.Conv2d(3, 4, 3)), good)


@pytest.mark.skipif("filter_pruning" not in ALGORITHMS, reason="filter_pruning not landed")
def test_flipped_bytes_in_a_pruned_file_are_refused(tmp_path: Path) -> None:
    from compress.deploy.pruned_file import load_pruned

    good, plain = _pruned_file(tmp_path)
    _try_all(
        "load_pruned (flips)",
        tmp_path,
        good,
        lambda p: load_pruned(ConvBNNet(), p).state_dict(),
        lambda state: _state_equal(state, plain.state_dict()),
        _pruned_cases(tmp_path, good, silent=True),
    )


def _inspect(path: Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["inspect", str(path)])
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text
    if code == 2:
        raise CompressError(err.getvalue())
    assert code == 0, text
    # Without the file name and the table rules, whose width follows the name's length.
    return re.sub(r"[\s|+-]", "", out.getvalue().replace(str(path), ""))


def test_damaged_and_foreign_files_for_compress_inspect(tmp_path: Path) -> None:
    good, _ = _sparse_file(tmp_path)
    ckpt = tmp_path / "epoch=0.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in ConvBNNet().state_dict().items()}}, ckpt)
    total = 0
    for original in (good, ckpt):
        expected = _inspect(original)
        cases = list(corruptions(original.read_bytes(), flips=25))
        counts = _try_all(
            f"compress inspect {original.suffix}",
            tmp_path,
            original,
            _inspect,
            lambda text, expected=expected: text == expected,
            cases,
        )
        assert counts["refused"] >= 0.75 * counts["tried"], counts
        total += counts["tried"]
    # Other formats: inspect reads any weights-only file with tensors (a plain state_dict, a
    # torch.export program); the rest is refused with the file's name, never a traceback.
    inspected = []
    for i, (what, data) in enumerate(foreign_files(tmp_path)):
        path = tmp_path / f"foreign{i}.pt"
        path.write_bytes(data)
        total += 1
        try:
            _inspect(path)
            inspected.append(what)
        except CompressError as e:
            assert str(path) in str(e), f"{what}: {e}"
    assert inspected == ["dense state_dict"]
    COUNTS["compress inspect, other formats"] = {"tried": i + 1, "inspected": len(inspected)}
    assert total >= 90


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["load_sparse", "load_pruned", "inspect", "inspect-ckpt"])
def test_pickle_payloads_are_refused_and_never_run(where: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / ("evil.ckpt" if where == "inspect-ckpt" else "evil.pt")
    payload = {
        "load_sparse": {"format": "compress.sparse", "version": 1, "tensors": _Payload(marker)},
        "load_pruned": {"format": "compress.pruned", "version": 1, "plan": _Payload(marker)},
        "inspect": {"format": "compress.sparse", "tensors": {"w": {"dense": _Payload(marker)}}},
        "inspect-ckpt": {"state_dict": {"w": torch.ones(1)}, "hyper_parameters": _Payload(marker)},
    }[where]
    torch.save(payload, path)
    with pytest.raises(CompressError, match=re.escape(str(path))) as info:
        if where == "load_sparse":
            load_sparse(path, ConvBNNet())
        elif where == "load_pruned":
            from compress.deploy.pruned_file import load_pruned

            load_pruned(ConvBNNet(), path)
        else:
            _inspect(path)
    assert not marker.exists(), "the payload ran"
    if where != "load_pruned":
        assert "refused to load" in str(info.value)


# --- safe writes -------------------------------------------------------------------------------

_WRITER = """
import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from compress.deploy.export import save_sparse
net = torch.nn.Linear(2048, 1024)
i = 0
while True:
    with torch.no_grad():
        net.weight.fill_(float(i))
        net.bias.fill_(float(i))
    save_sparse(net, {path!r})
    print(i, flush=True)
    i += 1
"""


def test_a_writer_killed_midway_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "model.sparse.pt"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER.format(root=str(ROOT), path=str(target))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    kills = 0
    try:
        deadline = time.monotonic() + 120
        # Wait for a first complete file, then for the next write to be under way (its
        # temporary file exists), and kill the writer there.
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert target.exists(), "the writer never finished a first file"
        while time.monotonic() < deadline:
            if any(p.name.startswith(".model.") for p in tmp_path.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.001)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert kills == 1 and proc.returncode == -signal.SIGKILL
    written = [int(line) for line in proc.stdout.read().split()]  # type: ignore[union-attr]
    net = load_sparse(target, nn.Linear(2048, 1024))
    value = float(net.bias[0].detach())
    assert value.is_integer() and 0 <= value <= (written[-1] + 1 if written else 0)
    assert torch.equal(net.weight, torch.full_like(net.weight, value))
    assert torch.equal(net.bias, torch.full_like(net.bias, value))


def _fail_at_rename(*args: Any, **kwargs: Any) -> None:
    raise OSError("simulated crash before the rename")


@pytest.mark.parametrize("fmt", ["sparse", "pt2", "onnx", "openvino", "pruned", "sparse_runtime"])
def test_every_export_format_is_written_to_a_temporary_name_and_renamed(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the final rename failing, the export fails and the previous file is untouched: an
    export that wrote to its final name directly would pass the rename and fail this test."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    if fmt == "openvino":
        pytest.importorskip("openvino")
    if fmt == "pruned":
        if "filter_pruning" not in ALGORITHMS:
            pytest.skip("filter_pruning not landed")
        _, first = _pruned_file(tmp_path / "a")
        _, second = _pruned_file(tmp_path / "b")
    else:
        first, second = ConvBNNet().eval(), ConvBNNet().eval()
    with warnings_ignored():
        paths = export(first, tmp_path / "m", [fmt], example_inputs=X)
    before = {p: p.read_bytes() for p in tmp_path.glob("m.*")}
    assert paths[fmt] in before
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    monkeypatch.setattr(os, "replace", _fail_at_rename)
    with pytest.raises(CompressError, match="simulated crash"), warnings_ignored():
        export(second, tmp_path / "m", [fmt], example_inputs=X)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in tmp_path.glob("m.*")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_atomic_write_cleans_up_after_an_interrupt(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"previous")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_report_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the corruption figures gathered above (run with -s to see them)."""
    with capsys.disabled():
        for name, c in sorted(COUNTS.items()):
            print(f"\n{name}: {c}")
        for name, n in sorted(TRIED.items()):
            print(f"\n{name}: {n}")
