"""Fault injection: every fault kind, counts, time windows, and the HTTP control API."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import jwt
import pytest

from jobtoken.devserver import DevServer, FaultSet
from tests.devserver_fixtures import (
    access_token_request,
    client_for,
    decode_unverified,
    running_devserver,
)
from tests.fakes import FakeClock

VO = "storage.create:/vo"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def srv(clock: FakeClock) -> Iterator[DevServer]:
    with running_devserver(clock=clock, op_scopes=(VO,)) as server:
        yield server


@pytest.fixture
def client(srv: DevServer) -> Iterator[httpx.Client]:
    with client_for(srv, timeout_s=5.0) as c:
        yield c


def test_status_fault_with_count_then_recovers(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken()
    srv.faults.add("access", status=503, count=2, retry_after_s=7)
    for _ in range(2):
        r = access_token_request(client, mt)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"] == "Service Unavailable"
    assert access_token_request(client, mt).status_code == 200
    statuses = [rec.status for rec in srv.requests("access")]
    assert statuses == [503, 503, 200]
    assert srv.requests("access")[0].fault_id is not None


def test_faulted_request_has_no_effect_unless_process(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(rotation={"on_AT": True})
    srv.faults.add("access", status=502, count=1)
    assert access_token_request(client, mt).status_code == 502
    assert access_token_request(client, mt).status_code == 200  # not rotated by the 502
    mt2 = srv.issue_mytoken(rotation={"on_AT": True})
    srv.faults.add("access", drop=True, process=True, count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        access_token_request(client, mt2)
    # the server rotated, the answer was lost: the old token is dead (the chain is lost)
    assert access_token_request(client, mt2).status_code == 401


def test_oauth_error_fault(srv: DevServer, client: httpx.Client):
    srv.faults.add("my", error="temporarily_unavailable", status=503, count=1)
    r = client.post("/api/v0/token/my", json={"grant_type": "mytoken"})
    assert r.status_code == 503 and r.json() == {"error": "temporarily_unavailable"}


def test_body_and_garbage_faults(srv: DevServer, client: httpx.Client):
    srv.faults.add("discovery", status=200, body="{}", count=1)
    assert client.get("/.well-known/mytoken-configuration").json() == {}
    srv.faults.add("discovery", garbage=True, count=1)
    r = client.get("/.well-known/mytoken-configuration")
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    assert client.get("/.well-known/mytoken-configuration").json()["issuer"] == srv.url


def test_429_fault_is_plain_text(srv: DevServer, client: httpx.Client):
    srv.faults.add("tokeninfo", status=429, retry_after_s=3, count=1)
    r = client.post("/api/v0/tokeninfo", json={})
    assert r.status_code == 429 and r.text == "Too Many Requests"
    assert r.headers["retry-after"] == "3"


def test_drop_fault_closes_without_answer(srv: DevServer, client: httpx.Client):
    srv.faults.add("jwks", drop=True, count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/jwks")
    assert srv.requests("jwks")[0].status == 0
    assert client.get("/jwks").status_code == 200


def test_delay_fault_trips_client_timeout(srv: DevServer):
    srv.faults.add("op-jwks", delay_s=2.0, count=1)
    with client_for(srv, timeout_s=0.3) as fast:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            fast.get("/op/jwks")
        assert time.monotonic() - start < 1.5
    srv.faults.add("op-discovery", delay_s=0.05, count=1)
    with client_for(srv) as c:
        assert c.get("/op/.well-known/openid-configuration").status_code == 200


def test_until_window(srv: DevServer, client: httpx.Client, clock: FakeClock):
    srv.faults.add("revoke", status=500, until=clock.now() + 10)
    assert client.post("/api/v0/token/revoke", json={"token": "x" * 40}).status_code == 500
    clock.advance(11)
    assert client.post("/api/v0/token/revoke", json={"token": "x" * 40}).status_code == 204


def test_clear(srv: DevServer, client: httpx.Client):
    srv.faults.add("jwks", status=500)
    srv.faults.clear()
    assert client.get("/jwks").status_code == 200


@pytest.mark.parametrize("kind", ["alg_none", "hs256"])
def test_unsigned_and_symmetric_token_faults(srv: DevServer, client: httpx.Client, kind: str):
    srv.faults.add("access", token=kind, count=1)
    at = access_token_request(client, srv.issue_mytoken()).json()["access_token"]
    alg = jwt.get_unverified_header(at)["alg"]
    assert alg == {"alg_none": "none", "hs256": "HS256"}[kind]


def test_wider_scope_and_wrong_audience_faults(srv: DevServer, client: httpx.Client):
    mt = srv.issue_mytoken(restrictions=[{"scope": VO, "audience": ["https://se"]}])
    srv.faults.add("access", token="wider_scope", count=1)
    body = access_token_request(client, mt, scope=VO, audience="https://se").json()
    assert "storage.modify:/" in decode_unverified(body["access_token"])["scope"].split()
    srv.faults.add("access", token="wrong_audience", count=1)
    body = access_token_request(client, mt, scope=VO, audience="https://se").json()
    assert decode_unverified(body["access_token"])["aud"] != "https://se"
    assert body["audience"] != ["https://se"]


def test_stale_exp_and_expired_faults(srv: DevServer, client: httpx.Client, clock: FakeClock):
    mt = srv.issue_mytoken()
    first = decode_unverified(access_token_request(client, mt).json()["access_token"])
    clock.advance(300)
    srv.faults.add("access", token="stale_exp", count=1)
    same = decode_unverified(access_token_request(client, mt).json()["access_token"])
    assert same["exp"] == first["exp"]
    srv.faults.add("access", token="expired", count=1)
    dead = decode_unverified(access_token_request(client, mt).json()["access_token"])
    assert dead["exp"] < clock.now()


def owner(srv: DevServer) -> dict:
    return {"Authorization": f"Bearer {srv.control_token}"}


def control(client: httpx.Client, srv: DevServer, rule: dict) -> httpx.Response:
    return client.post("/_devserver/faults", headers=owner(srv), json=rule)


def test_http_control_api(srv: DevServer, client: httpx.Client):
    r = control(client, srv, {"endpoint": "jwks", "status": 500, "count": 1})
    assert r.status_code == 201 and r.json()["id"] >= 1
    assert client.get("/jwks").status_code == 500
    assert control(client, srv, {"endpoint": "jwks", "status": 500}).is_success
    assert client.delete("/_devserver/faults", headers=owner(srv)).status_code == 204
    assert client.get("/jwks").status_code == 200
    bad = control(client, srv, {"endpoint": "nope"})
    assert bad.status_code == 400
    bad = control(client, srv, {"endpoint": "jwks", "token": "hs256"})
    assert bad.status_code == 400


def test_control_api_for_s_window(srv: DevServer, client: httpx.Client, clock: FakeClock):
    control(client, srv, {"endpoint": "jwks", "status": 500, "for_s": 5})
    assert client.get("/jwks").status_code == 500
    clock.advance(6)
    assert client.get("/jwks").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer guessed"}])
def test_control_api_refuses_everyone_but_its_owner(
    srv: DevServer, client: httpx.Client, headers: dict
):
    # issue 12 item 15: any local user reaches loopback; only the owner's secret steers it
    r = client.post("/_devserver/faults", headers=headers, json={"endpoint": "jwks", "status": 500})
    assert r.status_code == 403 and "owner's secret" in r.text
    assert client.delete("/_devserver/faults", headers=headers).status_code == 403
    assert srv.faults.active() == ()
    assert client.get("/jwks").status_code == 200


def test_add_validates() -> None:
    faults = FaultSet(lambda: 0.0)
    with pytest.raises(ValueError):
        faults.add("access", count=0)
    with pytest.raises(ValueError):
        faults.add("access", token="nonsense")
    with pytest.raises(ValueError):
        faults.add_from_json({"endpoint": "access", "colour": "red"})


def test_stop_releases_delayed_requests() -> None:
    srv = DevServer()
    srv.start()
    srv.faults.add("jwks", delay_s=30, count=1)
    results: list = []

    def fetch() -> None:
        try:
            with client_for(srv, timeout_s=10) as c:
                results.append(c.get("/jwks").status_code)
        except httpx.HTTPError as exc:
            results.append(exc)

    worker = threading.Thread(target=fetch)
    worker.start()
    deadline = time.monotonic() + 5
    poll = threading.Event()
    while srv.faults.active() and time.monotonic() < deadline:  # until the fault is taken
        poll.wait(0.01)
    start = time.monotonic()
    srv.stop()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert time.monotonic() - start < 5
    assert results == [200]
