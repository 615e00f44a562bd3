"""How apply writes to and reads from an LDAP server: the request encoding, DN keys, batches, transactions, refusals."""

from __future__ import annotations

import itertools
from pathlib import Path

import ldap3
import pytest
from hypothesis import given, settings, strategies as st
from ldap3.operation.add import add_operation
from ldap3.operation.delete import delete_operation
from ldap3.operation.modify import modify_operation
from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
from pyasn1.codec.ber import encoder

from conftest import NEW_SUFFIX, PROJECT_SCHEMA, started
from mailmerge_gov.config import DirectoryConfig, LdapServer, Secret
from mailmerge_gov.directory.apply import ApplyError, Entry, apply_entries, rollback
from mailmerge_gov.directory.ldif import format_entry
from mailmerge_gov.directory.target import (
    Change, LdapTarget, _message, _parsed_dn_key, _parsed_rdn_values, _plain_rdns, _request, dn_key, rdn_values,
)
from mailmerge_gov.store import open_store
from servers import SlapdServer

PERSON = ("top", "person", "organizationalPerson", "inetOrgPerson", "inetLocalMailRecipient", "mailmergeHistory")
_bases = itertools.count(1)


def ldap3_encoding(message_id: int, operation: str, request: object) -> bytes:
    """The bytes ldap3 sends for a request (its pyasn1 objects, BER-encoded)."""
    message = LDAPMessage()
    message["messageID"] = MessageID(message_id)
    message["protocolOp"] = ProtocolOp().setComponentByName(operation, request)
    return encoder.encode(message)


# ------------------------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("message_id", [1, 127, 128, 255, 256, 65535, 70000, 2**31 - 1])
def test_add_is_encoded_as_ldap3_encodes_it(message_id: int) -> None:
    # values around the BER length forms: one byte, 0x81 xx, 0x82 xx xx, 0x83 xx xx xx
    attributes = (("objectClass", ("top", "person", "inetOrgPerson")), ("cn", ("Nguyễn Văn An", "Nguyen Van An")),
                  ("sn", ("Nguyễn",)), ("description", ("d" * 127, "e" * 128, "f" * 300)), ("title", ("t" * 70000,)))
    dn = f"uid=annv,ou=people,{NEW_SUFFIX}"
    expected = ldap3_encoding(message_id, "addRequest",
                              add_operation(dn, {name: list(values) for name, values in attributes}, True))
    assert _message(message_id, _request(Change("add", dn, (), attributes))) == expected


def test_modify_and_delete_are_encoded_as_ldap3_encodes_them() -> None:
    dn = f"uid=annv,ou=people,{NEW_SUFFIX}"
    modifications = (("add", "cn", ("Nguyễn Văn An",)), ("delete", "sn", ("Nguyen",)), ("add", "sn", ("Nguyễn",)),
                     ("delete", "cn", ("x",)), ("replace", "title", ("Trưởng phòng",)), ("delete", "mobile", ()))
    # what target.py sent through ldap3 before: the operations of one attribute together, in order
    grouped: dict[str, list[tuple[int, list[str]]]] = {}
    codes = {"add": ldap3.MODIFY_ADD, "delete": ldap3.MODIFY_DELETE, "replace": ldap3.MODIFY_REPLACE}
    for operation, name, values in modifications:
        grouped.setdefault(name, []).append((codes[operation], list(values)))
    assert _message(5, _request(Change("modify", dn, (), (), modifications))) == ldap3_encoding(
        5, "modifyRequest", modify_operation(dn, grouped, True))
    assert _message(9, _request(Change("delete", dn, (), ()))) == ldap3_encoding(9, "delRequest",
                                                                                  delete_operation(dn))


# ------------------------------------------------------------------------------------------------ DN keys

DN_TEXT = st.text(st.sampled_from(list("abAB09 ,=+\\\"#;<>-.\tở\x00") + ["\ud800"]), max_size=24)
DN_PARTS = st.lists(st.tuples(st.sampled_from(["uid", "ou", "dc", "cn", "O", "2.5.4.3"]),
                              st.text(st.sampled_from(list("ab9 -.=,\\+#ởỞ")), min_size=1, max_size=8)),
                    min_size=1, max_size=5)


def check_plain_split(dn: str) -> None:
    """A DN split without ldap3 has the key and first RDN ldap3's parser gives it."""
    if _plain_rdns(dn) is None:
        return
    assert dn_key(dn) == _parsed_dn_key(dn)
    assert rdn_values(dn) == _parsed_rdn_values(dn)


@settings(max_examples=3000, deadline=None)
@given(DN_TEXT)
def test_plain_dns_split_as_ldap3_parses_them(dn: str) -> None:
    check_plain_split(dn)


