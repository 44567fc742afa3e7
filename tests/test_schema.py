"""schemathesis against the gateway's own /openapi.json, over real HTTP to a live gateway on real
Redis: no request it can generate gets a 500, and every answer matches what the document says."""

from __future__ import annotations

from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import ALICE, LiveStack


def test_api_whenAnyGeneratedRequest_thenNo500AndConformsToSchema(make_stack: Callable[..., LiveStack]) -> None:
    # Short long-polls and stream lifetimes: a generated `wait=30` must not stall the run. A stream's
    # lifetime is checked on the hub's tick (it holds to within one heartbeat), so the heartbeat is
    # short too: at the default 15 s an idle stream (a `tag=` with no jobs yet) stays open until the
    # tick, or until the client's 10 s read timeout cuts it, and a few of those outlast the test.
    stack = make_stack(
        with_worker=False,
        poll_max_wait_s=0.5,
        sse_max_lifetime_s=0.5,
        heartbeat_s=0.2,
        create_rate="100000/minute",
    )
    schema = schemathesis.openapi.from_url(stack.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Case) -> None:
            # Excluded: "every schema-valid body is accepted". A job's `type` must name a handler
            # registered at run time and its `input` must fit that handler's model, which the
            # document cannot spell out for every deployment: those answer 422, with field errors.
            case.call_and_validate(
                headers={**(case.headers or {}), **ALICE}, timeout=10, excluded_checks=[positive_data_acceptance]
            )

        check()
