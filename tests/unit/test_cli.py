"""run_main: bad input becomes one line and exit status 2; a bug keeps its traceback."""

import pytest

from dist_lm.cli import run_main
from dist_lm.config import load_config
from dist_lm.errors import UserError


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: load_config(bad))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key optim.lr='fast'") and err.count("\n") == 1


def test_missing_file_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: load_config(tmp_path / "nope.yaml"))
    assert exit_info.value.code == 2 and str(tmp_path / "nope.yaml") in capsys.readouterr().err


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback():
    def buggy():
        int("not a number")  # a ValueError from inside the code, not from the user's input

    with pytest.raises(ValueError, match="invalid literal"):
        run_main(buggy)


def test_user_error_is_still_a_value_error_for_library_callers():
    assert issubclass(UserError, ValueError)


def _exit(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err


def _raise(exc: BaseException):
    def main():
        raise exc

    return main


def test_exit_statuses_a_job_script_can_tell_apart(capsys, monkeypatch):
    from dist_lm.cli import EXIT_INTERRUPTED, EXIT_STALLED, EXIT_STOPPED
    from dist_lm.errors import StallError, StorageError

    monkeypatch.delenv("RANK", raising=False)
    assert _exit(lambda: EXIT_STOPPED, capsys) == (75, "")  # what the trainer returns after an early stop
    assert _exit(lambda: object(), capsys) == (0, "")  # anything else a main returns is success, not a status
    assert _exit(_raise(StorageError("disk full")), capsys) == (2, "error: disk full\n")
    assert _exit(_raise(StallError("a collective gave up")), capsys) == (EXIT_STALLED, "error: a collective gave up\n")
    assert _exit(_raise(KeyboardInterrupt()), capsys) == (EXIT_INTERRUPTED, "error: interrupted\n")


def test_other_ranks_stay_silent_unless_the_error_is_theirs_alone(capsys, monkeypatch):
    from dist_lm.errors import StallError

    monkeypatch.setenv("RANK", "1")
    assert _exit(_raise(UserError("bad config")), capsys) == (2, "")  # every rank saw it: rank 0 says it
    own = UserError("shard_0001.bin, bytes 0-262143: checksum mismatch")
    own.rank = 1  # the trainer marks a data error that only this rank's batch met
    assert _exit(_raise(own), capsys) == (2, f"error: rank 1: {own}\n")
    assert _exit(_raise(StallError("gave up")), capsys) == (3, "error: gave up\n")  # the stalled one may be rank 0