@settings(max_examples=3000, deadline=None)
@given(DN_PARTS)
def test_plain_dns_made_of_rdns_split_as_ldap3_parses_them(parts: list[tuple[str, str]]) -> None:
    check_plain_split(",".join(f"{attribute}={value}" for attribute, value in parts))


def test_the_dns_apply_makes_are_plain() -> None:
    for dn in (f"uid=annv,ou=people,{NEW_SUFFIX}", f"ou=79.STC,ou=79,ou=units,{NEW_SUFFIX}",
               f"cn=Sở Tài chính,ou=groups,{NEW_SUFFIX}"):
        assert _plain_rdns(dn) is not None
        assert dn_key(dn) == _parsed_dn_key(dn)
    for dn in ("uid=a\\,b,dc=x", "uid=a+cn=b,dc=x", "uid=a, dc=x", 'cn="a",dc=x', "uid=khang,,dc=x"):
        assert _plain_rdns(dn) is None


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture
def base(slapd: SlapdServer) -> str:
    """A fresh sub-tree of the new unit's suffix for one test."""
    name = f"write-test-{next(_bases)}"
    slapd.add_ldif(f"dn: ou={name},{NEW_SUFFIX}\nobjectClass: organizationalUnit\nou: {name}\n")
    return f"ou={name},{NEW_SUFFIX}"


def target_of(server: SlapdServer, base: str, bind_dn: str | None = None, password_file: Path | None = None
              ) -> DirectoryConfig:
    """The target directory: the server, bound as the suffix's admin unless told otherwise."""
    return DirectoryConfig(kind="ldap", ldap=LdapServer(
        url=server.url, base_dn=base, bind_dn=bind_dn or server.admin_dn(server.suffix_of(base)),
        password=Secret(file=password_file or server.password_file)))


def container(dn: str) -> Entry:
    """A plain organizationalUnit."""
    return Entry(dn, (("objectClass", ("top", "organizationalUnit")), ("ou", (dn.split(",")[0][3:],))))


def official(parent: str, number: int) -> Entry:
    """An official with a Vietnamese name; the number makes the uid unique."""
    uid = f"annv{number}"
    return Entry(f"uid={uid},{parent}", (
        ("objectClass", PERSON), ("uid", (uid,)), ("cn", ("Nguyễn Văn An", "Nguyen Van An")), ("sn", ("Nguyễn",)),
        ("mail", (f"{uid}@hcm.gov.vn",)), ("mailRoutingAddress", (f"{uid}@hcm.gov.vn",)),
        ("mailLocalAddress", (f"{uid}@hcm.gov.vn",)), ("mailmergeIdentity", (str(number),)),
        ("mailmergeAccountStatus", ("active",))))


def many(base: str, count: int) -> list[Entry]:
    """Two containers and `count` officials: more than one batch, more than one page."""
    return [container(f"ou=units,{base}"), container(f"ou=people,{base}")] + [
        official(f"ou=people,{base}", number) for number in range(1, count + 1)]


def names(server: SlapdServer, base: str) -> set[str]:
    """The DNs of the sub-tree, read back through ldap3 with paging."""
    conn = ldap3.Connection(ldap3.Server(server.url), server.admin_dn(server.suffix_of(base)), server.admin_password,
                            auto_bind=True)
    found = {item["dn"] for item in conn.extend.standard.paged_search(base, "(objectClass=*)", attributes=["1.1"],
                                                                        paged_size=500, generator=True)}
    conn.unbind()
    return found


def test_many_changes_in_batches_then_nothing_to_do_then_rolled_back(slapd, base, tmp_path) -> None:
    desired = many(base, 1200)
    target = target_of(slapd, base)
    with open_store(tmp_path / "state.sqlite") as store:
        first = apply_entries(store, target, desired, base_dn=base, plan_id=1, max_disables=0,
                              backup_dir=tmp_path / "backups")
        assert len(first.changes) == 1202
        assert names(slapd, base) == {base} | {entry.dn for entry in desired}
        log = store.apply_changes(first.apply_id)
        assert [(row.seq, row.state) for row in log] == [(seq, "done") for seq in range(1, 1203)]
        # one audit line per change, in the order of the changes, then the end of the run
        audit = [(entry.action, entry.subject) for entry in store.audit_log()]
        assert audit == [("directory-apply", row.dn) for row in log] + [("directory-apply", "apply 1")]
        assert apply_entries(store, target, desired, base_dn=base, plan_id=1, max_disables=0,
                             backup_dir=tmp_path / "backups").changes == ()
        undo = rollback(store, target, first.apply_id, base_dn=base)
        assert [change.dn for change in undo.changes] == [row.dn for row in reversed(log)]
        assert names(slapd, base) == {base}
        assert {row.state for row in store.apply_changes(first.apply_id)} == {"undone"}


LOCKED_APPLIER = f"cn=applier,{NEW_SUFFIX}"


