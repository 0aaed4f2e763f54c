"""``{re}`` scopes are matched with RE2, which cannot backtrack, with ``re``'s results."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compress
from compress.errors import ConfigError
from compress.recipe.scopes import check_regex, compile_regex, matches, nncf_names

PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
BERT = [f"bert.encoder.layer.{i}.{part}" for i in range(12) for part in PARTS]
LONG = "bert.encoder.layer.11.attention.self.query." * 4  # 172 characters, no 'Z'


class Bert(nn.Module):
    """BERT's module names, with layers of 2 features."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.bert.encoder.layer:
            block.attention = nn.Module()
            block.attention.self = nn.ModuleDict({"query": nn.Linear(2, 2), "key": nn.Linear(2, 2)})
            block.attention.output = nn.ModuleDict({"dense": nn.Linear(2, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.bert.encoder.layer:
            attention = block.attention
            x = attention.output.dense(attention.self.query(x) + attention.self.key(x))
        return x


def test_a_pattern_that_doubles_per_character_in_re_selects_layers_of_a_bert() -> None:
    """'(.|.)*' has 2**n ways to split a name of n characters: Python's re searched the
    48-character names of this model for hours; RE2 reads each name once."""
    recipe = {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "ignored_scopes": ["{re}(.|.)*query"],
        }
    }
    ctrl, _ = compress.create_compressed_model(Bert(), recipe, torch.randn(1, 2))
    layers = [r["layer"] for r in ctrl.statistics().to_dict()["algorithms"][0]["layers"]]
    assert layers == [
        f"bert.encoder.layer.{i}.attention.{part}"
        for i in range(2)
        for part in ("self.key", "output.dense")
    ]


@pytest.mark.parametrize("pattern", ["(.|.)*Z", "(a|aa)*Z", "(x*)*Z"])
def test_patterns_that_backtrack_in_re_are_matched_in_one_pass(pattern: str) -> None:
    names = [n for n, _ in nncf_names(Bert())]
    assert not any(matches("{re}" + pattern, name) for name in names)
    assert not any(matches("{re}" + pattern, name) for name in [*BERT, LONG])
    assert compile_regex(pattern, "target_scopes").search(LONG + "Zy")  # where re matches too


def test_nested_counts_past_re2s_limit_are_refused_before_any_name_is_matched() -> None:
    """'(.{0,40}){0,40}Z' passed the static check and then ran past 120 s in re."""
    recipe = {"compression": {"algorithm": "magnitude_sparsity", "target_scopes": []}}
    recipe["compression"]["target_scopes"] = ["{re}(.{0,40}){0,40}Z"]
    with pytest.raises(
        ConfigError,
        match=r"compression\.target_scopes: '\{re\}\(\.\{0,40\}\)\{0,40\}Z' repeats more than "
        r"RE2 allows \(invalid repetition size: \{0,40\}\): counts up to 1000, nested counts",
    ):
        compress.create_compressed_model(Bert(), recipe, torch.randn(1, 2))


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(conv)\1", r"refers back to a group \(invalid escape sequence: \\1\)"),
        (r"(?P<a>conv)(?P=a)", r"refers back to a group"),
        (r"conv(?!1)", r"uses a lookaround \(invalid perl operator: \(\?!\).*target_scopes"),
        (r"(?<=layer)1", r"uses a lookaround"),
        (r"(?>conv)1", r"atomic group or a possessive quantifier"),
        (r"conv1++", r"atomic group or a possessive quantifier \(bad repetition operator: \+\+\)"),
        (r"a{1001}", r"repeats more than RE2 allows \(invalid repetition size: \{1001\}\)"),
        (r"[[:alpha:]]", r"holds '\[:' in a class, a POSIX class in RE2"),
        (r"(?x) conv", r"is not supported by RE2.*re2/wiki/Syntax"),
    ],
)
def test_syntax_that_re2_lacks_is_a_config_error_naming_key_and_pattern(
    pattern: str, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=rf"^ignored_scopes: '\{{re\}}{re.escape(pattern)}' "):
        check_regex(pattern, "ignored_scopes")
    with pytest.raises(ConfigError, match=message):
        compile_regex(pattern, "ignored_scopes")
    assert capfd.readouterr().err == ""  # RE2's own log lines are off


def test_the_static_refusals_still_come_first_and_compiled_patterns_are_cached() -> None:
    with pytest.raises(ConfigError, match=r"repeats a part of variable length without bound"):
        check_regex("(a+)+$", "target_scopes")
    with pytest.raises(ConfigError, match=r"has 4 unbounded quantifiers"):
        check_regex(".*.*.*.*x", "target_scopes")
    with pytest.raises(ConfigError, match=r"is not a valid regex: missing \)"):
        check_regex("(conv", "target_scopes")
    assert compile_regex("conv[12]", "a") is compile_regex("conv[12]", "b")


def test_python_spellings_that_re2_reads_otherwise_are_translated() -> None:
    """'\\Z' is RE2's '\\z' and '{,n}' is RE2's '{0,n}'; inside a class both stay literal."""
    for pattern, name, found in [
        (r"conv1\Z", "layer1.0.conv1", True),
        (r"conv1\Z", "layer1.0.conv12", False),
        (r"\\Z", "a\\Z", True),
        ("o{,2}v", "conv", True),
        ("x{,2}v", "conv", True),
        ("n{,}v", "connv", True),
        ("[{,2}]", "a,", True),
        ("[{,2}]", "a0", False),
    ]:
        assert bool(compile_regex(pattern, "k").search(name)) is found, pattern
        assert bool(re.search(pattern, name)) is found, pattern


ATOMS = ["a", "b", ".", r"\.", r"\d", r"\w", r"\W", "[ab]", "[^a.]", "[0-9]", "_", "(?:ab|b)", "Z"]
ANCHORS = ["^", "$", r"\b", r"\B", r"\A", r"\Z", ""]
QUANT = ["", "*", "+", "?", "{2}", "{0,2}", "{1,3}?", "*?", "??", "{,2}", "{2,}"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        atom = draw(st.sampled_from(ATOMS))
        if draw(st.booleans()):
            atom = f"({atom}|{draw(st.sampled_from(ATOMS))})"
        parts.append(draw(st.sampled_from(ANCHORS)) + atom + draw(st.sampled_from(QUANT)))
    flags = draw(st.sampled_from(["", "(?i)", "(?s)", "(?m)"]))
    return flags + "".join(parts)


# ASCII module names: RE2's \w, \d and \b are ASCII, and a module name holds no newline. Not
# empty: Python 3.11's \B does not match an empty string (3.14's does, as RE2's).
# At most 12 characters: ``re``, the oracle, backtracks on patterns such as ``(.|\w)*`` followed
# by a part that fails, doubling its work per character (a whole BERT name hung the test).
NAMES = st.text(alphabet="abAB._0129Z[]:", min_size=1, max_size=12) | st.sampled_from(
    sorted({name[-12:] for name in BERT})
)


@settings(max_examples=400, deadline=None)
@given(patterns(), NAMES)
def test_results_equal_re_search_and_fullmatch(pattern: str, name: str) -> None:
    compiled = compile_regex(pattern, "target_scopes")
    assert (compiled.search(name) is not None) == (re.search(pattern, name) is not None)
    assert (compiled.fullmatch(name) is not None) == (re.fullmatch(pattern, name) is not None)
    assert matches("{re}" + pattern, name) == (re.fullmatch(pattern, name) is not None)
