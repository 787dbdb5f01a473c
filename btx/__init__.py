"""btx: Branch-Train-MiX, from one dense seed to a routed Mixture-of-Experts."""

__version__ = "0.1.0"
