"""Runs that start together on a new sqlite store (a sweep, two jobs): each opens its MLflow run, and the file is
left whole. MLflow migrates a new store's tables on first use, and two migrations at once used to leave
`_alembic_tmp_*` tables behind that broke the file for every later reader."""

import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
OPEN = """
import sys, time
sys.path.insert(0, {root!r})
from dist_lm.train.tracking import MlflowTracker
while time.time() < {start}:  # every process leaves this line at the same moment
    pass
print(MlflowTracker({uri!r}, "together", sys.argv[1]).run_id)
"""


def test_runs_starting_at_once_on_a_new_sqlite_store_all_open_and_leave_it_whole(tmp_path):
    import time

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    script = OPEN.format(root=str(ROOT), start=time.time() + 8.0, uri=uri)  # time for 4 interpreters to import
    procs = [subprocess.Popen([sys.executable, "-c", script, f"run{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    answers = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in answers]
    run_ids = {out.strip() for out, _ in answers}
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
    assert not [t for t in tables if t.startswith("_alembic_tmp")], tables
    client = MlflowClient(uri)  # a later reader: migrates nothing, finds every run
    found = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert {r.info.run_id for r in found} == run_ids and len(run_ids) == 4
