"""Consolidation files for tests, built from one set of parts so each test states only what differs."""

from __future__ import annotations

from pathlib import Path

from mailmerge_gov.config import ConfigError, load_config

HEAD = """\
[project]
name = "Thử nghiệm"
state_file = "state.sqlite"

[target]
name = "Thành phố Hồ Chí Minh"
code = "79"
mail_domain = "hcm.gov.vn"
base_dn = "dc=hcm,dc=gov,dc=vn"
"""


def source(name: str, unit_name: str, code: str, domain: str, directory: str, mail: str = "") -> str:
    """Return one [[sources]] table with its directory (and mail) sub-tables."""
    text = (f'\n[[sources]]\nname = "{name}"\nunit_name = "{unit_name}"\ncode = "{code}"\n'
            f'domains = ["{domain}"]\n\n[sources.directory]\n{directory}')
    return text + (f"\n[sources.mail]\n{mail}" if mail else "")


def consolidation(sources: str, target: str = "", addressing: str = "", tail: str = "") -> str:
    """Return a whole consolidation file: head, target sub-tables, sources, policy, tail."""
    return (HEAD + target + sources
            + '\n[addressing]\npatterns = ["{{ given }}{{ initials }}"]\n' + addressing
            + "\n[transition]\nends = 2026-06-30\n" + tail)


HCM_LDIF = source("hcm", "Thành phố Hồ Chí Minh", "79", "hcm.gov.vn", 'ldif = "hcm.ldif"\n')

# A consolidation whose directories and mailboxes are all files: no server to start.
FILES_ONLY = consolidation(
    target='\n[target.directory]\nldif = "out/new.ldif"\n',
    sources=HCM_LDIF + source("binhduong", "Tỉnh Bình Dương", "74", "binhduong.gov.vn",
                              'csv = "bd.csv"\n', 'maildir = "bd-mail"\n'),
)


def relay_config(tmp_path: Path, relay: str, map_text: str) -> Path:
    """Write the files-only consolidation with a [relay] table and the address map; return the config path."""
    (tmp_path / "map.csv").write_text(map_text, encoding="utf-8")
    path = tmp_path / "consolidation.toml"
    path.write_text(FILES_ONLY + "\n[relay]\n" + relay, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    """The message of the ConfigError that loading `path` raises (the test fails if it loads)."""
    import pytest  # here: the benchmarks import this module too, and need no pytest

    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)
