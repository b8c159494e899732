"""The earlier import path `optlite.training`, kept so that code written against it runs unchanged.

The code lives in `optlite/train/loop.py`.
"""

from .train.loop import *  # noqa: F401,F403
