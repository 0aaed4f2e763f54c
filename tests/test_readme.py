"""The README stays true: its key table is the schema's, its test command is CI's."""

import re
from pathlib import Path

from compress.recipe.config import keys_markdown

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_key_table_is_generated_from_the_schema() -> None:
    section = re.search(r"<!-- keys:begin -->\n(.*?)\n<!-- keys:end -->", README, re.S)
    assert section, "README lacks the keys section"
    assert section.group(1) == keys_markdown(), "run: python -m compress.cli keys --write-readme"


def test_ci_runs_the_readme_test_command() -> None:
    lines = (ROOT / ".ci/run").read_text().splitlines()
    command = lines[
        lines.index(
            "# The README's test command (tests/test_readme.py checks that the two stay the same):"
        )
        + 1
    ]
    assert f"```bash\n{command}\n```" in README


def test_readme_main_command_runs_the_digits_example() -> None:
    assert 'pip install -e ".[examples]" && python examples/digits.py' in README
