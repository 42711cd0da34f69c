"""Code both services use: settings, errors, data sets, embedding sets and outlier shards.

This package imports no service: `oal_synth` and `oal_trainer` import it, never the reverse.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
