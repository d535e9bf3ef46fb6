"""fedlowrank: federated, privacy-preserving low-rank fine-tuning.

The core library (this package) never imports Flower; ``strategies/`` and ``clients/`` hold the Flower
server and client apps built on it.
"""

__version__ = "0.1.0"
