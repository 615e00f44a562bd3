"""Shared pytest fixtures: real servers on loopback ports (see tests/servers.py) and the example folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path ("prepend" import mode)
import configs
from servers import (DovecotServer, ServerNotInstalled, SlapdServer, SmtpSink, free_port as pick_free_port,
                     uvicorn_in_thread)

TESTS_DIR = Path(__file__).resolve().parent

# the merger the tests use: Bình Dương (74) and Bà Rịa–Vũng Tàu (77) into Thành phố Hồ Chí Minh (79)
NEW_SUFFIX = "dc=hcm,dc=gov,dc=vn"
OLD_SUFFIXES = ("dc=binhduong,dc=gov,dc=vn", "dc=baria-vungtau,dc=gov,dc=vn")
SUFFIXES = (NEW_SUFFIX, *OLD_SUFFIXES)
# the project's own auxiliary schema (history attributes), as an administrator loads it
PROJECT_SCHEMA = TESTS_DIR.parent / "directory" / "mailmerge-gov.schema"


def started[S: (SlapdServer, DovecotServer, SmtpSink)](server: S) -> S:
    """Start `server`; a missing program fails the test with the Debian packages to install (never a skip)."""
    try:
        server.start()
    except ServerNotInstalled as exc:
        missing = str(exc)
    else:
        return server
    # outside the except block, so that the report shows the one message and no exception chain
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function that picks a free TCP port on 127.0.0.1."""
    return pick_free_port


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """Path of the bundled sample consolidation, examples/hcm-merger."""
    return TESTS_DIR.parent / "examples" / "hcm-merger"


