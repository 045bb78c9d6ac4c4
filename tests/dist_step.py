"""One rollout batch's update of the tiny toy model on a fixed global batch (one optimizer step; two
with ``steps_per_generation`` 2), on however many ranks launched this script (``python
tests/dist_step.py OUT [LOSS_AGG STEPS BF16]`` or ``torchrun --nproc_per_node=2 tests/dist_step.py OUT
...``). Rank r trains groups r, r+N, ... (whole groups); rank 0 writes the updated parameters and the
metrics to OUT.safetensors / OUT.json. ``BF16`` 1: ``--bf16`` (autocast in one process, FSDP2 mixed
precision on several). Used by tests/test_distributed.py."""
import json
import os
import sys

import torch

from fasthint import dist
from fasthint.batch import Sample
from fasthint.config import TrainConfig
from fasthint.data import render_prompt
from fasthint.loss import PolicyLoss
from fasthint.toy.model import build_model, build_tokenizer
from fasthint.update import policy_update

GROUPS, G = 5, 4


def global_batch(tok) -> list[list[Sample]]:
    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(GROUPS):
        prompt = render_prompt(tok, f"{i}+{2 * i}=?")
        group = []
        for _ in range(G):
            comp = torch.randint(3, len(tok), (2 + int(torch.randint(0, 7, (), generator=g)),), generator=g).tolist()
            old = (-2.0 - torch.rand(len(comp), generator=g)).tolist()
            group.append(Sample(prompt, comp, old, advantage=float(torch.randn((), generator=g)), group=i))
        groups.append(group)
    return groups


def main(out: str, loss_agg: str, steps: int, bf16: bool) -> None:
    dist.init()
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    policy = PolicyLoss(model)
    if dist.world_size() > 1:
        dist.shard(policy, bf16=bf16)
    cfg = TrainConfig(micro_batch_size=G, loss_agg=loss_agg, learning_rate=0.5, max_grad_norm=0.5,
                      steps_per_generation=steps, bf16=bf16).validate()
    # SGD: parameters move by lr * gradient, so equal parameters mean equal gradients (Adam's first
    # step, g / (|g| + eps), magnifies fp32 rounding of near-zero gradients)
    opt = torch.optim.SGD(policy.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with dist.gathered(policy), torch.no_grad():  # as in training: rollouts use the gathered LM first
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2 + 3 * dist.rank(), do_sample=False,
                       synced_gpus=False)
    groups = global_batch(tok)[:4 if steps > 1 else GROUPS]  # 4 groups: 2 steps x 2 ranks see the same halves
    mine = [s for group in groups[dist.rank()::dist.world_size()] for s in group]
    stats = policy_update(policy, mine, cfg, opt, sched)
    sd = dist.full_state_dict(policy) if dist.world_size() > 1 else model.state_dict()
    if dist.rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, out + ".safetensors")
        with open(out + ".json", "w") as fh:
            json.dump(stats, fh)
    dist.barrier()  # as the trainer does before closing: no rank tears gloo down while another writes
    dist.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = sys.argv[1:] + ["token-mean", "1", "0"][len(sys.argv) - 2:]
    main(args[0], args[1], int(args[2]), args[3] == "1")
    dist.exit_process(0)  # as torchrun -m fasthint.train ends
