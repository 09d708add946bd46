"""`--help` of every subcommand: each default shown once, as an operator writes it."""

from __future__ import annotations

import re

import pytest

from router.cli import main as cli

COMMANDS = ["serve", "render", "reloader", "doctor", "demo"]


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flag_states_its_default_twice(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(command, capsys)
    assert not re.search(r"\(default[^)]*\) \(default", text), text


def test_durations_and_sizes_read_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("serve", capsys)
    for shown in ("(default 1m15s)", "(default 1m30s)", "(default 8Mi)", "(default 32Mi)"):
        assert shown in text
    for parsed in (
        "(default: 75.0)",
        "(default: 90.0)",
        "(default: 8388608)",
        "(default: 33554432)",
    ):
        assert parsed not in text
    assert "(default: 10s)" in text  # a default the formatter adds is still shown
    assert "(default 15s)" in text  # --leader-elect-lease-duration


def test_doctor_shows_its_timeouts_once(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("doctor", capsys)
    assert "(default 5s)" in text
    assert "(default: 5.0)" not in text
    assert "(default 168h)" in text
    assert "(default: 604800.0)" not in text
