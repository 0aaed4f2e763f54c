"""Records NNCF 2.17's outputs as golden fixtures for the parity tests.

Run in a side environment, never a dependency of this project::

    python -m venv /tmp/nncf && . /tmp/nncf/bin/activate
    pip install torch==2.13.0 nncf==2.17.0
    NNCF_TORCH_LEGACY_TRACING=1 python tools/record_nncf.py [AREA ...]

Each area is a module of ``tools/nncf217/`` with a ``record() -> dict`` function; its result is
written to ``tests/fixtures/nncf217/AREA.json``. The models are the seeded ones of
``tests/nncf217_models.py``, which the tests rebuild without NNCF.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "nncf217"
AREAS = ("sparsity", "pruning", "scopes")


def main(argv: list[str]) -> int:
    os.environ.setdefault("NNCF_TORCH_LEGACY_TRACING", "1")
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools")]
    areas = argv or list(AREAS)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for area in areas:
        if area not in AREAS:
            print(f"unknown area {area!r}; one of {', '.join(AREAS)}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"nncf217.{area}")
        result = module.record()
        path = FIXTURES / f"{area}.json"
        path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"{path.relative_to(ROOT)}: {len(result.get('cases', []))} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
