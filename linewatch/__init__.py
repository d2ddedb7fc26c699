"""linewatch: streaming visual inspection with STFPM."""

__version__ = "0.1.0"
