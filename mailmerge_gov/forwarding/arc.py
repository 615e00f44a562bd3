"""ARC sealing (RFC 8617) of relayed messages with dkimpy, after checking what they arrived with."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_HEADER_SAFE = re.compile(r"[^A-Za-z0-9._-]")  # what a domain or selector may hold, in a header field we write


@dataclass(frozen=True)
class ArcSealer:
    """Seals each relayed message with an ARC set (RFC 8617) of the relay's domain, with dkimpy."""

    selector: str
    domain: str
    key: bytes  # RSA private key, PEM
    authserv_id: str  # the relay's hostname, naming who checked in ARC-Authentication-Results
    dnsfunc: Callable[..., bytes | None] | None = None  # TXT lookups (name, timeout=); dkimpy's resolver when None
    dns_timeout: float = 5.0

    def seal(self, message: bytes) -> tuple[bytes, str]:
        """The fields to prepend to a CRLF message, the ARC set above the relay's Authentication-Results (empty if
        dkimpy made no ARC set), and the results they record."""
        import dkim  # dkimpy and authres are needed only when [relay] arc_* is set

        lookup = {"dnsfunc": self.dnsfunc} if self.dnsfunc is not None else {}
        results = [self._dkim_result(message, lookup), f"arc={self._arc_result(message, lookup)}"]
        # dkimpy takes what the relay checked from an Authentication-Results field of our authserv-id (RFC 8617
        # 5.1.1: the seal records the checks made at this hop). The field goes on the message too, under the
        # ARC set, as in what dkimpy signed: the next hop sees the relay's verdict as well as the seal.
        checked = f"Authentication-Results: {self.authserv_id}; {'; '.join(results)}\r\n".encode("ascii")
        fields = dkim.arc_sign(checked + message, self.selector.encode("ascii"), self.domain.encode("ascii"),
                               self.key, self.authserv_id.encode("ascii"))
        return (b"".join(fields) + checked if fields else b""), "; ".join(results)

    def _dkim_result(self, message: bytes, lookup: dict[str, Any]) -> str:
        """dkim=pass/fail/... of the first DKIM signature, as in an Authentication-Results field (RFC 8601)."""
        import dkim

        checker = dkim.DKIM(message, timeout=self.dns_timeout)
        if not any(name.lower() == b"dkim-signature" for name, _ in checker.headers):
            return "dkim=none"
        try:
            result = "pass" if checker.verify(**lookup) else "fail"
        except dkim.DnsTimeoutError:
            result = "temperror"
        except dkim.KeyFormatError:
            result = "permerror"  # no usable key published for the signature
        except dkim.DKIMException:
            result = "fail"  # dkimpy raises for a body hash mismatch too, not only returns False
        # Values from the message go into a header field: only characters a domain or selector may have.
        domain = _HEADER_SAFE.sub("", (checker.domain or b"").decode("ascii", "replace"))
        selector = _HEADER_SAFE.sub("", (checker.selector or b"").decode("ascii", "replace"))
        return f"dkim={result}" + (f" header.d={domain}" if domain else "") + (f" header.s={selector}" if selector
                                                                               else "")

    def _arc_result(self, message: bytes, lookup: dict[str, Any]) -> str:
        """none, pass or fail: the ARC chain the message arrived with."""
        import dkim

        try:
            chain, _, _ = dkim.arc_verify(message, timeout=self.dns_timeout, **lookup)
        except dkim.DKIMException:
            return "fail"
        return chain.decode("ascii") if isinstance(chain, bytes) else str(chain)
