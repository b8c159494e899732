"""The earlier import path `optlite.data`, kept so that code written against it runs unchanged.

The code lives in `optlite/train/data.py`.
"""

from .train.data import *  # noqa: F401,F403
