"""fasthint: fast, trustworthy RL for LLM math reasoning with verifiable rewards.

Library use::

    import fasthint
    cfg = fasthint.TrainConfig(max_steps=20, output_dir="outputs/lib")
    results = fasthint.fit(cfg)                       # math-verify reward
    results = fasthint.fit(cfg, reward_fn=my_reward)  # my_reward(completion: str, row: dict) -> float
"""
from fasthint.config import TrainConfig, parse_args
from fasthint.errors import FastHintError
from fasthint.rewards import math_reward

__version__ = "0.1.0"


def fit(config: TrainConfig, reward_fn=None) -> dict:
    """Trains with ``config`` (see ``fasthint.train.fit``); returns final and evaluation metrics."""
    from fasthint.train import fit as _fit

    return _fit(config, reward_fn)


__all__ = ["TrainConfig", "parse_args", "fit", "math_reward", "FastHintError", "__version__"]
