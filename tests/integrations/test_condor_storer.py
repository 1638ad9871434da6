"""Access point: the per-submission mytoken, ``include command`` output and the storer.

``include command`` output is combined with a user's submit text and read back with the
bindings' submit parser (``htcondor2.Submit``); the storer is run with condor_submit's
argv format and its credd call checked with pytest-mock.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional

import htcondor2
import pytest

from jobtoken import cli
from jobtoken._config import Config, ServerConfig
from jobtoken._errors import ConfigError, MytokenRejectedError, UsageError
from jobtoken._mytokenfile import MytokenSource
from jobtoken.devserver import DevServer
from jobtoken.integrations.condor_storer import (
    CondorCredd,
    find_user_mytoken,
    mint_submission_mytoken,
    parse_storer_argument,
    run_storer,
)

from .conftest import AUDIENCE, write_secret


@pytest.fixture
def user_mytoken(srv: DevServer, tmp_path: Path) -> Path:
    mt = srv.issue_mytoken(
        capabilities=["AT", "create_mytoken", "tokeninfo"],
        restrictions=[
            {"scope": "storage.create:/dteam storage.read:/dteam", "audience": [AUDIENCE]}
        ],
    )
    return write_secret(tmp_path / "mt_user", mt)


def config_for(srv: DevServer) -> Config:
    return Config(server=ServerConfig(url=srv.url, allow_http=True, timeout_s=5.0))


def introspect_restrictions(srv: DevServer, mytoken: str) -> Dict[str, Any]:
    info = srv.introspect(mytoken)
    token = info.get("token", info)
    return {"capabilities": token.get("capabilities"), "restrictions": token.get("restrictions")}


# --- minting -------------------------------------------------------------------------------


def test_submission_mytoken_is_restricted(srv: DevServer, user_mytoken: Path) -> None:
    token = mint_submission_mytoken(
        config_for(srv),
        MytokenSource(path=user_mytoken),
        scopes=["storage.create:/dteam"],
        audiences=[AUDIENCE],
        lifetime_s=3600,
        max_jobs=10,
    )
    seen = introspect_restrictions(srv, token.mytoken)
    assert set(seen["capabilities"]) == {"AT", "create_mytoken"}
    (entry,) = seen["restrictions"]
    assert entry["scope"] == "storage.create:/dteam"
    assert entry["audience"] == [AUDIENCE]
    assert entry["usages_other"] == 10
    assert token.mytoken not in repr(token)


def test_submission_mytoken_cannot_widen(srv: DevServer, user_mytoken: Path) -> None:
    with pytest.raises(MytokenRejectedError):
        mint_submission_mytoken(
            config_for(srv),
            MytokenSource(path=user_mytoken),
            scopes=["storage.create:/"],
            lifetime_s=600,
        )


def test_submission_needs_create_mytoken(srv: DevServer, tmp_path: Path) -> None:
    at_only = write_secret(tmp_path / "mt", srv.issue_mytoken(capabilities=["AT"]))
    with pytest.raises(MytokenRejectedError):
        mint_submission_mytoken(
            config_for(srv),
            MytokenSource(path=at_only),
            scopes=["storage.create:/dteam"],
            lifetime_s=600,
        )


def test_find_user_mytoken_where_the_mytoken_cli_keeps_it(tmp_path: Path) -> None:
    path = write_secret(tmp_path / f"mt_u{os.geteuid()}", "x" * 40)
    found = find_user_mytoken(Config(), {"XDG_RUNTIME_DIR": str(tmp_path)})
    assert found.path == path
    configured = Config(token=Config().token.__class__(mytoken_file="/nonexistent/mt"))
    assert find_user_mytoken(configured, {"XDG_RUNTIME_DIR": str(tmp_path)}).path == Path(
        "/nonexistent/mt"
    )  # an explicit file wins over discovery


# --- include command ------------------------------------------------------------------------


USER_SUBMIT = """\
executable = analysis.sh
transfer_input_files = input.dat, calib.db
encrypt_input_files = calib.db
My.Experiment = "dteam"
"""


@pytest.mark.parametrize("user_lists", [True, False], ids=["with-user-lists", "without"])
def test_include_command_output_parses_and_appends(
    srv: DevServer, user_mytoken: Path, tmp_path: Path, capsys: Any, user_lists: bool
) -> None:
    out_dir = tmp_path / "state"
    rc = cli.main(
        [
            "condor",
            "submit",
            "--server",
            srv.url,
            "--allow-http",
            "--mytoken-file",
            str(user_mytoken),
            "--scope",
            "storage.create:/dteam",
            "--audience",
            AUDIENCE,
            "--lifetime",
            "3600",
            "--out-dir",
            str(out_dir),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    user = USER_SUBMIT if user_lists else "executable = analysis.sh\n"
    sub = htcondor2.Submit(user + captured.out + "queue\n")
    files = [f.strip() for f in sub["transfer_input_files"].split(",")]
    encrypted = [f.strip() for f in sub["encrypt_input_files"].split(",")]
    (mt_path,) = [f for f in files if f.endswith("jobtoken_submission.mytoken")]
    assert mt_path in encrypted
    if user_lists:
        assert files[:2] == ["input.dat", "calib.db"] and "calib.db" in encrypted
        assert sub["My.Experiment"] == '"dteam"'
    assert sub["My.JobtokenMytokenFile"] == '"jobtoken_submission.mytoken"'
    assert sub["My.JobtokenScope"] == '"storage.create:/dteam"'
    assert sub["My.JobtokenAudience"] == f'"{AUDIENCE}"'
    assert sub["My.JobtokenServer"] == f'"{srv.url}"'
    # the secret: only in a private file, never in the submit text (hence the job ad)
    secret = Path(mt_path).read_text()
    assert secret not in captured.out and secret not in captured.err
    assert stat.S_IMODE(Path(mt_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(mt_path).parent.stat().st_mode) == 0o700
    assert introspect_restrictions(srv, secret)["restrictions"][0]["scope"] == (
        "storage.create:/dteam"
    )


def test_include_command_fails_cleanly_without_mytoken(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rc = cli.main(
        [
            "condor",
            "submit",
            "--server",
            "http://127.0.0.1:9",
            "--allow-http",
            "--mytoken-file",
            str(tmp_path / "missing"),
            "--scope",
            "storage.read:/x",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 78 and captured.out == ""
    assert "does not exist" in captured.err


# --- SEC_CREDENTIAL_STORER ---------------------------------------------------------------------


def test_parse_storer_argument() -> None:
    req = parse_storer_argument(
        "jobtoken&handle=prod&scopes=storage.read:/a,storage.create:/b&audience=https://se"
    )
    assert req.service == "jobtoken" and req.handle == "prod" and req.name == "jobtoken_prod"
    assert req.scopes == ("storage.read:/a", "storage.create:/b")
    assert req.audiences == ("https://se",)
    with pytest.raises(UsageError):
        parse_storer_argument("jobtoken&colour=blue")
    with pytest.raises(UsageError):
        parse_storer_argument("&scopes=x")


SCOPE = "storage.create:/dteam"


class FakeCredd:
    """The credd API of 24.10+/25 bindings (``refresh``); records calls, answers queries."""

    def __init__(self, use_after: int = 0) -> None:
        self.stored: List[Dict[str, Any]] = []
        self.queries = 0
        self.use_after = use_after

    def add_user_service_cred(
        self,
        credtype: Any,
        credential: bytes,
        service: str,
        handle: Any = None,
        user: Any = None,
        refresh: Any = None,
    ) -> None:
        self.stored.append(
            dict(
                credtype=credtype,
                credential=credential,
                service=service,
                handle=handle,
                refresh=refresh,
            )
        )

    def query_user_service_cred(
        self, credtype: Any, service: str, handle: Any = None
    ) -> Optional[str]:
        self.queries += 1
        name = f"{service}_{handle}" if handle else service
        stored = {
            f"{c['service']}_{c['handle']}" if c["handle"] else c["service"] for c in self.stored
        }
        if name not in stored:
            return None  # the bindings' answer for FAILURE_NOT_FOUND
        lines = [f"Top{name}Time = 1000"]
        if self.queries > self.use_after:
            lines.append(f"{name} = 1001")  # the credmon wrote the .use after the .top
        return "\n".join(lines) + "\n"


class OldCredd(FakeCredd):
    """The credd API of 23.x/24.0 bindings: no ``refresh`` keyword."""

    def add_user_service_cred(  # type: ignore[override]
        self,
        credtype: Any,
        credential: bytes,
        service: str,
        handle: Any = None,
        user: Any = None,
    ) -> None:
        super().add_user_service_cred(credtype, credential, service, handle, user, "absent")


def storer_config(srv: DevServer, user_mytoken: Path) -> Config:
    return Config(
        server=config_for(srv).server,
        token=config_for(srv).token.__class__(mytoken_file=str(user_mytoken)),
    )


@pytest.mark.parametrize("credd_class, refresh", [(FakeCredd, True), (OldCredd, "absent")])
def test_storer_stores_restricted_mytoken_as_top(
    srv: DevServer, user_mytoken: Path, credd_class: Any, refresh: Any
) -> None:
    """refresh=True where the bindings have it (else 25.x stores a .use sent to jobs as is)."""
    credd = credd_class()
    names = run_storer(
        storer_config(srv, user_mytoken),
        [f"jobtoken&handle=prod&scopes=storage.create:/dteam&audience={AUDIENCE}"],
        env={},
        lifetime_s=3600,
        credd=credd,
    )
    assert names == ["jobtoken_prod"]
    parent, call = credd.stored
    # 23.9's Vault credmon deletes svc_handle credentials whose svc.top is missing
    assert parent["service"] == "jobtoken" and parent["handle"] is None
    assert "mytoken" not in json.loads(parent["credential"])
    assert call["credtype"] == htcondor2.CredType.OAuth and call["refresh"] == refresh
    assert call["service"] == "jobtoken" and call["handle"] == "prod"
    top = json.loads(call["credential"])
    seen = introspect_restrictions(srv, top["mytoken"])
    assert set(seen["capabilities"]) == {"AT", "create_mytoken"}
    assert seen["restrictions"][0]["scope"] == "storage.create:/dteam"
    assert top["mytoken_server"] == srv.url and top["mom_id"]
    # not "scopes"/"audience": the credd would compare them with its query's and say "missing"
    assert top["jobtoken_scopes"] == ["storage.create:/dteam"]
    assert top["jobtoken_audiences"] == [AUDIENCE] and "scopes" not in top


def test_a_handle_never_replaces_a_credential_without_one(
    srv: DevServer, user_mytoken: Path
) -> None:
    """The parent .top that keeps 23.9's Vault credmon off handle credentials is stored only
    where none exists: a running job's jobtoken.top (no handle) must keep its mytoken."""
    credd = FakeCredd()
    config = storer_config(srv, user_mytoken)
    run_storer(config, [f"jobtoken&scopes={SCOPE}&audience={AUDIENCE}"], env={}, credd=credd)
    run_storer(
        config, [f"jobtoken&handle=out&scopes={SCOPE}&audience={AUDIENCE}"], env={}, credd=credd
    )
    assert [(c["service"], c["handle"]) for c in credd.stored] == [
        ("jobtoken", None),
        ("jobtoken", "out"),
    ]
    assert "mytoken" in json.loads(credd.stored[0]["credential"])


