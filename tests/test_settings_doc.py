"""docs/configuration.md's settings table is the one `ServerSettings` renders today."""

from __future__ import annotations

import pytest

from app import settings_doc
from app.settings import ServerSettings


def test_committed_table_matches_the_settings_class() -> None:
    committed = settings_doc.DOC.read_text()
    assert settings_doc.render(committed) == committed, "stale: run `python -m app.settings_doc`"
    assert settings_doc.main(["--check"]) == 0


def test_every_setting_has_a_row_and_a_description() -> None:
    table = settings_doc.settings_table()
    for env, name in ServerSettings.env_names().items():
        assert f"| `{env}` |" in table
        assert ServerSettings.model_fields[name].description, f"{name} has no description"
    assert "| `SEEDLING_PORT` | int >= 1 <= 65535 | `8000` |" in table
    assert "`auto`, `none`" in table  # Literal choices are listed


def test_a_stale_table_is_detected(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = settings_doc.DOC.read_text().replace("`SEEDLING_PORT`", "`SEEDLING_OLD_PORT`")
    doc = tmp_path / "configuration.md"
    doc.write_text(stale)
    monkeypatch.setattr(settings_doc, "DOC", doc)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main([]) == 0 and "SEEDLING_OLD_PORT" not in doc.read_text()


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ValueError, match="markers"):
        settings_doc.render("# no table here\n")
