"""An Idempotency-Key whose job was deleted is free again: a retry creates a new job instead of
answering with the deleted job's body (README: "Idempotency")."""

from __future__ import annotations

import httpx

from tests.conftest import ALICE


def test_idempotencyKey_whenItsJobWasDeleted_thenARetryCreatesANewJob(client: httpx.Client) -> None:
    headers = {**ALICE, "Idempotency-Key": "order-7"}
    first = client.post("/v1/jobs", json={"type": "external"}, headers=headers)
    assert first.status_code == 201
    replay = client.post("/v1/jobs", json={"type": "external"}, headers=headers)
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert client.delete(f"/v1/jobs/{first.json()['id']}", headers=ALICE).status_code == 204
    again = client.post("/v1/jobs", json={"type": "external", "input": {"n": 2}}, headers=headers)
    assert again.status_code == 201, again.text
    assert again.json()["id"] != first.json()["id"]
    assert client.get(f"/v1/jobs/{again.json()['id']}", headers=ALICE).status_code == 200
    repeat = client.post("/v1/jobs", json={"type": "external", "input": {"n": 2}}, headers=headers)
    assert repeat.status_code == 200 and repeat.json()["id"] == again.json()["id"]
