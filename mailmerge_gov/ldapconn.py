"""Connecting and binding to an LDAP server as the configuration says, with reasons people can act on."""

from __future__ import annotations

import ssl

import ldap3
import ldap3.core.exceptions

from mailmerge_gov.config import LdapServer


class LdapConnectError(Exception):
    """Connecting, StartTLS or binding failed; the message says why (never the password)."""


def open_connection(server: LdapServer, password: str | None, *, read_only: bool = False,
                    get_info: str = ldap3.NONE) -> ldap3.Connection:
    """Connect (ldaps or StartTLS as configured, certificates verified) and bind; return the connection."""
    tls = None
    if server.use_ssl or server.starttls:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(server.ca_file) if server.ca_file else None)
    connection = ldap3.Connection(
        ldap3.Server(server.host, port=server.port, use_ssl=server.use_ssl, tls=tls,
                     connect_timeout=server.timeout, get_info=get_info),
        user=server.bind_dn, password=password, read_only=read_only, raise_exceptions=False,
        auto_referrals=False,
        # ldap3 packs this into SO_RCVTIMEO with struct: it must be an int
        receive_timeout=max(1, round(server.timeout)),
    )
    try:
        connection.open()
        if connection.closed:
            raise LdapConnectError("cannot connect")
        if server.starttls and not connection.start_tls():
            raise LdapConnectError(f"StartTLS failed: {result_reason(connection)}")
        if not connection.bind():
            raise LdapConnectError(f"bind as {server.bind_dn or 'anonymous'} failed: {result_reason(connection)}")
    except ldap3.core.exceptions.LDAPException as exc:
        connection.unbind()
        raise LdapConnectError(failure_reason(exc)) from None
    except LdapConnectError:
        connection.unbind()
        raise
    return connection


def result_reason(connection: ldap3.Connection) -> str:
    """Describe the last LDAP result of a connection."""
    result = connection.result or {}
    text = result.get("description") or "no answer"
    message = result.get("message")
    return f"{text} ({message})" if message else text


def failure_reason(exc: BaseException) -> str:
    """Describe a connection failure the way an administrator reads it."""
    text = str(exc)
    # ldap3 wraps the socket error in a list repr; keep the words a person can act on.
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host",
                   "certificate verify failed"):
        if marker in text:
            return f"cannot connect: {marker[0].lower()}{marker[1:]}"
    return f"connection failed: {text or type(exc).__name__}"
