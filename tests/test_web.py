"""The staff directory web application through Starlette's TestClient: pages, vCards, the JSON API, hostile input."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from mailmerge_gov.cli import cli
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
    assert '<a href="tel:02743827438">0274 3827 438</a>, <a href="tel:0792890605">0792890605</a>' in text
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
        "TEL;TYPE=WORK,VOICE:0274 3827 438\r\nTEL;TYPE=WORK,VOICE:0792890605\r\n"
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
        "phones": ["0274 3827 438", "0792890605"],
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
