"""Exceptions fl_patch raises. Everything it raises on purpose derives from FlPatchError."""


class FlPatchError(Exception):
    """Base class of fl_patch's own errors."""


class SettingsError(FlPatchError, ValueError):
    """A setting (environment variable or argument) has a value fl_patch does not accept."""


class UnknownNameError(SettingsError):
    """An include/exclude/kernel name that matches nothing known; the message lists the valid names."""


class DuplicateTargetError(FlPatchError):
    """A patch-table row was registered twice under the same name."""


class PatchError(FlPatchError):
    """A target could not be patched (raised only in strict mode; otherwise recorded in the report)."""
