"""The staff directory web application through Starlette's TestClient: pages, vCards, the JSON API, hostile input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from mailmerge_gov.cli import cli
from mailmerge_gov.config import Secret
from mailmerge_gov.web import catalogue, create_app


@pytest.fixture(scope="module")
def client(web_index: Path) -> TestClient:
    return TestClient(create_app(web_index), raise_server_exceptions=True)


def test_both_languages_offer_every_text() -> None:
    assert catalogue.TEXT["vi"].keys() == catalogue.TEXT["en"].keys()
    assert catalogue.pick(None) == catalogue.pick("fr") == catalogue.pick("<x>") == "vi"


def test_search_page_is_vietnamese_by_default_and_works_without_javascript(client: TestClient) -> None:
    empty = client.get("/")
    assert empty.status_code == 200 and empty.headers["content-type"] == "text/html; charset=utf-8"
    assert '<html lang="vi">' in empty.text and "<h1>Tìm cán bộ</h1>" in empty.text
    assert '<form method="get" action="/" role="search"' in empty.text and '<label for="q">' in empty.text
    assert 'href="/?lang=en"' in empty.text  # the language switch
    page = client.get("/", params={"q": "nguyen van an"})
    assert page.status_code == 200
    assert '<a href="/people/annv">Nguyễn Văn An</a>' in page.text
    assert '<a href="mailto:annv7@hcm.gov.vn">annv7@hcm.gov.vn</a>' in page.text
    assert "trước đây: an.nguyenvan@binhduong.gov.vn, nguyenvanan@binhduong.gov.vn, Sở Xây dựng tỉnh Bình Dương" \
        in page.text
    assert '<p class="none">Không tìm thấy ai khớp với từ khóa này.</p>' in client.get("/", params={"q": "zzzzqq"}).text


def test_english_is_selectable_and_links_keep_it(client: TestClient) -> None:
    page = client.get("/", params={"q": "annv7", "lang": "en"})
    assert page.status_code == 200
    assert '<html lang="en">' in page.text and "<h1>Find an official</h1>" in page.text
    assert '<a href="/people/annv7?lang=en">Nguyễn Văn An</a>' in page.text
    assert "formerly: an.nguyenvan@binhduong.gov.vn" in page.text
    assert 'href="/units?lang=en"' in page.text and '<input type="hidden" name="lang" value="en">' in page.text
    assert 'id="switch-lang">Tiếng Việt</a>' in page.text


def test_person_card(client: TestClient) -> None:
    page = client.get("/people/annv7")
    assert page.status_code == 200
    text = page.text
    assert "<h1>Nguyễn Văn An</h1>" in text and "<dd>Kế toán</dd>" in text
    assert '<dd class="unit-path">Thành phố Hồ Chí Minh › Sở Xây dựng</dd>' in text
    assert '<a href="mailto:annv7@hcm.gov.vn">annv7@hcm.gov.vn</a>' in text
    # the office number is public; the mobile (0792890605) is private by default: only after login
    assert '<dt>Điện thoại</dt><dd><a href="tel:02743827438">0274 3827 438</a></dd>' in text
    assert "0792890605" not in text and "Di động" not in text
    assert ('<p class="formerly">trước đây: an.nguyenvan@binhduong.gov.vn, nguyenvanan@binhduong.gov.vn, '
            "Sở Xây dựng tỉnh Bình Dương</p>") in text
    assert 'href="/people/annv7/vcard.vcf"' in text and '<img src="/people/annv7/qr.svg"' in text
    assert client.get("/people/nobody-here").status_code == 404
    missing = client.get("/people/nobody-here?lang=en")
    assert missing.status_code == 404 and "<h1>Page not found</h1>" in missing.text


def test_vcard_3(client: TestClient) -> None:
    response = client.get("/people/annv7/vcard.vcf")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/vcard; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="annv7.vcf"'
    assert response.content.decode("utf-8") == (
        "BEGIN:VCARD\r\nVERSION:3.0\r\nN:Nguyễn;An;Văn;;\r\nFN:Nguyễn Văn An\r\n"
        "ORG:Thành phố Hồ Chí Minh;Sở Xây dựng\r\nTITLE:Kế toán\r\nEMAIL;TYPE=INTERNET,PREF:annv7@hcm.gov.vn\r\n"
        "TEL;TYPE=WORK,VOICE:0274 3827 438\r\n"
        "NOTE:an.nguyenvan@binhduong.gov.vn\\, nguyenvanan@binhduong.gov.vn\\, Sở X\r\n ây dựng tỉnh Bình Dương\r\n"
        "UID:annv7\r\nEND:VCARD\r\n")
    # every line at most 75 octets (RFC 2425 folding)
    assert all(len(line.encode()) <= 75 for line in response.content.decode().split("\r\n"))


def test_vcard_escapes_and_folds() -> None:
    from mailmerge_gov.directory.search import Person
    from mailmerge_gov.web.data import vcard

    card = vcard(Person(uid="x", full_name="Lê; Văn, Tám\\", title="Trưởng phòng\nKế hoạch", unit="", unit_path=(),
                        mail="", phones=(), old_addresses=(), old_units=("Ủy ban nhân dân " * 8,)))
    assert "FN:Lê\\; Văn\\, Tám\\\\\r\n" in card and "TITLE:Trưởng phòng\\nKế hoạch\r\n" in card
    assert "ORG:" not in card and "EMAIL" not in card
    lines = card.split("\r\n")
    assert all(len(line.encode()) <= 75 for line in lines) and any(line.startswith(" ") for line in lines)


def test_qr_code_is_an_svg(client: TestClient) -> None:
    response = client.get("/people/annv7/qr.svg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/svg+xml"
    assert response.text.startswith("<?xml") and "<svg" in response.text and "<path" in response.text
    assert client.get("/people/nobody-here/qr.svg").status_code == 404
    assert client.get("/people/nobody-here/vcard.vcf").status_code == 404


def test_unit_tree(client: TestClient) -> None:
    page = client.get("/units")
    assert page.status_code == 200 and "<h1>Cơ cấu tổ chức</h1>" in page.text
    assert '<details>' in page.text and "<summary>" in page.text
    assert re.search(r'<span class="unit-name">Sở Xây dựng</span> <span class="members">\(\d+ người\)</span>',
                     page.text)
    units = client.get("/api/units").json()["units"]
    top = units[0]
    assert top["name"] == "Thành phố Hồ Chí Minh" and top["path"] == ["Thành phố Hồ Chí Minh"]

    def check(unit: dict) -> None:
        assert unit["total"] == unit["members"] + sum(child["total"] for child in unit["children"])
        for child in unit["children"]:
            assert child["path"][:-1] == unit["path"]
            check(child)

    for unit in units:
        check(unit)
    assert sum(unit["total"] for unit in units) == 760  # every indexed official once
    assert "people" not in top  # counts only: the API lists officials through /api/people


def test_lookup_page(client: TestClient) -> None:
    moved = client.get("/lookup", params={"address": "AN.NGUYENVAN@binhduong.gov.vn"})
    assert moved.status_code == 200
    assert "AN.NGUYENVAN@binhduong.gov.vn đã chuyển. Thư hãy gửi đến:" in moved.text
    assert '<a href="mailto:annv7@hcm.gov.vn">annv7@hcm.gov.vn</a>' in moved.text
    current = client.get("/lookup", params={"address": "annv7@hcm.gov.vn", "lang": "en"})
    assert "annv7@hcm.gov.vn is the current address of:" in current.text
    unknown = client.get("/lookup", params={"address": "nobody@example.org"})
    assert "Không có cán bộ đang công tác nào dùng địa chỉ nobody@example.org." in unknown.text
    assert "Hãy nhập một địa chỉ thư đầy đủ" in client.get("/lookup", params={"address": "not an address"}).text
    assert "<h1>Địa chỉ thư này giờ ở đâu?</h1>" in client.get("/lookup").text


def test_api_people(client: TestClient) -> None:
    response = client.get("/api/people", params={"q": "0274 3827 438"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == {"query": "0274 3827 438", "count": 1, "people": [{
        "uid": "annv7", "full_name": "Nguyễn Văn An", "title": "Kế toán", "unit": "Sở Xây dựng",
        "unit_path": ["Thành phố Hồ Chí Minh", "Sở Xây dựng"], "mail": "annv7@hcm.gov.vn",
        "phones": ["0274 3827 438"],
        "old_addresses": ["an.nguyenvan@binhduong.gov.vn", "nguyenvanan@binhduong.gov.vn"],
        "old_units": ["Sở Xây dựng tỉnh Bình Dương"]}]}
    found = client.get("/api/people", params={"q": "nguyen van an", "limit": "3"}).json()
    assert [p["uid"] for p in found["people"]] == ["annv", "annv2", "annv3"]
    assert client.get("/api/people").json() == {"query": "", "count": 0, "people": []}
    for limit in ("0", "101", "-1", "x", "1e3", "²", "١٢", " 5", ""):
        bad = client.get("/api/people", params={"q": "an", "limit": limit})
        assert bad.status_code == 400 and "limit" in bad.json()["error"]


def test_api_person_and_lookup(client: TestClient) -> None:
    assert client.get("/api/people/annv7").json()["mail"] == "annv7@hcm.gov.vn"
    missing = client.get("/api/people/nobody-here")
    assert missing.status_code == 404 and missing.json() == {"error": "no active official has this uid"}
    moved = client.get("/api/lookup", params={"address": "nguyenvanan@binhduong.gov.vn"}).json()
    assert (moved["found"], moved["current"], moved["person"]["uid"]) == (True, False, "annv7")
    assert client.get("/api/lookup", params={"address": "annv7@hcm.gov.vn"}).json()["current"] is True
    assert client.get("/api/lookup", params={"address": "x@example.org"}).json() == {
        "address": "x@example.org", "found": False, "current": False, "person": None}
    assert client.get("/api/lookup", params={"address": "nope"}).status_code == 400
    assert client.get("/api/lookup").status_code == 400


def test_openapi_describes_every_api_route(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {"/api/people", "/api/people/{uid}", "/api/units", "/api/lookup"}


def test_disabled_officials_never_appear(client: TestClient, web_index: Path) -> None:
    from mailmerge_gov.config import load_config
    from mailmerge_gov.directory.plan import load_plan
    from mailmerge_gov.store import open_store

    config = load_config(web_index.parent.parent / "consolidation.toml")
    with open_store(config.state_file) as store:
        disabled = [p for p in load_plan(config, store).people if p.disabled]
    assert disabled
    units_page = client.get("/units").text
    for person in disabled:
        for _, address in person.mailboxes:
            assert client.get("/api/lookup", params={"address": address}).json()["found"] is False, address
            assert client.get("/api/people", params={"q": address}).json()["count"] == 0, address
            assert f"mailto:{address}" not in client.get("/", params={"q": address}).text


HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "*)(uid=*", '"', "*", "(", "NEAR",
           'an" OR "b', "nguyen AND", "^an", "an:nv", "{{ 7*7 }}", "%s%s%n", "\x00", "a" * 5000, "@", "' OR 1=1 --",
           "ä" * 3000 + "@x.vn"]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_input_is_escaped_and_answered(client: TestClient, query: str) -> None:
    for lang in ("vi", "en"):
        page = client.get("/", params={"q": query, "lang": lang})
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        api = client.get("/api/people", params={"q": query})
        assert api.status_code == 200 and isinstance(api.json()["people"], list)
        assert len(api.json()["query"]) <= 200
        lookup = client.get("/lookup", params={"address": query, "lang": lang})
        assert lookup.status_code == 200 and "<script>alert" not in lookup.text
        assert client.get("/api/lookup", params={"address": query}).status_code in (200, 400)
    assert client.get("/api/people/" + quote(query[:1000], safe="")).status_code == 404
    assert client.get("/people/" + quote(query[:1000], safe="")).status_code == 404


def test_template_syntax_in_a_query_is_text(client: TestClient) -> None:
    assert 'value="{{ 7*7 }}"' in client.get("/", params={"q": "{{ 7*7 }}"}).text


def test_hostile_address_is_escaped_on_the_lookup_page(client: TestClient) -> None:
    page = client.get("/lookup", params={"address": "<script>x</script>@evil.vn"})
    assert page.status_code == 200
    assert "&lt;script&gt;x&lt;/script&gt;@evil.vn" in page.text and "<script>x" not in page.text


def test_hostile_language_and_paths(client: TestClient) -> None:
    page = client.get("/", params={"lang": '"><script>alert(1)</script>'})
    assert page.status_code == 200 and '<html lang="vi">' in page.text and "<script>alert" not in page.text
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/people/").status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert client.post("/api/people").status_code == 405


def test_security_headers(client: TestClient) -> None:
    headers = client.get("/").headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


def test_a_missing_index_is_503_not_500(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "none.sqlite"))
    assert client.get("/").status_code == 200  # no query: nothing to read yet
    page = client.get("/", params={"q": "an"})
    assert page.status_code == 503 and "Danh bạ tạm thời chưa sẵn sàng" in page.text
    assert client.get("/api/people", params={"q": "an"}).status_code == 503
    assert client.get("/units").status_code == 503
    assert client.get("/api/people/annv").status_code == 503
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"not a database" * 100)
    assert TestClient(create_app(broken)).get("/api/units").status_code == 503


def test_serve_command_runs_uvicorn_on_the_index(example_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                 web_index: Path) -> None:
    import uvicorn

    config = str(example_copy / "consolidation.toml")
    result = CliRunner().invoke(cli, ["directory", "serve", "-c", config])
    assert result.exit_code == 1 and "build it with `mailmerge-gov directory index`" in result.output
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    config = str(web_index.parent.parent / "consolidation.toml")
    result = CliRunner().invoke(cli, ["directory", "serve", "-c", config, "--port", "8181"])
    assert result.exit_code == 0, result.output
    (app, options), = calls
    assert (options["host"], options["port"]) == ("127.0.0.1", 8181)
    assert TestClient(app).get("/api/people/annv7").json()["uid"] == "annv7"
    assert CliRunner().invoke(cli, ["directory", "serve", "-c", config, "--port", "70000"]).exit_code == 2


# --- the unit tree from the directory's OUs ---

def test_units_without_officials_are_in_the_tree_with_zero(client: TestClient) -> None:
    top, unplaced = client.get("/api/units").json()["units"]
    assert (top["code"], top["name"], top["members"], top["total"]) == ("79", "Thành phố Hồ Chí Minh", 0, 689)
    children = {unit["name"]: unit for unit in top["children"]}
    # two wards of the new city have no official yet: they are units of the organisation all the same
    assert {name: (unit["code"], unit["members"], unit["total"], unit["children"])
            for name, unit in children.items() if unit["total"] == 0} == {
        "UBND Xã Hòa Hiệp": ("26647", 0, 0, []), "UBND Xã Long Sơn": ("26545", 0, 0, [])}
    # sister units in Vietnamese dictionary order (the departments, then the wards)
    assert list(children)[:3] == ["Sở Giáo dục và Đào tạo", "Sở Khoa học và Công nghệ", "Sở Nội vụ"]
    assert children["Sở Xây dựng"]["path"] == ["Thành phố Hồ Chí Minh", "Sở Xây dựng"]
    assert (unplaced["name"], unplaced["members"], unplaced["total"]) == ("", 71, 71)
    page = client.get("/units").text
    assert '<span class="unit-name">UBND Xã Long Sơn</span> <span class="members">(0 người)</span>' in page


def test_a_unit_lists_its_officials_on_a_page_of_its_own(client: TestClient) -> None:
    # the tree has units, counts and a link per unit: a 100,000-official tree with every name would be megabytes
    tree = client.get("/units").text
    assert "/people/" not in tree
    code = {unit["name"]: unit["code"] for unit in client.get("/api/units").json()["units"][0]["children"]}["Sở Xây dựng"]
    assert f'<a href="/units/{code}">Danh sách 50 cán bộ của đơn vị</a>' in tree
    page = client.get(f"/units/{code}").text
    assert "<h1>Sở Xây dựng</h1>" in page and '<a href="/units">Cơ cấu tổ chức</a>' in page
    assert page.count('<li><a href="/people/') == 50
    assert '<li><a href="/people/annv7">Nguyễn Văn An</a> – Kế toán</li>' in page
    top = client.get("/units/79").text
    assert "<h1>Thành phố Hồ Chí Minh</h1>" in top and f'<a href="/units/{code}">Sở Xây dựng</a>' in top
    assert "<li>UBND Xã Long Sơn <span" in top  # nothing to list there: no link
    assert client.get("/units/-").text.count('<li><a href="/people/') == 71  # the officials in no unit
    english = client.get(f"/units/{code}", params={"lang": "en"}).text
    assert '<a href="/units?lang=en">Organisation</a>' in english and "<h2>Officials</h2>" in english
    for missing in ("nope", "79.STP%2F..", "*"):
        assert client.get(f"/units/{missing}").status_code == 404, missing


def test_an_index_of_another_version_is_refused(tmp_path: Path, web_index: Path) -> None:
    import shutil
    import sqlite3

    old = tmp_path / "old.sqlite"
    shutil.copy(web_index, old)
    with sqlite3.connect(old) as db:
        db.execute("PRAGMA user_version = 1")
    page = TestClient(create_app(old)).get("/", params={"q": "an"})
    assert page.status_code == 503 and "Danh bạ tạm thời chưa sẵn sàng" in page.text


# --- privacy: public fields for visitors ---

def test_the_mobile_number_is_private_by_default(client: TestClient) -> None:
    assert "mobile" not in client.get("/api/people/annv7").json()
    assert client.get("/api/people", params={"q": "0792890605"}).json()["count"] == 0  # not even found by it
    assert client.get("/api/people", params={"q": "0274 3827 438"}).json()["count"] == 1
    assert "0792890605" not in client.get("/people/annv7/vcard.vcf").text
    assert "0792890605" not in client.get("/", params={"q": "annv7"}).text
    assert "Đăng nhập" not in client.get("/people/annv7").text  # no login configured: no login link


def test_the_qr_code_holds_only_public_fields(client: TestClient, web_index: Path) -> None:
    from mailmerge_gov.config import DEFAULT_PUBLIC_FIELDS
    from mailmerge_gov.web.data import person, qr_svg, redact, vcard

    full = person(web_index, "annv7")
    assert full is not None and full.mobile == ("0792890605",)
    qr = client.get("/people/annv7/qr.svg").text
    assert qr == qr_svg(vcard(redact(full, DEFAULT_PUBLIC_FIELDS))) and qr != qr_svg(vcard(full))


def test_configured_public_fields_hide_the_others_everywhere(web_index: Path) -> None:
    from mailmerge_gov.config import WebConfig

    client = TestClient(create_app(web_index, settings=WebConfig(public_fields=("title",))))
    assert client.get("/api/people/annv7").json() == {"uid": "annv7", "full_name": "Nguyễn Văn An", "title": "Kế toán"}
    for hidden in ("annv7@hcm.gov.vn", "an.nguyenvan@binhduong.gov.vn", "an.nguyenvan", "0274 3827 438"):
        assert client.get("/api/people", params={"q": hidden}).json()["count"] == 0, hidden
    for address in ("annv7@hcm.gov.vn", "an.nguyenvan@binhduong.gov.vn"):
        assert client.get("/api/lookup", params={"address": address}).json()["found"] is False, address
    assert [p["uid"] for p in client.get("/api/people", params={"q": "nguyen van an", "limit": "2"}).json()["people"]
            ] == ["annv", "annv2"]  # the name is always public
    card = client.get("/people/annv7").text
    assert "annv7@hcm.gov.vn" not in card and "Sở Xây dựng" not in card and "<dd>Kế toán</dd>" in card
    assert client.get("/people/annv7/vcard.vcf").text == (
        "BEGIN:VCARD\r\nVERSION:3.0\r\nN:Nguyễn;An;Văn;;\r\nFN:Nguyễn Văn An\r\nTITLE:Kế toán\r\nUID:annv7\r\n"
        "END:VCARD\r\n")
    # without the unit field, who works where is not shown: the tree has its units and counts, no names
    units = client.get("/units").text
    assert "Sở Xây dựng" in units and "/people/annv7" not in units and 'href="/units/' not in units
    assert client.get("/units/79").status_code == 404


# --- old URLs ---

@pytest.fixture(scope="module")
def redirecting(web_index: Path) -> TestClient:
    from mailmerge_gov.config import WebConfig, WebRedirect

    redirects = (WebRedirect("/danhba/chitiet.php", address="{uid}@binhduong.gov.vn"),
                 WebRedirect("/danhba/", (("page", "donvi"),), to="/units"),
                 WebRedirect("/danhba/", to="/people/{id}"),
                 WebRedirect("/danhba/", to="/?q={q}"),
                 WebRedirect("/danhba/", to="/"))
    return TestClient(create_app(web_index, settings=WebConfig(redirects=redirects)), follow_redirects=False)


@pytest.mark.parametrize(("old", "status", "new"), [
    # an old account: whoever has its address now, which a re-index may change, so never for good (302)
    ("/danhba/chitiet.php?uid=an.nguyenvan", 302, "/people/annv7"),
    ("/danhba/chitiet.php?uid=AN.NGUYENVAN&lang=vi", 302, "/people/annv7"),
    ("/danhba/chitiet.php?uid=nobody", 302, "/lookup?address=nobody%40binhduong.gov.vn"),
    ("/danhba/chitiet.php", 404, None),  # no uid: no redirect fits, so the old URL is not found
    ("/danhba/?page=donvi", 301, "/units"),
    ("/danhba?page=donvi", 301, "/units"),
    ("/danhba/?id=annv7", 301, "/people/annv7"),
    ("/danhba/?id=../../api/units%3Fx", 301, "/people/..%2F..%2Fapi%2Funits%3Fx"),  # one path segment, quoted
    ("/danhba/?q=nguyen%20van%20an", 301, "/?q=nguyen%20van%20an"),
    ("/danhba/?q=%22%3E%3Cscript%3E", 301, "/?q=%22%3E%3Cscript%3E"),
    ("/danhba/", 301, "/"),
    ("/danhba/?id=", 301, "/"),
])
def test_old_urls_redirect(redirecting: TestClient, old: str, status: int, new: str | None) -> None:
    response = redirecting.get(old)
    assert (response.status_code, response.headers.get("location")) == (status, new)


def test_old_urls_lead_to_the_page(redirecting: TestClient) -> None:
    page = redirecting.get("/danhba/chitiet.php?uid=an.nguyenvan", follow_redirects=True)
    assert page.status_code == 200 and "<h1>Nguyễn Văn An</h1>" in page.text
    assert redirecting.post("/danhba/?id=annv7").status_code == 404  # only a GET is an old link followed


# --- the [web] table ---

WEB_TOML = """
[web]
host = "0.0.0.0"
port = 8443
public_url = "https://danhba.hcm.gov.vn/"
default_language = "en"
public_fields = ["title", "unit", "mail"]
session_secret_file = "web-secret"
session_minutes = 60
trusted_proxies = ["10.0.0.1", "192.168.0.0/24"]

