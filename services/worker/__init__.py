"""Offline jobs on Celery workers: training runs and batch rollouts (services/worker/app.py holds the app)."""

from services.worker.settings import WorkerSettings
from services.worker.specs import RolloutItem, RolloutJobSpec, TrainJobSpec

__all__ = ["RolloutItem", "RolloutJobSpec", "TrainJobSpec", "WorkerSettings"]
