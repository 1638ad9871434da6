"""``jobtoken broker`` clients: one line and a documented exit code when the broker is away."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobtoken.cli import main


@pytest.mark.parametrize("args", [["status"], ["ensure", "--min-valid", "60"], ["release"],
                                  ["prepare", "--dir", "/tmp"], ["ping"],
                                  ["register", "--job-id", "j", "--uid", "1",
                                   "--anchor-pid", "2"]])
def test_an_unreachable_broker_is_exit_75_in_one_line(
        args: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["broker", *args, "--socket", str(tmp_path / "none.sock")])
    err = capsys.readouterr().err
    assert code == 75
    assert err.count("\n") == 1 and "cannot reach the node broker" in err


def test_the_socket_comes_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBTOKEN_BROKER_SOCKET", str(tmp_path / "env.sock"))
    assert main(["broker", "ping"]) == 75
    assert "env.sock" in capsys.readouterr().err


def test_broker_without_a_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["broker"]) == 2
    assert "serve" in capsys.readouterr().err
