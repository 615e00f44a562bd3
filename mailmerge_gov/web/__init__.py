"""The staff directory on the web: search, person cards, vCards, the unit tree and the old-address lookup."""

from mailmerge_gov.web.app import create_app

__all__ = ["create_app"]
