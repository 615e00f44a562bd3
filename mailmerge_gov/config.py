"""consolidation.toml → frozen dataclasses; errors name the file, the key and the line."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import jinja2

from mailmerge_gov import tomlpos
from mailmerge_gov.textfile import read_utf8

T = TypeVar("T")

PRESETS = ("openldap", "ad", "zimbra")
IMAP_LOGINS = ("user", "master", "authzid")
# EWS: how the service account opens an official's mailbox, how it authenticates, and the server versions
# (RequestServerVersion names; pinned so that no probe request is needed).
EWS_ACCESS = ("impersonation", "delegate")
EWS_AUTH = ("ntlm", "basic")
EWS_VERSIONS = ("Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2", "Exchange2013", "Exchange2013_SP1",
                "Exchange2016", "Exchange2019")
_EWS_KEYS = ("access", "auth", "version", "max_backoff")

# Keys people reach for when they want to write a password into the file. They are refused
# with the two safe ways instead, so a secret never ends up in a file that gets copied,
# committed or attached to a ticket.
_LITERAL_SECRET_KEYS = {
    "password", "passwd", "pass", "pw", "secret", "secrets", "bind_password",
    "master_password", "admin_password", "token", "api_key", "srs_secret",
}
_SECRET_HELP = (
    'literal passwords are not allowed in the configuration; use password_env = "VARIABLE" '
    '(read from the environment) or password_file = "/path/to/file" (first line of a file '
    "readable only by the service)"
)
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")
_TEMPLATE_ENV = jinja2.Environment(autoescape=False)


_DEFAULT_PORTS = {"ldap": 389, "ldaps": 636, "imap": 143, "imaps": 993, "http": 80, "https": 443,
                  "smtp": 25, "smtps": 465}


def url_host(url: str) -> str:
    """Return the host of a server URL."""
    return urlsplit(url).hostname or ""


def url_port(url: str) -> int:
    """Return the port of a server URL, or its scheme's well-known port."""
    parts = urlsplit(url)
    return parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


class ConfigError(Exception):
    """The configuration file cannot be used; the message names file, line and key."""


class SecretError(Exception):
    """A secret named by the configuration cannot be read."""


def mailbox_password(path: Path, mailbox: str) -> str:
    """Return a mailbox's password from a credentials file (CSV: mailbox,password); SecretError otherwise."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    # Passwords of every official: like ssh with a private key, refuse a file others can read.
    if mode & 0o077:
        raise SecretError(f"credentials file {path} can be read by others (mode {mode & 0o777:o}): chmod 600 it")
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if number == 1 and row[:2] == ["mailbox", "password"]:
            continue
        if len(row) < 2:
            raise SecretError(f"credentials file {path}, line {number}: expected mailbox,password")
        if row[0].strip().lower() == mailbox.lower():
            return row[1]
    raise SecretError(f"credentials file {path} has no password for {mailbox}")


@dataclass(frozen=True)
class Secret:
    """Where a password comes from: an environment variable or a file, never the config."""

    env: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        """Say where the secret is read from, without revealing it."""
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def reveal(self) -> str:
        """Read the secret now; raise SecretError saying what is missing."""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise SecretError(f"environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            text = self.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecretError(f"cannot read password file {self.file}: {exc.strerror}") from exc
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise SecretError(f"password file {self.file} is empty")
        return lines[0]


@dataclass(frozen=True)
class LdapServer:
    """An LDAP directory server and how to bind to it."""

    url: str
    base_dn: str
    bind_dn: str | None = None
    password: Secret | None = None
    starttls: bool = False
    ca_file: Path | None = None
    timeout: float = 10.0

    @property
    def host(self) -> str:
        """Host name from the URL."""
        return url_host(self.url)

    @property
    def port(self) -> int:
        """Port from the URL, or the scheme's default."""
        return url_port(self.url)

    @property
    def use_ssl(self) -> bool:
        """Whether the URL asks for LDAP over TLS (ldaps)."""
        return urlsplit(self.url).scheme == "ldaps"


@dataclass(frozen=True)
class DirectoryConfig:
    """Where a directory is read from or written to: an LDAP server, an LDIF or a CSV file."""

    kind: str  # "ldap", "ldif" or "csv"
    ldap: LdapServer | None = None
    path: Path | None = None
    preset: str = "openldap"
    attributes: tuple[tuple[str, str], ...] = ()
    hr_csv: Path | None = None


@dataclass(frozen=True)
class MailServer:
    """Where mailboxes live: an IMAP or EWS server, or a Maildir / mbox folder on disk."""

    kind: str  # "imap", "ews", "maildir" or "mbox"
    url: str | None = None
    path: Path | None = None
    admin_user: str | None = None
    password: Secret | None = None
    login: str = "user"
    master_separator: str = "*"
    probe_mailbox: str | None = None
    starttls: bool = False
    ca_file: Path | None = None
    timeout: float = 30.0
    max_connections: int = 4
    subtree: str | None = None  # a source's folders go under this target folder ("Lưu trữ/Bình Dương")
    credentials_file: Path | None = None  # login = "user": each mailbox's own password (CSV mailbox,password)
    access: str = "impersonation"  # EWS: admin_user opens mailboxes by impersonation or as a delegate
    auth: str = "ntlm"  # EWS: HTTP authentication, "ntlm" or "basic"
    version: str = "Exchange2016"  # EWS: the server version requests are written for (one of EWS_VERSIONS)
    max_backoff: float = 600.0  # EWS: seconds one request may wait in total while the server throttles

    @property
    def host(self) -> str:
        """Host name from the URL."""
        return url_host(self.url or "")

    @property
    def port(self) -> int:
        """Port from the URL, or the scheme's default."""
        return url_port(self.url or "")

    @property
    def use_ssl(self) -> bool:
        """Whether the URL asks for implicit TLS (imaps, https)."""
        return urlsplit(self.url or "").scheme in ("imaps", "https")


