"""Every piece of text the web pages show, in Vietnamese (the default) and English.

Templates read it as `t.<key>`; Python code never writes UI text itself.
"""

from __future__ import annotations

LANGUAGES = ("vi", "en")
DEFAULT = "vi"

TEXT: dict[str, dict[str, str]] = {
    "vi": {
        "lang_name": "Tiếng Việt",
        "other_lang_label": "English",
        "site_title": "Danh bạ cán bộ",
        "skip": "Bỏ qua, đến nội dung chính",
        "nav_label": "Điều hướng chính",
        "nav_search": "Tìm kiếm",
        "nav_units": "Cơ cấu tổ chức",
        "nav_lookup": "Địa chỉ cũ",
        "search_heading": "Tìm cán bộ",
        "search_label": "Họ tên, tên viết tắt, địa chỉ thư, số điện thoại, chức danh hoặc đơn vị",
        "search_hint": "Có thể gõ không dấu, ví dụ: nguyen van an",
        "search_button": "Tìm",
        "results_heading": "Kết quả",
        "results_count": "Tìm thấy {n} người",
        "no_results": "Không tìm thấy ai khớp với từ khóa này.",
        "formerly": "trước đây",
        "title": "Chức danh",
        "unit": "Đơn vị",
        "mail": "Thư điện tử",
        "phones": "Điện thoại",
        "vcard": "Tải danh thiếp (vCard)",
        "qr_alt": "Mã QR chứa danh thiếp của {name}",
        "qr_caption": "Quét mã QR để lưu vào danh bạ điện thoại",
        "back_to_search": "Quay lại tìm kiếm",
        "units_heading": "Cơ cấu tổ chức",
        "units_intro": "Bấm vào một đơn vị để xem các đơn vị trực thuộc và cán bộ.",
        "members": "{n} người",
        "no_unit": "Chưa xếp đơn vị",
        "lookup_heading": "Địa chỉ thư này giờ ở đâu?",
        "lookup_label": "Địa chỉ thư (cũ hoặc mới)",
        "lookup_button": "Tra cứu",
        "lookup_current": "{address} là địa chỉ hiện tại của:",
        "lookup_moved": "{address} đã chuyển. Thư hãy gửi đến:",
        "lookup_unknown": "Không có cán bộ đang công tác nào dùng địa chỉ {address}.",
        "lookup_invalid": "Hãy nhập một địa chỉ thư đầy đủ, ví dụ ten@hcm.gov.vn.",
        "not_found_heading": "Không tìm thấy trang",
        "not_found": "Trang hoặc cán bộ bạn tìm không có trong danh bạ.",
        "unavailable_heading": "Danh bạ tạm thời chưa sẵn sàng",
        "unavailable": "Chỉ mục tìm kiếm chưa được tạo hoặc không đọc được. Hãy báo cho quản trị viên.",
        "bad_request": "Yêu cầu không hợp lệ.",
        "loading": "Đang tìm…",
    },
    "en": {
        "lang_name": "English",
        "other_lang_label": "Tiếng Việt",
        "site_title": "Staff directory",
        "skip": "Skip to main content",
        "nav_label": "Main navigation",
        "nav_search": "Search",
        "nav_units": "Organisation",
        "nav_lookup": "Old addresses",
        "search_heading": "Find an official",
        "search_label": "Name, initials, mail address, phone number, title or unit",
        "search_hint": "Diacritics are optional, e.g. nguyen van an",
        "search_button": "Search",
        "results_heading": "Results",
        "results_count": "{n} found",
        "no_results": "Nobody matches this search.",
        "formerly": "formerly",
        "title": "Title",
        "unit": "Unit",
        "mail": "Mail",
        "phones": "Phone",
        "vcard": "Download contact card (vCard)",
        "qr_alt": "QR code holding the contact card of {name}",
        "qr_caption": "Scan the QR code to save the contact on a phone",
        "back_to_search": "Back to search",
        "units_heading": "Organisation",
        "units_intro": "Open a unit to see its sub-units and officials.",
        "members": "{n} people",
        "no_unit": "Not in a unit",
        "lookup_heading": "Where did this address go?",
        "lookup_label": "Mail address (old or new)",
        "lookup_button": "Look up",
        "lookup_current": "{address} is the current address of:",
        "lookup_moved": "{address} has moved. Write to:",
        "lookup_unknown": "No active official uses {address}.",
        "lookup_invalid": "Enter a whole mail address, e.g. name@hcm.gov.vn.",
        "not_found_heading": "Page not found",
        "not_found": "The page or official you asked for is not in the directory.",
        "unavailable_heading": "The directory is not available yet",
        "unavailable": "The search index has not been built or cannot be read. Please tell an administrator.",
        "bad_request": "The request is not valid.",
        "loading": "Searching…",
    },
}



def pick(lang: str | None) -> str:
    """The language asked for, or the default."""
    return lang if lang in LANGUAGES else DEFAULT
