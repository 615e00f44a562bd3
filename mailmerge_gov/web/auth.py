"""Login to the staff directory: an LDAP simple bind as the official, against the new directory; and its throttle."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

import ldap3
import ldap3.core.exceptions
from ldap3.utils.conv import escape_filter_chars

from mailmerge_gov.config import LdapServer, SecretError
from mailmerge_gov.ldapconn import LdapConnectError, open_connection

log = logging.getLogger("mailmerge_gov.web")
MAX_USERNAME = 256
MAX_PASSWORD = 1024


class LoginUnavailable(Exception):
    """The directory could not be asked (down, or the service bind failed): not the official's fault."""


def authenticate(directory: LdapServer, username: str, password: str) -> str | None:
    """The uid of the active official whose uid or mail is `username` and whose password binds; None otherwise."""
    username = username.strip()
    # An empty password is an "unauthenticated bind" (RFC 4513 5.1.2) that many servers accept: never a login.
    if not username or not password or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
        return None
    found = _find(directory, username)
    if found is None:
        log.info("login refused for %r: no single active official has this uid or mail", username)
        return None
    dn, uid = found
    try:
        connection = open_connection(dataclasses.replace(directory, bind_dn=dn), password, read_only=True)
    except LdapConnectError as exc:
        # never the password; the server's reason (invalidCredentials …) is for the log only
        log.info("login refused for %r (%s): %s", username, dn, exc)
        return None
    connection.unbind()
    log.info("login of %s (%s)", uid, dn)
    return uid


def _find(directory: LdapServer, username: str) -> tuple[str, str] | None:
    """The DN and uid of the one active official whose uid or mail is `username`, through the service bind."""
    try:
        password = directory.password.reveal() if directory.password else None
        connection = open_connection(directory, password, read_only=True)
    except (SecretError, LdapConnectError) as exc:
        log.error("login impossible: the directory %s cannot be searched: %s", directory.url, exc)
        raise LoginUnavailable(str(exc)) from None
    try:
        value = escape_filter_chars(username)  # "*)(uid=*" stays text, never filter syntax
        connection.search(directory.base_dn, f"(&(objectClass=inetOrgPerson)(|(uid={value})(mail={value})))",
                          ldap3.SUBTREE, attributes=["uid", "mailmergeAccountStatus"], size_limit=3)
        entries = [item for item in connection.response or () if item.get("type") == "searchResEntry"]
    except ldap3.core.exceptions.LDAPException as exc:
        log.error("login impossible: searching %s failed: %s", directory.url, exc)
        raise LoginUnavailable(str(exc)) from None
    finally:
        connection.unbind()
    if len(entries) != 1:
        return None  # nobody, or two officials answering to one name: bind as neither
    attributes = {name.lower(): values for name, values in entries[0]["attributes"].items()}
    status = attributes.get("mailmergeaccountstatus") or ["active"]
    if str(status[0]).lower() != "active":
        return None  # disabled officials keep their entry (and maybe a password) but not their access
    uid = attributes.get("uid") or [username]
    return entries[0]["dn"], str(uid[0] if isinstance(uid, list) else uid)


@dataclasses.dataclass
class Throttle:
    """Failed logins per key (client address, user name): past `limit` within `window` seconds, refuse for a while."""

    limit: int = 5
    window: float = 300.0
    _failures: dict[str, deque[float]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def blocked(self, *keys: str) -> bool:
        """Whether any key has failed too often lately."""
        now = time.monotonic()
        with self._lock:
            # only keys that failed before: asking about a key must not add it (each visitor's address would)
            return any(len(self._recent(key, now)) >= self.limit for key in keys if key in self._failures)

    def failed(self, *keys: str) -> None:
        """Count one failure against every key."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > 100_000:  # a flood of names must not grow the memory without bound
                self._failures = {k: v for k, v in self._failures.items() if v and now - v[-1] < self.window}

    def succeeded(self, key: str) -> None:
        """Forget a key's failures (the official got in)."""
        with self._lock:
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times