@dataclass(frozen=True)
class Source:
    """One old unit whose directory and mail system are being consolidated."""

    name: str
    unit_name: str
    code: str
    domains: tuple[str, ...]
    directory: DirectoryConfig
    mail: MailServer | None = None


@dataclass(frozen=True)
class Target:
    """The new, merged unit."""

    name: str
    code: str
    mail_domain: str
    base_dn: str
    directory: DirectoryConfig | None = None
    mail: MailServer | None = None


@dataclass(frozen=True)
class Addressing:
    """How new addresses are made: ordered patterns, reserved names, who keeps theirs."""

    patterns: tuple[str, ...]
    reserved: tuple[str, ...] = ()
    keep_addresses_of: tuple[str, ...] = ()


DEFAULT_PRIVILEGED_GROUPS = ("*admin*", "*quản trị*", "*quan tri*", "*quantri*", "postmaster*")


@dataclass(frozen=True)
class DirectoryPolicy:
    """How the directory is consolidated: the unit mapping file and the safety limits of apply."""

    structure: Path | None = None
    max_disables: int = 10
    privileged_groups: tuple[str, ...] = DEFAULT_PRIVILEGED_GROUPS


@dataclass(frozen=True)
class Relay:
    """Settings of the forwarding relay daemon."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 2525
    hostname: str = "localhost"
    next_hop: str | None = None
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20  # refused commands in a session without a message relayed; then 421 and closed
    min_data_rate: int = 500  # bytes/s a message must keep coming at after `timeout` seconds of DATA; 0: no floor
    map: Path | None = None  # the address map CSV (old_address,new_address,valid_until)
    srs_domain: str | None = None  # envelope senders from elsewhere are rewritten onto this domain
    srs_secrets: tuple[Secret, ...] = ()  # the first signs, all verify (rotation)
    srs_hash_length: int = 6
    srs_max_age_days: int = 21
    timeout: float = 300.0  # a client session's idle limit
    next_hop_timeout: float = 60.0  # each next-hop command; below `timeout`, so the client gets an answer
    next_hop_ca_file: Path | None = None  # smtps:// next hop signed by a private CA
    max_hops: int = 50  # more Received headers than this: a mail loop
    shutdown_timeout: float = 30.0  # SIGTERM: how long open sessions may take to finish
    reload_timeout: float = 30.0  # SIGHUP with workers: how long a worker may take to answer before it is restarted
    tls_cert_file: Path | None = None  # inbound STARTTLS: certificate chain (PEM); set with tls_key_file
    tls_key_file: Path | None = None
    require_tls: bool = False  # refuse MAIL before STARTTLS (530 5.7.0); needs the certificate
    max_connections: int = 200  # client connections at once; more get 421 4.7.0
    max_connections_per_ip: int = 20  # client connections at once from one IP address
    metrics_listen: tuple[str, int] | None = None  # Prometheus /metrics over HTTP; off when unset
    arc_selector: str | None = None  # ARC seal (RFC 8617): the three arc_* keys together, or none of them
    arc_domain: str | None = None
    arc_key_file: Path | None = None  # RSA private key (PEM) whose public half is at selector._domainkey.domain
    workers: int | str = "auto"  # relay processes on the one listening socket; "auto": one per CPU it may use
    event_loop: str = "auto"  # "uvloop", "asyncio", or "auto": uvloop when it is installed

    @property
    def next_hop_host(self) -> str:
        """Host of the next hop URL."""
        return url_host(self.next_hop or "")

    @property
    def next_hop_port(self) -> int:
        """Port of the next hop URL, or 25 (465 for smtps)."""
        return url_port(self.next_hop or "")


@dataclass(frozen=True)
class MigrationPolicy:
    """[migration]: folder rules for every mailbox, and how many mailboxes are copied at once."""

    rename: tuple[tuple[str, str], ...] = ()  # (regular expression, replacement) on source folder names
    include: tuple[str, ...] = ()  # regular expressions: only matching folders (all when empty)
    exclude: tuple[str, ...] = ()  # regular expressions: folders left out (listed as such)
    jobs: int = 4  # mailboxes copied at once
    connections: int = 2  # pairs of connections per mailbox, copying folders side by side


# Fields of an official the staff directory can show; the name (and uid) are always shown. The mobile
# number is private unless the [web] table says otherwise: it is a personal number, not the agency's.
WEB_FIELDS = ("title", "unit", "mail", "phones", "mobile", "old_addresses", "old_units")
DEFAULT_PUBLIC_FIELDS = ("title", "unit", "mail", "phones", "old_addresses", "old_units")
WEB_LANGUAGES = ("vi", "en")


@dataclass(frozen=True)
class WebRedirect:
    """One old directory URL (path, and query parameters it must carry) and the new page it moved to."""

    old_path: str
    old_query: tuple[tuple[str, str], ...] = ()  # parameters the old URL must carry with these values
    to: str | None = None  # a new path; "{name}" takes the old URL's query parameter `name`
    address: str | None = None  # or an old address template: the card of whoever has that address now


@dataclass(frozen=True)
class WebConfig:
    """[web]: the staff directory site: where it listens, what visitors see, the login's session."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # the address people use (https: the session cookie is Secure)
    default_language: str = "vi"
    public_fields: tuple[str, ...] = DEFAULT_PUBLIC_FIELDS
    session_secret: Secret | None = None  # signs the session cookie; no secret, no login
    session_minutes: int = 480
    trusted_proxies: tuple[str, ...] = ()  # reverse proxies whose X-Forwarded-For/-Proto are believed
    redirects: tuple[WebRedirect, ...] = ()

    @property
    def secure_cookies(self) -> bool:
        """Whether the site is reached over https, so cookies must be Secure."""
        return urlsplit(self.public_url or "").scheme == "https"


