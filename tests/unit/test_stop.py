"""dist_lm.train.stop and dist_lm.train.lock: durations, the signal flag (real signals to this process), the time
limit's arithmetic, and the run-directory lock between real processes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dist_lm.errors import UserError
from dist_lm.train.lock import LOCK_FILE, RunDirLock
from dist_lm.train.stop import MARGIN_S, TIME_LIMIT, StopCheck, parse_duration, reason_text


@pytest.mark.parametrize("text, seconds", [("", None), ("45", 45.0), ("45s", 45.0), ("90m", 5400.0), ("1.5h", 5400.0),
                                           ("2d", 172800.0), ("10:00", 600.0), ("1:30:00", 5400.0),
                                           ("2-00:00:00", 172800.0), ("1-12", 129600.0)])
def test_durations_in_seconds_units_and_slurms_format(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1h30", "-5", "1:2:3:4"])
def test_a_duration_that_is_none_of_those_names_the_key(text):
    with pytest.raises(UserError, match=r"train.time_limit=.*SLURM's \[D-\]HH:MM:SS"):
        parse_duration(text)


def test_a_signal_only_sets_the_flag_and_a_second_one_keeps_the_first():
    check = StopCheck()
    before = signal.getsignal(signal.SIGUSR1)
    check.install()
    try:
        assert check.due(0) == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal: Python runs the handler before the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)  # the second one (a second Ctrl-C, a launcher's forward) changes nothing
        assert check.signum == signal.SIGUSR1 and check.due(1) == signal.SIGUSR1
        assert reason_text(check.due(2)) == "SIGUSR1"
    finally:
        check.restore()
    assert signal.getsignal(signal.SIGUSR1) is before  # the handlers found are back


def test_between_checks_a_signal_waits_for_the_next_check():
    check = StopCheck(check_every=4)
    check.signum = signal.SIGTERM
    assert [check.due(s) for s in range(1, 9)] == [0, 0, 0, signal.SIGTERM, 0, 0, 0, signal.SIGTERM]


def test_the_time_limit_keeps_room_for_the_next_steps_the_save_and_a_margin():
    now = [1000.0]
    check = StopCheck(time_limit_s=100.0, check_every=2, clock=lambda: now[0], first_save_bytes=0)
    assert check.due(0) == 0
    now[0] += 20.0  # steps 1-2 took 10 s each
    assert check.due(2) == 0  # 80 s left > 2 steps x 10 s + no save yet + margin
    check.note_save(30.0)
    now[0] += 20.0  # 60 s left: 2 x 10 + 30 + margin = 55 still fits
    assert check.due(4) == 0
    now[0] += 20.0  # 40 s left < 55: stop now, with the time to save
    assert check.due(6) == TIME_LIMIT and "time limit" in reason_text(TIME_LIMIT)
    assert check.time_left() == pytest.approx(40.0)
    assert MARGIN_S > 0


def test_before_the_first_save_the_estimate_comes_from_the_bytes_to_write():
    now = [0.0]
    check = StopCheck(time_limit_s=30.0, clock=lambda: now[0], first_save_bytes=int(10e9))  # 10 GB: ~50 s at 200 MB/s
    assert check.due(0) == TIME_LIMIT  # it could not save in time: stop before the first step


def _hold_lock(run_dir, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from dist_lm.train.lock import RunDirLock
        lock = RunDirLock({str(run_dir)!r}, "first").acquire()
        print("locked", flush=True)
        time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_first_ones_process_and_host(tmp_path):
    first = _hold_lock(tmp_path / "run", 60)
    try:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {first.pid} on host .*, run 'first'"):
            RunDirLock(tmp_path / "run", "second").acquire()
    finally:
        first.kill()
        first.wait()
    # The holder died without releasing (SIGKILL): the kernel freed the lock, and the next run takes it.
    with RunDirLock(tmp_path / "run", "third") as lock:
        assert lock.held and '"run": "third"' in (tmp_path / "run" / LOCK_FILE).read_text()
    assert not lock.held


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "oops").write_text("not a directory")
    with pytest.raises(UserError, match="run_dir .*oops is a file; point run_dir"):
        RunDirLock(tmp_path / "oops").acquire()
