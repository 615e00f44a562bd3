"""consolidation.toml: the example loads; every kind of mistake names the file, line and key."""

import configparser
import datetime as dt
from pathlib import Path

import configs
import pytest

from mailmerge_gov.config import ConfigError, Secret, SecretError, load_config

MINIMAL = configs.consolidation(
    sources=configs.HCM_LDIF + configs.source(
        "binhduong", "Tỉnh Bình Dương", "74", "binhduong.gov.vn",
        'ldap_url = "ldap://127.0.0.1:3389"\nbase_dn = "dc=binhduong,dc=gov,dc=vn"\n'
        'bind_dn = "cn=admin,dc=binhduong,dc=gov,dc=vn"\npassword_env = "BINHDUONG_LDAP_PASSWORD"\n',
        'imap_url = "imap://127.0.0.1:3143"\nadmin_user = "admin"\npassword_file = "imap-password"\n'
        'login = "master"\nprobe_mailbox = "vanthu@binhduong.gov.vn"\n'),
    addressing='keep_addresses_of = ["hcm"]\n',
)


def test_example_config_loads(example_dir: Path) -> None:
    config = load_config(example_dir / "consolidation.toml")
    assert config.name == "Hợp nhất Thành phố Hồ Chí Minh 2025"
    assert config.state_file == example_dir / "state" / "hcm-merger.sqlite"
    assert [(s.name, s.code, s.domains, s.directory.preset) for s in config.sources] == [
        ("hcm", "79", ("hcm.gov.vn", "tphcm.gov.vn"), "openldap"),
        ("binhduong", "74", ("binhduong.gov.vn", "sotc.binhduong.gov.vn", "sotp.binhduong.gov.vn",
                             "soyt.binhduong.gov.vn"), "ad"),
        ("baria-vungtau", "77", ("baria-vungtau.gov.vn", "brvt.gov.vn"), "zimbra"),
    ]
    assert config.source("binhduong").directory.hr_csv == example_dir / "sources/binhduong/hr.csv"
    assert config.target.mail_domain == "hcm.gov.vn"
    assert config.addressing.keep_addresses_of == ("hcm",)
    assert config.transition_ends == dt.date(2027, 6, 30)
    assert (config.relay.listen_host, config.relay.listen_port, config.relay.next_hop) == ("127.0.0.1", 2525, None)


def test_minimal_config_reads_servers(tmp_path: Path) -> None:
    path = tmp_path / "consolidation.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    config = load_config(path)
    ldap = config.source("binhduong").directory.ldap
    assert (ldap.host, ldap.port, ldap.use_ssl, ldap.bind_dn) == (
        "127.0.0.1", 3389, False, "cn=admin,dc=binhduong,dc=gov,dc=vn")
    assert ldap.password == Secret(env="BINHDUONG_LDAP_PASSWORD")
    mail = config.source("binhduong").mail
    assert (mail.kind, mail.host, mail.port, mail.login, mail.password) == (
        "imap", "127.0.0.1", 3143, "master", Secret(file=tmp_path / "imap-password"))
    assert config.source("hcm").directory.path == tmp_path / "hcm.ldif"
    assert config.relay.max_recipients == 100