def test_storer_leaves_other_services_alone(srv: DevServer, user_mytoken: Path) -> None:
    """23.9 runs the storer for every service in use_oauth_services (e.g. scitokens)."""
    credd = FakeCredd()
    names = run_storer(
        storer_config(srv, user_mytoken),
        [
            "scitokens",
            "dune&handle=prod&scopes=x",
            f"jobtoken&scopes=storage.create:/dteam&audience={AUDIENCE}",
        ],
        env={},
        credd=credd,
    )
    assert names == ["jobtoken"] and [c["service"] for c in credd.stored] == ["jobtoken"]
    credd = FakeCredd()
    assert (
        run_storer(
            storer_config(srv, user_mytoken),
            [f"jobtoken&scopes=storage.create:/dteam&audience={AUDIENCE}"],
            env={"CONDOR_CREDENTIAL_STORER_MODE": "pelican"},  # 25.14: not a pelican storer
            credd=credd,
        )
        == []
        and credd.stored == []
    )


def test_storer_hands_other_services_to_the_site_storer(
    srv: DevServer, user_mytoken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "argv"
    site = tmp_path / "condor_vault_storer"
    site.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    site.chmod(0o755)
    knobs = {"JOBTOKEN_SITE_CREDENTIAL_STORER": str(site)}
    monkeypatch.setattr(CondorCredd, "knob", lambda self, name, default: knobs.get(name, default))
    credd = FakeCredd()
    run_storer(
        storer_config(srv, user_mytoken),
        [
            "dune&handle=prod&scopes=a,b",
            f"jobtoken&scopes=storage.create:/dteam&audience={AUDIENCE}",
        ],
        env=dict(os.environ),
        credd=credd,
    )
    assert seen.read_text().splitlines() == ["dune&handle=prod&scopes=a,b"]
    site.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(ConfigError, match="exit 3"):
        run_storer(storer_config(srv, user_mytoken), ["dune"], env={}, credd=credd)


def test_storer_waits_for_the_credmon(srv: DevServer, user_mytoken: Path) -> None:
    """condor_submit does not wait; a job that starts before the .use exists is held."""
    credd = FakeCredd(use_after=3)
    run_storer(
        storer_config(srv, user_mytoken),
        [f"jobtoken&scopes=storage.create:/dteam&audience={AUDIENCE}"],
        env={},
        credd=credd,
        wait_s=20,
    )
    assert credd.queries == 4
    slow = FakeCredd(use_after=10**6)
    with pytest.raises(ConfigError, match="no jobtoken.use from the access point's credmon"):
        run_storer(
            storer_config(srv, user_mytoken),
            [f"jobtoken&scopes=storage.create:/dteam&audience={AUDIENCE}"],
            env={},
            credd=slow,
            wait_s=0.3,
        )


def test_storer_cli_exit_codes(
    srv: DevServer, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, mocker: Any
) -> None:
    monkeypatch.setenv("CONDOR_CREDENTIAL_STORER_MODE", "vault")
    at_only = write_secret(tmp_path / "mt", srv.issue_mytoken(capabilities=["AT"]))
    monkeypatch.setenv("JOBTOKEN_MYTOKEN_FILE", str(at_only))
    mocker.patch("htcondor2.Credd", FakeCredd)
    rc = cli.main(
        [
            "condor",
            "storer",
            "--server",
            srv.url,
            "--allow-http",
            "jobtoken&scopes=storage.create:/dteam",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 77 and err.startswith("\n")  # condor_submit aborts with our one line
    assert len(err.strip().splitlines()) == 1
