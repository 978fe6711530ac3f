"""Every scenario, registered by name when this package is imported."""

from scenarios import fmnist  # noqa: F401
