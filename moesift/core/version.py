"""The package version, recorded in every file moesift writes."""

__version__ = "0.1.0"
