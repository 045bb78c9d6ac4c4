"""``python -m fasthint.rehearse``: the real step on a fake cluster (issue 28). A tiny Qwen2 (the
toy's shape) at world 8 runs every phase in a few seconds; the sharded state is checked against the
hand count, the verdict against the card, bad input against the CLI's contract."""
import json
import subprocess
import sys

import pytest

from fasthint import rehearse
from fasthint.config import TrainConfig

TINY = ["--max_new_tokens", "32", "--max_prompt_length", "32", "--prompts_per_step", "16", "--num_generations", "4"]


def _run(argv, capsys):
    code = rehearse.main(argv)
    return code, capsys.readouterr()


def test_tiny_model_world_8_fits_and_matches_the_hand_count(tmp_path, capsys):
    out_path = tmp_path / "r.json"
    code, out = _run(TINY + ["--nproc_per_node", "4", "--nnodes", "2", "--gpu_memory_gb", "80", "--json",
                             str(out_path), "--steps_per_generation", "2", "--algo", "guide"], capsys)
    assert code == 0, out.err
    assert out.out.strip().splitlines()[-1].startswith("fits: peak")
    data = json.loads(out_path.read_text())
    assert data["world"] == 8 and data["fits"]
    names = [(p["phase"], p["rank"]) for p in data["phases"]]
    for rank in (0, 1):  # rank 0 and a non-zero rank, every phase of a Guide step with 2 optimizer steps
        for phase in ("rollout", "algorithm forwards", "old log-probs", "update", "weight sync", "checkpoint"):
            assert (phase, rank) in names
    hand, got = data["hand_count"], data["sharded_state_gb"]
    for kind in ("params", "grads", "optimizer"):  # rank 0's shards: the hand count up to uneven rows
        assert got[kind] == pytest.approx(hand[kind], rel=0.05), kind
    # the update holds the policy's activations and its gradients; the gathered phases the whole bf16 policy
    phases = {(p["phase"], p["rank"]): p for p in data["phases"]}
    assert phases[("update", 0)]["act+temp"] > 0
    whole_bf16 = 2 * hand["parameters"] / 1e9  # (plus, at a peak during the gather, a unit's all-gather buffer)
    assert whole_bf16 <= phases[("old log-probs", 0)]["gathered"] <= 2.05 * whole_bf16
    assert data["peak"]["gb"] == max(p["total"] for p in data["phases"])


def test_does_not_fit_exits_3(capsys):
    code, out = _run(TINY + ["--nproc_per_node", "8", "--gpu_memory_gb", "1"], capsys)
    assert code == 3
    assert out.out.strip().splitlines()[-1].startswith("does not fit: ")
    assert "GB of 1" in out.out


def test_vllm_reservation_counts_by_phase(capsys, tmp_path):
    """vLLM counts by what it reserves (utilisation x card) while awake, not by what it uses; asleep
    (sleep mode) it keeps a stated residue, and its bf16 weights during the sync."""
    path = tmp_path / "v.json"
    code, _ = _run(TINY + ["--engine", "vllm", "--vllm_sleep_mode", "true", "--vllm_gpu_memory_utilization", "0.5",
                           "--nproc_per_node", "2", "--gpu_memory_gb", "40", "--json", str(path)], capsys)
    assert code == 0
    ph = {p["phase"]: p for p in json.loads(path.read_text())["phases"] if p["rank"] == 0}
    asleep = rehearse.ASSUMPTIONS["vllm_asleep_gb"][0]
    assert ph["rollout"]["vllm"] == pytest.approx(20.0)
    assert ph["update"]["vllm"] == pytest.approx(asleep)
    params = json.loads(path.read_text())["hand_count"]["parameters"]
    assert ph["weight sync"]["vllm"] == pytest.approx(asleep + 2 * params / 1e9)


def test_bad_input_is_one_line_exit_2():
    for argv in (["--gpu_memory_gb", "-3"], ["--nproc_per_node", "x"], ["--model", "org/NoSuchModel"]):
        r = subprocess.run([sys.executable, "-m", "fasthint.rehearse", *argv], capture_output=True, text=True)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_hub_ids_resolve_to_the_shipped_shapes():
    cfg = rehearse.model_config("Qwen/Qwen2.5-7B-Instruct", None)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (3584, 28, 152064)
    plan = rehearse.plan(TrainConfig(prompts_per_step=128, num_generations=8, steps_per_generation=2,
                                     max_prompt_length=2048, max_new_tokens=8192, micro_batch_tokens=20480,
                                     padding_free=True).validate(), world=8, rank=0, pad=0)
    assert (plan.samples, plan.per_step, plan.micro_batches) == (128, 64, 32)
    assert plan.largest.input_ids.numel() == 20480


def test_gpu_smoke_script_runs_on_cpu():
    """scripts/gpu_smoke.py (the lent GPU's first check) runs its whole path on CPU at the toy's shape."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_smoke.py"), "--tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 steps: loss" in r.stdout and "rehearsal's trainer peak" in r.stdout


def test_the_frozen_reference_is_counted_whole_on_every_rank(capsys, tmp_path):
    """``--beta > 0`` loads the reference whole (bf16, the GPU default the rehearsal assumes when
    ``--bf16`` is not given) on every rank: every phase holds it."""
    paths = {beta: tmp_path / f"{beta}.json" for beta in ("0", "0.04")}
    for beta, path in paths.items():
        assert _run(TINY + ["--nproc_per_node", "4", "--beta", beta, "--json", str(path)], capsys)[0] == 0
    without, with_ref = (json.loads(paths[b].read_text()) for b in ("0", "0.04"))
    ref = 2 * with_ref["hand_count"]["parameters"] / 1e9
    for a, b in zip(without["phases"], with_ref["phases"]):
        assert a["phase"] == b["phase"]
        assert b["gathered"] - a["gathered"] == pytest.approx(ref, rel=0.02), a["phase"]
        if a["phase"] != "update":  # (the update also runs the reference's forward)
            assert b["trainer"] - a["trainer"] == pytest.approx(ref, rel=0.02), a["phase"]


def test_the_head_is_rehearsed_as_a_gpu_runs_it(capsys, tmp_path):
    """Qwen2.5-0.5B's shape (vocabulary 151,936 over a 896-wide model) on short sequences, where the
    head is the peak: each phase is rehearsed with the Triton kernels (their custom ops' fake kernels)
    and with the chunked torch path at its CUDA chunk, and the larger counts. Here torch's ``[chunk, V]``
    fp32 buffer (2^28 // V rows) outweighs Triton's dz buffer, so the forwards and the update name
    torch and hold at least that buffer; phases without a head forward say "either"."""
    path = tmp_path / "h.json"
    argv = ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--max_prompt_length", "256", "--max_new_tokens", "768",
            "--prompts_per_step", "8", "--num_generations", "4", "--micro_batch_tokens", "4096",
            "--steps_per_generation", "2", "--nproc_per_node", "2", "--json", str(path)]
    assert _run(argv, capsys)[0] == 0
    ph = {p["phase"]: p for p in json.loads(path.read_text())["phases"] if p["rank"] == 0}
    rows = max(2 ** 28 // 151936, 256)
    for name in ("old log-probs", "update"):
        assert ph[name]["head"] == "torch", ph[name]
        assert ph[name]["act+temp"] * 1e9 >= rows * 151936 * 4
    assert ph["weight sync"]["head"] == ph["checkpoint"]["head"] == "either"
