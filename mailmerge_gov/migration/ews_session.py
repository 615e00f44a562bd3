"""The connections to an Exchange server that the stores of one server and login share: exchangelib's retry
policy (throttling waits, counted to the store whose request waited), the HTTP adapter for a private CA, and the
count of stores that closes the connections when the last one is done."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
from exchangelib import Account
from exchangelib import errors as ews_errors
from exchangelib.protocol import CachingProtocol, FaultTolerance, Protocol

log = logging.getLogger(__name__)

# The store whose request is being made in this thread: a back-off is counted to it.
acting = threading.local()


class Throttle(FaultTolerance):
    """exchangelib's retry policy, capped: one request waits at most max_wait seconds in all, and a 401 fails at
    once (FaultTolerance would take it for throttling and retry a wrong password for max_wait)."""

    def __init__(self, url: str, max_wait: float) -> None:
        super().__init__(max_wait=max_wait)
        self.url = url
        self.waits = 0  # back-offs the server asked for, on every connection of this policy
        self.seconds = 0.0
        self._count_lock = threading.Lock()
        self._streak = threading.local()  # seconds waited by this thread's current request

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_count_lock", None)
        state.pop("_streak", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._count_lock = threading.Lock()
        self._streak = threading.local()

    def raise_response_errors(self, response: requests.Response) -> None:
        if response.status_code == 200:
            self._streak.seconds = 0.0
        if response.status_code == 401:
            raise ews_errors.UnauthorizedError(f"the server refused the credentials (HTTP 401) for {response.url}")
        super().raise_response_errors(response)

    def back_off(self, seconds: float | None) -> None:
        wait = self.DEFAULT_BACKOFF if seconds is None else seconds
        waited = getattr(self._streak, "seconds", 0.0) + wait
        if waited > self.max_wait:
            self._streak.seconds = 0.0
            raise ews_errors.RateLimitError(f"the server kept asking to back off for over {self.max_wait:g} s",
                                            wait=wait)
        self._streak.seconds = waited
        with self._count_lock:
            self.waits += 1
            self.seconds += wait
        store = getattr(acting, "store", None)
        if store is not None:
            store.note_back_off(wait)
        log.warning("%s: backing off %.3g s: the server is busy or did not answer (back-off %d)", self.url, wait,
                    self.waits)
        super().back_off(wait)


class CaFileAdapter(requests.adapters.HTTPAdapter):
    """Verify an EWS server's certificate against its configured ca_file (requests' own CAs otherwise).

    exchangelib takes its HTTP adapter from a class attribute (BaseProtocol.HTTP_ADAPTER_CLS, the way its
    documentation gives for a private CA): the swap is process-wide, so this adapter changes only requests to an
    origin some open store has a ca_file for, and behaves as requests' own adapter for every other one."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        ca_file = _CA_FILES.get(origin_of(request.url or ""))
        if ca_file is not None and kwargs.get("verify", True) is not False:  # True, or REQUESTS_CA_BUNDLE's path
            kwargs["verify"] = ca_file
        return super().send(request, *args, **kwargs)


@dataclass
class Shared:
    """What the stores of one server and one login share: exchangelib's Protocol (its connections) and the
    retry policy, and how many stores use them."""

    policy: Throttle
    users: int = 0
    ca_file: str | None = None


_CA_FILES: dict[str, str] = {}  # origin -> ca_file, while a store of that origin with a ca_file is open
shared_logins: dict[tuple[str, str], Shared] = {}
sharing = threading.RLock()  # re-entrant: open_ews calls release() under it when exchangelib refuses an Account


def origin_of(url: str) -> str:
    """The scheme and host:port of a URL, lowercased: what a ca_file is kept for."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def refresh_ca_files(origin: str) -> None:
    """Point the adapter at the ca_file of the open stores of an origin (under sharing), or at none."""
    files = sorted({s.ca_file for k, s in shared_logins.items() if s.ca_file and origin_of(k[0]) == origin})
    if files:
        _CA_FILES[origin] = files[0]
    else:
        _CA_FILES.pop(origin, None)


def release(key: tuple[str, str], account: Account | None) -> None:
    """A store is done with its server: the last one closes the connections and forgets the protocol."""
    with sharing:
        shared = shared_logins.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del shared_logins[key]
        refresh_ca_files(origin_of(key[0]))  # a closed server's ca_file does not outlive its stores
        if account is None:
            return
        protocol = account.protocol
        with CachingProtocol._protocol_cache_lock:
            cached = CachingProtocol._protocol_cache.get(CachingProtocol._cache_key(protocol.config))
            if cached is not None and cached[0] is protocol:
                del Protocol[protocol.config]
        protocol.close()


__all__ = ["CaFileAdapter", "Shared", "Throttle", "acting", "origin_of", "refresh_ca_files", "release", "shared_logins",
           "sharing"]
