"""The broker's wire protocol: one JSON line each way, strict on input, open to new keys."""

from __future__ import annotations

import json

import pytest

from jobtoken._brokerproto import MAX_REQUEST_BYTES, BrokerReply, BrokerRequest, reply_for_error
from jobtoken._errors import (
    IdentityError,
    JobtokenError,
    ProtocolError,
    ServerUnavailableError,
    UsageError,
)


def test_an_adopt_request_keeps_its_anchor_over_the_wire() -> None:
    request = BrokerRequest("adopt", tokendir="/session/x/.jobtoken", anchor_pid=4242)
    assert BrokerRequest.from_json(request.to_json().encode()) == request
    assert "anchor_pid" not in json.loads(BrokerRequest("adopt", tokendir="/d").to_json())


def test_a_request_survives_the_wire_and_unknown_keys_are_ignored() -> None:
    request = BrokerRequest("prepare", tokendir="/scratch/t", scopes=("storage.read:/a",),
                            audiences=("https://se",), min_valid_s=30.0)
    assert BrokerRequest.from_json(request.to_json().encode()) == request
    data = json.loads(request.to_json())
    assert data["v"] == 1
    data["from_the_future"] = {"x": 1}
    assert BrokerRequest.from_json(json.dumps(data).encode()) == request


@pytest.mark.parametrize("line, words", [
    (b"\xff\xfe", "not one line of JSON"),
    (b"[]", "not a JSON object"),
    (b'{"v": 2, "op": "ping"}', "protocol version 2"),
    (b'{"op": "steal"}', "unknown op"),
    (b'{"op": "prepare", "tokendir": 5}', "tokendir must be a string"),
    (b'{"op": "ensure", "min_valid_s": true}', "min_valid_s"),
    (b'{"op": "ensure", "min_valid_s": -1}', "min_valid_s"),
    (b'{"op": "prepare", "scopes": [1]}', "scopes must be a list of strings"),
    (b'{"op": "register", "job": []}', "job must be an object"),
    (b'{"op": "adopt", "anchor_pid": "1234"}', "anchor_pid must be a pid > 1"),
    (b'{"op": "adopt", "anchor_pid": 1}', "anchor_pid must be a pid > 1"),
    (b'{"op": "adopt", "anchor_pid": true}', "anchor_pid must be a pid > 1"),
])
def test_a_bad_request_is_a_usage_error_in_one_line(line: bytes, words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        BrokerRequest.from_json(line)
    assert "\n" not in caught.value.message


def test_a_request_over_64_kib_is_refused_unparsed() -> None:
    line = json.dumps({"op": "ping", "pad": "x" * MAX_REQUEST_BYTES}).encode()
    with pytest.raises(UsageError, match="larger than"):
        BrokerRequest.from_json(line)


def test_a_reply_survives_the_wire_and_a_failure_raises_its_own_class() -> None:
    reply = BrokerReply(True, 0, "prepared", expires_at=1.5e9, bearer_token_file="/s/bt",
                        job_id="j", detail={"renewed": True})
    assert BrokerReply.from_json(reply.to_json().encode()) == reply
    reply.raise_for_failure()
    refused = BrokerReply.from_json(reply_for_error(IdentityError("who?")).to_json().encode())
    with pytest.raises(IdentityError, match="who?") as caught:
        refused.raise_for_failure()
    assert caught.value.exit_code == 67
    busy = reply_for_error(ServerUnavailableError("wait"))
    with pytest.raises(ServerUnavailableError) as unavailable:
        BrokerReply.from_json(busy.to_json().encode()).raise_for_failure()
    assert unavailable.value.retryable and unavailable.value.exit_code == 75
    odd = BrokerReply(False, 99, "odd")
    with pytest.raises(JobtokenError) as other:
        odd.raise_for_failure()
    assert other.value.exit_code == 1


def test_an_unforeseen_error_says_only_its_type() -> None:
    reply = reply_for_error(KeyError("secret-looking detail"))
    assert reply.exit_code == 1 and "secret" not in reply.message and "KeyError" in reply.message


@pytest.mark.parametrize("line", [b"garbage", b'{"ok": "yes", "exit_code": 0, "message": ""}',
                                  b'{"ok": true, "exit_code": true, "message": ""}'])
def test_a_garbled_reply_is_a_retryable_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        BrokerReply.from_json(line)
    assert caught.value.retryable
