"""The README is the newcomer's contract: its commands and settings table must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from oal_shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _settings_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `(OAL_[A-Z0-9_]+)` \| (.+?) \|", README, flags=re.MULTILINE)
    return dict(rows)


def test_readme_lists_every_setting_with_its_default():
    rows = _settings_rows()
    for name, field in Settings.model_fields.items():
        variable = f"OAL_{name.upper()}"
        assert variable in rows, f"README's settings table lacks {variable}"
        expected = "unset" if field.default is None else f"`{field.default}`"
        assert rows[variable] == expected, f"{variable}: README says {rows[variable]}, Settings says {expected}"
    unknown = set(rows) - {f"OAL_{name.upper()}" for name in Settings.model_fields}
    assert not unknown, f"README documents settings that do not exist: {sorted(unknown)}"


def test_quickstart_shows_the_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make \w+", quickstart, flags=re.MULTILINE) == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, flags=re.MULTILINE)
