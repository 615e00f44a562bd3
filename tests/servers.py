"""Private real servers for the tests: OpenLDAP slapd, Dovecot (IMAP + LMTP) and Postfix's smtp-sink.

Each class owns one temporary folder under /tmp and the processes it started, listens on 127.0.0.1 only,
and is driven as `server.start()` ... `server.stop()`. Measured facts behind the choices made here are in
shared/server-notes.md ("the notes" below).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import ctypes
import json
import os
import pwd
import queue
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
# Every wait below has an overall deadline: a misconfigured Dovecot login service never exits, it retries with
# growing back-off (notes, section 2), so a wait without a deadline would hang for as long as it loops.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Where a non-root PATH may not look, but Debian puts daemons.
SYSTEM_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
NOBODY = "nobody"
# linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


class ServerNotInstalled(RuntimeError):
    """A server or client program is missing; the message names the Debian packages to install."""


class ServerStartError(RuntimeError):
    """A server did not become ready; the message holds the tail of its log."""


def tied(args: list[str], user: str | None = None) -> list[str]:
    """The command `args` run (as `user`, when given) so that it gets SIGKILL when the test process ends, however
    it ends."""
    # The servers run in sessions of their own (stop() kills the whole group), so a test run killed with
    # SIGKILL, whose fixtures never tear down, used to leave them running. util-linux's setpriv sets the
    # parent-death signal and then execs the server: same pid, nothing else changes. (preexec_fn could set it
    # too, but is unsafe in a process with threads, as the web tests have.) The signal comes when the thread
    # that started the server ends: fixtures run in pytest's main thread. The kernel clears the signal when a
    # process changes its user, so one that must run as another user is started as that user by setpriv.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return args
    identity = []
    if user is not None:
        entry = pwd.getpwnam(user)
        identity = ["--reuid", str(entry.pw_uid), "--regid", str(entry.pw_gid), "--clear-groups"]
    return [setpriv, *identity, "--pdeathsig", "KILL", "--", *args]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def not_installed(what: str, packages: str) -> ServerNotInstalled:
    """Return the error for a missing program or file, naming the Debian package(s) to install."""
    noun = "packages" if " " in packages else "package"
    return ServerNotInstalled(f"{what} not found: install the Debian {noun} {packages} (scripts/test does this)")


def require_program(name: str, packages: str) -> str:
    """Return the full path of program `name`, or raise ServerNotInstalled naming the Debian packages."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_BIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        raise not_installed(name, packages)
    return found


def require_file(path: str, packages: str) -> str:
    """Return `path` if it exists, or raise ServerNotInstalled naming the Debian packages."""
    if not Path(path).exists():
        raise not_installed(path, packages)
    return path


def make_server_dir(prefix: str) -> Path:
    """Create a fresh folder under /tmp that the servers' unprivileged users can traverse."""
    # Not pytest's tmp_path: /tmp/pytest-of-root is mode 0700 and daemons that drop privileges (dovecot's
    # imap as nobody, smtp-sink -u nobody) cannot reach into it (notes, section 4). Short prefix: Dovecot's
    # unix sockets live in it and sun_path is at most 108 bytes.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def log_tail(paths: Iterable[Path], limit: int = 4000) -> str:
    """Return the last `limit` characters of each existing log file, labelled, for error messages."""
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {path} ---\n{text[-limit:] or '(empty)'}")
    return "\n".join(parts) or "(no log written)"


def read_banner(port: int, timeout: float = 0.5) -> bytes:
    """Connect to 127.0.0.1:port and return the first line the server sends, or b"" if none."""
    # Read the greeting rather than trusting connect(): Dovecot's port accepts before imap-login works (notes).
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    logs: Sequence[Path],
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll `ready` until true; raise ServerStartError with the logs if `proc` dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{what} exited with code {proc.returncode} before it was ready\n{log_tail(logs)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} was not ready after {timeout:.0f} s\n{log_tail(logs)}")
        time.sleep(0.005)


