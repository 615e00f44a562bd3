"""The forwarding relay: address map, SRS, the aiosmtpd handler and the daemon (usable without the CLI)."""
