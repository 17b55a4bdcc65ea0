"""One settings module: every RAL_* variable the code names is declared in ral_core/settings.py, read only through
it, never written to pass a flag, and README's table is the one the module generates."""
import re
from pathlib import Path

import pytest

from ral_core import settings
from ral_core.errors import RALError

ROOT = Path(__file__).resolve().parents[1]
PY_NAMES = {"RAL_ARMS"}  # Python constants that happen to start with RAL_, not environment variables


def _sources():
    for d in ("ral_core", "app", "bench", "scripts"):
        yield from (p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_readme_table_is_generated_from_the_settings():
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- settings table: begin -->\n", 1)[1].split("<!-- settings table: end -->", 1)[0]
    assert table == settings.markdown(), "regenerate it: python -m ral_core.settings --markdown"


def test_every_variable_named_in_the_code_is_declared():
    named = {m for p in _sources() for m in re.findall(r"\bRAL_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())}
    assert named - PY_NAMES - set(settings.SETTINGS) == set()


def test_reads_go_through_settings_and_nothing_writes_them():
    read = re.compile(r"""(?:environ(?:\.get)?\s*[(\[]|getenv\s*\()\s*["']RAL_""")
    write = re.compile(r"""environ\[\s*["']RAL_\w+["']\s*\]\s*=[^=]|(?:setdefault|putenv)\(\s*["']RAL_""")
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in _sources() if p.name != "settings.py"
           for i, line in enumerate(p.read_text().splitlines(), 1) if read.search(line) or write.search(line)]
    assert bad == []


def test_values_are_parsed_or_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("RAL_MAX_RUNS", "3")
    assert settings.get("RAL_MAX_RUNS") == 3
    monkeypatch.setenv("RAL_MAX_RUNS", "")
    assert settings.get("RAL_MAX_RUNS") == 1 and settings.get("RAL_MAX_RUNS", 7) == 7
    for name, raw in (("RAL_MAX_RUNS", "two"), ("RAL_MAX_RUNS", "0"), ("RAL_REQUEST_SECONDS", "nan"),
                      ("RAL_ALLOW_DOWNLOAD", "maybe")):
        monkeypatch.setenv(name, raw)
        with pytest.raises(RALError, match=name) as e:
            settings.get(name)
        assert "\n" not in str(e.value)
    for raw, want in (("0", False), ("no", False), ("FALSE", False), ("1", True), ("yes", True), ("on", True)):
        monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", raw)
        assert settings.get("RAL_ALLOW_DOWNLOAD") is want


def test_allow_download_reaches_nested_loads_without_the_environment(monkeypatch):
    import os

    from ral_core import hub
    monkeypatch.delenv("RAL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not hub.downloads_allowed()
    with hub.allowing_downloads(True):
        assert hub.downloads_allowed() and not hub.downloads_allowed(False)
        assert "RAL_ALLOW_DOWNLOAD" not in os.environ
    assert not hub.downloads_allowed()


def test_allow_download_as_text_is_parsed(monkeypatch):
    from ral_core import hub
    monkeypatch.setenv("RAL_ALLOW_DOWNLOAD", "1")
    assert hub.downloads_allowed("false") is False and hub.downloads_allowed("yes") is True
    with pytest.raises(RALError, match="allow_download must be true or false"):
        hub.downloads_allowed("perhaps")
