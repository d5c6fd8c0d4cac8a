"""switch layer."""
