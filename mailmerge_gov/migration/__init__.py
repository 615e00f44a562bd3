"""Mailbox migration: stores behind one protocol, the copy engine, verification."""
