"""User-facing errors: one line naming the thing and the fix, printed without a traceback."""


class LinewatchError(Exception):
    """An error a person can act on. ``str(err)`` is the whole message."""


class ConfigError(LinewatchError):
    pass


class WeightsError(LinewatchError):
    pass


class BundleError(LinewatchError):
    pass


class DataError(LinewatchError):
    pass