@dataclass(frozen=True)
class Config:
    """A whole consolidation: project, new unit, old units, policy, transition, relay."""

    path: Path
    name: str
    state_file: Path
    target: Target
    sources: tuple[Source, ...]
    addressing: Addressing
    transition_ends: dt.date
    relay: Relay = field(default_factory=Relay)
    directory: DirectoryPolicy = field(default_factory=DirectoryPolicy)
    migration: MigrationPolicy = field(default_factory=lambda: MigrationPolicy())
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the file are resolved against."""
        return self.path.parent

    @property
    def reports_folder(self) -> Path:
        """Where reports (and the Exchange exports) are written: beside the state file."""
        return self.state_file.parent / "reports"

    def source(self, name: str) -> Source:
        """Return the source with this name; KeyError if there is none."""
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)


class _Table:
    """One TOML table being read: typed getters, and unknown keys reported at the end."""

    def __init__(self, loader: "_Loader", data: dict[str, Any], path: tomlpos.Path) -> None:
        self.loader = loader
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        """Build an error pointing at a key of this table (or the table itself)."""
        path = self.path + ((key,) if key is not None else ())
        return self.loader.error(path, message)

    def get(self, key: str, kind: type[T], default: T | None = None, required: bool = False) -> T | None:
        """Return the value of key, checked to be of kind."""
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "missing required key")
            return default
        value = self.data[key]
        # bool is an int subclass in Python, and TOML datetimes are dates: be exact.
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is dt.date and isinstance(value, dt.datetime):
            ok = False
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"expected {_KIND_NAMES[kind]}, got {_describe(value)}")
        return value

    def text(self, key: str, required: bool = False, default: str | None = None) -> str | None:
        """Return a non-empty string value."""
        value = self.get(key, str, default, required)
        if value is not None and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str, required: bool = False) -> tuple[str, ...]:
        """Return a list of non-empty strings as a tuple."""
        value = self.get(key, list, None, required)
        if value is None:
            return ()
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise self.error(key, f"expected a list of non-empty strings, found {_describe(item)}")
        if required and not value:
            raise self.error(key, "must list at least one value")
        return tuple(value)

    def table(self, key: str, required: bool = False) -> _Table | None:
        """Return a sub-table reader."""
        value = self.get(key, dict, None, required)
        return None if value is None else _Table(self.loader, value, self.path + (key,))

    def tables(self, key: str) -> list[_Table]:
        """Return readers for an array of tables."""
        value = self.get(key, list, None)
        if value is None:
            return []
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(key, f"expected [[{key}]] tables, found {_describe(item)}")
            result.append(_Table(self.loader, item, self.path + (key, index)))
        return result

    def path_value(self, key: str, required: bool = False) -> Path | None:
        """Return a file path, relative paths resolved against the config's folder."""
        value = self.text(key, required)
        return None if value is None else self.loader.resolve(value)

    def secret(self) -> Secret | None:
        """Return the password source of this table, if it names one."""
        for key in self.data:
            if key.lower() in _LITERAL_SECRET_KEYS:
                raise self.error(key, _SECRET_HELP)
        return self.secret_source("password_env", "password_file")

    def secret_source(self, env_key: str, file_key: str) -> Secret | None:
        """Return the secret named by an environment variable key or a file key (one of the two), if either is set."""
        env = self.text(env_key)
        file = self.path_value(file_key)
        if env and file:
            raise self.error(file_key, f"give {env_key} or {file_key}, not both")
        if env and not _ENV_NAME.match(env):
            raise self.error(env_key, f"'{env}' is not an environment variable name")
        return Secret(env=env, file=file) if env or file else None

    def one_of(self, keys: tuple[str, ...], what: str) -> str:
        """Return the one key of keys that is present; error if none or several are."""
        present = [key for key in keys if key in self.data]
        if len(present) != 1:
            listed = ", ".join(keys)
            found = "none" if not present else " and ".join(present)
            key = present[1] if len(present) > 1 else None
            raise self.error(key, f"{what} needs exactly one of {listed}; found {found}")
        return present[0]

    def finish(self) -> None:
        """Refuse keys nobody asked for: typos must not be ignored silently."""
        for key in self.data:
            if key in self.seen:
                continue
            if key.lower() in _LITERAL_SECRET_KEYS:
                raise self.error(key, _SECRET_HELP)
            raise self.error(key, f"unknown key '{key}'")


