"""MytokenStore, the dev server's memory of every mytoken, driven directly with a FakeClock.

The end-to-end modules check the answers on the wire. This module checks what they cannot
pin down precisely: exact time boundaries, what rotation keeps and what it kills, how far a
revocation reaches, and which counter a use lands on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Optional, Sequence

import jwt
import pytest

from jobtoken.devserver._keys import SigningKey, new_signing_key
from jobtoken.devserver._responses import ApiError
from jobtoken.devserver._restrictions import Restriction
from jobtoken.devserver._state import MytokenRecord, MytokenStore, Rotation, is_jwt
from tests.fakes import FakeClock

ISSUER = "http://127.0.0.1:8000"
OP = ISSUER + "/op"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key() -> SigningKey:
    return new_signing_key("ES512", "mytoken")


@pytest.fixture
def store(key: SigningKey) -> MytokenStore:
    return MytokenStore(key=key, issuer=ISSUER, oidc_issuer=OP)


def issue(
    store: MytokenStore,
    clock: FakeClock,
    *,
    restrictions: Sequence[Restriction] = (),
    capabilities: Sequence[str] = ("AT", "create_mytoken"),
    rotation: Optional[Rotation] = None,
    name: str = "",
    parent: Optional[MytokenRecord] = None,
) -> MytokenRecord:
    return store.create(
        oidc_sub="dev-user",
        restrictions=tuple(restrictions),
        capabilities=capabilities,
        rotation=rotation,
        name=name,
        now=clock.now(),
        parent=parent,
    )


def verified_claims(key: SigningKey, token: str) -> Dict[str, Any]:
    """Claims of a mytoken as a client checks them: signature via the JWKS, aud = issuer.

    Time claims are compared by the tests against the FakeClock, not against the wall clock.
    """
    signing = jwt.PyJWKSet.from_dict(key.jwks())[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        signing.key,
        algorithms=[key.alg],
        audience=ISSUER,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )


def use(store: MytokenStore, token: str, now: float) -> MytokenRecord:
    """What every endpoint does with a presented mytoken: resolve, then authenticate."""
    token_jwt, _ = store.resolve(token)
    return store.authenticate(token_jwt, now)


def api_error(exc_info: pytest.ExceptionInfo) -> tuple:
    err = exc_info.value
    return err.status, err.error, err.description


# --- rotation policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        [],
        "on_AT",
        {"on_AT": 1},
        {"auto_revoke": "true"},
        {"lifetime": -1},
        {"lifetime": True},
        {"lifetime": 1.5},
    ],
)
def test_rotation_policy_rejects_wrong_wire_types(raw: object) -> None:
    """The mytoken endpoint turns this ValueError into 400 invalid_request."""
    with pytest.raises(ValueError):
        Rotation.from_json(raw)


def test_rotation_policy_round_trips_and_omits_defaults() -> None:
    assert Rotation.from_json(None) is None
    assert Rotation.from_json({}) == Rotation()
    full = {"on_AT": True, "on_other": True, "lifetime": 60, "auto_revoke": True}
    assert Rotation.from_json(full).to_json() == full
    # Go omitempty: a policy that never rotates has nothing to say on the wire
    assert Rotation.from_json({"on_AT": False, "lifetime": 0}).to_json() == {}


# --- creation and the token response ---------------------------------------------------------


def test_mytoken_exp_is_latest_entry_exp_and_absent_when_one_entry_is_unlimited(
    store: MytokenStore, key: SigningKey, clock: FakeClock
) -> None:
    now = int(clock.now())
    bounded = issue(
        store,
        clock,
        restrictions=[Restriction(scope="a", exp=now + 100), Restriction(scope="b", exp=now + 500)],
        rotation=Rotation(on_AT=True),
        name="job",
    )
    header = jwt.get_unverified_header(bounded.jwt)
    assert header["typ"] == "MT+JWT" and header["kid"] == key.kid
    claims = verified_claims(key, bounded.jwt)
    assert claims["exp"] == now + 500
    assert claims["iat"] == claims["nbf"] == now
    assert claims["jti"] == bounded.id and claims["seq_no"] == 1
    assert claims["restrictions"] == [
        {"scope": "a", "exp": now + 100},
        {"scope": "b", "exp": now + 500},
    ]
    assert claims["rotation"] == {"on_AT": True} and claims["name"] == "job"

    unlimited = issue(
        store, clock, restrictions=[Restriction(scope="a", exp=now + 100), Restriction(scope="b")]
    )
    assert "exp" not in verified_claims(key, unlimited.jwt)
    assert "exp" not in verified_claims(key, issue(store, clock).jwt)


def test_entries_that_all_start_later_make_the_jwt_not_valid_yet(
    store: MytokenStore, clock: FakeClock
) -> None:
    now = int(clock.now())
    record = issue(
        store,
        clock,
        restrictions=[Restriction(scope="a", nbf=now + 50), Restriction(scope="b", nbf=now + 80)],
    )
    with pytest.raises(ApiError) as err:
        store.authenticate(record.jwt, clock.now())
    assert api_error(err) == (401, "invalid_token", "token is not valid yet")
    clock.advance(50)
    assert store.authenticate(record.jwt, clock.now()) is record


def test_token_response_is_the_api_mytoken_response(store: MytokenStore, clock: FakeClock) -> None:
    now = int(clock.now())
    entry = Restriction(scope="a", exp=now + 3600, usages_AT=3)
    record = issue(
        store, clock, restrictions=[entry], capabilities=["AT"], rotation=Rotation(on_other=True)
    )
    clock.advance(100.7)
    assert store.token_response(record, "token", clock.now()) == {
        "mytoken": record.jwt,
        "mytoken_type": "token",
        "expires_in": 3500,
        "mom_id": record.mom_id,
        "restrictions": [{"scope": "a", "exp": now + 3600, "usages_AT": 3}],
        "capabilities": ["AT"],
        "rotation": {"on_other": True},
    }
    bare = issue(store, clock, capabilities=["AT"])
    out = store.token_response(bare, "short_token", clock.now())
    # unlimited, unrestricted, not rotating: those keys are omitted, not null
    assert set(out) == {"mytoken", "mytoken_type", "mom_id", "capabilities"}
    assert out["mytoken_type"] == "short_token"
    assert store.resolve(out["mytoken"]) == (bare.jwt, "short_token")


# --- short tokens and resolving presented strings ----------------------------------------------


def test_short_tokens_are_fresh_opaque_strings_of_the_configured_length(
    key: SigningKey, clock: FakeClock
) -> None:
    store = MytokenStore(key=key, issuer=ISSUER, oidc_issuer=OP, short_token_len=40)
    record = issue(store, clock)
    first, second = store.short_token_for(record), store.short_token_for(record)
    assert first != second
    for short in (first, second):
        assert len(short) == 40 and short.isascii() and short.isalnum()
        assert not is_jwt(short)
        assert store.resolve(short) == (record.jwt, "short_token")
    assert store.resolve(record.jwt) == (record.jwt, "token")


@pytest.mark.parametrize("token", ["x" * 31, "y" * 32])
def test_too_short_or_unknown_strings_are_not_valid_tokens(store: MytokenStore, token: str) -> None:
    """Fact 7: 400 invalid_request "token not valid", not 401 (the server fails parsing)."""
    with pytest.raises(ApiError) as err:
        store.resolve(token)
    assert api_error(err) == (400, "invalid_request", "token not valid")


def test_revoked_short_token_is_not_valid_like_an_unknown_one(
    store: MytokenStore, clock: FakeClock
) -> None:
    """Fact 7: an unknown or revoked short token is 400 invalid_request "token not valid".

    The real server deletes a revoked mytoken's row, and its short tokens go with it
    (``ProxyTokens.MT_id ... ON DELETE CASCADE``). That holds whichever way the mytoken was
    revoked: through a parent's recursive revocation, by mom_id, or by auto_revoke.
    """
    parent = issue(store, clock)
    child = issue(store, clock, parent=parent)
    short = store.short_token_for(child)
    assert use(store, short, clock.now()) is child
    store.revoke(parent.id, recursive=True)
    with pytest.raises(ApiError) as err:
        use(store, short, clock.now())
    assert api_error(err) == (400, "invalid_request", "token not valid")


# --- signature and time checks -------------------------------------------------------------------


def test_jwt_expiry_is_checked_to_the_second(store: MytokenStore, clock: FakeClock) -> None:
    now = int(clock.now())
    record = issue(store, clock, restrictions=[Restriction(exp=now + 100)])
    clock.advance(100)
    assert store.authenticate(record.jwt, clock.now()) is record
    clock.advance(1)
    with pytest.raises(ApiError) as err:
        store.authenticate(record.jwt, clock.now())
    assert api_error(err) == (401, "invalid_token", "token is expired by 1s")


def test_tokens_of_another_server_are_invalid_token(
    store: MytokenStore, key: SigningKey, clock: FakeClock
) -> None:
    other_key = MytokenStore(key=new_signing_key("ES512", "mytoken"), issuer=ISSUER, oidc_issuer=OP)
    with pytest.raises(ApiError) as err:
        store.parse(issue(other_key, clock).jwt, clock.now())
    assert api_error(err) == (401, "invalid_token", "signature is invalid")

    other_url = MytokenStore(key=key, issuer="http://127.0.0.1:9999", oidc_issuer=OP)
    with pytest.raises(ApiError) as err:
        store.parse(issue(other_url, clock).jwt, clock.now())
    assert api_error(err) == (401, "invalid_token", "invalid issuer")

    # same key and URL (a restarted server sharing its RSA key): the jti is unknown here
    restarted = MytokenStore(key=key, issuer=ISSUER, oidc_issuer=OP)
    with pytest.raises(ApiError) as err:
        store.authenticate(issue(restarted, clock).jwt, clock.now())
    assert api_error(err) == (401, "invalid_token", "")

    with pytest.raises(ApiError) as err:
        store.parse("not.a.jwt", clock.now())
    assert api_error(err)[:2] == (401, "invalid_token")


# --- rotation ------------------------------------------------------------------------------------


def test_rotation_keeps_identity_and_exp_and_kills_the_previous_jwt(
    store: MytokenStore, key: SigningKey, clock: FakeClock
) -> None:
    now = int(clock.now())
    record = issue(
        store,
        clock,
        restrictions=[Restriction(scope="a", exp=now + 3600)],
        rotation=Rotation(on_AT=True),
    )
    previous = record.jwt
    clock.advance(10)
    store.rotate(record, clock.now())
    claims = verified_claims(key, record.jwt)
    assert claims["jti"] == record.id and claims["seq_no"] == record.seq_no == 2
    assert claims["iat"] == claims["nbf"] == now + 10
    assert claims["exp"] == now + 3600  # rotating must not extend the mytoken's life
    assert store.authenticate(record.jwt, clock.now()) is record
    with pytest.raises(ApiError) as err:
        store.authenticate(previous, clock.now())
    assert api_error(err) == (401, "invalid_token", "")
    # without auto_revoke, a stale copy is refused but does no harm to the chain
    assert not record.revoked
    assert store.authenticate(record.jwt, clock.now()) is record


def test_rotation_lifetime_bounds_each_token_of_the_chain(
    store: MytokenStore, key: SigningKey, clock: FakeClock
) -> None:
    now = int(clock.now())
    record = issue(store, clock, rotation=Rotation(on_AT=True, lifetime=100))
    clock.advance(100)
    assert store.authenticate(record.jwt, clock.now()) is record  # at the limit: still valid
    store.rotate(record, clock.now())
    assert verified_claims(key, record.jwt)["exp"] == now + 200
    clock.advance(100)
    assert store.authenticate(record.jwt, clock.now()) is record
    clock.advance(1)
    with pytest.raises(ApiError) as err:
        store.authenticate(record.jwt, clock.now())
    assert api_error(err)[:2] == (401, "invalid_token")


def test_stale_use_with_auto_revoke_revokes_the_whole_subtree_only(
    store: MytokenStore, clock: FakeClock
) -> None:
    root = issue(store, clock, rotation=Rotation(on_AT=True, auto_revoke=True))
    child = issue(store, clock, parent=root)
    grandchild = issue(store, clock, parent=child)
    bystander = issue(store, clock)
    stale = root.jwt
    store.rotate(root, clock.now())
    with pytest.raises(ApiError):
        store.authenticate(stale, clock.now())
    assert root.revoked and child.revoked and grandchild.revoked
    assert not bystander.revoked
    with pytest.raises(ApiError) as err:
        store.authenticate(root.jwt, clock.now())  # the current token of the chain is dead too
    assert api_error(err) == (401, "invalid_token", "")


def test_auto_revoke_also_fires_when_the_rotation_lifetime_ran_out(
    store: MytokenStore, clock: FakeClock
) -> None:
    root = issue(store, clock, rotation=Rotation(on_AT=True, lifetime=60, auto_revoke=True))
    child = issue(store, clock, parent=root)
    clock.advance(61)
    with pytest.raises(ApiError):
        store.authenticate(root.jwt, clock.now())
    assert root.revoked and child.revoked


# --- revocation, tree and ancestry ---------------------------------------------------------------


def test_revocation_reaches_descendants_only_when_recursive_and_counts_new_ones(
    store: MytokenStore, clock: FakeClock
) -> None:
    root = issue(store, clock)
    a = issue(store, clock, parent=root)
    a1 = issue(store, clock, parent=a)
    b = issue(store, clock, parent=root)
    assert store.revoke(a.id, recursive=True) == 2
    assert a.revoked and a1.revoked and not root.revoked and not b.revoked
    assert store.revoke(a.id, recursive=True) == 0  # nothing new was revoked
    assert store.revoke("no-such-id", recursive=True) == 0
    assert store.revoke(root.id, recursive=False) == 1
    assert store.authenticate(b.jwt, clock.now()) is b
    assert store.revoke_all() == 1  # only b was still live


def test_recursive_revocation_skips_children_orphaned_by_an_earlier_revocation(
    store: MytokenStore, clock: FakeClock
) -> None:
    """Revoking deletes the mytoken's row, and its children's ``parent_id`` becomes NULL
    (``MTokens ... ON DELETE SET NULL``). Such a child has no ancestors any more, so a later
    recursive revocation of its former grandparent (``MTokens_RevokeRec`` walks
    ``parent_id``) leaves it alone. docs/devserver.md describes this SET NULL model.
    """
    root = issue(store, clock)
    middle = issue(store, clock, parent=root)
    leaf = issue(store, clock, parent=middle)
    store.revoke(middle.id, recursive=False)
    assert store.authenticate(leaf.jwt, clock.now()) is leaf
    revoked = store.revoke(root.id, recursive=True)
    assert store.authenticate(leaf.jwt, clock.now()) is leaf
    assert revoked == 1


def test_subtree_lists_live_descendants_with_their_creation_time(
    store: MytokenStore, clock: FakeClock
) -> None:
    t0 = int(clock.now())
    root = issue(store, clock, name="root")
    clock.advance(5)
    a = issue(store, clock, parent=root, name="a")
    clock.advance(5)
    a1 = issue(store, clock, parent=a)
    gone = issue(store, clock, parent=root, name="gone")
    store.revoke(gone.id, recursive=False)
    assert store.subtree(root) == {
        "token": {"mom_id": root.mom_id, "created": t0, "name": "root"},
        "children": [
            {
                "token": {"mom_id": a.mom_id, "created": t0 + 5, "name": "a"},
                "children": [{"token": {"mom_id": a1.mom_id, "created": t0 + 10}}],
            }
        ],
    }
    direct = [c.id for c in store.children(root.id)]
    assert a.id in direct and a1.id not in direct


def test_ancestry_and_mom_id_lookup(store: MytokenStore, clock: FakeClock) -> None:
    """Revocation by mom_id is allowed to ancestors; these answer who is one."""
    root = issue(store, clock)
    child = issue(store, clock, parent=root)
    grandchild = issue(store, clock, parent=child)
    stranger = issue(store, clock)
    assert store.is_ancestor(root, grandchild) and store.is_ancestor(child, grandchild)
    assert not store.is_ancestor(grandchild, root)
    assert not store.is_ancestor(grandchild, grandchild)
    assert not store.is_ancestor(stranger, grandchild)
    assert store.by_mom_id(child.mom_id) is child
    assert store.by_mom_id("0" * 64) is None
    assert len({r.mom_id for r in (root, child, grandchild, stranger)}) == 4


# --- usage counting ------------------------------------------------------------------------------


def test_usages_are_counted_per_token_and_entry_and_survive_rotation(
    store: MytokenStore, clock: FakeClock
) -> None:
    """A budget that reset on rotation, or leaked into sub-tokens, would not be a budget."""
    e1 = Restriction(scope="a", usages_AT=5, usages_other=2)
    e2 = Restriction(scope="b", usages_AT=1)
    parent = issue(store, clock, restrictions=[e1, e2], rotation=Rotation(on_AT=True))
    child = issue(store, clock, restrictions=[e1], parent=parent)
    store.count_at(parent, e1)
    store.count_at(parent, e1)
    store.count_other(parent, e1)
    store.rotate(parent, clock.now())
    store.count_at(parent, e1)
    assert store.at_used(parent, e1) == 3 and store.other_used(parent, e1) == 1
    assert store.at_used(parent, e2) == 0
    assert store.at_used(child, e1) == 0 and store.other_used(child, e1) == 0

    info = store.introspection(parent, "token")
    assert info["valid"] is True and info["token_type"] == "token"
    assert info["mom_id"] == parent.mom_id and info["token"]["seq_no"] == 2
    assert info["token"]["restrictions"] == [
        {
            "scope": "a",
            "usages_AT": 5,
            "usages_other": 2,
            "usages_AT_done": 3,
            "usages_other_done": 1,
        },
        {"scope": "b", "usages_AT": 1},  # never used: no *_done keys, as on the real server
    ]


# --- concurrency and secrecy ---------------------------------------------------------------------


def test_store_calls_work_inside_the_held_store_lock(store: MytokenStore, clock: FakeClock) -> None:
    """Handlers hold ``store.lock`` for a whole request and call the store inside it."""
    finished = threading.Event()

    def one_request() -> None:
        with store.lock:
            record = issue(store, clock)
            store.rotate(record, clock.now())
            store.authenticate(record.jwt, clock.now())
            store.revoke(record.id, recursive=True)
        finished.set()

    worker = threading.Thread(target=one_request, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert finished.is_set()


def test_no_token_string_reaches_the_log(
    store: MytokenStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jobtoken.devserver")
    root = issue(store, clock, rotation=Rotation(on_AT=True, auto_revoke=True))
    child = issue(store, clock, parent=root)
    secrets = [root.jwt, child.jwt, store.short_token_for(child)]
    stale = root.jwt
    store.rotate(root, clock.now())
    secrets.append(root.jwt)
    with pytest.raises(ApiError):
        store.authenticate(stale, clock.now())  # auto-revokes: logged
    assert caplog.records  # the lifecycle is logged at all...
    for token in secrets:  # ...but never a token, nor a JWT's signature
        assert token not in caplog.text
        assert token.rsplit(".", 1)[-1] not in caplog.text
