"""v4lab: reproducible ablations of DeepSeek-V4-era architecture pieces."""

__version__ = "0.1.0"
