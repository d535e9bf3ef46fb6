"""The message protocol between the server (``strategies/``) and the clients (``clients/``).

``messages`` holds the typed instructions and replies (Flower-free); ``flower`` encodes them as Flower records.
"""

from fedlowrank.protocol.messages import *  # noqa: F403
from fedlowrank.protocol.messages import __all__ as __all__