def test_a_refusal_inside_a_batch_stops_right_there(tmp_path) -> None:
    # The batch of 256 changes that holds the refused one goes as one transaction first: the server makes none of
    # it. It is then sent one change at a time: those before the refused one are made, none after it.
    seed = (f"dn: {LOCKED_APPLIER}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            "cn: applier\nuserPassword: applier-secret\n\n"
            f"dn: ou=locked,{NEW_SUFFIX}\nobjectClass: organizationalUnit\nou: locked\n")
    server = started(SlapdServer([NEW_SUFFIX], seed_ldif=seed, schemas=(PROJECT_SCHEMA,)))
    try:
        server.lock_subtree(f"ou=locked,{NEW_SUFFIX}", LOCKED_APPLIER)
        password = tmp_path / "applier.pw"
        password.write_text("applier-secret")
        target = target_of(server, NEW_SUFFIX, bind_dn=LOCKED_APPLIER, password_file=password)
        before = names(server, NEW_SUFFIX)
        people = many(NEW_SUFFIX, 600)
        # changes 1-2 are the containers, 3-602 the officials: batches 1, 2-3, 4-7 … 256-510; 400 is refused
        desired = people[:399] + [official(f"ou=locked,{NEW_SUFFIX}", 9999)] + people[399:]
        with open_store(tmp_path / "state.sqlite") as store:
            with pytest.raises(ApplyError) as refused:
                apply_entries(store, target, desired, base_dn=NEW_SUFFIX, plan_id=1, max_disables=0,
                              backup_dir=tmp_path / "backups")
            assert str(refused.value).startswith(
                f"uid=annv9999,ou=locked,{NEW_SUFFIX}: the server refused the add: insufficientAccessRights "
                "(no write access to parent)\napply 1 stopped there: 399 of 603 changes were written")
            log = store.apply_changes(1)
            assert [(row.seq, row.state) for row in log] == [(seq, "done") for seq in range(1, 400)] + [
                (400, "refused")]
            assert names(server, NEW_SUFFIX) == before | {entry.dn for entry in desired[:399]}
            undo = rollback(store, target, 1, base_dn=NEW_SUFFIX)
            assert len(undo.changes) == 399
            assert names(server, NEW_SUFFIX) == before
    finally:
        server.stop()


def test_changes_logged_intended_but_written_are_undone_by_rollback_and_met_by_apply(slapd, base, tmp_path) -> None:
    # The state a kill -9 in the middle of a batch leaves: every change of the batch logged as intended, some of
    # them written. Rollback removes exactly what is there; a new apply writes exactly what is missing.
    desired = many(base, 6)
    target = target_of(slapd, base)
    with open_store(tmp_path / "state.sqlite") as store:
        apply_id = store.start_apply(1, slapd.url, base)
        store.record_apply_changes(apply_id, [(seq, "add", entry.dn, (), entry.attributes)
                                              for seq, entry in enumerate(desired, start=1)])
        written = desired[:5]
        slapd.add_ldif("".join(format_entry(entry.dn, entry.attributes) for entry in written))
        undo = rollback(store, target, apply_id, base_dn=base)
        assert [change.dn for change in undo.changes] == [entry.dn for entry in reversed(written)]
        assert names(slapd, base) == {base}
        [run] = store.apply_runs()
        assert run.status == "rolled-back"
        slapd.add_ldif("".join(format_entry(entry.dn, entry.attributes) for entry in written))
        again = apply_entries(store, target, desired, base_dn=base, plan_id=1, max_disables=0,
                              backup_dir=tmp_path / "backups")
        assert [change.dn for change in again.changes] == [entry.dn for entry in desired[5:]]
        assert names(slapd, base) == {base} | {entry.dn for entry in desired}


def test_without_transactions_parents_still_come_before_children(slapd, base) -> None:
    # A server that offers no transactions gets the changes with several in flight; slapd may work on them in
    # any order, so a change waits while one above or below its entry is in flight.
    server = target_of(slapd, base).ldap
    assert server is not None
    target = LdapTarget(server, base)
    try:
        assert target.transactions  # slapd offers them; switched off here to try the other way
        target.transactions = False
        units = [container(f"ou=u{number},{base}") for number in range(40)]
        nested = [container(f"ou=n{number},{unit.dn}") for number, unit in enumerate(units)]
        adds = [Change("add", entry.dn, (), entry.attributes) for pair in zip(units, nested) for entry in pair]
        assert sorted(target.write(adds)) == [(index, None) for index in range(len(adds))]
        assert {entry.dn for entry in target.read()} == {base} | {change.dn for change in adds}
        deletes = [Change("delete", change.dn, change.after, ()) for change in reversed(adds)]
        assert sorted(target.write(deletes)) == [(index, None) for index in range(len(deletes))]
        assert [entry.dn for entry in target.read()] == [base]
    finally:
        target.close()
