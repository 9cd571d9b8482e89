"""The wheel ships every package of relay/: pyproject.toml lists them by hand
(``[tool.setuptools] packages``), and a folder added without a line there installs
fine in a developer's editable venv but is missing from the wheel and the sdist
install (it happened with relay/transport/; .ci/portable caught it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_relay_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "relay").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert {p for p in listed if p.startswith("relay")} - on_disk == set(), \
        "listed in pyproject.toml but not a package of relay/"
