"""The OpenAPI 3.1 description of the directory's JSON API, served at /api/openapi.json (written by hand)."""

from __future__ import annotations

from mailmerge_gov import __version__

_PERSON = {
    "type": "object",
    # the other fields are present only when the caller may see them: [web] public_fields, or all after login
    "required": ["uid", "full_name"],
    "description": "An official. Fields that are not public ([web] public_fields; the mobile number by default) "
                   "are left out unless the request carries the session cookie of an official who logged in.",
    "properties": {
        "uid": {"type": "string"},
        "full_name": {"type": "string"},
        "title": {"type": "string"},
        "unit": {"type": "string"},
        "unit_path": {"type": "array", "items": {"type": "string"},
                      "description": "from the top of the new organisation down to the official's unit"},
        "mail": {"type": "string", "format": "email"},
        "phones": {"type": "array", "items": {"type": "string"}, "description": "office numbers"},
        "mobile": {"type": "array", "items": {"type": "string"}},
        "old_addresses": {"type": "array", "items": {"type": "string"}},
        "old_units": {"type": "array", "items": {"type": "string"}},
    },
}
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "mailmerge-gov staff directory", "version": __version__,
             "description": "Active officials of the new organisation (disabled accounts are never listed). Fields "
                            "that are not public are left out, and never searched, unless the request carries the "
                            "session cookie of an official who logged in on the site (/login)."},
    "paths": {
        "/api/people": {"get": {
            "summary": "Search officials by name (diacritics optional), initials, address, phone, title or unit",
            "parameters": [
                {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 200},
                 "description": "the search text; longer text is cut; an empty query finds nobody"},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                                             "default": 20}}],
            "responses": {"200": {"description": "the officials found, best first", "content": _json("SearchResult")},
                          "400": _ERROR, "503": _ERROR}}},
        "/api/people/{uid}": {"get": {
            "summary": "One official",
            "parameters": [{"name": "uid", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the official", "content": _json("Person")},
                          "404": _ERROR, "503": _ERROR}}},
        "/api/units": {"get": {
            "summary": "The unit tree with member counts",
            "responses": {"200": {"description": "the top units", "content": _json("UnitTree")}, "503": _ERROR}}},
        "/api/lookup": {"get": {
            "summary": "Where did this address go? An old or current address to the official who has it now",
            "parameters": [{"name": "address", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the answer (found is false when no active official has it)",
                                  "content": _json("Lookup")}, "400": _ERROR, "503": _ERROR}}},
    },
    "components": {"schemas": {
        "Person": _PERSON,
        "SearchResult": {"type": "object", "required": ["query", "count", "people"], "properties": {
            "query": {"type": "string"}, "count": {"type": "integer"},
            "people": {"type": "array", "items": {"$ref": "#/components/schemas/Person"}}}},
        "Unit": {"type": "object", "required": ["code", "name", "path", "members", "total", "children"], "properties": {
            "code": {"type": "string", "description": "the unit's code in the new directory (mailmergeUnitCode)"},
            "name": {"type": "string"}, "path": {"type": "array", "items": {"type": "string"}},
            "members": {"type": "integer", "description": "officials directly in this unit"},
            "total": {"type": "integer", "description": "officials in this unit and all units below it"},
            "children": {"type": "array", "items": {"$ref": "#/components/schemas/Unit"}}}},
        "UnitTree": {"type": "object", "required": ["units"], "properties": {
            "units": {"type": "array", "items": {"$ref": "#/components/schemas/Unit"}}}},
        "Lookup": {"type": "object", "required": ["address", "found", "current", "person"], "properties": {
            "address": {"type": "string"}, "found": {"type": "boolean"},
            "current": {"type": "boolean", "description": "true when the address is the official's address today"},
            "person": {"oneOf": [{"$ref": "#/components/schemas/Person"}, {"type": "null"}]}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    }},
}
