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
    official = page.locator('a[href="/people/annv7"]')
    expect(official).to_be_hidden()
    summary.click()
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
