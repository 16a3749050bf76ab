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
