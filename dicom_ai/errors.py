"""The exception tree. Each boundary maps these to its own answer (a DIMSE status, a job
state, a CLI exit code); nothing else escapes a boundary.

    DicomAIError
    ├── ConfigError            a config or rules file is invalid (names file, line, field)
    ├── StorageError           the spool or index cannot take an instance
    │   └── OutOfSpaceError    free space is below the watermark
    ├── InputError             a received dataset or series cannot be used
    │   └── GeometryError      a series has no consistent 3-D geometry
    ├── ModelError             a model failed to load or run
    │   └── ModelTimeoutError  a model exceeded its timeout
    ├── EncodingError          findings could not become a valid SEG/SR
    ├── DeliveryError          a destination did not accept a result
    └── RequestError           a console request that cannot be served (its HTTP status)
        ├── BadRequest         400: a parameter or upload is invalid (the message says which)
        ├── NotAuthenticated   401: no valid token or session
        ├── Forbidden          403: the role may not; or a missing CSRF token
        ├── NotFound           404
        ├── Conflict           409: the object is not in a state the action applies to
        └── TooManyRequests    429: logins paused after failures
"""

from __future__ import annotations


class DicomAIError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(DicomAIError):
    """A configuration or rules file is invalid."""


class StorageError(DicomAIError):
    """The spool or the index could not take an instance."""


class OutOfSpaceError(StorageError):
    """Free space on the spool's filesystem is below the configured watermark."""


class InputError(DicomAIError):
    """A received dataset or series cannot be used."""


class GeometryError(InputError):
    """A series has no consistent 3-D geometry (mixed orientation, gaps, tilt)."""


class ModelError(DicomAIError):
    """A model failed to load or to run."""


class ModelTimeoutError(ModelError):
    """A model ran longer than its configured timeout."""


class EncodingError(DicomAIError):
    """Findings could not be encoded as a valid DICOM object."""


class DeliveryError(DicomAIError):
    """A destination refused a result or could not be reached."""


class RequestError(DicomAIError):
    """A console request that cannot be served; ``status`` is its HTTP status."""

    status = 400


class BadRequest(RequestError):
    status = 400


class NotAuthenticated(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class NotFound(RequestError):
    status = 404


class Conflict(RequestError):
    status = 409


class TooManyRequests(RequestError):
    status = 429
