"""The import paths of the earlier flat layout still give the training package's objects."""

import optlite.train as train


def test_earlier_import_paths_give_the_same_objects():
    from optlite.data import CausalLMCollator, TokenBlocks
    from optlite.train_config import ModelSource, TrainConfig
    from optlite.training import build_optimizer
    from optlite.training import train as train_fn

    assert (CausalLMCollator, TokenBlocks, TrainConfig, ModelSource, train_fn) == (
        train.CausalLMCollator, train.TokenBlocks, train.TrainConfig, train.ModelSource, train.train)
    assert build_optimizer is train.loop.build_optimizer
