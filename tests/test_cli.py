"""The command line: version, help on every group, and `check` on files and real servers."""

import subprocess
import sys
from pathlib import Path

import configs
import pytest
from click.testing import CliRunner

from mailmerge_gov import __version__
from mailmerge_gov.cli import cli


def run(*args: str) -> tuple[int, str]:
    """Run the CLI in-process and return its exit code and output."""
    result = CliRunner().invoke(cli, list(args), prog_name="mailmerge-gov", catch_exceptions=False)
    return result.exit_code, result.output


def test_version() -> None:
    assert run("--version") == (0, f"mailmerge-gov, version {__version__}\n")


def test_python_dash_m_runs_the_same_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "mailmerge_gov", "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"mailmerge-gov, version {__version__}\n")


@pytest.mark.parametrize(
    ("group", "first_line"),
    [
        ((), "Consolidate the mail systems and staff directories of merged agencies."),
        (("directory",), "Consolidate the old directories into the new one, and search it."),
        (("mailbox",), "Migrate mailboxes from the old mail systems and verify nothing was lost."),
        (("relay",), "Forward mail sent to old addresses to the officials' new addresses."),
        (("check",), "Try every server and file the consolidation file names."),
    ],
)
def test_help_on_every_group(group: tuple[str, ...], first_line: str) -> None:
    code, output = run(*group, "--help")
    assert code == 0
    assert output.splitlines()[0] == f"Usage: mailmerge-gov {' '.join(group) + ' ' if group else ''}[OPTIONS]" + (
        " COMMAND [ARGS]..." if group != ("check",) else "")
    assert output.splitlines()[2] == f"  {first_line}"


def test_check_on_the_example(example_dir: Path, tmp_path: Path) -> None:
    code, output = run("check", "-c", str(example_dir / "consolidation.toml"))
    assert code == 0, output
    lines = output.splitlines()
    assert lines[-1] == "10 checked, 0 failed"
    assert [line.split()[0] for line in lines[:-1]] == ["OK"] * 10


def test_check_reports_a_config_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "consolidation.toml"
    path.write_text("[project]\nname = 1\n", encoding="utf-8")
    assert run("check", "-c", str(path)) == (1, f"Error: {path}, line 2: project.name: expected a string, got an integer (1)\n")


def test_check_with_files_only(write_config) -> None:
    path = write_config()
    (path.parent / "hcm.ldif").write_text("dn: dc=hcm,dc=gov,dc=vn\n", encoding="utf-8")
    code, output = run("check", "-c", str(path))
    assert (code, output) == (1, (
        "OK     state file                  state.sqlite: not created yet; the first run creates it\n"
        "OK     source hcm directory        hcm.ldif: LDIF readable, 24 bytes\n"
        "FAILED source binhduong directory  bd.csv: CSV cannot be read: No such file or directory\n"
        "FAILED source binhduong mail       bd-mail: Maildir root does not exist\n"
        "OK     target directory            out/new.ldif: LDIF will be created, writable\n"
        "5 checked, 2 failed\n"
    ))


