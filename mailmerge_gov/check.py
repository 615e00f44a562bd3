"""Try every server and file a configuration names, and say for each what works."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import imapclient
import imapclient.exceptions
import ldap3
import ldap3.core.exceptions

from mailmerge_gov.config import Config, DirectoryConfig, LdapServer, MailServer, SecretError, mailbox_password
from mailmerge_gov.ldapconn import LdapConnectError, failure_reason, open_connection, result_reason
from mailmerge_gov.store import StoreError, inspect_store


@dataclass(frozen=True)
class CheckResult:
    """The outcome of trying one server or file."""

    subject: str  # what the config calls it: "source binhduong directory"
    target: str  # where: a URL or a path
    ok: bool
    detail: str


def check_config(config: Config) -> Iterator[CheckResult]:
    """Try the state file, every directory, mail server and the relay's next hop."""
    yield _check_state(config)
    for source in config.sources:
        yield from _check_directory(config, f"source {source.name} directory", source.directory)
        if source.mail:
            yield _check_mail(config, f"source {source.name} mail", source.mail)
    if config.target.directory:
        yield from _check_directory(config, "target directory", config.target.directory, output=True)
    if config.target.mail:
        yield _check_mail(config, "target mail", config.target.mail, output=True)
    if config.relay.next_hop:
        yield _check_smtp("relay next hop", config.relay.next_hop, config.relay.next_hop_host,
                          config.relay.next_hop_port, config.relay.hostname)
    if config.web.session_secret is not None:
        yield _check_web_login(config)


def _check_web_login(config: Config) -> CheckResult:
    """Read the staff directory's session secret as `directory serve` would; the directory is checked above."""
    from mailmerge_gov.web.app import WebSetupError, login_setup  # the web stack only when [web] has a login

    assert config.web.session_secret is not None
    where = config.web.session_secret.describe()
    try:
        directory, _ = login_setup(config)
    except WebSetupError as exc:
        return CheckResult("staff directory login", where, False, str(exc))
    assert directory is not None
    return CheckResult("staff directory login", where, True,
                       f"session secret readable; officials log in against {directory.url}")


def _shown(config: Config, path: Path) -> str:
    """Show a path as the config file writes it (relative to the file) where possible."""
    try:
        return str(path.relative_to(config.base_dir))
    except ValueError:
        return str(path)


def _check_state(config: Config) -> CheckResult:
    """Report the state file's schema version without creating or changing it."""
    where = _shown(config, config.state_file)
    try:
        status = inspect_store(config.state_file)
    except StoreError as exc:
        return CheckResult("state file", where, False, str(exc))
    if not status.exists:
        parent = _existing_parent(config.state_file)
        if not os.access(parent, os.W_OK):
            return CheckResult("state file", where, False, f"cannot be created: {parent} is not writable")
        return CheckResult("state file", where, True, "not created yet; the first run creates it")
    if status.too_new:
        return CheckResult("state file", where, False,
                           f"schema version {status.version} is newer than this mailmerge-gov knows ({status.latest})")
    if status.needs_upgrade:
        return CheckResult("state file", where, True,
                           f"schema version {status.version}; the next run upgrades it to {status.latest}")
    return CheckResult("state file", where, True, f"schema version {status.version}")


def _existing_parent(path: Path) -> Path:
    """Return the nearest folder above path that exists."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _check_file(config: Config, subject: str, path: Path, what: str) -> CheckResult:
    """Check that an input file exists and can be read."""
    where = _shown(config, path)
    try:
        with path.open("rb") as handle:
            handle.read(1)
        size = path.stat().st_size
    except IsADirectoryError:
        return CheckResult(subject, where, False, f"{what} is a folder, expected a file")
    except OSError as exc:
        return CheckResult(subject, where, False, f"{what} cannot be read: {exc.strerror}")
    return CheckResult(subject, where, True, f"{what} readable, {_size(size)}")


def _check_output(config: Config, subject: str, path: Path, what: str) -> CheckResult:
    """Check that an output file or folder can be written."""
    where = _shown(config, path)
    parent = _existing_parent(path) if not path.exists() else (path if path.is_dir() else path.parent)
    if not os.access(parent, os.W_OK):
        return CheckResult(subject, where, False, f"{what} cannot be written: {parent} is not writable")
    state = "exists" if path.exists() else "will be created"
    return CheckResult(subject, where, True, f"{what} {state}, writable")


def _size(size: int) -> str:
    """Format a byte count for people."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _check_directory(config: Config, subject: str, directory: DirectoryConfig,
                     output: bool = False) -> Iterator[CheckResult]:
    """Check a directory: bind to LDAP, or read/write the LDIF or CSV file."""
    if directory.kind == "ldap":
        assert directory.ldap is not None
        yield _check_ldap(subject, directory.ldap)
    else:
        assert directory.path is not None
        what = "LDIF" if directory.kind == "ldif" else "CSV"
        check = _check_output if output else _check_file
        yield check(config, subject, directory.path, what)
    if directory.hr_csv:
        yield _check_file(config, f"{subject} HR file", directory.hr_csv, "CSV")


