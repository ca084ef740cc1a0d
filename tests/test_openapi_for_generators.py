"""The OpenAPI document says through `required` alone which fields may be left out, the way
client generators read it (a TypeScript client compiled from it: test_typescript_client)."""

from __future__ import annotations

import json

import msgspec
from openapi_spec_validator import validate

import app


def schemas() -> dict:
    return json.loads(app.openapi_document())["components"]["schemas"]


def test_the_document_is_valid_openapi_3_1():
    validate(json.loads(app.openapi_document()))


def test_a_request_body_field_the_client_may_leave_out_is_optional_and_has_no_default():
    """openapi-typescript makes a property with a `default` required; so the default is told in
    the description instead."""
    new_todo, changes = schemas()["NewTodo"], schemas()["TodoChanges"]
    assert new_todo["required"] == ["title"]
    assert changes.get("required", []) == [] and changes["minProperties"] == 1
    for schema in (new_todo, changes):
        assert schema["additionalProperties"] is False
        assert all("default" not in field for field in schema["properties"].values())
    assert "false when left out" in new_todo["properties"]["completed"]["description"]
    assert msgspec.json.decode(b'{"title": "x"}', type=app.NewTodo).completed is False


def test_the_todo_schema_is_unchanged():
    assert schemas()["Todo"] == {
        "title": "Todo",
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "title": {"type": "string"},
            "completed": {"type": "boolean"},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
        },
        "required": ["id", "title", "completed", "created_at", "updated_at"],
    }


def test_a_response_field_is_required_exactly_when_it_is_always_sent():
    """Every field of a response is sent, defaults included, except in /readyz's body, which
    leaves out what it does not know (omit_defaults): those fields are optional, with no
    default that a generator could read as "always there"."""
    found = schemas()
    for name in ("Problem", "Health", "PoolStatus", "TokenStatus", "ReplacementStatus", "IdleReleaseStatus"):
        assert found[name]["required"] == list(found[name]["properties"]), name
    assert found["Problem"]["required"] == ["type", "title", "status", "detail"]
    readiness = found["Readiness"]
    assert readiness["required"] == ["status", "database"]
    assert all("default" not in field for field in readiness["properties"].values())
    sent = msgspec.json.decode(app.encoder.encode(app.Readiness(status="ok", database="reachable")))
    assert sent == {"status": "ok", "database": "reachable"}


def test_location_is_a_required_header_of_a_create():
    created = json.loads(app.openapi_document())["paths"]["/todos"]["post"]["responses"]["201"]
    assert created["headers"]["Location"]["required"] is True
