"""The state store's batched writes give what one statement per row gave: identities, addresses, the apply log."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailmerge_gov.store import AddressRow, StoreError, open_store


def test_identity_ids_are_handed_out_in_order_and_written_with_their_links(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with open_store(path) as store:
        first, second = store.new_identity(), store.new_identity()
        assert (first, second) == (1, 2)
        assert store.link_records({"hcm:uid=annv": first, "hcm:uid=binhtt": second}) == {
            "hcm:uid=annv": 1, "hcm:uid=binhtt": 2}
        assert store.new_identity() == 3  # handed out, never linked: written when the store closes
    with open_store(path) as store:
        assert [row[0] for row in store.db.execute("SELECT id FROM identities ORDER BY id")] == [1, 2, 3]
        assert store.identity_links() == {"hcm:uid=annv": 1, "hcm:uid=binhtt": 2}
        assert store.new_identity() == 4


def test_identities_made_meanwhile_by_another_process_are_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with open_store(path) as store, open_store(path) as other:
        mine = store.new_identity()
        theirs = other.new_identity()
        other.link_records({"binhduong:cn=x": theirs})
        with pytest.raises(StoreError, match="another process created identities while this one was planning"):
            store.link_records({"hcm:uid=annv": mine})
    with open_store(path) as store:
        assert store.identity_links() == {"binhduong:cn=x": 1}


def test_saving_addresses_takes_the_rows_one_by_one(tmp_path: Path) -> None:
    with open_store(tmp_path / "state.sqlite") as store:
        store.save_addresses([AddressRow("annv@hcm.gov.vn", 1, "official", "applied"),
                              AddressRow("binhtt@hcm.gov.vn", 2, "official", "planned")])
        # a new address twice in one call: the later row wins; a planned one is updated; an applied one stays
        store.save_addresses([AddressRow("an@binhduong.gov.vn", 1, "alias", "planned", "binhduong", "2027-06-30"),
                              AddressRow("an@binhduong.gov.vn", 3, "alias", "planned", "binhduong", "2027-06-30"),
                              AddressRow("binhtt@hcm.gov.vn", 4, "official", "planned"),
                              AddressRow("annv@hcm.gov.vn", 1, "official", "planned")])
        assert [(row.address, row.identity_id, row.state) for row in store.addresses()] == [
            ("an@binhduong.gov.vn", 3, "planned"), ("annv@hcm.gov.vn", 1, "applied"),
            ("binhtt@hcm.gov.vn", 4, "planned")]
        with pytest.raises(StoreError, match="^address annv@hcm.gov.vn is applied for identity 1 and cannot be "
                                             "given to identity 5$"):
            store.save_addresses([AddressRow("new@hcm.gov.vn", 5, "official", "planned"),
                                  AddressRow("annv@hcm.gov.vn", 5, "official", "planned")])
        assert "new@hcm.gov.vn" not in {row.address for row in store.addresses()}  # all or nothing
        store.mark_addresses_applied([4])
        store.drop_planned_addresses(keep=set())
        assert [(row.address, row.state) for row in store.addresses()] == [
            ("annv@hcm.gov.vn", "applied"), ("binhtt@hcm.gov.vn", "applied")]


def test_a_batch_of_the_apply_log_is_marked_and_audited_at_once(tmp_path: Path) -> None:
    with open_store(tmp_path / "state.sqlite") as store:
        apply_id = store.start_apply(1, "ldap://127.0.0.1:1", "dc=hcm,dc=gov,dc=vn")
        entry = (("objectClass", ("top", "organizationalUnit")), ("ou", ("Sở Nội vụ",)))
        store.record_apply_changes(apply_id, [(seq, "add", f"ou={seq},dc=hcm,dc=gov,dc=vn", (), entry)
                                              for seq in (1, 2, 3, 4)])
        store.complete_apply_changes(apply_id, [1, 2])
        store.refuse_apply_change(apply_id, 3)
        store.forget_apply_changes(apply_id, [3, 4])  # 3 was answered: only never-sent changes are forgotten
        assert [(row.seq, row.state) for row in store.apply_changes(apply_id)] == [(1, "done"), (2, "done"),
                                                                                     (3, "refused")]
        assert [(e.action, e.subject, e.before, e.after) for e in store.audit_log()] == [
            ("directory-apply", f"ou={seq},dc=hcm,dc=gov,dc=vn", [], [["objectClass", ["top", "organizationalUnit"]],
                                                                       ["ou", ["Sở Nội vụ"]]]) for seq in (1, 2)]
        store.undo_apply_changes(apply_id, [(2, entry, ()), (1, None, None)])
        assert [(e.action, e.subject, e.after) for e in list(store.audit_log())[2:]] == [
            ("directory-rollback", "ou=2,dc=hcm,dc=gov,dc=vn", [])]
        assert [row.state for row in store.apply_changes(apply_id)] == ["undone", "undone", "refused"]
