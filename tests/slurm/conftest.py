"""tests/slurm: real jobs on a real SLURM cluster, usually the local one of `tools/slurm_cluster.sh start`.

The `slurm` fixture finds the cluster: $SLURM_CONF if set, else the script's cluster if it runs
($DIST_LM_SLURM_DIR, default /tmp/dist_lm_slurm), else SLURM's own configuration. `sinfo` must answer; if it
does not, every test here skips with the reason, except in CI (CI=true), where the SLURM tests must run and an
unreachable cluster fails them instead. Every test here is marked `slurm`.

What the local cluster is (tools/slurm_cluster.sh): nodes n1 and n2, two slurmd on one host sharing its CPUs (2 on
the development VM), partition `debug`, no GPUs (no GRES), requeue allowed, KillWait 30 s, a requeued job may
start again 11 s after its requeue (cred_expire 10 s), finished jobs kept 16 s (MinJobAge). Jobs run as the
submitting user, here root.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

import pytest

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parents[1]
CLUSTER_SCRIPT = ROOT / "tools" / "slurm_cluster.sh"
# JobState names that no longer change. A job that ended but still runs its epilog shows COMPLETING, and a requeued
# one PENDING or REQUEUED: neither is final.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                          "DEADLINE", "OUT_OF_MEMORY"})
# A key of `scontrol show job -o`: a word at the start of the line or after a space, then '='. Values may hold
# '=' (TRES=cpu=1,mem=...) but not ' Word=' (a value with spaces followed by such a word would be split there).
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/.]*)=")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # this hook sees the whole session's items: touch only those under tests/slurm
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


class SbatchResult(NamedTuple):
    returncode: int
    """What `sbatch --wait` returns: the job's exit status, or 1 if a signal ended it."""
    job_id: str


def parse_job_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {key: value}.

    >>> parse_job_record("JobId=7 JobName=a b JobState=FAILED ExitCode=3:0 TRES=cpu=1,node=1")["ExitCode"]
    '3:0'
    """
    keys = list(_KEY.finditer(line))
    return {m.group(1): line[m.end(): nxt.start() if nxt else len(line)].strip()
            for m, nxt in zip(keys, [*keys[1:], None])}


def sbatch_returncode(exit_code: str) -> int:
    """The status `sbatch --wait` returns for a job's ExitCode=<status>:<signal>: the status, or 1 after a signal."""
    status, _, signal = exit_code.partition(":")
    return int(status) if int(signal or 0) == 0 else 1