_KIND_NAMES: dict[type, str] = {
    str: "a string", int: "an integer", float: "a number", bool: "true or false",
    list: "a list", dict: "a table", dt.date: "a date like 2026-06-30 (written without quotes)",
}


def _describe(value: Any) -> str:
    """Name the TOML type of a value for an error message."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dt.datetime):
        return f"a date-time ({value.isoformat()})"
    for kind in (int, float, dt.date):
        if isinstance(value, kind):
            return f"{_KIND_NAMES[kind].split(' like')[0]} ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


class _Loader:
    """State of reading one file: its path, its text and the lines of its keys."""

    def __init__(self, path: Path, text: str) -> None:
        self.display = path
        self.path = path.absolute()
        self.lines = tomlpos.key_lines(text)

    def dotted(self, path: tomlpos.Path) -> str:
        """Show a key path as people write it: sources[2].directory.ldif (counted from 1)."""
        out = ""
        for part in path:
            out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out

    def error(self, path: tomlpos.Path, message: str) -> ConfigError:
        """Build an error naming the file, the line and the key."""
        line = tomlpos.line_of(self.lines, path)
        where = f"{self.display}, line {line}" if line else str(self.display)
        key = self.dotted(path)
        return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def resolve(self, value: str) -> Path:
        """Resolve a path from the file against the file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a consolidation file; raise ConfigError naming file, line and key."""
    path = Path(path)
    text = read_utf8(path, "configuration", ConfigError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from exc
    loader = _Loader(path, text)
    return _read_config(loader, _Table(loader, data, ()))


def _syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """Name the line and key of a TOML syntax error, and quote the line."""
    match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
    if not match:
        return ConfigError(f"{path}: not valid TOML: {exc}")
    number = int(match.group(1))
    reason = str(exc)[: match.start()].strip()
    lines = text.splitlines()
    quoted = lines[number - 1].strip() if number <= len(lines) else ""
    # The keys up to the bad line are still readable, so the message can name the key too.
    keys = [key for key, line in tomlpos.key_lines("\n".join(lines[:number])).items() if line == number]
    key = _Loader(path, "").dotted(max(keys, key=len)) + ": " if keys else ""
    return ConfigError(f"{path}, line {number}: {key}not valid TOML: {reason} (column {match.group(2)}): {quoted}")


def _read_config(loader: _Loader, root: _Table) -> Config:
    """Build the Config from the top-level table."""
    project = root.table("project", required=True)
    name = project.text("name", required=True)
    state_file = project.path_value("state_file", required=True)
    project.finish()

    target_table = root.table("target", required=True)
    source_tables = root.tables("sources")
    if not source_tables:
        raise root.error(None, "at least one [[sources]] table is required (one per old unit)")
    sources = tuple(_read_source(table) for table in source_tables)
    _check_unique(source_tables, sources)
    target = _read_target(target_table)

    addressing = _read_addressing(root.table("addressing", required=True), sources)
    transition = root.table("transition", required=True)
    ends = transition.get("ends", dt.date, required=True)
    transition.finish()
    relay_table = root.table("relay")
    relay = _read_relay(relay_table) if relay_table else Relay()
    directory_table = root.table("directory")
    policy = _read_directory_policy(directory_table) if directory_table else DirectoryPolicy()
    migration_table = root.table("migration")
    migration = _read_migration(migration_table) if migration_table else MigrationPolicy()
    web_table = root.table("web")
    web = _read_web(web_table) if web_table else WebConfig()
    root.finish()
    return Config(
        path=loader.path, name=name, state_file=state_file, target=target, sources=sources,
        addressing=addressing, transition_ends=ends, relay=relay, directory=policy, migration=migration,
        web=web,
    )


def _read_web(table: _Table) -> WebConfig:
    """Read [web]: the staff directory site's address, public fields, session and old URLs."""
    for key in table.data:
        if key.lower() in _LITERAL_SECRET_KEYS or key == "session_secret":
            raise table.error(key, 'the session secret is never written into the configuration; use '
                                   'session_secret_env = "VARIABLE" or session_secret_file = "/path/to/file"')
    host = table.text("host", default="127.0.0.1")
    port = int(_positive(table, "port", 8080, integer=True))
    if port > 65535:
        raise table.error("port", f"must be 1 to 65535, got {port}")
    public_url = table.text("public_url")
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise table.error("public_url", f"'{public_url}' is not an http:// or https:// URL with a host")
        public_url = public_url.rstrip("/")
    language = table.text("default_language", default="vi")
    if language not in WEB_LANGUAGES:
        raise table.error("default_language", f"unknown language '{language}'; choose one of {', '.join(WEB_LANGUAGES)}")
    public = table.strings("public_fields") if "public_fields" in table.data else DEFAULT_PUBLIC_FIELDS
    for name in public:
        if name not in WEB_FIELDS:
            raise table.error("public_fields", f"unknown field '{name}'; choose from {', '.join(WEB_FIELDS)} "
                                               "(the name is always public)")
    session_secret = table.secret_source("session_secret_env", "session_secret_file")
    minutes = int(_positive(table, "session_minutes", 480, integer=True))
    proxies = table.strings("trusted_proxies")
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise table.error("trusted_proxies", f"'{proxy}' is not an IP address or network") from None
    redirects = tuple(_read_redirect(entry) for entry in table.tables("redirects"))
    web = WebConfig(host=host, port=port, public_url=public_url, default_language=language,
                    public_fields=tuple(dict.fromkeys(public)),
                    session_secret=session_secret,
                    session_minutes=minutes, trusted_proxies=proxies, redirects=redirects)
    table.finish()
    return web