def terminate(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """Stop one process by its pid: SIGTERM, then SIGKILL if it is still there after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def run_checked(args: Sequence[str], what: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; return its stdout or raise RuntimeError with its output."""
    result = subprocess.run(list(args), input=stdin, capture_output=True, timeout=30, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed with exit code {result.returncode}: {' '.join(args)}\n"
            f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
        )
    return result.stdout.decode()


# --------------------------------------------------------------------------------------------------------------
# OpenLDAP


def ldif_entries(text: str) -> list[str]:
    """Split LDIF text into its entries (comments and the version line dropped)."""
    entries = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith("#")]
        if lines and lines[0].startswith("version:"):
            lines = lines[1:]
        if lines:
            entries.append("\n".join(lines) + "\n")
    return entries


def ldif_dn(entry: str) -> str:
    """Return the DN of one LDIF entry, decoding a base64 `dn::` line and its continuation lines."""
    lines = entry.split("\n")
    first = lines[0]
    for line in lines[1:]:
        if not line.startswith(" "):
            break
        first += line[1:]
    if first.lower().startswith("dn::"):
        return base64.b64decode(first[4:].strip()).decode()
    if first.lower().startswith("dn:"):
        return first[3:].strip()
    raise ValueError(f"LDIF entry does not start with a dn line: {first!r}")


def dn_in_suffix(dn: str, suffix: str) -> bool:
    """Tell whether `dn` is `suffix` or below it (case-insensitive, spaces after commas ignored)."""
    norm_dn = ",".join(part.strip() for part in dn.lower().split(","))
    norm_suffix = ",".join(part.strip() for part in suffix.lower().split(","))
    return norm_dn == norm_suffix or norm_dn.endswith("," + norm_suffix)


