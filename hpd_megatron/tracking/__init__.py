"""MLflow tracking for training runs: one run per job, continued across resumes, asynchronous.

``start_tracking`` (on the logging rank) returns a ``Tracker``; every other rank, and a run
with ``tracking.enabled: false``, uses a ``NullTracker``. See tracker.py for the guarantees.
"""

from hpd_megatron.tracking.config import TrackingConfig, resolve_tracking_uri
from hpd_megatron.tracking.params import flatten_params
from hpd_megatron.tracking.redact import redact, redacted_config
from hpd_megatron.tracking.tags import default_tags
from hpd_megatron.tracking.tracker import DeliveryStats, NullTracker, Tracker, start_tracking

__all__ = [
    "DeliveryStats",
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "default_tags",
    "flatten_params",
    "redact",
    "redacted_config",
    "resolve_tracking_uri",
    "start_tracking",
]
