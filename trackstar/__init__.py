"""TrackStar: scalable influence and fact tracing (Chang et al. 2024), as a library.

The library knows nothing of DVC; `stages/` wires it into a pipeline.
"""

__version__ = "0.1.0"
