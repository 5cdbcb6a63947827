"""v4lab: reproducible ablations of DeepSeek-V4-era architecture pieces."""

__version__ = "0.1.0"

from v4lab.allocator import retain_freed_memory as _retain_freed_memory
from v4lab.threads import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()  # before torch starts OpenMP (see v4lab.threads)
_retain_freed_memory()  # no page faults for each step's tensors (see v4lab.allocator)
