"""tswitch-ray: binary task switches and model merging for model zoos, on Ray."""

__version__ = "0.1.0"