@pytest.fixture
def servers_config(write_config, slapd, dovecot_old, dovecot_new, smtp_sink, monkeypatch, tmp_path):
    """A consolidation naming the real slapd, both Dovecots and smtp-sink, all reachable."""
    dovecot_old.add_user("vanthu@binhduong.gov.vn", "bd-pass")
    dovecot_old.add_user("vanthu@baria-vungtau.gov.vn", "brvt-pass")
    dovecot_new.add_user("vanthu@hcm.gov.vn", "hcm-pass")
    monkeypatch.setenv("MMG_TEST_LDAP_PASSWORD", slapd.admin_password)
    monkeypatch.setenv("MMG_TEST_USER_PASSWORD", "hcm-pass")
    (tmp_path / "master.pw").write_text(dovecot_old.master_password + "\n", encoding="utf-8")
    values = dict(ldap_port=slapd.port, old_imap_port=dovecot_old.imap_port, new_imap_port=dovecot_new.imap_port,
                  smtp_port=smtp_sink.port, brvt_base="dc=baria-vungtau,dc=gov,dc=vn")

    def write(**changes: object) -> Path:
        v = {**values, **changes}
        ldap = f'ldap_url = "ldap://127.0.0.1:{v["ldap_port"]}"\n'
        admin = 'password_env = "MMG_TEST_LDAP_PASSWORD"\n'
        old_imap = f'imap_url = "imap://127.0.0.1:{v["old_imap_port"]}"\nadmin_user = "admin"\npassword_file = "master.pw"\n'
        return write_config(configs.consolidation(
            target=(f'\n[target.directory]\n{ldap}bind_dn = "cn=admin,dc=hcm,dc=gov,dc=vn"\n{admin}'
                    f'\n[target.mail]\nimap_url = "imap://127.0.0.1:{v["new_imap_port"]}"\n'
                    'admin_user = "vanthu@hcm.gov.vn"\npassword_env = "MMG_TEST_USER_PASSWORD"\n'),
            sources=(
                configs.source("binhduong", "Tỉnh Bình Dương", "74", "binhduong.gov.vn",
                               f'{ldap}base_dn = "dc=binhduong,dc=gov,dc=vn"\n'
                               f'bind_dn = "cn=admin,dc=binhduong,dc=gov,dc=vn"\n{admin}',
                               f'{old_imap}login = "master"\nprobe_mailbox = "vanthu@binhduong.gov.vn"\n')
                + configs.source("baria-vungtau", "Tỉnh Bà Rịa - Vũng Tàu", "77", "baria-vungtau.gov.vn",
                                 f'{ldap}base_dn = "{v["brvt_base"]}"\n',
                                 f'{old_imap}login = "authzid"\nprobe_mailbox = "vanthu@baria-vungtau.gov.vn"\n')),
            tail=f'\n[relay]\nnext_hop = "smtp://127.0.0.1:{v["smtp_port"]}"\nhostname = "relay.hcm.gov.vn"\n',
        ))

    return write


@pytest.mark.parametrize("secret, mode, expected", [
    ("s" * 40, 0o600, "OK staff directory login file {file}: session secret readable; officials log in against {ldap}"),
    ("s" * 40, 0o644, "FAILED staff directory login file {file}: session secret file {file} can be read by others: "
                      "chmod 600 it"),
    ("short", 0o600, "FAILED staff directory login file {file}: the session secret has 5 characters; it needs at "
                     "least 32"),
], ids=["ok", "readable by others", "too short"])
def test_check_reads_the_staff_directory_session_secret(servers_config, slapd, tmp_path: Path, secret: str, mode: int,
                                                        expected: str) -> None:
    path = servers_config()
    file = tmp_path / "web.secret"
    file.write_text(secret, encoding="utf-8")
    file.chmod(mode)
    path.write_text(path.read_text(encoding="utf-8") + f'\n[web]\nsession_secret_file = "{file}"\n', encoding="utf-8")
    code, output = run("check", "-c", str(path))
    lines = [" ".join(line.split()) for line in output.splitlines()]
    assert (code, lines[-2]) == (0 if mode == 0o600 and len(secret) >= 32 else 1,
                                 expected.format(file=file, ldap=f"ldap://127.0.0.1:{slapd.port}"))