class Slurm:
    """A reachable SLURM cluster: submit job scripts, wait for them, read their records."""

    def __init__(self, conf: Path | None, jobs_dir_factory):
        self.conf = conf
        """The slurm.conf that SLURM_CONF names, or None for SLURM's own default."""
        self._jobs_dir = jobs_dir_factory
        self._final: dict[str, dict[str, str]] = {}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment for a SLURM command: SLURM_CONF set, and no SBATCH_* or SLURM_* of an
        allocation this test may itself run in (they would change the options or the job's environment)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SLURM_"))}
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        return {**env, **(extra or {})}

    def run(self, *cmd: str, timeout: float = 30, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM command (scontrol, squeue, scancel, sbatch, srun ...) against this cluster; output as text.
        A job submitted here starts in `cwd` (default: this process's, the checkout under `make test`): pass
        tmp_path, or --output, so that its slurm-<id>.out does not land there."""
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def sbatch_wait(self, script: str | os.PathLike, *args: str, timeout: float = 120,
                    cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                    script_args: Sequence[str] = ()) -> SbatchResult:
        """Submit `script` with `sbatch --parsable --wait *args script *script_args`; wait until the job ends.

        `args` are sbatch options: `--nodes=2`, `--time=5`, `--signal=B:USR1@20`, `--output=...`,
        `--open-mode=append`, `--export=ALL,KEY=value`; they override the script's #SBATCH lines.
        The job starts in `cwd` (default: a fresh temporary directory, so that slurm-<id>.out never lands in the
        checkout), and gets this process's environment plus `env` (sbatch's default is --export=ALL).

        Returns (returncode, job_id): returncode as `sbatch --wait` gives it, the job's exit status (1 if a signal
        ended it). `job_info(job_id)` then holds the final record: JobState, ExitCode, Restarts, StdOut ...

        On `timeout` seconds (for submission, queueing, every run and the wait), the job is cancelled and
        TimeoutError raises with its state and the tail of its output. A refused submission raises RuntimeError
        with sbatch's message (EnforcePartLimits=ALL refuses what could never run).

        Requeues, as measured on SLURM 22.05.8 (Debian 12) with `scontrol requeue` from the job itself: `sbatch
        --wait` does not return when its job is requeued. The running batch script is killed at
        once ("CANCELLED ... DUE TO JOB REQUEUE"); the job goes to PENDING, Reason=BeginTime, never through a
        final state, for cred_expire + 1 s (11 s on the local cluster, 121 s by SLURM's default); then it runs
        again with SLURM_RESTART_COUNT=1 (unset on the first run), and sbatch returns the last run's exit status.
        Its ExitCode and JobState are the last run's; Restarts counts the requeues. The output file is
        truncated at each start unless the job asks for --open-mode=append. sbatch takes any base state past
        SUSPENDED for the end (its source), flags aside, so this helper still checks the state itself after sbatch
        returns, waits on (polling `scontrol show job`) while it is not in FINAL_STATES (COMPLETING, REQUEUED,
        PENDING), and returns the status of the final run.
        `sbatch --wait` polls on a 2 s, 8 s, 8 s ... back-off here (MinJobAge=16), so it returns up to 8 s after
        the job ends; with SLURM's default MinJobAge (300 s) that is up to 32 s.
        """
        cwd = Path(cwd) if cwd is not None else self._jobs_dir()
        cmd = ["sbatch", "--parsable", "--wait", *args, str(script), *script_args]
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # sbatch printed the id when the job was accepted; stopping the waiter does not stop the job
            proc.terminate()
            out, err = proc.communicate()
            job_id = out.split(";")[0].strip()
            if not job_id:
                raise RuntimeError(f"sbatch did not submit in {timeout} s: {shlex.join(cmd)}\n{err}") from None
            self._cancel_and_raise(job_id, timeout)
        job_id = out.split(";")[0].strip()
        if not job_id:
            raise RuntimeError(f"sbatch refused the job (exit {proc.returncode}): {shlex.join(cmd)}\n{err.strip()}")
        info = self._poll_final(job_id, deadline)
        if info is None:
            self._cancel_and_raise(job_id, timeout)
        # sbatch's own status is this number (it reads the same ExitCode), unless it took a state that was not the
        # end for the end (a requeue): then the final run's counts.
        return SbatchResult(sbatch_returncode(info["ExitCode"]), job_id)

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """Wait until a job (submitted any way: `run("sbatch", "--parsable", ...)`) is in a final state, polling
        `scontrol show job` every 0.5 s, and return that record. A requeued job is PENDING, not final, until its
        next run ends: this waits through requeues. On `timeout` seconds it raises TimeoutError and leaves the
        job alone (cancel it yourself: `run("scancel", job_id)` is a no-op for a job that ended)."""
        info = self._poll_final(job_id, time.monotonic() + timeout)
        if info is None:
            raise TimeoutError(f"job {job_id} did not end in {timeout} s: {self.job_info(job_id).get('JobState')}")
        return info

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o <id>` as {key: value} (JobState, ExitCode, Restarts, NodeList, StdOut ...).

        A finished job leaves slurmctld MinJobAge (16 s) after it ends; for a job that sbatch_wait or wait saw
        end, its final record is returned after that."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id))
        if proc.returncode != 0 or not proc.stdout.strip():
            if job_id in self._final:
                return self._final[job_id]
            raise LookupError(f"scontrol show job {job_id}: {proc.stderr.strip() or 'no such job'}")
        return parse_job_record(proc.stdout.splitlines()[0])

    def output(self, job_id: str) -> str:
        """The text of the job's standard output file (its StdOut), '' if it wrote none."""
        path = Path(self.job_info(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def _poll_final(self, job_id: str, deadline: float) -> dict[str, str] | None:
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in FINAL_STATES:
                self._final[job_id] = info  # for job_info once slurmctld has purged the job
                return info
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)

    def _cancel_and_raise(self, job_id: str, timeout: float) -> NoReturn:
        self.run("scancel", job_id)
        try:
            info = self._poll_final(job_id, time.monotonic() + 45)  # KillWait is 30 s
            state = f"JobState={info['JobState']} Reason={info.get('Reason')}" if info else "still not ended"
            tail = self.output(job_id)[-3000:]
        except LookupError as e:
            state, tail = str(e), ""
        raise TimeoutError(f"job {job_id} did not end in {timeout} s and was cancelled ({state})\n"
                           f"--- output tail\n{tail}")


def _find_conf() -> tuple[Path | None, str]:
    """The cluster to use, and how it was found."""
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"]), "SLURM_CONF"
    local_dir = Path(os.environ.get("DIST_LM_SLURM_DIR", "/tmp/dist_lm_slurm"))
    running = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, timeout=30)
    if running.returncode == 0:
        return local_dir / "slurm.conf", "tools/slurm_cluster.sh"
    return None, "SLURM's default configuration"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Slurm:
    """The reachable SLURM cluster (see the module docstring); skips, or fails in CI, when there is none."""
    conf, found_by = _find_conf()
    cluster = Slurm(conf, lambda: tmp_path_factory.mktemp("slurm-job"))
    try:
        if conf is not None and not conf.is_file():
            why = f"{conf} does not exist"  # sinfo would retry reading it for a minute before saying so
        else:
            proc = cluster.run("sinfo", "-h", "-o", "%P %a %D %T", timeout=30)
            why = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    except FileNotFoundError:
        why = "sinfo: command not found"
    except subprocess.TimeoutExpired:
        why = "sinfo did not answer in 30 s"
    if why is not None:
        reason = (f"no SLURM cluster reachable ({found_by}): {why}; start one with tools/slurm_cluster.sh start "
                  "(as root)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}: CI must run the SLURM tests", pytrace=False)
        pytest.skip(reason)
    return cluster
