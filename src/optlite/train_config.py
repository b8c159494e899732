"""The earlier import path `optlite.train_config`, kept so that code written against it runs unchanged.

The code lives in `optlite/train/config.py` and `optlite/train/launch.py`.
"""

from .train.config import *  # noqa: F401,F403
from .train.launch import *  # noqa: F401,F403