[[web.redirects]]
from = "/danhba/chitiet.php?kind=person"
address = "{uid}@binhduong.gov.vn"

[[web.redirects]]
from = "/danhba/"
to = "/?q={q}"
"""


def with_web(example_copy: Path, table: str) -> Path:
    """The example's consolidation file with its own [web] tables replaced by `table`."""
    config = example_copy / "consolidation.toml"
    text = config.read_text(encoding="utf-8")
    start, end = text.index("\n[web]\n"), text.index("\n[relay]\n")
    config.write_text(text[:start] + text[end:] + table, encoding="utf-8")
    return config


def test_the_web_table_is_read(example_copy: Path) -> None:
    from mailmerge_gov.config import Secret, WebConfig, WebRedirect, load_config

    web = load_config(with_web(example_copy, WEB_TOML)).web
    assert web == WebConfig(
        host="0.0.0.0", port=8443, public_url="https://danhba.hcm.gov.vn", default_language="en",
        public_fields=("title", "unit", "mail"), session_secret=Secret(file=example_copy / "web-secret"),
        session_minutes=60, trusted_proxies=("10.0.0.1", "192.168.0.0/24"),
        redirects=(WebRedirect("/danhba/chitiet.php", (("kind", "person"),), address="{uid}@binhduong.gov.vn"),
                   WebRedirect("/danhba/", to="/?q={q}")))
    assert web.secure_cookies is True


