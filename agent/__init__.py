"""runner-agent: runs Prefect flow runs as transient systemd scopes."""

__version__ = "0.1.0"
