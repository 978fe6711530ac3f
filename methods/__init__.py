"""Every method, registered by NAME when this package is imported."""

from methods import ft, joint  # noqa: F401
