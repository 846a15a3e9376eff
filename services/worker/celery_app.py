"""The Celery app object and its settings, made once from the environment (see services/worker/app.py, the
workers' entry point, for the variables). The tasks module registers on it; app.py imports both, so neither imports
the other back."""

from __future__ import annotations

from services.worker import metrics
from services.worker.runtime import JobTask
from services.worker.settings import WorkerSettings, make_app

settings = WorkerSettings.from_env()
app = make_app(settings)
JobTask.settings = settings
metrics.connect(settings.metrics_port, settings.metrics_host)
