"""Test helper, run as a subprocess by tests/test_apply.py: apply entries, then SIGKILL itself after N changes.

Usage: python apply_worker.py SPEC.json. The spec names the LDAP server, the base, the state file, the backup
folder, the entries and `kill_after`. The kill comes from apply_entries' own progress callback, so the process
dies at an exact point between two writes, as a kill -9 from an operator would, with no library code patched.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from mailmerge_gov.config import DirectoryConfig, LdapServer, Secret
from mailmerge_gov.directory.apply import Entry, apply_entries
from mailmerge_gov.store import open_store


def main(spec_path: str) -> None:
    """Run one apply as the spec says."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    kill_after = spec["kill_after"]

    def progress(done: int, total: int) -> None:
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    server = LdapServer(url=spec["url"], base_dn=spec["base_dn"], bind_dn=spec["bind_dn"],
                        password=Secret(file=Path(spec["password_file"])))
    target = DirectoryConfig(kind="ldap", ldap=server)
    entries = [Entry(dn, tuple((name, tuple(values)) for name, values in attributes))
               for dn, attributes in spec["entries"]]
    with open_store(Path(spec["state"])) as store:
        apply_entries(store, target, entries, base_dn=spec["base_dn"], plan_id=1, max_disables=10,
                      backup_dir=Path(spec["backup_dir"]), on_change=progress)


if __name__ == "__main__":
    main(sys.argv[1])
