"""Smoke tests of the SLURM cluster itself and of the `slurm` fixture, with tiny real batch jobs: what the job
scripts of launch/slurm rely on (two nodes, node ids, resolvable host names, exit statuses, self-requeue)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def job_script(tmp_path: Path, body: str, name: str = "job.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    return path


def test_two_node_job_sees_both_nodes(slurm, tmp_path):
    # Each node's task reports who it is; the batch step lists the nodes and checks that their names resolve,
    # which a multi-node launch needs for its rendezvous address.
    script = job_script(tmp_path, """
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
echo "hostnames: $(echo $nodes)"
for n in $nodes; do getent hosts "$n" >/dev/null || { echo "unresolved: $n"; exit 7; }; done
srun bash -c 'echo "task node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID"'
""")
    out = tmp_path / "out.txt"
    rc, job_id = slurm.sbatch_wait(script, "--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
                                   cwd=tmp_path, timeout=90)
    text = out.read_text()
    assert rc == 0, text
    info = slurm.job_info(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info

    hostnames = re.search(r"^hostnames: (.*)$", text, re.M).group(1).split()
    tasks = re.findall(r"^task node=(\S+) nodeid=(\d+) procid=(\d+)$", text, re.M)
    assert len(hostnames) == 2 and len(set(hostnames)) == 2, text
    assert sorted(node for node, _, _ in tasks) == sorted(hostnames), text
    assert sorted(nodeid for _, nodeid, _ in tasks) == ["0", "1"], text
    assert sorted(procid for _, _, procid in tasks) == ["0", "1"], text
    # node id i is the i-th node of the job's node list, the order a launcher numbers machines in
    assert {node: int(nodeid) for node, nodeid, _ in tasks} == {h: i for i, h in enumerate(hostnames)}, text


def test_exit_status_comes_back(slurm, tmp_path):
    script = job_script(tmp_path, "echo before-exit\nexit 3\n")
    rc, job_id = slurm.sbatch_wait(script, "--time=1", cwd=tmp_path, timeout=60)
    assert rc == 3
    info = slurm.job_info(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0"), info
    # without --output the log is slurm-<id>.out in the job's working directory
    assert Path(info["StdOut"]) == tmp_path / f"slurm-{job_id}.out"
    assert slurm.output(job_id) == "before-exit\n"


def test_wait_follows_a_job_submitted_without_wait(slurm, tmp_path):
    script = job_script(tmp_path, "sleep 1\nexit 5\n")
    submitted = slurm.run("sbatch", "--parsable", "--time=1", str(script), cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    info = slurm.wait(submitted.stdout.split(";")[0].strip(), timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "5:0"), info


def test_job_that_requeues_itself_completes_on_its_second_run(slurm, tmp_path):
    # The pattern of a job script that is preempted or near its time limit: requeue itself and let the next run
    # resume. The requeue kills this run at once; the second run (SLURM_RESTART_COUNT=1) finishes.
    script = job_script(tmp_path, """
#SBATCH --requeue
echo "run restart_count=${SLURM_RESTART_COUNT:-unset}"
if [[ -z ${SLURM_RESTART_COUNT:-} ]]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # not reached in practice: the requeue ends this run
    exit 9
fi
echo done
""")
    out = tmp_path / "out.txt"
    # --open-mode=append keeps the first run's lines: each start truncates the output file otherwise
    # (11 s between the runs on the local cluster; 121 s with SLURM's default cred_expire)
    rc, job_id = slurm.sbatch_wait(script, "--time=2", f"--output={out}", "--open-mode=append", cwd=tmp_path,
                                   timeout=240)
    text = out.read_text()
    assert rc == 0, text
    info = slurm.job_info(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
    runs = re.findall(r"^run restart_count=(\S+)$", text, re.M)
    assert runs == ["unset", "1"], text
    assert "DUE TO JOB REQUEUE" in text and text.rstrip().endswith("done"), text


def test_impossible_job_is_refused_at_submission(slurm, tmp_path):
    # EnforcePartLimits=ALL: a job that could never run is refused at once instead of pending forever
    script = job_script(tmp_path, "true\n")
    nodes = int(slurm.run("sinfo", "-h", "-o", "%D").stdout.split()[0])
    with pytest.raises(RuntimeError, match="sbatch refused the job"):
        slurm.sbatch_wait(script, f"--nodes={nodes + 1}", "--time=1", cwd=tmp_path, timeout=30)


def test_timeout_cancels_the_job(slurm, tmp_path):
    script = job_script(tmp_path, "echo started\nsleep 300\n")
    with pytest.raises(TimeoutError, match=r"cancelled \(JobState=CANCELLED") as exc:
        slurm.sbatch_wait(script, "--time=10", cwd=tmp_path, timeout=6)
    assert "started" in str(exc.value)  # the tail of the job's output
    job_id = re.search(r"job (\d+) did not end", str(exc.value)).group(1)
    assert slurm.job_info(job_id)["JobState"] == "CANCELLED"
