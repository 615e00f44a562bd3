"""Consolidation files for tests, built from one set of parts so each test states only what differs."""

from __future__ import annotations

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
