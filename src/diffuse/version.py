"""The package version, on the bottom floor so checkpoints and exports can stamp it without importing
the package's public API (diffuse/__init__.py loads diffuse.api on first use)."""

__version__ = "0.1.0"
