"""Upload Gateway: an async reverse proxy that authenticates and inspects uploads (SPEC §1)."""

__version__ = "0.1.0"