@pytest.fixture(scope="session")
def slapd() -> Iterator[SlapdServer]:
    """One private slapd serving the new unit's suffix and the two old units' suffixes."""
    server = started(SlapdServer(SUFFIXES, schemas=(PROJECT_SCHEMA,)))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dovecot_old() -> Iterator[DovecotServer]:
    """The old units' mail server: a private Dovecot with IMAP and LMTP."""
    server = started(DovecotServer("old"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dovecot_new() -> Iterator[DovecotServer]:
    """The new unit's mail server: a second private Dovecot, independent of dovecot_old."""
    server = started(DovecotServer("new"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh Postfix smtp-sink per test: a real SMTP partner that keeps what it receives."""
    server = started(SmtpSink())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Return a function that writes a consolidation file into tmp_path and returns its path."""

    def write(text: str = configs.FILES_ONLY) -> Path:
        path = tmp_path / "consolidation.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write



@pytest.fixture
def example_copy(example_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the example, so a test can plan, apply and edit without touching the original."""
    copy = tmp_path / "hcm-merger"
    shutil.copytree(example_dir, copy, ignore=shutil.ignore_patterns("state", "out"))
    return copy


@pytest.fixture
def new_directory() -> Iterator[SlapdServer]:
    """A private slapd holding only the new unit's (empty) suffix, with the project schema: a target to apply to."""
    server = started(SlapdServer([NEW_SUFFIX], schemas=(PROJECT_SCHEMA,)))
    try:
        yield server
    finally:
        server.stop()


def ldap_target(config_path: Path, server: SlapdServer, env_var: str) -> None:
    """Point a consolidation file's [target.directory] at an LDAP server (password from env_var)."""
    text = config_path.read_text(encoding="utf-8")
    old = '[target.directory]\n# the new directory is written as an LDIF file here; a real run names ldap_url instead\nldif = "out/directory.ldif"\n'
    assert old in text
    config_path.write_text(text.replace(old, (
        f'[target.directory]\nldap_url = "{server.url}"\nbind_dn = "{server.admin_dn(NEW_SUFFIX)}"\n'
        f'password_env = "{env_var}"\n')), encoding="utf-8")


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for relay.test and 127.0.0.1 made by the openssl command: (cert file, key file)."""
    import subprocess

    from servers import require_program

    try:
        openssl = require_program("openssl", "openssl")
    except ServerNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    # An EC key: made in milliseconds, where RSA would take a noticeable part of a second.
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=relay.test",
                    "-addext", "subjectAltName=DNS:relay.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def _ews_server(folder: Path, account: str, password: str) -> Iterator["EwsServer"]:
    """A test EWS server (tests/ews_server.py) in `folder` with a service account that impersonates; stopped after."""
    from ews_server import EwsServer

    server = EwsServer(folder).start()
    server.add_user(account, password, impersonation=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ews_old(tmp_path: Path) -> Iterator["EwsServer"]:
    """The old units' Exchange."""
    yield from _ews_server(tmp_path / "ews-old", "svc-migrate@binhduong.gov.vn", "mật-khẩu-cũ")


@pytest.fixture
def ews_new(tmp_path: Path) -> Iterator["EwsServer"]:
    """The new unit's Exchange: a second, independent test EWS server with its own service account."""
    yield from _ews_server(tmp_path / "ews-new", "svc-migrate@hcm.gov.vn", "mật-khẩu-mới")


# --- the staff directory web application (tests/test_web*.py) ---

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def web_index(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    """The example planned, applied to its LDIF target and indexed; returns the search index's path."""
    from click.testing import CliRunner

    from mailmerge_gov.cli import cli
    from mailmerge_gov.config import load_config
    from mailmerge_gov.directory.search import index_path

    copy = tmp_path_factory.mktemp("web") / "hcm-merger"
    shutil.copytree(example_dir, copy, ignore=shutil.ignore_patterns("state", "out"))
    config = str(copy / "consolidation.toml")
    for command in (["directory", "plan"], ["directory", "apply", "--force"], ["directory", "index"]):
        result = CliRunner().invoke(cli, [*command, "-c", config], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return index_path(load_config(copy / "consolidation.toml").state_file)


@pytest.fixture(scope="session")
def web_server(web_index: Path) -> Iterator[str]:
    """The web application served by a real uvicorn on a free loopback port; yields its base URL."""
    from mailmerge_gov.web import create_app

    with uvicorn_in_thread(create_app(web_index), "uvicorn-web") as url:
        yield url


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, which Playwright drives (never a downloaded browser); missing, the test fails."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium as root "
                    "(DEBIAN_FRONTEND=noninteractive apt-get install -y chromium), or run scripts/test", pytrace=False)
    return CHROMIUM


# --- the staff directory's login (tests/test_web*.py): the example applied to a real slapd ---

# officials the login tests bind as; their passwords are set by the fixture (apply writes none)
WEB_LOGIN_PASSWORD = "Mật-khẩu đúng 7!"
WEB_DISABLED_UID = "nghiht"


@pytest.fixture(scope="session")
def web_ldap(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Iterator[tuple[SlapdServer, Path]]:
    """The example applied to a private slapd and indexed from it; yields (server, consolidation file).

    annv7 and a disabled official (WEB_DISABLED_UID, added here: apply carries no disabled official over) have
    the password WEB_LOGIN_PASSWORD.
    """
    import ldap3
    from click.testing import CliRunner

    from mailmerge_gov.cli import cli

    server = started(SlapdServer([NEW_SUFFIX], schemas=(PROJECT_SCHEMA,)))
    try:
        copy = tmp_path_factory.mktemp("web-ldap") / "hcm-merger"
        shutil.copytree(example_dir, copy, ignore=shutil.ignore_patterns("state", "out"))
        config = copy / "consolidation.toml"
        text = config.read_text(encoding="utf-8")
        old = '[target.directory]\n# the new directory is written as an LDIF file here; a real run names ldap_url instead\nldif = "out/directory.ldif"\n'
        assert old in text
        config.write_text(text.replace(old, f'[target.directory]\nldap_url = "{server.url}"\n'
                                            f'bind_dn = "{server.admin_dn(NEW_SUFFIX)}"\n'
                                            f'password_file = "{server.password_file}"\n'), encoding="utf-8")
        for command in (["directory", "plan"], ["directory", "apply", "--force"]):
            result = CliRunner().invoke(cli, [*command, "-c", str(config)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
        admin = ldap3.Connection(ldap3.Server(server.url), server.admin_dn(NEW_SUFFIX), server.admin_password,
                                 auto_bind=True)
        try:
            assert admin.add(f"uid={WEB_DISABLED_UID},ou=people,{NEW_SUFFIX}",
                             ["inetOrgPerson", "mailmergeHistory"],
                             {"uid": WEB_DISABLED_UID, "cn": "Hồ Thị Nghị", "sn": "Hồ",
                              "mail": f"{WEB_DISABLED_UID}@hcm.gov.vn", "mailmergeAccountStatus": "disabled",
                              "userPassword": WEB_LOGIN_PASSWORD}), admin.result
            assert admin.modify(f"uid=annv7,ou=people,{NEW_SUFFIX}",
                                {"userPassword": [(ldap3.MODIFY_REPLACE, [WEB_LOGIN_PASSWORD])]}), admin.result
        finally:
            admin.unbind()
        result = CliRunner().invoke(cli, ["directory", "index", "-c", str(config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        yield server, config
    finally:
        server.stop()
