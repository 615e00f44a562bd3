"""The staff directory on the web: search, person cards, vCards, the unit tree and the old-address lookup."""

from mailmerge_gov.web.app import WebSetupError, app_from_config, create_app

__all__ = ["WebSetupError", "app_from_config", "create_app"]
