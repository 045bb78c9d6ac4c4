"""fasthint: fast, trustworthy RL for LLM math reasoning with verifiable rewards.

Library use::

    from fasthint import TrainConfig, train
    cfg = TrainConfig(max_steps=20, output_dir="outputs/lib")
    results = train(cfg)                                  # --reward_funcs (default: the math check)
    results = train(cfg, reward_funcs=["math", brevity])  # brevity(prompts, completions, **columns), as in TRL

``fasthint.fit(cfg, reward_fn=...)`` is the same with the original ``reward_fn(completion, row) -> float``.
"""
import importlib

from fasthint.errors import FastHintError

__version__ = "0.1.0"


def __getattr__(name: str):
    """``TrainConfig``, ``parse_args`` and ``math_reward`` on first use: the package root stays
    import-light, because every math-verify worker process imports ``fasthint.rewards`` (and so this
    file), and ``python -m fasthint.train`` checks its arguments before torch, transformers or
    math-verify load (``fasthint.precheck``)."""
    if name == "train":  # the callable module fasthint/train.py (``train(config, reward_funcs=...)``)
        return importlib.import_module("fasthint.train")
    if name in ("TrainConfig", "parse_args"):
        from fasthint import config  # lazy: the config pulls in torch, transformers and every component

        return getattr(config, name)
    if name == "math_reward":
        from fasthint import rewards  # lazy: math-verify takes seconds to import

        return rewards.math_reward
    raise AttributeError(f"module 'fasthint' has no attribute {name!r}")


def fit(config, reward_fn=None, reward_funcs=None) -> dict:
    """Trains with ``config`` (a ``TrainConfig``; see ``fasthint.train.fit``); returns final and
    evaluation metrics."""
    from fasthint.train import fit as _fit  # lazy: importing it here would make `python -m fasthint.train` warn

    return _fit(config, reward_fn, reward_funcs)


__all__ = ["TrainConfig", "parse_args", "fit", "train", "math_reward", "FastHintError", "__version__"]
