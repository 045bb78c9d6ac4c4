"""DAPO's dynamic sampling and batch-std advantages over however many ranks launched this script
(``python tests/dist_rollout.py OUT`` or ``torchrun --nproc_per_node=2 tests/dist_rollout.py OUT``),
with a scripted engine whose rewards depend only on the prompt and the completion's index. Rank 0
writes every trained group's advantages (by uid), the sampler position and DAPO's metrics to OUT.
Used by tests/test_distributed.py."""
import json
import sys

from fasthint import dist
from fasthint.algorithms import RolloutContext, make_algorithm
from fasthint.algorithms.base import group_advantages
from fasthint.config import TrainConfig
from fasthint.data import PromptSampler
from fasthint.engines.base import Completion, SamplingConfig


class Scripted:
    def generate(self, prompts, sampling):
        return [Completion(i, [p[0], k], [-1.0, -1.0]) for i, p in enumerate(prompts) for k in range(sampling.n)]


class Tok:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [f"{a} {k}" for a, k in ids]


def reward(text: str, row: dict) -> float:
    uid, k = (int(x) for x in text.split())
    return float(k % 2 == 0) * (1 + uid % 4) if uid % 3 == 0 else 0.0  # a third of prompts informative


def main(out: str) -> None:
    dist.init()
    rows = [{"uid": str(i), "question": f"q{i}", "answer": "0"} for i in range(60)]
    cfg = TrainConfig(algo="dapo", adv_scale="batch", prompts_per_step=6, num_generations=4, dapo_max_rounds=6)
    cfg.validate()
    sampler = PromptSampler(len(rows), cfg.prompts_per_step, seed=1)
    ctx = RolloutContext(engine=Scripted(), tokenizer=Tok(), sampling=SamplingConfig(n=4),
                         score=lambda texts, rs, *ids: [reward(t, r) for t, r in zip(texts, rs)],
                         render=lambda row, hint: [int(row["uid"])],
                         next_rows=lambda: [rows[i] for i in next(sampler)])
    algo = make_algorithm(cfg)
    batch = [rows[i] for i in next(sampler)][dist.rank()::dist.world_size()]
    groups, info = algo.rollout(batch, ctx)
    adv = group_advantages(groups, cfg)
    mine = {g.uid: a for g, a in zip(groups, adv)}
    parts = dist.all_gather(mine)
    if dist.rank() == 0:
        merged = {k: v for p in parts for k, v in p.items()}
        with open(out, "w") as fh:
            public = {k: v for k, v in info.items() if not k.startswith("_")}  # "_" keys: for the metrics code
            json.dump({"advantages": merged, "info": public, "sampler": sampler.state()}, fh)
    dist.barrier()  # as the trainer does before closing: no rank tears gloo down while another writes
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)  # as torchrun -m fasthint.train ends
