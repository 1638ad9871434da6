"""Minting a restricted sub-mytoken: one routine for job and submission mytokens.

Against the development server: what comes back wider than asked is refused AND
revoked, for the job mytoken of ``prepare`` and the submission mytoken of the
HTCondor credential storer alike (the storer's copy of the check once let a widened
audience through).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from jobtoken._errors import MytokenRejectedError, ProtocolError
from jobtoken._mytokenfile import MytokenSource
from jobtoken._submytoken import SubMytokenRequest, check_minted, mint_sub_mytoken
from jobtoken._tokenfile import write_secret_file
from jobtoken.devserver import DevServer
from tests.devserver_fixtures import running_devserver
from tests.runhelpers import AUD, job_config

OP_SCOPES = ("storage.read:/", "storage.create:/")


@pytest.fixture()
def srv() -> Iterator[DevServer]:
    with running_devserver(at_lifetime_s=1200, op_scopes=OP_SCOPES, default_audience=AUD) as s:
        yield s


def _request(**kw: Any) -> SubMytokenRequest:
    fields: dict = dict(name="jobtoken 1", label="job 1's mytoken", capabilities=("AT",),
                        scopes=("storage.create:/vo/jobs/1",), audiences=(AUD,),
                        exp=int(time.time()) + 3600)
    fields.update(kw)
    return SubMytokenRequest(**fields)


@dataclasses.dataclass(frozen=True)
class _Answer:
    capabilities: tuple = ("AT",)
    restrictions: tuple = ()


@pytest.mark.parametrize(
    ("got", "why"),
    [
        (dict(capabilities=("AT", "create_mytoken")), "capabilities"),
        (dict(restrictions=()), "without restrictions"),
        (dict(restrictions=({"scope": "storage.create:/vo", "exp": 1},)), "scope"),
        (dict(restrictions=({"scope": "storage.create:/vo/jobs/1", "exp": 1},)), "audience"),
        (dict(restrictions=({"scope": "storage.create:/vo/jobs/1", "exp": 1,
                             "audience": [AUD, "https://other"]},)), "audience"),
        (dict(restrictions=({"scope": "storage.create:/vo/jobs/1", "audience": AUD,
                             "exp": 10**10},)), "later expiry"),
    ],
)
def test_an_answer_wider_than_asked_is_refused(got: dict, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        check_minted(_Answer(**got), _request(exp=1000))


def test_an_answer_as_narrow_as_asked_passes() -> None:
    narrow = {"scope": "storage.create:/vo/jobs/1", "audience": [AUD], "exp": 1000}
    check_minted(_Answer(restrictions=(narrow,)), _request(exp=1000))
    check_minted(_Answer(capabilities=(), restrictions=(narrow,)), _request(exp=1000))


def _parent(srv: DevServer, tmp_path: Path, **kw: Any) -> MytokenSource:
    path = tmp_path / "parent.mt"
    write_secret_file(path, srv.issue_mytoken(capabilities=["AT", "create_mytoken"], **kw),
                      newline=False)
    return MytokenSource(path=path)


def _widen_audience(mocker: Any) -> None:
    from jobtoken import _mytoken

    real = _mytoken.MytokenClient.create_mytoken

    def widen(self: Any, *args: Any, **kw: Any) -> Any:
        result = real(self, *args, **kw)
        wider = [dict(r, audience=[*r.get("audience", []), "https://evil"])
                 for r in result.restrictions]
        return dataclasses.replace(result, restrictions=tuple(wider))

    mocker.patch.object(_mytoken.MytokenClient, "create_mytoken", widen)


def test_a_widened_job_mytoken_is_revoked(srv: DevServer, tmp_path: Path, mocker: Any) -> None:
    from jobtoken._oneshot import mytoken_client

    source = _parent(srv, tmp_path)
    _widen_audience(mocker)
    with mytoken_client(job_config(srv, source.path, lifetime_s=1200), srv.url) as client:
        with pytest.raises(ProtocolError, match="job 1's mytoken's audience"):
            mint_sub_mytoken(client, source.path.read_text(), source, _request())
    assert len(srv.requests("revoke")) == 1


def test_the_storer_s_submission_mytoken_gets_the_same_check(
    srv: DevServer, tmp_path: Path, mocker: Any
) -> None:
    from jobtoken.integrations.condor_storer import mint_submission_mytoken

    source = _parent(srv, tmp_path)
    _widen_audience(mocker)
    with pytest.raises(ProtocolError, match="submission mytoken's audience"):
        mint_submission_mytoken(job_config(srv, source.path, lifetime_s=1200), source,
                                scopes=["storage.create:/vo"], audiences=[AUD],
                                lifetime_s=600)
    assert len(srv.requests("revoke")) == 1


def test_a_refusal_leaves_nothing_to_revoke(srv: DevServer, tmp_path: Path) -> None:
    from jobtoken._oneshot import mytoken_client

    source = _parent(srv, tmp_path, restrictions=[{"scope": "storage.create:/vo/jobs/1"}])
    with mytoken_client(job_config(srv, source.path, lifetime_s=1200), srv.url) as client:
        with pytest.raises(MytokenRejectedError):
            mint_sub_mytoken(client, source.path.read_text(), source,
                             _request(scopes=("storage.create:/vo",)))
    assert srv.requests("revoke") == ()


def _forged_mytoken(**claims: Any) -> str:
    """A mytoken look-alike JWT whose claims are chosen by the test (unsigned use only)."""
    import base64
    import json

    def part(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    body = claims.pop("_raw", None) or json.dumps(claims)
    return f"{part(json.dumps({'alg': 'ES512', 'typ': 'MT+JWT'}))}.{part(body)}.c2ln"


def _swap_minted_token(mocker: Any, forged: str) -> None:
    """The server describes a narrow token in JSON but hands out ``forged``."""
    from jobtoken import _mytoken

    real = _mytoken.MytokenClient.create_mytoken

    def swap(self: Any, *args: Any, **kw: Any) -> Any:
        return dataclasses.replace(real(self, *args, **kw), mytoken=forged)

    mocker.patch.object(_mytoken.MytokenClient, "create_mytoken", swap)


_NARROW = {"scope": "storage.create:/vo/jobs/1", "audience": [AUD], "exp": 1}


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        # issue 12 item 13: AT + create_mytoken + tokeninfo, no restrictions, was accepted
        (dict(capabilities=["AT", "create_mytoken", "tokeninfo"]), "capabilities"),
        (dict(capabilities=["AT"]), "no restrictions"),
        (dict(capabilities=["AT"], restrictions=[dict(_NARROW, scope="storage.create:/")]),
         "scope"),
        (dict(capabilities=["AT"], restrictions=[dict(_NARROW, usages_AT=10**7)]), "usages_AT"),
        (dict(capabilities=["AT"], restrictions=[dict(_NARROW, exp=10**10)]), "later expiry"),
        (dict(_raw='{"capabilities":["AT","create_mytoken"],"capabilities":["AT"],'
                   '"restrictions":[]}'), "repeated"),
    ],
)
def test_a_minted_mytoken_whose_own_claims_are_wider_is_refused_and_revoked(
    srv: DevServer, tmp_path: Path, mocker: Any, claims: dict, why: str
) -> None:
    from jobtoken._oneshot import mytoken_client

    source = _parent(srv, tmp_path)
    exp = int(time.time()) + 3600
    for entry in claims.get("restrictions", ()):
        entry["exp"] = entry["exp"] if entry["exp"] > 1 else exp
    _swap_minted_token(mocker, _forged_mytoken(**claims))
    revoke = mocker.spy(__import__("jobtoken._mytoken", fromlist=["x"]).MytokenClient, "revoke")
    with mytoken_client(job_config(srv, source.path, lifetime_s=1200), srv.url) as client:
        with pytest.raises(ProtocolError, match=why):
            mint_sub_mytoken(client, source.path.read_text(), source,
                             _request(exp=exp, usages_at=5))
    assert revoke.call_count == 1


def test_a_minted_jwt_mytoken_as_narrow_as_asked_passes(srv: DevServer, tmp_path: Path) -> None:
    from jobtoken._oneshot import mytoken_client
    from jobtoken._tokens import unverified_claims

    source = _parent(srv, tmp_path)
    with mytoken_client(job_config(srv, source.path, lifetime_s=1200), srv.url) as client:
        minted = mint_sub_mytoken(client, source.path.read_text(), source, _request(usages_at=5))
    assert unverified_claims(minted.mytoken)["capabilities"] == ["AT"]


def test_unverified_claims_refuse_a_repeated_key() -> None:
    from jobtoken._tokens import unverified_claims

    assert unverified_claims(_forged_mytoken(_raw='{"a":1,"a":2}')) is None
    assert unverified_claims(_forged_mytoken(_raw='{"a":{"b":1,"b":2}}')) is None
    assert unverified_claims(_forged_mytoken(a=1)) == {"a": 1}


@pytest.mark.parametrize(
    ("caps", "restrictions", "why"),
    [
        (["AT", "{what}"], [_NARROW], r"grant capabilities \['AT', '\{what\}'\]"),
        ("AT", [_NARROW], "capabilities unreadable"),
        (["AT"], [], "no restrictions"),
        (["AT"], ["storage.read:/"], "unreadable restriction claim"),
        (["AT"], [dict(_NARROW, usages_other=3)], "usages_other"),
    ],
)
def test_the_minted_token_s_own_claims_are_judged_one_rule_at_a_time(
    caps: Any, restrictions: list, why: str
) -> None:
    from jobtoken import _submytoken

    request = _request(exp=1, usages_other=2)
    problem = (_submytoken._claimed_capabilities_problem(caps, request)
               or _submytoken._claimed_restrictions_problem(restrictions, request))
    assert problem is not None and "job 1's mytoken" in problem
    assert re.search(why, problem), problem


def test_claims_as_narrow_as_asked_raise_no_problem() -> None:
    from jobtoken import _submytoken

    request = _request(exp=1, usages_other=2)
    assert _submytoken._claimed_capabilities_problem(["AT"], request) is None
    assert _submytoken._claimed_restrictions_problem(
        [dict(_NARROW, usages_other=2)], request) is None
