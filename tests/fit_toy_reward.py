"""``fasthint.fit`` with the CLI's options and a reward that depends only on the completion text
(the parity of its characters' code points), so that even an untrained toy model gets groups with
different rewards and real updates. Used by the resume and distributed tests
(``python|torchrun tests/fit_toy_reward.py --key value ...``)."""
import logging
import sys

from fasthint.config import parse_args
from fasthint.train import fit


def reward(text: str, row: dict) -> float:
    return float(sum(map(ord, text)) % 2 == 0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    fit(parse_args(sys.argv[1:]), reward_fn=reward)
