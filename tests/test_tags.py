"""Tags and metadata on create (API.md 1.1): stored as given, in the create answer and the status."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ALICE, create_job
from tests.helpers import assert_problem


def test_create_whenTagsAndMetadata_thenAnsweredAndInTheStatusAsGiven(client: httpx.Client) -> None:
    metadata = {"chat_id": "42", "nested": {"n": 1.5, "list": [True, None, "ü"]}}
    created = create_job(client, tags=["chat:42", "report", "chat:42", "a_b.c-d"], metadata=metadata)
    assert created["tags"] == ["chat:42", "report", "a_b.c-d"]  # duplicates dropped, first-seen order
    assert created["metadata"] == metadata
    status = client.get(f"/v1/jobs/{created['id']}", headers=ALICE).json()
    assert status["tags"] == ["chat:42", "report", "a_b.c-d"]
    assert status["metadata"] == metadata


def test_create_whenNoTagsOrMetadata_thenEmptyListAndObject(client: httpx.Client) -> None:
    created = create_job(client)
    assert created["tags"] == [] and created["metadata"] == {}
    status = client.get(f"/v1/jobs/{created['id']}", headers=ALICE).json()
    assert status["tags"] == [] and status["metadata"] == {}


def test_metadata_whenExactlyTheLimit_thenAccepted(client: httpx.Client) -> None:
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    metadata = {"k": "x" * (4096 - overhead)}
    assert create_job(client, metadata=metadata)["metadata"] == metadata


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tags": [f"t{n}" for n in range(17)]}, "tags"),
        ({"tags": ["-leading-dash"]}, "tags"),
        ({"tags": ["has space"]}, "tags"),
        ({"tags": ["x" * 129]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"tags": "chat:42"}, "tags"),
        ({"tags": [42]}, "tags"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"metadata": "text"}, "metadata"),
        ({"metadata": {"k": "é" * 2100}}, "metadata"),  # 4,200 bytes of UTF-8
    ],
)
def test_create_whenTagsOrMetadataInvalid_then422NamingTheField(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json={"type": "external", **body}, headers=ALICE)
    problem = assert_problem(response, 422)
    errors = problem["errors"]
    assert isinstance(errors, list) and errors
    assert all(error["loc"][0] == field for error in errors)
