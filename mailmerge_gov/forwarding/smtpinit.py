"""aiosmtpd's SMTP.__init__ without its per-connection reflection: the method tables built once per class."""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
from typing import Any

import aiosmtpd
from aiosmtpd import smtp as aiosmtpd_smtp

# aiosmtpd 1.4 builds each connection's tables of smtp_*, auth_* and handle_* methods with inspect.getmembers()
# and dir() over the server and the handler: about 90 us per connection, a fifth of the relay's time when a
# client opens a session per message. They depend only on the classes (and on a handler's own attributes,
# looked at too), so they are listed once per class here and bound per connection. The rest is
# SMTP.__init__ of aiosmtpd 1.4.6 as it is, for the options the relay uses; with another aiosmtpd version, or
# other options, the relay calls SMTP.__init__ itself (tests/test_relay_data.py compares both).
SUPPORTED_VERSION = "1.4.6"
OPTIONS = frozenset({"data_size_limit", "enable_SMTPUTF8", "decode_data", "hostname", "ident", "tls_context",
                     "require_starttls", "timeout", "loop"})
_names: dict[tuple[type, str], tuple[tuple[str, str], ...]] = {}
_ehlo_parameters: dict[Any, int] = {}  # a handle_EHLO method's function -> its bound signature's parameter count


def applicable(options: dict[str, Any]) -> bool:
    """Whether init() can stand in for SMTP.__init__ with these keyword arguments."""
    return aiosmtpd.__version__ == SUPPORTED_VERSION and options.keys() <= OPTIONS


def _class_names(cls: type, prefix: str) -> tuple[tuple[str, str], ...]:
    """(name without the prefix, attribute name) of the class attributes starting with `prefix`, in dir() order."""
    key = (cls, prefix)
    names = _names.get(key)
    if names is None:
        names = _names[key] = tuple((name.replace(prefix, ""), name) for name in dir(cls) if name.startswith(prefix))
    return names


def _names_of(obj: object, prefix: str, own: bool = True) -> tuple[tuple[str, str], ...]:
    """What dir(obj) would list with `prefix`: the class's names and (with `own`) the instance's own."""
    names = _class_names(type(obj), prefix)
    if not own:
        return names
    extra = [name for name in getattr(obj, "__dict__", ()) if name.startswith(prefix)]
    if not extra:
        return names
    return tuple(sorted({*names, *((name.replace(prefix, ""), name) for name in extra)}, key=lambda item: item[1]))


def init(server: aiosmtpd_smtp.SMTP, handler: Any, *, data_size_limit: int | None = aiosmtpd_smtp.DATA_SIZE_DEFAULT,
         enable_SMTPUTF8: bool = False, decode_data: bool = False, hostname: str | None = None,  # noqa: N803
         ident: str | None = None, tls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
         timeout: float = 300, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Initialise `server` as aiosmtpd 1.4.6's SMTP.__init__ does (no AUTH, no PROXY, no command call limit)."""
    server.__ident__ = ident or aiosmtpd_smtp.__ident__  # type: ignore[misc]
    server.loop = loop if loop else aiosmtpd_smtp.make_loop()
    asyncio.StreamReaderProtocol.__init__(
        server, asyncio.StreamReader(loop=server.loop, limit=server.line_length_limit),
        client_connected_cb=server._cb_client_connected, loop=server.loop)
    server.event_handler = handler
    assert data_size_limit is None or isinstance(data_size_limit, int)
    server.data_size_limit = data_size_limit
    server.enable_SMTPUTF8 = enable_SMTPUTF8
    server._decode_data = decode_data
    server.command_size_limits.clear()
    server.hostname = hostname if hostname else socket.getfqdn()
    server.tls_context = tls_context
    if tls_context:
        if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:  # noqa: DUO122
            aiosmtpd_smtp.log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                                      "this might cause client connection problems")
        elif tls_context.check_hostname:
            aiosmtpd_smtp.log.warning("tls_context.check_hostname == True; this might cause client connection problems")
    server.require_starttls = tls_context and require_starttls  # type: ignore[assignment]
    server._timeout_duration = timeout
    server._timeout_handle = None
    server._tls_handshake_okay = True
    server._tls_protocol = None
    server._original_transport = None
    server.session = None
    server.envelope = None
    server.transport = None
    server._handler_coroutine = None
    server._auth_require_tls = True
    server._proxy_timeout = None
    server._auth_callback = aiosmtpd_smtp.login_always_fail
    server._authenticator = None
    server._auth_required = False
    # The server's own instance attributes are not looked at (own=False): none is set before this point.
    server._auth_methods = {
        getattr(method, "__auth_mechanism_name__", short.replace("__", "-")):
            aiosmtpd_smtp._AuthMechAttr(method, obj is server)
        for obj, own in ((server, False), (handler, True))
        for short, name in _names_of(obj, "auth_", own)
        for method in (getattr(obj, name),)
    }  # aiosmtpd also logs the mechanisms at INFO for every connection; the relay offers no AUTH, so not here
    server._handle_hooks = {short: getattr(handler, name) for short, name in _names_of(handler, "handle_")}
    ehlo_hook = server._handle_hooks.get("EHLO")
    if ehlo_hook is None:
        server._ehlo_hook_ver = None
    else:
        function = getattr(ehlo_hook, "__func__", None)
        parameters = _ehlo_parameters.get(function) if function is not None else None
        if parameters is None:
            parameters = len(inspect.signature(ehlo_hook).parameters)
            if function is not None:
                _ehlo_parameters[function] = parameters
        if parameters not in (4, 5):
            raise RuntimeError("Unsupported EHLO Hook")
        if parameters == 4:  # aiosmtpd warns about the old form: let it
            aiosmtpd_smtp.SMTP.__init__(server, handler, data_size_limit=data_size_limit,
                                        enable_SMTPUTF8=enable_SMTPUTF8, decode_data=decode_data, hostname=hostname,
                                        ident=ident, tls_context=tls_context, require_starttls=require_starttls,
                                        timeout=timeout, loop=loop)
            return
        server._ehlo_hook_ver = "new"
    server._smtp_methods = {short: getattr(server, name) for short, name in _names_of(server, "smtp_", own=False)}
    server._enforce_call_limit = False