def _check_ldap(subject: str, server: LdapServer) -> CheckResult:
    """Bind to an LDAP server and read its base entry."""
    try:
        password = server.password.reveal() if server.password else None
    except SecretError as exc:
        return CheckResult(subject, server.url, False, str(exc))
    try:
        connection = open_connection(server, password, read_only=True)
    except LdapConnectError as exc:
        return CheckResult(subject, server.url, False, str(exc))
    try:
        found = connection.search(server.base_dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
        if not found:
            return CheckResult(subject, server.url, False,
                               f"base DN {server.base_dn} not readable: {result_reason(connection)}")
    except ldap3.core.exceptions.LDAPException as exc:
        return CheckResult(subject, server.url, False, failure_reason(exc))
    finally:
        connection.unbind()
    who = f"bound as {server.bind_dn}" if server.bind_dn else "anonymous bind"
    tls_note = ", TLS" if server.use_ssl else (", StartTLS" if server.starttls else "")
    return CheckResult(subject, server.url, True, f"{who}{tls_note}, base DN {server.base_dn} found")


def _check_mail(config: Config, subject: str, server: MailServer, output: bool = False) -> CheckResult:
    """Check a mail store: log in to IMAP, or look at the Maildir/mbox on disk."""
    if server.kind == "imap":
        return _check_imap(subject, server)
    if server.kind == "ews":
        return _check_ews(subject, server)
    assert server.path is not None
    if output:
        return _check_output(config, subject, server.path, "Maildir root" if server.kind == "maildir" else "mbox")
    where = _shown(config, server.path)
    if server.kind == "mbox":
        return _check_file(config, subject, server.path, "mbox")
    if not server.path.exists():
        return CheckResult(subject, where, False, "Maildir root does not exist")
    if not server.path.is_dir():
        return CheckResult(subject, where, False, "Maildir root is not a folder")
    # A Maildir whose cur/ or new/ is empty may have lost that folder (git keeps no empty
    # folders; some backup tools neither), so either one marks a mailbox.
    mailboxes = [p for p in server.path.iterdir() if (p / "cur").is_dir() or (p / "new").is_dir()]
    if not mailboxes:
        return CheckResult(subject, where, False, "no Maildir mailboxes found (expected <root>/<address>/cur)")
    return CheckResult(subject, where, True, f"Maildir root readable, {len(mailboxes)} mailboxes")


def _check_imap(subject: str, server: MailServer) -> CheckResult:
    """Connect to an IMAP server and log in the way the migration will."""
    url = server.url or ""
    per_user = server.login == "user" and server.credentials_file is not None
    if per_user and not server.probe_mailbox:
        return CheckResult(subject, url, False, "login = \"user\" with a credentials_file logs in as each mailbox: "
                                                "set probe_mailbox to one to try")
    try:
        if per_user:
            password = mailbox_password(server.credentials_file, server.probe_mailbox)
        else:
            password = server.password.reveal() if server.password else None
    except SecretError as exc:
        return CheckResult(subject, url, False, str(exc))
    if server.admin_user is None and not per_user:
        return CheckResult(subject, url, False, "no admin_user configured, so no login can be tried")
    if server.login != "user" and not server.probe_mailbox:
        return CheckResult(subject, url, False,
                           f"login = \"{server.login}\" logs in for a mailbox: set probe_mailbox to one to try")
    context = ssl.create_default_context(cafile=str(server.ca_file) if server.ca_file else None)
    try:
        client = imapclient.IMAPClient(server.host, port=server.port, ssl=server.use_ssl,
                                       ssl_context=context, timeout=server.timeout)
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        return CheckResult(subject, url, False, _socket_reason(exc))
    try:
        if server.starttls:
            client.starttls(context)
        if server.login == "master":
            who = f"{server.probe_mailbox}{server.master_separator}{server.admin_user}"
            client.login(who, password)
        elif server.login == "authzid":
            who = f"{server.admin_user} for {server.probe_mailbox}"
            client.plain_login(server.admin_user, password, authorization_identity=server.probe_mailbox)
        elif per_user:
            who = server.probe_mailbox
            client.login(server.probe_mailbox, password)  # the way the migration logs in for each mailbox
        else:
            who = server.admin_user
            client.login(server.admin_user, password)
        folders = client.list_folders()
    except imapclient.exceptions.LoginError as exc:
        return CheckResult(subject, url, False, f"login as {who} failed: {_imap_text(exc)}")
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        return CheckResult(subject, url, False, _socket_reason(exc))
    finally:
        _quietly_logout(client)
    return CheckResult(subject, url, True, f"logged in as {who}, {len(folders)} folders")


def _check_ews(subject: str, server: MailServer) -> CheckResult:
    """Open probe_mailbox on an Exchange server the way the migration opens every mailbox, and list its folders."""
    from mailmerge_gov.migration.ews import open_ews  # imports exchangelib only when a config has an EWS server
    from mailmerge_gov.migration.protocol import MailboxError

    url = server.url or ""
    if not server.probe_mailbox:
        way = ("each mailbox logs in with its own password" if server.credentials_file is not None
               else f"{server.admin_user} opens each mailbox by "
                    f"{'delegate access' if server.access == 'delegate' else 'impersonation'}")
        return CheckResult(subject, url, False, f"{way}: set probe_mailbox to one to try")
    try:
        store = open_ews(server, server.probe_mailbox)
    except MailboxError as exc:
        # the store's messages start with the URL, which the result shows already
        return CheckResult(subject, url, False, str(exc).removeprefix(f"{url} "))
    try:
        folders = store.folders()
        how = store.how
    except MailboxError as exc:
        return CheckResult(subject, url, False, str(exc).removeprefix(f"{url} "))
    finally:
        store.close()
    mail = sum(f.selectable for f in folders)
    return CheckResult(subject, url, True, f"opened {server.probe_mailbox} as {how} (EWS {server.version}, "
                                           f"{server.auth.upper()}), {mail} mail folders")


def _imap_text(exc: BaseException) -> str:
    """Turn an imaplib error (often a bytes repr) into the server's words."""
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text


def _quietly_logout(client: imapclient.IMAPClient) -> None:
    """Log out, ignoring a connection that is already gone."""
    try:
        client.logout()
    except (OSError, imapclient.exceptions.IMAPClientError, AttributeError):
        pass


def _socket_reason(exc: BaseException) -> str:
    """Describe a failed connection from its exception."""
    if isinstance(exc, ConnectionRefusedError):
        return "cannot connect: connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "cannot connect: timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    return f"cannot connect: {exc}"


def _check_smtp(subject: str, url: str, host: str, port: int, helo: str) -> CheckResult:
    """Connect to an SMTP server and say EHLO."""
    try:
        if url.startswith("smtps:"):
            client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, local_hostname=helo, timeout=10)
        else:
            client = smtplib.SMTP(host, port, local_hostname=helo, timeout=10)
    except smtplib.SMTPException as exc:
        return CheckResult(subject, url, False, f"no SMTP greeting: {exc}")
    except OSError as exc:
        return CheckResult(subject, url, False, _socket_reason(exc))
    try:
        code, _ = client.ehlo()
        if code != 250:
            return CheckResult(subject, url, False, f"EHLO answered {code}")
        features = sorted(name.upper() for name in client.esmtp_features)
        client.quit()
    except (smtplib.SMTPException, OSError) as exc:
        return CheckResult(subject, url, False, f"EHLO failed: {exc}")
    shown = ", ".join(features) if features else "no extensions"
    return CheckResult(subject, url, True, f"EHLO accepted ({shown})")