@pytest.mark.parametrize(("table", "message"), [
    ('port = 70000', "web.port: must be 1 to 65535, got 70000"),
    ('public_url = "danhba.hcm.gov.vn"', "web.public_url: 'danhba.hcm.gov.vn' is not an http:// or https:// URL"),
    ('default_language = "fr"', "web.default_language: unknown language 'fr'; choose one of vi, en"),
    ('public_fields = ["mobile", "birthday"]', "web.public_fields: unknown field 'birthday'; choose from title, unit,"),
    ('session_secret = "abc"', "web.session_secret: the session secret is never written into the configuration"),
    ('session_secret_env = "A"\nsession_secret_file = "x"', "web.session_secret_file: give session_secret_env or"),
    ('trusted_proxies = ["proxy.hcm"]', "web.trusted_proxies: 'proxy.hcm' is not an IP address or network"),
    ('colour = "red"', "web.colour: unknown key 'colour'"),
    ('[[web.redirects]]\nfrom = "/danhba/"\nto = "https://evil.example/"',
     "web.redirects[1].to: 'https://evil.example/' is not a path of this site"),
    ('[[web.redirects]]\nfrom = "/danhba/"\nto = "//evil.example/"', "web.redirects[1].to: '//evil.example/' is not"),
    ('[[web.redirects]]\nfrom = "danhba"\nto = "/"', "web.redirects[1].from: 'danhba' is not the path of an old URL"),
    ('[[web.redirects]]\nfrom = "/danhba/"', "web.redirects[1]: a redirect needs exactly one of to, address"),
    ('[[web.redirects]]\nfrom = "/d"\nto = "/people/{u id}"', "web.redirects[1].to: '/people/{u id}': a placeholder"),
    ('[[web.redirects]]\nfrom = "/d"\naddress = "{uid}"', "web.redirects[1].address: '{uid}' is not an address"),
])
def test_web_table_errors_name_the_key(example_copy: Path, table: str, message: str) -> None:
    from mailmerge_gov.config import ConfigError, load_config

    config = with_web(example_copy, "\n[web]\n" + table + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert message in str(caught.value) and str(caught.value).startswith(f"{config}, line ")


def test_serve_reads_the_web_table_and_flags_win(example_copy: Path, web_index: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import uvicorn

    config = with_web(example_copy, '\n[web]\nhost = "127.0.0.2"\nport = 8282\ntrusted_proxies = ["127.0.0.1"]\n'
                                    'default_language = "en"\n')
    (example_copy / "state").mkdir()
    shutil.copy(web_index, example_copy / "state" / web_index.name)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    assert CliRunner().invoke(cli, ["directory", "serve", "-c", str(config)]).exit_code == 0
    assert CliRunner().invoke(cli, ["directory", "serve", "-c", str(config), "--host", "::1", "--port", "9000"]
                              ).exit_code == 0
    (app, options), (_, flagged) = calls
    assert (options["host"], options["port"], options["proxy_headers"], options["forwarded_allow_ips"]) == (
        "127.0.0.2", 8282, True, "127.0.0.1")
    assert (flagged["host"], flagged["port"]) == ("::1", 9000)
    page = TestClient(app).get("/")
    assert '<html lang="en">' in page.text and 'href="/?lang=vi"' in page.text and "Log in" not in page.text


def test_serve_refuses_a_session_secret_it_cannot_use(example_copy: Path, web_index: Path) -> None:
    import shutil

    config = with_web(example_copy, '\n[web]\nsession_secret_file = "secret"\n')
    (example_copy / "state").mkdir()
    shutil.copy(web_index, example_copy / "state" / web_index.name)
    result = CliRunner().invoke(cli, ["directory", "serve", "-c", str(config)])
    assert result.exit_code == 1 and "officials log in against the new LDAP directory" in result.output


# --- login against the new LDAP directory (a real slapd with the example applied) ---

SECRET = "a-session-secret-for-the-tests-only-0123456789"


@pytest.fixture
def login_client(web_ldap) -> TestClient:
    """A fresh site (its own login throttle) whose officials log in against the slapd of web_ldap."""
    from mailmerge_gov.config import load_config
    from mailmerge_gov.web import app_from_config

    _, config_path = web_ldap
    config = load_config(config_path)
    secret = config_path.parent / "web-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    config = dataclasses.replace(config, web=dataclasses.replace(config.web, session_secret=Secret(file=secret)))
    return TestClient(app_from_config(config), follow_redirects=False)


def log_in(client: TestClient, username: str, password: str, next_page: str = "/people/annv7"):  # type: ignore[no-untyped-def]
    """Open the login page and send its form, as a browser does."""
    form = client.get("/login", params={"next": next_page})
    assert form.status_code == 200
    token = re.search(r'<input type="hidden" name="csrf" value="([^"]+)">', form.text).group(1)
    return client.post("/login", data={"csrf": token, "next": next_page, "username": username, "password": password})


def test_login_shows_the_private_fields_and_logout_hides_them(login_client: TestClient, web_ldap) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    card = login_client.get("/people/annv7").text
    assert "0792890605" not in card and '<a href="/login?next=%2Fpeople%2Fannv7">Đăng nhập để xem thêm' in card
    cookie = login_client.get("/login").headers["set-cookie"]
    assert cookie.startswith("mmg_session=") and "httponly" in cookie and "samesite=lax" in cookie
    assert "secure" not in cookie  # http: a Secure cookie would never come back
    response = log_in(login_client, "annv7", WEB_LOGIN_PASSWORD)
    assert (response.status_code, response.headers["location"]) == (303, "/people/annv7")
    card = login_client.get("/people/annv7")
    assert '<dt>Di động</dt><dd class="mobile"><a href="tel:0792890605">0792890605</a></dd>' in card.text
    assert '<span id="user">Đã đăng nhập: annv7</span>' in card.text and "Đăng nhập để xem thêm" not in card.text
    assert card.headers["cache-control"] == "private, no-store"
    assert login_client.get("/api/people/annv7").json()["mobile"] == ["0792890605"]
    assert [p["uid"] for p in login_client.get("/api/people", params={"q": "0792890605"}).json()["people"]] == ["annv7"]
    assert "TEL;TYPE=CELL,VOICE:0792890605\r\n" in login_client.get("/people/annv7/vcard.vcf").text
    # logging out needs the form's token too: another site cannot log an official out
    assert login_client.post("/logout", data={"csrf": "forged"}).status_code == 403
    token = re.search(r'name="csrf" value="([^"]+)"', card.text).group(1)
    out = login_client.post("/logout", data={"csrf": token})
    assert (out.status_code, out.headers["location"]) == (303, "/")
    assert "mobile" not in login_client.get("/api/people/annv7").json()


def test_login_by_mail_address(login_client: TestClient) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    assert log_in(login_client, " ANNV7@hcm.gov.vn ", WEB_LOGIN_PASSWORD, "/").headers["location"] == "/"
    assert "mobile" in login_client.get("/api/people/annv7").json()


@pytest.mark.parametrize(("username", "password"), [
    ("annv7", "wrong"), ("annv7", ""), ("nobody-at-all", "whatever"), ("nghiht", "Mật-khẩu đúng 7!"),
    ("*", "Mật-khẩu đúng 7!"), ("*)(uid=*", "x"), ("annv7)(|(uid=*", "Mật-khẩu đúng 7!"), ("", ""),
    ("annv7", "Mật-khẩu đúng 7!" + "x" * 2000),
])
def test_a_failed_login_says_one_thing(login_client: TestClient, username: str, password: str) -> None:
    response = log_in(login_client, username, password)
    assert response.status_code == 400
    assert '<p class="error" role="alert" id="login-error">Tên đăng nhập hoặc mật khẩu không đúng.</p>' in response.text
    assert "mobile" not in login_client.get("/api/people/annv7").json()


def test_the_login_form_needs_its_token(login_client: TestClient) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    login_client.get("/login")
    forged = login_client.post("/login", data={"username": "annv7", "password": WEB_LOGIN_PASSWORD, "csrf": "x"})
    assert forged.status_code == 403 and "Biểu mẫu đã hết hạn" in forged.text
    fresh = TestClient(login_client.app, follow_redirects=False)  # no session cookie at all
    assert fresh.post("/login", data={"username": "annv7", "password": WEB_LOGIN_PASSWORD}).status_code == 403
    assert "mobile" not in login_client.get("/api/people/annv7").json()
    assert login_client.post("/login", content=b"x" * 10000).status_code == 413


def test_failed_logins_are_throttled(login_client: TestClient) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    assert [log_in(login_client, "annv7", f"wrong {n}").status_code for n in range(5)] == [400] * 5
    blocked = log_in(login_client, "annv7", WEB_LOGIN_PASSWORD)  # even the right password, for a while
    assert blocked.status_code == 429 and "Đăng nhập sai quá nhiều lần" in blocked.text
    assert "mobile" not in login_client.get("/api/people/annv7").json()


def test_the_throttle_keeps_only_keys_that_failed() -> None:
    from mailmerge_gov.web.auth import Throttle

    throttle = Throttle(limit=2)
    assert [throttle.blocked(f"ip:10.0.0.{n}", f"user:u{n}") for n in range(1000)] == [False] * 1000
    throttle.failed("ip:10.0.0.1", "user:u1")
    throttle.failed("ip:10.0.0.1", "user:u2")
    assert (throttle.blocked("ip:10.0.0.1"), throttle.blocked("user:u1"), throttle.blocked("ip:10.0.0.2")) == (
        True, False, False)
    assert sorted(throttle._failures) == ["ip:10.0.0.1", "user:u1", "user:u2"]  # noqa: SLF001  no entry per visitor


def test_the_password_is_never_logged(login_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from conftest import WEB_LOGIN_PASSWORD

    with caplog.at_level(logging.DEBUG):
        log_in(login_client, "annv7", "sai-mật-khẩu-xyz")
        log_in(login_client, "annv7", WEB_LOGIN_PASSWORD)
    assert "login refused for 'annv7'" in caplog.text and "login of annv7" in caplog.text
    assert "sai-mật-khẩu-xyz" not in caplog.text and WEB_LOGIN_PASSWORD not in caplog.text


def test_a_forged_session_cookie_is_ignored(login_client: TestClient, web_index: Path) -> None:
    import base64
    import json

    import itsdangerous

    payload = base64.b64encode(json.dumps({"uid": "annv7"}).encode())
    for secret in ("another-secret-of-enough-length-0123456789", SECRET[:-1]):
        cookie = itsdangerous.TimestampSigner(secret).sign(payload).decode()
        login_client.cookies.set("mmg_session", cookie)
        assert "mobile" not in login_client.get("/api/people/annv7").json()
    genuine = itsdangerous.TimestampSigner(SECRET).sign(payload).decode()
    login_client.cookies.set("mmg_session", genuine)
    assert "mobile" in login_client.get("/api/people/annv7").json()  # the same payload, signed: the check is real


def test_a_session_of_an_official_disabled_since_the_login_shows_public_fields(login_client: TestClient) -> None:
    # a genuine cookie, signed at a login when the official was still active: they are not in today's index
    import base64
    import json

    import itsdangerous

    from conftest import WEB_DISABLED_UID

    payload = base64.b64encode(json.dumps({"uid": WEB_DISABLED_UID}).encode())
    login_client.cookies.set("mmg_session", itsdangerous.TimestampSigner(SECRET).sign(payload).decode())
    assert "mobile" not in login_client.get("/api/people/annv7").json()
    card = login_client.get("/people/annv7").text
    assert "0792890605" not in card and "Đã đăng nhập" not in card and "Đăng nhập để xem thêm" in card


def test_login_when_the_directory_is_down(web_index: Path) -> None:
    from servers import free_port

    from mailmerge_gov.config import LdapServer

    directory = LdapServer(url=f"ldap://127.0.0.1:{free_port()}", base_dn="dc=hcm,dc=gov,dc=vn", timeout=2)
    client = TestClient(create_app(web_index, directory=directory, session_secret=SECRET))
    response = log_in(client, "annv7", "x")
    assert response.status_code == 503 and "Hiện không kiểm tra được đăng nhập" in response.text


def test_https_cookies_are_secure_and_host_bound(web_index: Path) -> None:
    from mailmerge_gov.config import LdapServer, WebConfig

    app = create_app(web_index, settings=WebConfig(public_url="https://danhba.hcm.gov.vn"),
                     directory=LdapServer(url="ldap://127.0.0.1:1", base_dn="dc=hcm,dc=gov,dc=vn"),
                     session_secret=SECRET)
    cookie = TestClient(app, base_url="https://testserver").get("/login").headers["set-cookie"]
    assert cookie.startswith("__Host-mmg_session=") and "; path=/;" in cookie
    assert "httponly; samesite=lax; secure" in cookie


@pytest.mark.parametrize(("web", "warned"), [
    ({"public_url": "https://danhba.hcm.gov.vn"}, True),
    ({"public_url": "https://danhba.hcm.gov.vn", "trusted_proxies": ("10.0.0.5",)}, False),
    ({}, False),  # on loopback, not published
])
def test_a_published_site_without_its_proxy_is_warned_of(web_ldap, web: dict, warned: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from mailmerge_gov.config import load_config
    from mailmerge_gov.web.app import login_setup

    _, config_path = web_ldap
    secret = config_path.parent / "web-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    config = load_config(config_path)
    config = dataclasses.replace(config, web=dataclasses.replace(config.web, session_secret=Secret(file=secret), **web))
    with caplog.at_level("WARNING", logger="mailmerge_gov.web"):
        login_setup(config)
    assert [r.getMessage() for r in caplog.records if "trusted_proxies" in r.getMessage()] == (
        ["[web] public_url is set but trusted_proxies is empty: name the reverse proxy in trusted_proxies, or the "
         "login throttle counts every visitor as the proxy"] if warned else [])


def test_a_short_session_secret_is_refused(web_index: Path) -> None:
    from mailmerge_gov.web import WebSetupError

    with pytest.raises(WebSetupError, match="the session secret has 6 characters; it needs at least 32"):
        create_app(web_index, directory=None, session_secret="abcdef")


def test_without_login_there_is_no_login_page(client: TestClient) -> None:
    assert client.get("/login").status_code == 404
    assert client.post("/logout").status_code == 404


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:x"])
def test_after_login_only_a_page_of_this_site(login_client: TestClient, target: str) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    assert log_in(login_client, "annv7", WEB_LOGIN_PASSWORD, target).headers["location"] == "/"


def test_the_example_redirects_bình_dương_s_old_pages(web_index: Path) -> None:
    from mailmerge_gov.config import load_config
    from mailmerge_gov.web import app_from_config

    client = TestClient(app_from_config(load_config(web_index.parent.parent / "consolidation.toml")),
                        follow_redirects=False)
    assert client.get("/danhba/chitiet.php?uid=an.nguyenvan").headers["location"] == "/people/annv7"
    assert client.get("/danhba/?q=tran thi thu ha").headers["location"] == "/?q=tran%20thi%20thu%20ha"
    assert client.get("/login").status_code == 404  # an LDIF target and no session secret: no login