def is_local_path(value: str) -> bool:
    """Whether a redirect target is a path of this site: "//host", "/\\host" and control characters are not."""
    # browsers take "//evil.example" and "/\\evil.example" as other sites: an open redirect would let anyone send
    # people anywhere under the site's name
    return value.startswith("/") and not value.startswith("//") and "\\" not in value and all(c >= " " for c in value)


def _read_redirect(table: _Table) -> WebRedirect:
    """Read one [[web.redirects]]: an old URL (`from`) and a new page (`to`) or an old address (`address`)."""
    old = table.text("from", required=True)
    parts = urlsplit(old)
    if not old.startswith("/") or parts.fragment:
        raise table.error("from", f"'{old}' is not the path of an old URL (it starts with /, like /danhba/?uid=x)")
    target = table.one_of(("to", "address"), "a redirect")
    value = table.text(target)
    names = re.findall(r"\{([^{}]*)\}", value)
    if any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) for name in names):
        raise table.error(target, f"'{value}': a placeholder is a query parameter's name, like {{uid}}")
    if target == "to" and not is_local_path(value):
        # a path of this site only: an open redirect would let anyone send people anywhere under our name
        raise table.error("to", f"'{value}' is not a path of this site (it starts with one /, like /people/{{uid}})")
    if target == "address" and value.count("@") != 1:
        raise table.error("address", f"'{value}' is not an address template, like {{uid}}@binhduong.gov.vn")
    redirect = WebRedirect(old_path=parts.path, old_query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
                           **{target: value})
    table.finish()
    return redirect


def _read_migration(table: _Table) -> MigrationPolicy:
    """Read [migration]: folder rename/include/exclude rules and the number of mailboxes at once."""
    rename = []
    for index, pair in enumerate(table.get("rename", list, [])):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise table.error("rename", f"entry {index + 1} must be [\"regular expression\", \"replacement\"]")
        rename.append((_regex(table, "rename", pair[0]), pair[1]))
    policy = MigrationPolicy(
        rename=tuple(rename),
        include=tuple(_regex(table, "include", p) for p in table.strings("include")),
        exclude=tuple(_regex(table, "exclude", p) for p in table.strings("exclude")),
        jobs=int(_positive(table, "jobs", 4, integer=True)),
        connections=int(_positive(table, "connections", 2, integer=True)),
    )
    table.finish()
    return policy


def _regex(table: _Table, key: str, pattern: str) -> str:
    """Check a regular expression of the config; ConfigError naming the key when it does not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise table.error(key, f"'{pattern}' is not a valid regular expression: {exc}") from None
    return pattern


def _read_directory_policy(table: _Table) -> DirectoryPolicy:
    """Read [directory]: the unit mapping file, apply's limits, privileged group patterns."""
    patterns = table.strings("privileged_groups")
    policy = DirectoryPolicy(
        structure=table.path_value("structure"),
        max_disables=int(_positive(table, "max_disables", 10, integer=True)),
        privileged_groups=tuple(p.lower() for p in patterns) if "privileged_groups" in table.data
        else DEFAULT_PRIVILEGED_GROUPS,
    )
    table.finish()
    return policy


def _read_target(table: _Table) -> Target:
    """Read [target]: the new unit."""
    base_dn = table.text("base_dn", required=True)
    directory_table = table.table("directory")
    mail_table = table.table("mail")
    target = Target(
        name=table.text("name", required=True),
        code=_code(table, "code"),
        mail_domain=_domain(table, "mail_domain", table.text("mail_domain", required=True)),
        base_dn=base_dn,
        directory=_read_directory(directory_table, ("ldap", "ldif"), base_dn) if directory_table else None,
        mail=_read_mail(mail_table, target=True) if mail_table else None,
    )
    table.finish()
    return target


def _read_source(table: _Table) -> Source:
    """Read one [[sources]] table: an old unit."""
    name = table.text("name", required=True)
    if not re.match(r"^[a-z0-9][a-z0-9_-]*$", name):
        raise table.error("name", f"'{name}' must be a short ASCII name (a-z, 0-9, - and _), used in files and logs")
    domains = table.strings("domains", required=True)
    mail_table = table.table("mail")
    source = Source(
        name=name,
        unit_name=table.text("unit_name", required=True),
        code=_code(table, "code"),
        domains=tuple(_domain(table, "domains", domain) for domain in domains),
        directory=_read_directory(table.table("directory", required=True), ("ldap", "ldif", "csv"), None),
        mail=_read_mail(mail_table) if mail_table else None,
    )
    table.finish()
    return source


