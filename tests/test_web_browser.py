"""The staff directory in a real browser: Debian's chromium driven by Playwright, against uvicorn on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    # the system browser, never one Playwright downloads (`playwright install` is not part of the setup)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def login_server(web_ldap, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The site with its login, against the slapd of web_ldap, served by uvicorn on a loopback port."""
    import dataclasses

    from servers import uvicorn_in_thread

    from mailmerge_gov.config import Secret, load_config
    from mailmerge_gov.web import app_from_config

    _, config_path = web_ldap
    secret = tmp_path_factory.mktemp("web-secret") / "secret"
    secret.write_text("browser-test-session-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    config = load_config(config_path)
    config = dataclasses.replace(config, web=dataclasses.replace(config.web, session_secret=Secret(file=secret)))
    with uvicorn_in_thread(app_from_config(config), "uvicorn-web-login") as url:
        yield url


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def test_typing_a_name_shows_the_card(page: Page, web_server: str, tmp_path: Path) -> None:
    page.goto(web_server + "/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Tìm cán bộ")
    page.get_by_label("Họ tên, tên viết tắt").press_sequentially("nguyen van an", delay=20)
    # results come from the JSON API as one types: the form is never submitted
    card = page.locator("#results article.card").first
    expect(card.get_by_role("link", name="Nguyễn Văn An")).to_be_visible()
    expect(page.locator("#results")).to_contain_text("annv@hcm.gov.vn")
    assert page.url.endswith("/?q=nguyen+van+an")
    page.screenshot(path=tmp_path / "search.png", full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 1000
    card.get_by_role("link", name="Nguyễn Văn An").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Nguyễn Văn An")
    expect(page.get_by_role("link", name="annv@hcm.gov.vn")).to_have_attribute("href", "mailto:annv@hcm.gov.vn")
    qr = page.get_by_role("img", name="Mã QR chứa danh thiếp của Nguyễn Văn An")
    expect(qr).to_be_visible()
    assert qr.evaluate("img => img.complete && img.naturalWidth > 0")


def test_the_form_works_without_javascript(browser: Browser, web_server: str) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(web_server + "/")
        page.get_by_label("Họ tên, tên viết tắt").fill("annv7")
        page.get_by_role("button", name="Tìm").click()
        expect(page.locator("#results")).to_contain_text("trước đây: an.nguyenvan@binhduong.gov.vn")
    finally:
        context.close()


def test_hostile_text_typed_stays_text(page: Page, web_server: str) -> None:
    page.goto(web_server + "/")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.get_by_label("Họ tên, tên viết tắt").fill('<img src=x onerror=alert(1)>*)(uid=*')
    expect(page.locator("#results p.none")).to_have_text("Không tìm thấy ai khớp với từ khóa này.")
    assert dialogs == []


def test_open_the_unit_tree(page: Page, web_server: str) -> None:
    page.goto(web_server + "/")
    page.get_by_role("link", name="Cơ cấu tổ chức").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Cơ cấu tổ chức")
    top = page.locator("ul.tree > li > details").first
    expect(top).not_to_have_attribute("open", "")
    top.locator(":scope > summary").click()
    expect(top).to_have_attribute("open", "")
    summary = top.locator("summary", has_text="Sở Xây dựng")
    expect(summary).to_contain_text("(50 người)")
    members = page.get_by_role("link", name="Danh sách 50 cán bộ của đơn vị")
    expect(members).to_be_hidden()
    summary.click()
    members.click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sở Xây dựng")
    official = page.locator('a[href="/people/annv7"]')
    expect(official).to_be_visible()
    expect(official).to_have_text("Nguyễn Văn An")


def test_switch_to_english(page: Page, web_server: str) -> None:
    page.goto(web_server + "/?q=annv7")
    expect(page.locator("html")).to_have_attribute("lang", "vi")
    page.get_by_role("link", name="English").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("heading", level=1)).to_have_text("Find an official")
    expect(page.locator("#results")).to_contain_text("formerly: an.nguyenvan@binhduong.gov.vn")
    page.get_by_role("link", name="Organisation").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Organisation")
    assert "lang=en" in page.url


@pytest.mark.parametrize("path", ["/?q=nguyen", "/people/annv7", "/units", "/lookup?address=an.nguyenvan@binhduong.gov.vn",
                                  "/?q=" + "a" * 150 + "&lang=en"])
def test_a_390_pixel_phone_has_no_horizontal_scroll(browser: Browser, web_server: str, path: str) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(web_server + path)
        for details in page.locator("details").all()[:20]:
            details.evaluate("d => d.open = true")
        assert no_horizontal_scroll(page), page.evaluate("document.documentElement.scrollWidth")
    finally:
        context.close()


def test_keyboard_focus_order(page: Page, web_server: str) -> None:
    page.goto(web_server + "/")
    page.locator("body").focus()
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.textContent.trim() || document.activeElement.id"))
    # skip link, site name, navigation, then the search box and its button
    assert order == ["Bỏ qua, đến nội dung chính", "Danh bạ cán bộ", "Tìm kiếm", "Cơ cấu tổ chức", "Địa chỉ cũ",
                     "English", "q", "Tìm"]


def test_the_login_shows_the_private_field(page: Page, login_server: str) -> None:
    from conftest import WEB_LOGIN_PASSWORD

    page.goto(login_server + "/people/annv7")
    expect(page.get_by_role("heading", level=1)).to_have_text("Nguyễn Văn An")
    expect(page.locator(".person dl")).not_to_contain_text("0792890605")
    page.get_by_role("link", name="Đăng nhập để xem thêm thông tin liên hệ.").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Đăng nhập")
    page.get_by_label("Tên đăng nhập hoặc địa chỉ thư").fill("annv7")
    page.get_by_label("Mật khẩu").fill("not the password")
    page.get_by_role("button", name="Đăng nhập").click()
    expect(page.get_by_role("alert")).to_have_text("Tên đăng nhập hoặc mật khẩu không đúng.")
    page.get_by_label("Mật khẩu").fill(WEB_LOGIN_PASSWORD)
    page.get_by_role("button", name="Đăng nhập").click()
    # back on the card, now with the mobile number
    expect(page.get_by_role("heading", level=1)).to_have_text("Nguyễn Văn An")
    expect(page.get_by_role("link", name="0792890605")).to_have_attribute("href", "tel:0792890605")
    expect(page.locator("#user")).to_have_text("Đã đăng nhập: annv7")
    cookie, = [c for c in page.context.cookies() if c["name"] == "mmg_session"]
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Lax")
    # the results as one types come from the API, which sees the same session
    page.goto(login_server + "/")
    page.get_by_label("Họ tên, tên viết tắt").press_sequentially("annv7", delay=20)
    expect(page.locator("#results .mobile")).to_have_text("0792890605")
    page.get_by_role("button", name="Đăng xuất").click()
    page.goto(login_server + "/people/annv7")
    expect(page.locator(".person dl")).not_to_contain_text("0792890605")
