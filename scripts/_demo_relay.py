"""The demo's relay step: `mailmerge-gov relay serve` on loopback forwards a message to a throwaway next hop.

Usage (from scripts/demo): python scripts/_demo_relay.py CONSOLIDATION.toml OLD_ADDRESS

The next hop is an aiosmtpd server inside this script that keeps what it receives, so no mail server has to be
installed. The relay runs from a copy of the consolidation file, next to it (its relative paths stay right), with
[relay] listen and next_hop set to free loopback ports; the copy is removed at the end.
"""

from __future__ import annotations

import json
import queue
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session, SMTP

LOOPBACK = "127.0.0.1"
MESSAGE = ("From: =?utf-8?q?Tr=E1=BA=A7n_Th=E1=BB=8B_B?= <tranthib@example.org>\r\n"
           "To: {to}\r\nSubject: =?utf-8?q?L=E1=BB=8Bch_h=E1=BB=8Dp?=\r\nMessage-ID: <demo-1@example.org>\r\n"
           "\r\nXin chao, hop luc 9 gio sang thu Hai.\r\n")


class NextHop:
    """aiosmtpd handler that keeps the envelopes it receives."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(envelope)
        return "250 2.0.0 Ok: queued"


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def relay_config(config: Path, listen: int, next_hop: int) -> Path:
    """A copy of the consolidation file whose [relay] listens on `listen` and forwards to `next_hop`."""
    text = config.read_text(encoding="utf-8")
    if "\n[relay]\n" not in text:
        raise SystemExit(f"{config}: no [relay] table")
    lines = [line for line in text.split("\n") if not line.startswith(("listen =", "next_hop =", "workers ="))]
    text = "\n".join(lines).replace(
        "\n[relay]\n", f'\n[relay]\nlisten = "{LOOPBACK}:{listen}"\nnext_hop = "smtp://{LOOPBACK}:{next_hop}"\n'
                       "workers = 1\n", 1)
    copy = config.with_name("relay-demo.toml")
    copy.write_text(text, encoding="utf-8")
    return copy


def main() -> int:
    """Start the next hop and the relay, send two messages, show what happened, stop both."""
    config, old_address = Path(sys.argv[1]), sys.argv[2]
    sink = NextHop()
    controller = Controller(sink, hostname=LOOPBACK, port=free_port(), server_hostname="mx.hcm.gov.vn")
    controller.start()
    port = free_port()
    copy = relay_config(config, port, controller.port)
    relay = subprocess.Popen([sys.executable, "-m", "mailmerge_gov", "relay", "serve", "-c", str(copy)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in relay.stderr or ()], daemon=True).start()
    try:
        first = json.loads(lines.get(timeout=20))
        if first.get("event") != "listening":
            raise SystemExit(f"the relay did not start: {first}")
        print(f"relay listening on {first['address']} ({first['addresses']} old addresses in its map), "
              f"next hop {first['next_hop']}")
        with smtplib.SMTP(LOOPBACK, port, timeout=20) as client:
            client.ehlo("mail.example.org")
            code, text = client.mail("tranthib@example.org")
            print(f"MAIL FROM:<tranthib@example.org>  -> {code} {text.decode()}")
            for address in (old_address, "khongco@binhduong.gov.vn"):
                code, text = client.rcpt(address)
                print(f"RCPT TO:<{address}>  -> {code} {text.decode().splitlines()[-1]}")
            try:
                code, text = client.data(MESSAGE.format(to=old_address).encode("ascii"))
                print(f"DATA  -> {code} {text.decode()}")
            except smtplib.SMTPRecipientsRefused:
                print("DATA  -> not sent: no recipient was accepted")
        record = json.loads(lines.get(timeout=20))
        print(f"relay log: {record['event']} {record['result']}, "
              + ", ".join(f"{r['to']} -> {r.get('new') or r['reply']}" for r in record["recipients"]))
        if not sink.received:
            print("next hop received nothing (after the transition the relay refuses old addresses: see above)")
        for envelope in sink.received:
            print(f"next hop received: MAIL FROM:<{envelope.mail_from}> RCPT TO:{envelope.rcpt_tos}; "
                  "the relay added:")
            for line in (envelope.original_content or b"").split(b"\r\n"):
                if line.startswith(b"From:"):
                    break
                print("    " + line.decode("ascii", "replace"))
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()  # it did not drain in time: the demo must not leave it listening
            relay.wait()
        finally:
            controller.stop()
            copy.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
