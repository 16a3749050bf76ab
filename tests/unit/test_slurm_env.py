"""dist_lm.train.slurm outside and inside a job's environment (the real-cluster tests are in tests/slurm)."""

import time

import pytest

from dist_lm.train import slurm


@pytest.fixture
def no_job(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_JOB_END_TIME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_outside_a_job_there_is_no_end_and_no_tags(no_job):
    assert not slurm.in_job() and slurm.seconds_left() is None and slurm.job_tags() == {}


def test_a_job_end_time_from_the_environment_and_the_tags_of_an_array_task(no_job):
    no_job.setenv("SLURM_JOB_ID", "42")
    no_job.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 3600))
    no_job.setenv("SLURM_ARRAY_JOB_ID", "40")
    no_job.setenv("SLURM_ARRAY_TASK_ID", "2")
    no_job.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    no_job.setenv("SLURM_NNODES", "2")
    assert 3590 < slurm.seconds_left() <= 3600
    assert slurm.job_tags() == {"slurm.job_id": "42", "slurm.array_job_id": "40", "slurm.array_task_id": "2",
                                "slurm.nodelist": "n[1-2]", "slurm.num_nodes": "2", "slurm.restart_count": "0"}
