"""fasthint: fast, trustworthy RL for LLM math reasoning with verifiable rewards.

Library use::

    import fasthint
    cfg = fasthint.TrainConfig(max_steps=20, output_dir="outputs/lib")
    results = fasthint.fit(cfg)                       # math-verify reward
    results = fasthint.fit(cfg, reward_fn=my_reward)  # my_reward(completion: str, row: dict) -> float
"""
from fasthint.errors import FastHintError
from fasthint.rewards import math_reward

__version__ = "0.1.0"


def __getattr__(name: str):
    """``TrainConfig`` and ``parse_args`` on first use: the package root stays import-light, because
    every math-verify worker process imports ``fasthint.rewards`` (and so this file)."""
    if name in ("TrainConfig", "parse_args"):
        from fasthint import config  # lazy: the config pulls in torch, transformers and every component

        return getattr(config, name)
    raise AttributeError(f"module 'fasthint' has no attribute {name!r}")


def fit(config, reward_fn=None) -> dict:
    """Trains with ``config`` (a ``TrainConfig``; see ``fasthint.train.fit``); returns final and
    evaluation metrics."""
    from fasthint.train import fit as _fit  # lazy: importing it here would make `python -m fasthint.train` warn

    return _fit(config, reward_fn)


__all__ = ["TrainConfig", "parse_args", "fit", "math_reward", "FastHintError", "__version__"]