class SlapdServer:
    """A private OpenLDAP slapd serving several mdb suffixes on a free loopback port."""

    def __init__(self, suffixes: Sequence[str], seed_ldif: str = "", schemas: Sequence[str | Path] = (),
                 maxsize: int = 104857600, database_options: Sequence[str] = ()) -> None:
        """Describe the instance; nothing runs until start().

        `schemas`: extra slapd.conf schema files to include. `maxsize`: the size limit of each mdb database in
        bytes (100 MB holds the tests' data; 100,000 officials need more). `database_options`: extra slapd.conf
        lines for each mdb database, e.g. "dbnosync" for a benchmark that compares two clients on equal terms.
        """
        if not suffixes:
            raise ValueError("SlapdServer needs at least one suffix")
        self.suffixes: tuple[str, ...] = tuple(suffixes)
        self.seed_ldif = seed_ldif
        self.schemas: tuple[Path, ...] = tuple(Path(schema).resolve() for schema in schemas)
        self.maxsize = maxsize
        self.database_options: tuple[str, ...] = tuple(database_options)
        # hex only: safe unquoted in slapd.conf and on any client's command line
        self.admin_password = secrets.token_hex(12)
        self.config_dn = "cn=admin,cn=config"
        self.port = 0
        self.url = ""
        self.dir = Path()
        self.password_file = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    def admin_dn(self, suffix: str) -> str:
        """Return the rootdn of one of this server's suffixes."""
        if suffix not in self.suffixes:
            raise KeyError(f"{suffix} is not a suffix of this slapd (it has {', '.join(self.suffixes)})")
        return f"cn=admin,{suffix}"

    def suffix_of(self, dn: str) -> str:
        """Return the suffix that holds `dn`."""
        for suffix in self.suffixes:
            if dn_in_suffix(dn, suffix):
                return suffix
        raise ValueError(f"{dn} is under none of the suffixes {', '.join(self.suffixes)}")

    def client_env(self) -> dict[str, str]:
        """Environment for the OpenLDAP command-line clients."""
        # LDAPNOINIT: ignore /etc/ldap/ldap.conf and ~/.ldaprc, whose BASE/URI/TLS settings would change results.
        return {**os.environ, "LDAPNOINIT": "1"}

    def start(self) -> None:
        """Write the config, seed each suffix with slapadd, start slapd and wait until a bind works."""
        slapd = require_program("slapd", "slapd and ldap-utils")
        slapadd = require_program("slapadd", "slapd and ldap-utils")
        require_program("ldapadd", "slapd and ldap-utils")
        require_file("/etc/ldap/schema/misc.schema", "slapd and ldap-utils")
        self.dir = make_server_dir("mmg-ldap-")
        try:
            self.port = free_port()
            self.url = f"ldap://{LOOPBACK}:{self.port}"
            self.password_file = self.dir / "admin.pw"
            # ldapadd/ldapsearch -y read the file verbatim: no trailing newline
            self.password_file.write_text(self.admin_password)
            self.password_file.chmod(0o600)
            conf = self.dir / "slapd.conf"
            conf.write_text(self.config_text())
            for index, suffix in enumerate(self.suffixes, start=1):
                (self.dir / f"db{index}").mkdir()
            self.seed(slapadd, conf)
            log = self.dir / "slapd.log"
            began = time.monotonic()
            with log.open("wb") as out:
                # -d: foreground, so Popen.pid is slapd itself and no pidfile is needed (notes, section 1).
                # "none" rather than the notes' 0: same quiet run, but the messages of level Any (start-up
                # errors such as "bind(6) failed errno=98") still reach the log; with 0 the log stays empty.
                self.proc = subprocess.Popen(
                    tied([slapd, "-d", "none", "-h", f"{self.url}/", "-f", str(conf)]),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            wait_until(self.can_bind, self.proc, f"slapd on {self.url}", [log])
            self.start_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def config_text(self) -> str:
        """Return slapd.conf for this instance."""
        extra_schemas = "".join(f'include   "{schema}"\n' for schema in self.schemas)
        head = f"""\
include   /etc/ldap/schema/core.schema
include   /etc/ldap/schema/cosine.schema
include   /etc/ldap/schema/inetorgperson.schema
include   /etc/ldap/schema/nis.schema
# misc: inetLocalMailRecipient (mailLocalAddress, mailRoutingAddress), the target schema in DESIGN.md
include   /etc/ldap/schema/misc.schema
{extra_schemas}pidfile   {self.dir}/slapd.pid
argsfile  {self.dir}/slapd.args
loglevel  none
modulepath /usr/lib/ldap
moduleload back_mdb
# Frontend ACLs apply to every database. Without them the default is "read by *" and anonymous
# clients can READ userPassword (notes, section 1). Comments stay on their own lines in slapd.conf.
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to *
    by * read

database config
rootdn   "{self.config_dn}"
rootpw   {self.admin_password}
"""
        databases = []
        options = "".join(f"{line}\n" for line in self.database_options)
        for index, suffix in enumerate(self.suffixes, start=1):
            databases.append(f"""
database  mdb
suffix    "{suffix}"
rootdn    "{self.admin_dn(suffix)}"
rootpw    {self.admin_password}
directory {self.dir}/db{index}
maxsize   {self.maxsize}
index     objectClass eq
index     uid,mail,cn eq,sub
index     mailLocalAddress,mailRoutingAddress eq
{options}""")
        return head + "".join(databases)

    def base_entry(self, suffix: str) -> str:
        """Return the LDIF of the dcObject+organization entry at the top of `suffix`."""
        first_rdn = suffix.split(",")[0]
        dc = first_rdn.split("=", 1)[1]
        domain = ".".join(part.split("=", 1)[1] for part in suffix.split(","))
        return f"dn: {suffix}\nobjectClass: dcObject\nobjectClass: organization\ndc: {dc}\no: {domain}\n"

    def split_by_suffix(self, ldif: str) -> dict[str, list[str]]:
        """Group the entries of an LDIF text by the suffix that holds them, keeping their order."""
        groups: dict[str, list[str]] = {}
        for entry in ldif_entries(ldif):
            groups.setdefault(self.suffix_of(ldif_dn(entry)), []).append(entry)
        return groups

    def seed(self, slapadd: str, conf: Path) -> None:
        """Load each suffix's base entry and the seed LDIF offline, before slapd starts."""
        # slapadd before start is the fastest way in (notes, section 1); -q skips consistency checks.
        extra = self.split_by_suffix(self.seed_ldif)
        for suffix in self.suffixes:
            ldif = "\n".join([self.base_entry(suffix), *extra.get(suffix, [])])
            run_checked([slapadd, "-q", "-f", str(conf), "-b", suffix], f"slapadd into {suffix}", stdin=ldif.encode())

    def can_bind(self) -> bool:
        """Tell whether an admin simple bind on the first suffix succeeds right now."""
        import ldap3  # the tests' client; imported here so that servers.py loads without it

        # A NEW Server object on every attempt: an ldap3 Server that got ECONNREFUSED marks the address
        # unavailable for 5 s, which turned 35 ms readiness into 6 s (notes, "Python ldap3 gotcha").
        server = ldap3.Server(self.url, connect_timeout=1)
        try:
            conn = ldap3.Connection(
                # receive_timeout: a port held by something that accepts but never answers must not block the wait
                server, self.admin_dn(self.suffixes[0]), self.admin_password, auto_bind=True, receive_timeout=1
            )
        except ldap3.core.exceptions.LDAPException:
            return False
        conn.unbind()
        return True

    def lock_subtree(self, subtree: str, writer_dn: str) -> None:
        """Through cn=config, let writer_dn write everywhere in the first database except under subtree (read-only).

        Tests use it to make a real server refuse a write half way through an apply.
        """
        import ldap3

        config = ldap3.Connection(ldap3.Server(self.url), self.config_dn, self.admin_password, auto_bind=True)
        try:
            done = config.modify("olcDatabase={1}mdb,cn=config", {"olcAccess": [(ldap3.MODIFY_ADD, [
                f'{{0}}to dn.subtree="{subtree}" by * read',
                f'{{1}}to * by dn.exact="{writer_dn}" write by * read'])]})
            if not done:
                raise ServerStartError(f"slapd refused the ACL change: {config.result}")
        finally:
            config.unbind()

    def add_ldif(self, text: str) -> None:
        """Add the entries of an LDIF text with the real ldapadd, each suffix bound as its own rootdn."""
        ldapadd = require_program("ldapadd", "slapd and ldap-utils")
        for suffix, entries in self.split_by_suffix(text).items():
            run_checked(
                # -y: the password from a file, never on the command line (DESIGN.md, Conventions)
                [ldapadd, "-x", "-H", self.url, "-D", self.admin_dn(suffix), "-y", str(self.password_file)],
                f"ldapadd into {suffix}",
                stdin="\n".join(entries).encode(),
                env=self.client_env(),
            )

    def stop(self) -> None:
        """Stop slapd by its pid (SIGTERM, SIGKILL after a deadline) and remove the folder."""
        began = time.monotonic()
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None
        self.stop_seconds = time.monotonic() - began
        if self.dir != Path() and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Dovecot


class DovecotServer:
    """A private Dovecot 2.3 with IMAP and LMTP on free loopback ports, passwd-file users and a master user."""

    MASTER_USER = "admin"
    # the mail files belong to nobody:nogroup: a root run refuses uid 0 for mail (notes, section 2)
    MAIL_UID = 65534
    MAIL_GID = 65534

    def __init__(self, name: str, users: dict[str, str] | None = None, quota: bool = False,
                 max_mail_size: str | None = None) -> None:
        """Describe the instance; nothing runs until start(). quota: per-user quotas (set_quota);
        max_mail_size: the largest message APPEND accepts ("100k"); larger ones get NO [LIMIT]."""
        self.name = name
        self.users: dict[str, str] = dict(users or {})
        self.quota = quota or max_mail_size is not None
        self.max_mail_size = max_mail_size
        self.quotas: dict[str, str] = {}
        self.master_user = self.MASTER_USER
        self.master_password = secrets.token_hex(12)
        self.separator = "*"
        self.host = LOOPBACK
        self.imap_port = 0
        self.lmtp_port = 0
        self.dir = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    @property
    def users_dir(self) -> Path:
        """Folder of the per-user passwd-files."""
        return self.dir / "users"

    @property
    def log_path(self) -> Path:
        """Dovecot's own log file."""
        return self.dir / "dovecot.log"

    def master_login(self, address: str) -> str:
        """Return the IMAP LOGIN name that logs the master user in as `address` ("user*admin")."""
        return f"{address}{self.separator}{self.master_user}"

    def maildir_of(self, address: str) -> Path:
        """Return the Maildir that holds the mail of `address`."""
        return self.dir / "mail" / address / "Maildir"

    def start(self) -> None:
        """Write the config and users, start dovecot and wait for the IMAP and LMTP greetings."""
        dovecot = require_program("dovecot", "dovecot-core dovecot-imapd dovecot-lmtpd")
        require_program("doveadm", "dovecot-core dovecot-imapd dovecot-lmtpd")
        require_file("/usr/lib/dovecot/imap", "dovecot-imapd")
        require_file("/usr/lib/dovecot/lmtp", "dovecot-lmtpd")
        if os.geteuid() != 0:
            # The non-root variant needs other settings (notes, section 2); the project's tests and CI run as root.
            raise ServerStartError("DovecotServer is configured for a root run; run the tests as root")
        for system_user in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(system_user)
            except KeyError:
                raise not_installed(f"system user {system_user}", "dovecot-core dovecot-imapd dovecot-lmtpd") from None
        self.dir = make_server_dir(f"mmg-dc-{self.name}-")
        try:
            self.imap_port = free_port()
            self.lmtp_port = free_port()
            while self.lmtp_port == self.imap_port:
                self.lmtp_port = free_port()
            mail = self.dir / "mail"
            mail.mkdir()
            os.chown(mail, self.MAIL_UID, self.MAIL_GID)
            self.users_dir.mkdir()
            (self.dir / "master-users").write_text(f"{self.master_user}:{{PLAIN}}{self.master_password}::::::\n")
            for address, password in self.users.items():
                self.write_user(address, password)
            conf = self.dir / "dovecot.conf"
            conf.write_text(self.config_text())
            began = time.monotonic()
            self._spawn(dovecot, conf)
            self.start_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def _spawn(self, dovecot: str, conf: Path) -> None:
        """Start dovecot on the instance's config and wait for the IMAP and LMTP greetings."""
        stdout_log = self.dir / "stdout.log"
        with stdout_log.open("ab") as out:
            # own session = own process group, so stop() can SIGKILL the whole tree at once (notes, section 2)
            self.proc = subprocess.Popen(
                tied([dovecot, "-F", "-c", str(conf)]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        logs = [stdout_log, self.log_path]
        what = f"dovecot {self.name}"
        wait_until(lambda: read_banner(self.imap_port).startswith(b"* OK"), self.proc, f"{what} IMAP", logs)
        wait_until(lambda: read_banner(self.lmtp_port).startswith(b"220"), self.proc, f"{what} LMTP", logs)

    def restart(self) -> None:
        """Kill the running instance (every connection drops) and start it again on the same ports and mail."""
        assert self.proc is not None, "restart() of a server that is not running"
        kill_group_and_reap(self.proc)
        self.proc = None
        self._spawn(require_program("dovecot", "dovecot-core"), self.dir / "dovecot.conf")

    def set_quota(self, address: str, storage: str) -> None:
        """Give a user a storage quota ("20K"); the server must have been made with quota=True."""
        assert self.quota, "set_quota() needs DovecotServer(..., quota=True)"
        self.quotas[address] = storage
        if self.proc is not None and address in self.users:
            self.write_user(address, self.users[address])
            # Dovecot re-stats a passwd-file at most once a second (see write_user): wait for the next second
            time.sleep(1.02 - time.time() % 1)

    def config_text(self) -> str:
        """Return dovecot.conf for this instance (comments on their own lines only)."""
        d = self.dir
        return f"""\
# distinct per instance: process titles, doveadm
instance_name = mmg-dovecot-{self.name}
base_dir  = {d}/run
state_dir = {d}/state
log_path  = {d}/dovecot.log
info_log_path = {d}/dovecot.log
auth_verbose = yes
# a failed login answers after about 0.5 s instead of 2 s (failures are still flushed on a 500 ms timer)
auth_failure_delay = 0
protocols = imap lmtp
listen    = {LOOPBACK}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = {self.separator}
postmaster_address = postmaster@localhost

# root run (notes, section 2): imap-login refuses to run as root, hence dovenull;
# mail uid 65534 is below 500, hence first_valid_uid = 0
default_internal_user  = dovecot
default_internal_group = dovecot
default_login_user     = dovenull
first_valid_uid = 0
first_valid_gid = 0

mail_location = maildir:{d}/mail/%u/Maildir
# tests only: faster
mail_fsync = never
{self._quota_text()}
namespace inbox {{
  inbox = yes
  separator = /
}}
# master user: "user*admin" or SASL PLAIN authzid; result_success = continue makes the target
# user go through the next passdb too, so it must exist
passdb {{
  driver = passwd-file
  args = {d}/master-users
  master = yes
  result_success = continue
}}
# one passwd-file per user (see write_user for why not one file); passwd-file, not static,
# so that LMTP rejects unknown users
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users/%u
  default_fields = uid={self.MAIL_UID} gid={self.MAIL_GID} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# no auth penalty: after a failed login anvil delays the next logins from the same IP by 2, 4, 8, 15 s
# (measured: 4 s). login_trusted_networks does not lift it in 2.3.19 (measured); this is the documented
# switch (doc.dovecot.org, "Authentication penalty support")
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {self.lmtp_port}
  }}
}}
"""

    def _quota_text(self) -> str:
        """The quota plugin's settings, when this instance has quotas."""
        if not self.quota:
            return ""
        # count: the quota is counted as mail is saved (no maildirsize file); vsizes is required by count.
        # quota_max_mail_size makes Dovecot refuse larger APPENDs with NO [LIMIT]; 2.3.19 does not advertise
        # APPENDLIMIT for it (only imap_capability = +APPENDLIMIT=n would).
        limit = f"\n  quota_max_mail_size = {self.max_mail_size}" if self.max_mail_size else ""
        return f"""mail_plugins = $mail_plugins quota
plugin {{
  quota = count:User quota
  quota_vsizes = yes{limit}
}}"""

    def write_user(self, address: str, password: str) -> None:
        """Write the passwd-file line of one user."""
        # Why one file per user and not one users file: Dovecot's passwd_file_sync() stats a passwd-file at
        # most once per second (it compares last_sync_time with the whole-second ioloop_time) and then
        # re-reads only if st_mtime (whole seconds) or st_size changed. A user added to a shared file in the
        # same second as any earlier login is therefore invisible for up to a second (measured: the login
        # fails). A file per user has a new path, which Dovecot opens on first lookup: visible at once.
        if not address or any(ch in address for ch in "/:\n") or address.startswith("."):
            raise ValueError(f"not a usable mail address for a passwd-file: {address!r}")
        if any(ch in password for ch in ":\n"):
            raise ValueError("a passwd-file password may not contain ':' or a newline")
        path = self.users_dir / address
        previous = path.stat().st_mtime if path.exists() else None
        tmp = path.with_name(f".{address}.tmp")
        # userdb extra field after the seventh colon: the user's own quota rule
        extra = f"userdb_quota_rule=*:storage={self.quotas[address]}" if address in self.quotas else ""
        tmp.write_text(f"{address}:{{PLAIN}}{password}::::::{extra}\n")
        if previous is not None:
            # a changed password of the same length would keep size and (same-second) mtime: move mtime on
            stamp = max(time.time(), previous + 1)
            os.utime(tmp, (stamp, stamp))
        os.replace(tmp, path)

    def fill(self, address: str, folders: dict[str, list[tuple[bytes, tuple[str, ...]]]]) -> None:
        """Create user `address` (password "pw") with these folders of (message, flags), appended over IMAP.

        The messages of a folder get distinct INTERNALDATEs: 3 February 2025, 09:00, 09:01 … in Vietnam.
        """
        import imapclient  # the client only for the tests that fill a mailbox

        self.add_user(address, "pw")
        vietnam = dt.timezone(dt.timedelta(hours=7))
        with imapclient.IMAPClient(LOOPBACK, port=self.imap_port, ssl=False) as client:
            client.login(address, "pw")
            for folder, messages in folders.items():
                if folder != "INBOX":
                    client.create_folder(folder)
                for index, (raw, flags) in enumerate(messages):
                    client.append(folder, raw, flags=flags, msg_time=dt.datetime(2025, 2, 3, 9, index, tzinfo=vietnam))

    def add_user(self, address: str, password: str) -> None:
        """Create `address` (or change its password); a new user can log in and receive mail at once."""
        if self.users.get(address) == password and (self.proc is None or (self.users_dir / address).exists()):
            return  # already so: nothing to write, and no second to wait for
        self.users[address] = password
        if self.proc is None:
            return
        changed = (self.users_dir / address).exists()
        self.write_user(address, password)
        if changed:
            # Dovecot may hold the old file until the next whole second (see write_user); the first lookup
            # after that re-stats it and sees the moved mtime. Not a polling loop of logins: each failed
            # login costs 0.5 s (Dovecot flushes auth failures on a 500 ms timer, even with auth_failure_delay=0).
            time.sleep(1.02 - time.time() % 1)
            if not self.password_works(address, password):
                raise ServerStartError(f"dovecot {self.name} did not pick up the new password of {address}")

    def password_works(self, address: str, password: str) -> bool:
        """Tell whether an IMAP LOGIN of `address` with `password` succeeds right now."""
        import imaplib

        with imaplib.IMAP4(self.host, self.imap_port, timeout=5) as imap:
            try:
                imap.login(address, password)
            except imaplib.IMAP4.error:
                return False
            imap.logout()
            return True

    def stop(self) -> None:
        """SIGKILL the instance's process group, wait for it, and remove the folder."""
        began = time.monotonic()
        if self.proc is not None:
            # SIGTERM takes 2.3-3.1 s (the master waits for its log process); SIGKILL of the group 2-10 ms (notes)
            kill_group_and_reap(self.proc)
            self.proc = None
        self.stop_seconds = time.monotonic() - began
        if self.dir != Path() and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def group_members(pgid: int) -> list[tuple[int, str, int]]:
    """Return (pid, state, ppid) of every process in group `pgid`, zombies included."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # fields after the command name, which may itself hold spaces and parentheses: state ppid pgrp ...
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid:
            members.append((int(entry.name), state, int(ppid)))
    return members


def process_state(pid: int) -> str:
    """The state letter of a process in /proc (S sleeping, Z ended...), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def live_group_members(pgid: int) -> list[int]:
    """Return the pids of process group `pgid` that are still running (zombies not counted)."""
    return [pid for pid, state, _ppid in group_members(pgid) if state != "Z"]


def set_child_subreaper(on: bool) -> bool:
    """Make this process adopt its orphaned descendants (Linux prctl); return the previous setting."""
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous))
    libc.prctl(PR_SET_CHILD_SUBREAPER, int(on))
    return bool(previous.value)


def kill_group_and_reap(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGKILL the process group led by `proc` and reap every member, so that none lingers in ps."""
    # The children die together with their parent (the dovecot master), so they are orphaned and would be
    # reparented to init, which reaps them in its own time (measured here: zombies for about 1.4 s). As a
    # child subreaper for the moment of the kill, this process adopts them instead and reaps them itself.
    previous = set_child_subreaper(True)
    try:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout)
        # the master has exited, so every orphan has been reparented by now
        for pid, _state, ppid in group_members(proc.pid):
            if ppid == os.getpid():
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
    finally:
        if not previous:
            set_child_subreaper(False)
    deadline = time.monotonic() + timeout
    while live_group_members(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of group {proc.pid} still alive {timeout:.0f} s after SIGKILL")
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------------------------
# smtp-sink


def _accepts(port: int) -> bool:
    """Tell whether something listens on a loopback port."""
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


class SmtpSink:
    """Postfix's smtp-sink on a free loopback port: a real SMTP server that keeps each message in a file."""

    def __init__(self, hostname: str = "sink.test", options: Sequence[str] = ()) -> None:
        """Describe the instance; nothing runs until start(). options: more smtp-sink options, e.g. -r RCPT
        (4xx at RCPT), -f RCPT (5xx), -b/-B (the replies), -Q CONNECT (421), -q CONNECT (drop)."""
        self.hostname = hostname
        self.options = tuple(options)
        self.host = LOOPBACK
        self.port = 0
        self.dir = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    @property
    def dump_dir(self) -> Path:
        """Folder where smtp-sink writes one file per received message."""
        return self.dir / "dump"

    def start(self) -> None:
        """Start smtp-sink and wait for its 220 greeting."""
        sink = require_program("smtp-sink", "postfix")
        self.dir = make_server_dir("mmg-sink-")
        try:
            self.port = free_port()
            self.dump_dir.mkdir()
            args = [sink, "-4", "-h", self.hostname, "-d", f"{self.dump_dir}/%Y%m%d%H%M%S.", *self.options]
            user = None
            if os.geteuid() == 0:
                # as root smtp-sink refuses to start without -u ("fatal: -u option is required if running as
                # root"); it then writes the dump files as that user. tied() starts it as that user instead when
                # it can: smtp-sink's own switch of user would clear the parent-death signal.
                user = NOBODY
                os.chown(self.dump_dir, pwd.getpwnam(NOBODY).pw_uid, -1)
                if not shutil.which("setpriv"):
                    args += ["-u", NOBODY]
            args += [f"{LOOPBACK}:{self.port}", "64"]
            log = self.dir / "smtp-sink.log"
            began = time.monotonic()
            with log.open("wb") as out:
                self.proc = subprocess.Popen(tied(args, user), stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            # -Q CONNECT / -q CONNECT never greet with 220: then a port that accepts connections is ready
            refuses = "CONNECT" in " ".join(self.options)
            wait_until(lambda: _accepts(self.port) if refuses else read_banner(self.port).startswith(b"220"),
                       self.proc, "smtp-sink", [log])
            self.start_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def messages(self) -> list[bytes]:
        """Return the dump of each message received so far, oldest first (smtp-sink's X-* headers first)."""
        files = sorted(self.dump_dir.iterdir(), key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [path.read_bytes() for path in files]

    def stop(self) -> None:
        """Stop smtp-sink by its pid and remove the folder."""
        began = time.monotonic()
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None
        self.stop_seconds = time.monotonic() - began
        if self.dir != Path() and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


class RelayDaemon:
    """`mailmerge-gov relay serve` in a child process; its stderr read line by line in a thread."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(tied([sys.executable, "-m", "mailmerge_gov", "relay", "serve", "-c", str(config)]),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the next JSON log line of event `name` (other lines are kept in self.seen)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(f"no {name!r} event; the daemon said: {self.seen}") from None
            self.seen.append(line)
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == name:
                return data

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it does not stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclasses.dataclass
class Relay:
    """A forwarding relay running in a thread of the test process: its port, handler, controller and log."""

    port: int
    handler: Any  # mailmerge_gov.forwarding.handler.RelayHandler
    controller: Any  # its aiosmtpd controller
    records: list[Any]  # the TransactionRecords it logged

    def client(self) -> smtplib.SMTP:
        """An smtplib client that has said EHLO."""
        client = smtplib.SMTP(LOOPBACK, self.port, local_hostname="mail.example.org", timeout=15)
        client.ehlo()
        return client

    def wait_records(self, count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until `count` transactions have been logged."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.records


@contextlib.contextmanager
def uvicorn_in_thread(app: object, name: str) -> Iterator[str]:
    """Serve an ASGI app with a real uvicorn on a free loopback port in a thread; yield its base URL, then stop it."""
    import uvicorn  # the web stack only for the tests that serve it

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def slapd_version() -> str:
    """slapd's version as `slapd -VV` prints it, for a benchmark's heading."""
    slapd = subprocess.run([require_program("slapd", "slapd"), "-VV"], capture_output=True, text=True)
    return (slapd.stderr or slapd.stdout).splitlines()[0].split("$OpenLDAP:")[-1].strip(" $")


EVENT_LOOPS = ["uvloop", "asyncio"]  # the loops a relay runs on ([relay] event_loop): tests of both for what differs


def relay_in_thread(make_handler: Callable[[Callable[[Any], None]], Any], controllers: list[Any],
                    event_loop: str = "auto") -> Relay:
    """Start a relay in a thread on a free loopback port with the handler make_handler(log) builds; its log is kept."""
    from mailmerge_gov.forwarding.smtpserver import relay_controller

    records: list[Any] = []
    handler = make_handler(records.append)
    controller = relay_controller(handler, LOOPBACK, free_port(), event_loop)
    controller.start()
    controllers.append(controller)  # the caller stops them
    return Relay(controller.port, handler, controller, records)