def _read_directory(table: _Table, kinds: tuple[str, ...], default_base: str | None) -> DirectoryConfig:
    """Read a directory table: ldap_url + base_dn, ldif or csv."""
    keys = {"ldap": "ldap_url", "ldif": "ldif", "csv": "csv"}
    kind = {v: k for k, v in keys.items()}[table.one_of(tuple(keys[k] for k in kinds), "a directory")]
    preset = table.text("preset", default="openldap")
    if preset not in PRESETS:
        raise table.error("preset", f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    ldap = None
    path = None
    if kind == "ldap":
        url = table.text("ldap_url")
        scheme = urlsplit(url).scheme
        if scheme not in ("ldap", "ldaps") or not urlsplit(url).hostname:
            raise table.error("ldap_url", f"'{url}' is not an ldap:// or ldaps:// URL with a host")
        base_dn = table.text("base_dn", required=default_base is None) or default_base
        starttls = table.get("starttls", bool, False)
        if starttls and scheme == "ldaps":
            raise table.error("starttls", "starttls is for ldap:// URLs; ldaps:// is TLS already")
        bind_dn = table.text("bind_dn")
        password = table.secret()
        if bind_dn and password is None:
            raise table.error("bind_dn", "a bind_dn needs password_env or password_file")
        ldap = LdapServer(
            url=url, base_dn=base_dn, bind_dn=bind_dn, password=password, starttls=starttls,
            ca_file=table.path_value("ca_file"), timeout=_positive(table, "timeout", 10.0),
        )
    else:
        path = table.path_value(keys[kind])
    attributes = table.table("attributes")
    pairs: tuple[tuple[str, str], ...] = ()
    if attributes:
        pairs = tuple(sorted((key, attributes.text(key, required=True)) for key in attributes.data))
        attributes.finish()
    directory = DirectoryConfig(
        kind=kind, ldap=ldap, path=path, preset=preset, attributes=pairs,
        hr_csv=table.path_value("hr_csv"),
    )
    table.finish()
    return directory


def _subtree(table: _Table, target: bool) -> str | None:
    """Read a source's `subtree`: a folder path of non-empty levels joined by "/"."""
    subtree = table.text("subtree")
    if subtree is None:
        return None
    if target:
        raise table.error("subtree", "subtree puts an old mailbox's folders under a folder of the new one: "
                                     "set it in a source's [sources.mail], not in [target.mail]")
    if any(not level.strip() for level in subtree.split("/")):
        raise table.error("subtree", f"'{subtree}' has an empty level: write levels joined by \"/\", "
                                     "like \"Lưu trữ/Bình Dương\"")
    return subtree


def _read_mail(table: _Table, target: bool = False) -> MailServer:
    """Read a mail table: imap_url, ews_url, maildir or mbox."""
    keys = {"imap_url": "imap", "ews_url": "ews", "maildir": "maildir", "mbox": "mbox"}
    key = table.one_of(tuple(keys), "a mail server")
    kind = keys[key]
    if kind in ("maildir", "mbox"):
        server = MailServer(kind=kind, path=table.path_value(key), subtree=_subtree(table, target))
        table.finish()
        return server
    url = table.text(key)
    schemes = ("imap", "imaps") if kind == "imap" else ("http", "https")
    if urlsplit(url).scheme not in schemes or not urlsplit(url).hostname:
        raise table.error(key, f"'{url}' is not a {' or '.join(s + '://' for s in schemes)} URL with a host")
    login = table.text("login", default="user")
    if login not in IMAP_LOGINS:
        raise table.error("login", f"unknown login '{login}'; choose one of {', '.join(IMAP_LOGINS)}")
    starttls = table.get("starttls", bool, False)
    if starttls and urlsplit(url).scheme != "imap":
        raise table.error("starttls", "starttls is for imap:// URLs")
    admin_user = table.text("admin_user")
    password = table.secret()
    if admin_user and password is None:
        raise table.error("admin_user", "an admin_user needs password_env or password_file")
    server = MailServer(
        kind=kind, url=url, admin_user=admin_user, password=password, login=login,
        master_separator=table.text("master_separator", default="*"),
        probe_mailbox=table.text("probe_mailbox"), starttls=starttls,
        ca_file=table.path_value("ca_file"), timeout=_positive(table, "timeout", 30.0),
        max_connections=int(_positive(table, "max_connections", 4, integer=True)),
        subtree=_subtree(table, target),
        credentials_file=table.path_value("credentials_file"),
    )
    if server.credentials_file is not None and login != "user":
        raise table.error("credentials_file", "a credentials file holds the users' own passwords: it goes with "
                                              "login = \"user\" (a master user or authzid needs none)")
    if kind == "ews":
        server = _read_ews(table, server)
    else:
        for ews_key in _EWS_KEYS:
            if ews_key in table.data:
                raise table.error(ews_key, f"{ews_key} is a key of an Exchange server (ews_url), not of {key}")
    table.finish()
    return server


def _read_ews(table: _Table, server: MailServer) -> MailServer:
    """Read the keys of an Exchange (EWS) mail table: access, auth, version, max_backoff."""
    if server.login != "user":
        raise table.error("login", f"login = \"{server.login}\" is for IMAP servers; an Exchange server opens "
                                   "mailboxes with admin_user and access = \"impersonation\" or \"delegate\"")
    if server.admin_user is None and server.credentials_file is None:
        raise table.error(None, "an Exchange server (ews_url) needs admin_user with password_env or password_file "
                                "(a service account), or credentials_file with each mailbox's own password")
    if server.admin_user is not None and server.credentials_file is not None:
        raise table.error("credentials_file", "give admin_user (a service account opens every mailbox) or "
                                              "credentials_file (each mailbox logs in itself), not both")
    access = table.text("access", default="impersonation")
    if access not in EWS_ACCESS:
        raise table.error("access", f"unknown access '{access}'; choose one of {', '.join(EWS_ACCESS)}")
    if "access" in table.data and server.credentials_file is not None:
        raise table.error("access", "with credentials_file each mailbox logs in itself: access is for admin_user")
    auth = table.text("auth", default="ntlm")
    if auth not in EWS_AUTH:
        raise table.error("auth", f"unknown auth '{auth}'; choose one of {', '.join(EWS_AUTH)}")
    version = table.text("version", default="Exchange2016")
    if version not in EWS_VERSIONS:
        raise table.error("version", f"unknown version '{version}'; choose one of {', '.join(EWS_VERSIONS)}")
    max_backoff = _positive(table, "max_backoff", 600.0)
    return dataclasses.replace(server, access=access, auth=auth, version=version, max_backoff=max_backoff)


def _read_addressing(table: _Table, sources: tuple[Source, ...]) -> Addressing:
    """Read [addressing]: address patterns, reserved names, units that keep their addresses."""
    patterns = table.strings("patterns", required=True)
    for pattern in patterns:
        try:
            _TEMPLATE_ENV.parse(pattern)
        except jinja2.TemplateSyntaxError as exc:
            raise table.error("patterns", f"pattern {pattern!r} is not a valid jinja2 template: {exc.message}") from exc
    keep = table.strings("keep_addresses_of")
    names = [source.name for source in sources]
    for name in keep:
        if name not in names:
            raise table.error("keep_addresses_of", f"'{name}' is not the name of a [[sources]] table ({', '.join(names)})")
    reserved = tuple(local.lower() for local in table.strings("reserved"))
    addressing = Addressing(patterns=patterns, reserved=reserved, keep_addresses_of=keep)
    table.finish()
    return addressing


def _read_relay(table: _Table) -> Relay:
    """Read [relay]: the forwarding daemon's settings."""
    for key in table.data:
        if key.lower() in _LITERAL_SECRET_KEYS:
            # before anything else: "srs_secret = ..." must be refused as a literal, not reported as missing
            raise table.error(key, _SECRET_HELP)
    listen = table.text("listen", default="127.0.0.1:2525")
    host, port = _host_port(table, "listen", listen)
    next_hop = table.text("next_hop")
    if next_hop is not None:
        parts = urlsplit(next_hop)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise table.error("next_hop", f"'{next_hop}' is not an smtp:// or smtps:// URL with a host")
    srs_domain = table.text("srs_domain")
    raw_secrets = table.data.get("srs_secrets")
    if raw_secrets is not None and not (isinstance(raw_secrets, list) and all(isinstance(x, dict) for x in raw_secrets)):
        # Never echo the value: it is most likely the secret itself, written into the file.
        raise table.error("srs_secrets", _SECRET_HELP + "; write each as [[relay.srs_secrets]] with one of them")
    srs_tables = table.tables("srs_secrets")
    secrets = []
    for entry in srs_tables:
        secret = entry.secret()
        if secret is None:
            raise entry.error(None, "each SRS secret needs password_env or password_file")
        entry.finish()
        secrets.append(secret)
    if srs_domain is not None and not secrets:
        raise table.error("srs_domain", "srs_domain needs srs_secrets: [[relay.srs_secrets]] with password_env "
                                        "or password_file (the first signs, all verify)")
    if secrets and srs_domain is None:
        raise table.error("srs_secrets", "srs_secrets are used only with srs_domain")
    hash_length = int(_positive(table, "srs_hash_length", 6, integer=True))
    if not 4 <= hash_length <= 27:
        raise table.error("srs_hash_length", f"must be 4 to 27 characters, got {hash_length}")
    max_age = int(_positive(table, "srs_max_age_days", 21, integer=True))
    if max_age > 1000:
        # SRS timestamps count days modulo 1024: an older address could not be told from a new one.
        raise table.error("srs_max_age_days", f"must be at most 1000 days, got {max_age}")
    timeout = _positive(table, "timeout", 300.0)
    next_hop_timeout = _positive(table, "next_hop_timeout", 60.0)
    if next_hop_timeout >= timeout:
        # The session timer keeps running while the relay waits for the next hop.
        raise table.error("next_hop_timeout", f"must be shorter than timeout ({timeout:g} s), got {next_hop_timeout:g}")
    relay = Relay(
        listen_host=host, listen_port=port, hostname=table.text("hostname", default="localhost"),
        next_hop=next_hop,
        max_message_size=int(_positive(table, "max_message_size", 50 * 1024 * 1024, integer=True)),
        max_recipients=int(_positive(table, "max_recipients", 100, integer=True)),
        max_errors=int(_positive(table, "max_errors", 20, integer=True)),
        min_data_rate=_not_negative_int(table, "min_data_rate", 500),
        map=table.path_value("map"),
        srs_domain=_domain(table, "srs_domain", srs_domain) if srs_domain is not None else None,
        srs_secrets=tuple(secrets), srs_hash_length=hash_length, srs_max_age_days=max_age,
        timeout=timeout, next_hop_timeout=next_hop_timeout,
        next_hop_ca_file=table.path_value("next_hop_ca_file"),
        max_hops=int(_positive(table, "max_hops", 50, integer=True)),
        shutdown_timeout=_positive(table, "shutdown_timeout", 30.0),
        reload_timeout=_positive(table, "reload_timeout", 30.0),
        **_read_relay_hardening(table),
    )
    table.finish()
    return relay


def _read_relay_hardening(table: _Table) -> dict[str, Any]:
    """Read the [relay] keys of inbound TLS, connection limits, metrics and the ARC seal (Relay keywords)."""
    cert = table.path_value("tls_cert_file")
    key = table.path_value("tls_key_file")
    if cert is not None and key is None:
        raise table.error("tls_cert_file", "tls_cert_file needs tls_key_file (the certificate's private key)")
    if key is not None and cert is None:
        raise table.error("tls_key_file", "tls_key_file needs tls_cert_file (the certificate it belongs to)")
    require_tls = table.get("require_tls", bool, False)
    if require_tls and cert is None:
        raise table.error("require_tls", "require_tls needs tls_cert_file and tls_key_file (STARTTLS is offered "
                                         "only with a certificate)")
    max_connections = int(_positive(table, "max_connections", 200, integer=True))
    per_ip = int(_positive(table, "max_connections_per_ip", 20, integer=True))
    if per_ip > max_connections:
        raise table.error("max_connections_per_ip",
                          f"must be at most max_connections ({max_connections}), got {per_ip}")
    metrics = table.text("metrics_listen")
    arc = {key: table.text(key) for key in ("arc_selector", "arc_domain", "arc_key_file")}
    given = [key for key, value in arc.items() if value is not None]
    if given and len(given) < 3:
        missing = [key for key in arc if key not in given]
        raise table.error(given[0], f"ARC sealing needs arc_selector, arc_domain and arc_key_file; "
                                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    selector = arc["arc_selector"]
    if selector is not None and not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                                             r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$", selector):
        raise table.error("arc_selector", f"'{selector}' is not a DKIM selector (DNS labels: letters, digits, '-')")
    return {"arc_selector": selector,
            "arc_domain": _domain(table, "arc_domain", arc["arc_domain"]) if arc["arc_domain"] else None,
            "arc_key_file": table.path_value("arc_key_file"),
            "tls_cert_file": cert, "tls_key_file": key, "require_tls": require_tls,
            "max_connections": max_connections, "max_connections_per_ip": per_ip,
            "metrics_listen": _loopback(table, "metrics_listen", metrics) if metrics is not None else None,
            "workers": _workers(table), "event_loop": _event_loop(table)}


def _workers(table: _Table) -> int | str:
    """[relay] workers: an integer of at least 1, or "auto" (the default)."""
    table.seen.add("workers")
    value = table.data.get("workers", "auto")
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    raise table.error("workers", f'must be "auto" or an integer from 1 to 256, got {_describe(value)}')


def _event_loop(table: _Table) -> str:
    """[relay] event_loop: "auto" (the default), "uvloop" or "asyncio"."""
    table.seen.add("event_loop")
    value = table.data.get("event_loop", "auto")
    if value in ("auto", "uvloop", "asyncio"):
        return str(value)
    raise table.error("event_loop", f'must be "auto", "uvloop" or "asyncio", got {_describe(value)}')


def _loopback(table: _Table, key: str, value: str) -> tuple[str, int]:
    """A host:port on a loopback address only (127.0.0.0/8, ::1 or localhost)."""
    host, port = _host_port(table, key, value)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # The counters have no login: they stay on the relay's own host, where Prometheus or its node exporter
        # runs, or behind a proxy that does the authentication.
        raise table.error(key, f"'{value}' is not a loopback address: the metrics are served without a login, "
                               "so only on 127.0.0.1, [::1] or localhost")
    return host, port


def _host_port(table: _Table, key: str, value: str) -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port'."""
    match = re.match(r"^(?:\[([0-9a-fA-F:]+)\]|([^:\[\]]+)):(\d{1,5})$", value)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise table.error(key, f"'{value}' is not host:port (use [::1]:25 for IPv6)")
    return match.group(1) or match.group(2), int(match.group(3))


def _not_negative_int(table: _Table, key: str, default: int) -> int:
    """Return an integer of at least 0."""
    value = table.get(key, int, default)
    if value < 0:
        raise table.error(key, f"must be 0 or more, got {value}")
    return int(value)


def _positive(table: _Table, key: str, default: float, integer: bool = False) -> float:
    """Return a positive number (an integer when asked)."""
    value = table.get(key, int if integer else float, default)
    if value <= 0:
        raise table.error(key, f"must be greater than 0, got {value}")
    return value


def _code(table: _Table, key: str) -> str:
    """Return an official unit code; TOML integers are accepted and kept as written."""
    value = table.data.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        # Codes like 79 are codes, not numbers: leading zeros (e.g. ward 26734 vs 02) matter.
        raise table.error(key, f'write the code as a string ("{value}") so leading zeros are kept')
    code = table.text(key, required=True)
    if not _CODE.match(code):
        raise table.error(key, f"'{code}' is not a unit code (letters, digits, '.', '-', '_')")
    return code


def _domain(table: _Table, key: str, value: str) -> str:
    """Return a lower-cased mail domain, checked for shape."""
    domain = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise table.error(key, f"'{value}' is not a mail domain")
    return domain


def _check_unique(tables: list[_Table], sources: tuple[Source, ...]) -> None:
    """Refuse a source name, unit code or domain given twice."""
    seen: dict[tuple[str, str], int] = {}
    for index, source in enumerate(sources):
        values = [("name", source.name), ("code", source.code)] + [("domains", d) for d in source.domains]
        for key, value in values:
            earlier = seen.get((key, value))
            if earlier is not None:
                first = tables[earlier].loader.dotted(tables[earlier].path)
                raise tables[index].error(key, f"'{value}' is given twice (also in {first})")
            seen[(key, value)] = index