def test_check_real_servers_all_ok(servers_config, slapd, dovecot_old, dovecot_new, smtp_sink) -> None:
    code, output = run("check", "-c", str(servers_config()))
    ldap = f"ldap://127.0.0.1:{slapd.port}"
    assert code == 0
    assert output.splitlines() == (
        "OK     state file                      state.sqlite: not created yet; the first run creates it\n"
        f"OK     source binhduong directory      {ldap}: bound as cn=admin,dc=binhduong,dc=gov,dc=vn, "
        "base DN dc=binhduong,dc=gov,dc=vn found\n"
        f"OK     source binhduong mail           imap://127.0.0.1:{dovecot_old.imap_port}: "
        "logged in as vanthu@binhduong.gov.vn*admin, 1 folders\n"
        f"OK     source baria-vungtau directory  {ldap}: anonymous bind, base DN dc=baria-vungtau,dc=gov,dc=vn found\n"
        f"OK     source baria-vungtau mail       imap://127.0.0.1:{dovecot_old.imap_port}: "
        "logged in as admin for vanthu@baria-vungtau.gov.vn, 1 folders\n"
        f"OK     target directory                {ldap}: bound as cn=admin,dc=hcm,dc=gov,dc=vn, "
        "base DN dc=hcm,dc=gov,dc=vn found\n"
        f"OK     target mail                     imap://127.0.0.1:{dovecot_new.imap_port}: "
        "logged in as vanthu@hcm.gov.vn, 1 folders\n"
        f"OK     relay next hop                  smtp://127.0.0.1:{smtp_sink.port}: EHLO accepted "
        "(8BITMIME, AUTH, DSN, ENHANCEDSTATUSCODES, PIPELINING, XCLIENT, XFORWARD)\n"
        "8 checked, 0 failed\n"
    ).splitlines()


@pytest.mark.parametrize(
    ("change", "line", "expected"),
    [
        pytest.param({"brvt_base": "dc=quangnam,dc=gov,dc=vn"}, "source baria-vungtau directory",
                     "{ldap}: base DN dc=quangnam,dc=gov,dc=vn not readable: noSuchObject", id="missing-base-dn"),
        pytest.param({"ldap_port": "CLOSED"}, "source binhduong directory",
                     "ldap://127.0.0.1:{closed}: cannot connect: connection refused", id="ldap-refused"),
        pytest.param({"old_imap_port": "CLOSED"}, "source binhduong mail",
                     "imap://127.0.0.1:{closed}: cannot connect: connection refused", id="imap-refused"),
        pytest.param({"smtp_port": "CLOSED"}, "relay next hop",
                     "smtp://127.0.0.1:{closed}: cannot connect: connection refused", id="smtp-refused"),
    ],
)
def test_check_names_what_failed(servers_config, slapd, free_port, change, line, expected) -> None:
    closed = free_port()
    changes = {key: closed if value == "CLOSED" else value for key, value in change.items()}
    code, output = run("check", "-c", str(servers_config(**changes)))
    lines = {row[7:].split("  ")[0]: row for row in output.splitlines()[:-1]}
    assert code == 1
    assert lines[line].startswith("FAILED ")
    assert lines[line].split("  ", 1)[1].strip() == expected.format(ldap=f"ldap://127.0.0.1:{slapd.port}", closed=closed)


def test_check_wrong_passwords(servers_config, slapd, dovecot_old, dovecot_new, monkeypatch, tmp_path) -> None:
    path = servers_config()
    monkeypatch.setenv("MMG_TEST_LDAP_PASSWORD", "not-the-password")
    monkeypatch.delenv("MMG_TEST_USER_PASSWORD")
    (tmp_path / "master.pw").write_text("wrong-master\n", encoding="utf-8")
    code, output = run("check", "-c", str(path))
    failed = [row.split("  ", 1)[1].strip() for row in output.splitlines() if row.startswith("FAILED")]
    ldap, old, new = f"ldap://127.0.0.1:{slapd.port}", dovecot_old.imap_port, dovecot_new.imap_port
    assert code == 1
    assert failed == [
        f"{ldap}: bind as cn=admin,dc=binhduong,dc=gov,dc=vn failed: invalidCredentials",
        f"imap://127.0.0.1:{old}: login as vanthu@binhduong.gov.vn*admin failed: "
        "[AUTHENTICATIONFAILED] Authentication failed.",
        f"imap://127.0.0.1:{old}: login as admin for vanthu@baria-vungtau.gov.vn failed: "
        "[AUTHENTICATIONFAILED] Authentication failed.",
        f"{ldap}: bind as cn=admin,dc=hcm,dc=gov,dc=vn failed: invalidCredentials",
        f"imap://127.0.0.1:{new}: environment variable MMG_TEST_USER_PASSWORD is not set",
    ]
    assert output.splitlines()[-1] == "8 checked, 5 failed"
    assert "not-the-password" not in output and "wrong-master" not in output