# (text to replace in MINIMAL, replacement, expected message after "<file>, line ")
ERRORS = [
    pytest.param('name = "Thử nghiệm"', 'nmae = "Thử nghiệm"', "1: project.name: missing required key",
                 id="missing-required-key"),
    pytest.param('state_file = "state.sqlite"', 'state_file = "state.sqlite"\nstate_dir = "x"',
                 "4: project.state_dir: unknown key 'state_dir'", id="unknown-key"),
    pytest.param('code = "74"', "code = 74",
                 '23: sources[2].code: write the code as a string ("74") so leading zeros are kept', id="code-as-number"),
    pytest.param('ldif = "hcm.ldif"', "ldif = 12",
                 "18: sources[1].directory.ldif: expected a string, got an integer (12)", id="wrong-type"),
    pytest.param("ends = 2026-06-30", 'ends = "30/06/2026"',
                 "44: transition.ends: expected a date like 2026-06-30 (written without quotes), "
                 "got a string ('30/06/2026')", id="date-as-string"),
    pytest.param("ends = 2026-06-30", "ends = 2026-06-31",
                 "44: transition.ends: not valid TOML: Invalid date or datetime (column 8): ends = 2026-06-31",
                 id="impossible-date"),
    pytest.param("ends = 2026-06-30", "ends = 2026-06-30T08:00:00",
                 "44: transition.ends: expected a date like 2026-06-30 (written without quotes), "
                 "got a date-time (2026-06-30T08:00:00)", id="datetime-not-date"),
    pytest.param('domains = ["binhduong.gov.vn"]', 'domains = ["binhduong.gov.vn", "HCM.gov.vn"]',
                 "24: sources[2].domains: 'hcm.gov.vn' is given twice (also in sources[1])", id="domain-twice"),
    pytest.param('code = "74"', 'code = "79"', "23: sources[2].code: '79' is given twice (also in sources[1])",
                 id="code-twice"),
    pytest.param('name = "binhduong"', 'name = "hcm"', "21: sources[2].name: 'hcm' is given twice (also in sources[1])",
                 id="name-twice"),
    pytest.param('password_env = "BINHDUONG_LDAP_PASSWORD"', 'password = "s3cret"',
                 "30: sources[2].directory.password: literal passwords are not allowed in the configuration; "
                 'use password_env = "VARIABLE" (read from the environment) or password_file = "/path/to/file" '
                 "(first line of a file readable only by the service)", id="literal-password"),
    pytest.param('password_env = "BINHDUONG_LDAP_PASSWORD"',
                 'password_env = "BINHDUONG_LDAP_PASSWORD"\npassword_file = "pw"',
                 "31: sources[2].directory.password_file: give password_env or password_file, not both",
                 id="two-secrets"),
    pytest.param('password_env = "BINHDUONG_LDAP_PASSWORD"', "",
                 "29: sources[2].directory.bind_dn: a bind_dn needs password_env or password_file",
                 id="bind-without-secret"),
    pytest.param('ldif = "hcm.ldif"', 'ldif = "hcm.ldif"\ncsv = "hcm.csv"',
                 "19: sources[1].directory.csv: a directory needs exactly one of ldap_url, ldif, csv; "
                 "found ldif and csv", id="two-directory-kinds"),
    pytest.param('ldap_url = "ldap://127.0.0.1:3389"', 'ldap_url = "http://127.0.0.1:3389"',
                 "27: sources[2].directory.ldap_url: 'http://127.0.0.1:3389' is not an ldap:// or ldaps:// URL "
                 "with a host", id="bad-ldap-url"),
    pytest.param('login = "master"', 'login = "root"',
                 "36: sources[2].mail.login: unknown login 'root'; choose one of user, master, authzid",
                 id="bad-login"),
    pytest.param('login = "master"', 'login = "master"\ncredentials_file = "passwords.csv"',
                 '37: sources[2].mail.credentials_file: a credentials file holds the users\' own passwords: it goes '
                 'with login = "user" (a master user or authzid needs none)', id="credentials-without-user-login"),
    pytest.param('login = "master"', 'login = "master"\nsubtree = "Lưu trữ//Bình Dương"',
                 '37: sources[2].mail.subtree: \'Lưu trữ//Bình Dương\' has an empty level: write levels joined by '
                 '"/", like "Lưu trữ/Bình Dương"', id="subtree-with-an-empty-level"),
    pytest.param('state_file = "state.sqlite"', 'state_file = "state.sqlite"\n\n[migration]\nexclude = ["(Spam"]',
                 "6: migration.exclude: '(Spam' is not a valid regular expression: missing ), unterminated subpattern "
                 "at position 0", id="bad-folder-regex"),
    pytest.param('keep_addresses_of = ["hcm"]', 'keep_addresses_of = ["tphcm"]',
                 "41: addressing.keep_addresses_of: 'tphcm' is not the name of a [[sources]] table "
                 "(hcm, binhduong)", id="keep-unknown-source"),
    pytest.param('patterns = ["{{ given }}{{ initials }}"]', 'patterns = ["{{ given }"]',
                 "40: addressing.patterns: pattern '{{ given }' is not a valid jinja2 template: "
                 "unexpected '}'", id="bad-pattern"),
    pytest.param('mail_domain = "hcm.gov.vn"', 'mail_domain = "hcm gov vn"',
                 "8: target.mail_domain: 'hcm gov vn' is not a mail domain", id="bad-domain"),
    pytest.param('ldif = "hcm.ldif"', 'ldif = "hcm.ldif"\npreset = "lotus"',
                 "19: sources[1].directory.preset: unknown preset 'lotus'; choose one of openldap, ad, zimbra",
                 id="bad-preset"),
    pytest.param("[transition]\nends = 2026-06-30\n", "",
                 "transition: missing required key", id="missing-table"),
    pytest.param('name = "Thử nghiệm"', 'name = "Thử nghiệm"\nname = "again"',
                 "3: not valid TOML: Cannot overwrite a value (column 15): name = \"again\"", id="duplicate-key"),
]


