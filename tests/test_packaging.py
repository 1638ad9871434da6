"""The package installs and runs on EL9's Python 3.9 (vermin in scripts/test checks syntax
and stdlib; this checks what vermin is told to ignore)."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "jobtoken"


def test_every_module_postpones_annotations() -> None:
    # annotations such as `dict[str, X] | None` are only safe on 3.9 as strings
    missing = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p.read_text().strip() and "from __future__ import annotations" not in p.read_text()
    ]
    assert missing == []


def test_py_typed_marker_ships() -> None:
    assert (SRC / "py.typed").is_file()
