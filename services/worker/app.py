"""The Celery app of the job workers: Redis broker and results, queues `train` and `rollout`, JSON messages.

Start one worker per queue (the --pool solo keeps CUDA out of forked children and runs one job at a time):
    celery -A services.worker.app worker -Q train --pool solo --concurrency 1 -n train@%h
    celery -A services.worker.app worker -Q rollout --pool solo --concurrency 1 -n rollout@%h
Configured from the environment (services/worker/settings.py): GENIE_BROKER_URL, GENIE_RESULT_BACKEND, GENIE_JOBS_DIR,
GENIE_TASK_TIME_LIMIT, GENIE_VISIBILITY_TIMEOUT, GENIE_WORKER_METRICS_PORT, GENIE_ROLLOUT_BACKEND, GENIE_WORLD,
GENIE_TRITON_URL, GENIE_TRITON_MODEL_URLS, GENIE_JOB_LEASE_TTL; Redis credentials and TLS: GENIE_BROKER_PASSWORD,
GENIE_BROKER_CA/CERT/KEY; Redis Sentinel: GENIE_BROKER_SENTINELS, GENIE_BROKER_SENTINEL_MASTER,
GENIE_BROKER_SENTINEL_PASSWORD.
"""

from __future__ import annotations

import services.worker.tasks  # noqa: F401  registers the tasks on `app`
from services.worker.celery_app import app, settings

__all__ = ["app", "settings"]