@pytest.mark.parametrize(("old", "new", "expected"), ERRORS)
def test_config_errors_name_file_line_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    path = tmp_path / "consolidation.toml"
    path.write_text(MINIMAL.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    separator = ", line " if expected[0].isdigit() else ": "
    assert str(caught.value) == f"{path}{separator}{expected}"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert str(caught.value) == f"{tmp_path / 'nope.toml'}: cannot read the configuration: No such file or directory"


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "consolidation.toml"
    path.write_bytes(MINIMAL.encode("utf-8").replace("Thử nghiệm".encode(), "Th\xfd".encode("latin-1")))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}, line 2: the file is not valid UTF-8"


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMG_TEST_PW", "mật khẩu")
    assert Secret(env="MMG_TEST_PW").reveal() == "mật khẩu"
    monkeypatch.delenv("MMG_TEST_PW")
    with pytest.raises(SecretError, match="^environment variable MMG_TEST_PW is not set$"):
        Secret(env="MMG_TEST_PW").reveal()


def test_secret_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n", encoding="utf-8")
    assert Secret(file=tmp_path / "pw").reveal() == "s3cret"
    (tmp_path / "empty").write_text("", encoding="utf-8")
    with pytest.raises(SecretError, match="is empty$"):
        Secret(file=tmp_path / "empty").reveal()
    with pytest.raises(SecretError, match="No such file or directory$"):
        Secret(file=tmp_path / "missing").reveal()


def test_the_relay_example_config_loads(example_dir: Path) -> None:
    config = load_config(example_dir.parent.parent / "forwarding" / "relay.example.toml")
    assert (config.relay.listen_host, config.relay.listen_port, config.relay.next_hop) == (
        "0.0.0.0", 25, "smtp://mx.hcm.gov.vn:25")


def test_the_relay_unit_file_runs_it_unprivileged_and_waits_for_its_drain(example_dir: Path) -> None:
    forwarding = example_dir.parent.parent / "forwarding"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys keep their case
    parser.read(forwarding / "mailmerge-gov-relay.service", encoding="utf-8")
    service = parser["Service"]
    assert (service["User"], service["AmbientCapabilities"], service["CapabilityBoundingSet"],
            service["NoNewPrivileges"]) == ("mailmerge-relay", "CAP_NET_BIND_SERVICE", "CAP_NET_BIND_SERVICE", "yes")
    assert service["ExecStart"].split()[1:] == ["relay", "serve", "-c", "/etc/mailmerge-gov/relay.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # systemd must not kill the relay while it drains: shutdown_timeout, then a next-hop call, then 10 s
    relay = load_config(forwarding / "relay.example.toml").relay
    assert int(service["TimeoutStopSec"]) > relay.shutdown_timeout + relay.next_hop_timeout + 10
