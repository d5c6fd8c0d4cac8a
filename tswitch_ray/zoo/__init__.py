"""zoo layer."""
