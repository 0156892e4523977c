"""Typed, user-facing errors. Each message says what was wrong and what to change."""


class VLServeError(Exception):
    """Base class for every error vlserve raises on purpose."""


class ConfigError(VLServeError):
    """A checkpoint's config.json (or another config file) is missing, unknown or inconsistent."""


class CheckpointError(VLServeError):
    """Weights are missing, unexpected or mis-shaped."""


class MediaError(VLServeError):
    """An image or video could not be fetched, decoded or preprocessed (a client error: HTTP 400)."""


class MediaTooLargeError(MediaError):
    """Media over a byte or pixel limit (HTTP 413)."""


class InvalidRequestError(VLServeError):
    """A request (messages, prompt, parameters) is malformed (HTTP 400)."""


class EngineDeadError(VLServeError):
    """The engine (or a worker) failed; in-flight and new requests get this instead of hanging (HTTP 503)."""


class ClusterError(VLServeError):
    """The Ray cluster is unreachable, too small, or its nodes differ (software versions, model files)."""


class PlanError(ConfigError):
    """The planner's checks found that this deployment would fail (before anything loads); says each fix."""
