"""Where a Ray task of a job in a bucket keeps its store: a *stage* on its node's own disk.

    <temp>/batchhub-task-stores/<node>/<job digest>/<task store name>/    journal, parts, job.json

A task's results are committed as its parts reach the bucket (batchhub/remote_job.py); what its
journal holds past the last part is only on that node. A task killed with its node alive (its
worker process died, its driver was killed) leaves that journal in its stage. Two things recover it:

- a retry of the task on the same node opens the same stage, and the store's recovery compacts the
  journal into a part and commits it before the task sends anything;
- the driver of a job in a bucket asks every live node, before it plans a run and after the run's
  tasks end, to commit the stages of this job no task holds (`commit_stages`): the journal of a task
  retried on another node, or of a killed driver's tasks, is committed then, and the replies it
  holds are paid for once and counted.

A node that is lost takes its stages with it: what they held past their last part is sent again
(at most `--flush-rows` results or `--flush-seconds` of them per task, and what was in flight).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from batchhub.errors import BatchhubError, JobStateError
from batchhub.objstore import ObjectURL
from batchhub.store import TASK_STORES_DIR, JobStore

log = logging.getLogger("batchhub")

#: the folder of the stages under the machine's temp folder
STAGES_DIR = "batchhub-task-stores"


def job_stages(job_url: ObjectURL, node_id: str) -> Path:
    """The folder of this node's stages of the job at `job_url`."""
    digest = hashlib.sha256(str(job_url).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / STAGES_DIR / node_id[:16] / digest


def task_store(job_url: ObjectURL, name: str, node_id: str, seq_floor: int) -> JobStore:
    """The store of the task store `name` (`shards/NNNNNN-runRRRR`) of the job at `job_url`, staged on this node."""
    from batchhub.remote_job import RemoteJob

    stage = job_stages(job_url, node_id) / name.rsplit("/", 1)[-1]
    return JobStore(stage, seq_floor=seq_floor, remote=RemoteJob(job_url.join(name), stage, lease=False))


def drop_stage(store: JobStore) -> None:
    """Delete a task's stage once all it holds is in the bucket (a failed upload keeps it for a retry here)."""
    assert store.remote is not None
    if not store.segments() and store.remote.push_unpushed() == 0:
        shutil.rmtree(store.dir, ignore_errors=True)


def commit_stages(job_url: ObjectURL, node_id: str) -> int:
    """Commit and delete this node's stages of the job that no task holds; returns the results committed.

    A stage a task holds (its lock is taken) is left to it; one that cannot be committed now (the
    bucket refuses) is kept for the next time.
    """
    folder = job_stages(job_url, node_id)
    if not folder.is_dir():
        return 0
    committed = 0
    for stage in sorted(path for path in folder.iterdir() if path.is_dir()):
        store = task_store(job_url, f"{TASK_STORES_DIR}/{stage.name}", node_id, 0)
        try:
            with store.lock():
                committed += store.recover()
                drop_stage(store)
        except JobStateError:
            continue  # a task holds it
        except (BatchhubError, OSError) as exc:
            log.warning("the stage %s could not be committed now: %s", stage, exc)
    return committed
