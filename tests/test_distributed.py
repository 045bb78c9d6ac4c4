"""Data parallelism on 2 CPU ranks (gloo, FSDP2): one step equals one process with the same global
batch; a 2-rank training run killed with SIGKILL resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from fasthint.checkpoint import list_checkpoints

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "kernels")]), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd, **kw):
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("loss_agg,steps", [("token-mean", 1), ("seq-mean-token-sum-norm", 1), ("token-mean", 2)])
def test_two_ranks_one_step_equals_one_rank(tmp_path, loss_agg, steps):
    """Same parameters after one SGD step (lr 0.5, gradient clipping) from 5 groups split 3/2 over two
    ranks (so one rank runs an idle micro-batch) as from one process; with ``steps_per_generation`` 2,
    after two steps on 4 groups (each rank's first half is the global first half), old log-probs
    recomputed first. Tolerance 1e-7 plus 2 ulps of the weight (rtol 2^-22): fp32 sums in another
    order (the gradient reduction) are the only difference, about 4e-9 in the update (measured), but
    the update lands on norm weights near 1.0, where one float32 ulp is 1.2e-7: with torch held to its
    scalar kernels (ATEN_CPU_CAPABILITY=default) one such weight rounded the other way."""
    from safetensors.torch import load_file

    script = os.path.join(REPO, "tests", "dist_step.py")
    _run([sys.executable, script, str(tmp_path / "one"), loss_agg, str(steps)])
    _run(TORCHRUN + [script, str(tmp_path / "two"), loss_agg, str(steps)])
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    init = {k: v for k, v in _initial().items() if k in one}
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 5e-5  # the step changed the parameters (by far more than the tolerance)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=2.0 ** -22, atol=1e-7, msg=k)
    s1, s2 = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    for k in ("loss", "grad_norm", "entropy", "num_tokens/trained", "clip_ratio/high"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_bf16_two_ranks_fsdp_mixed_precision_matches_one_rank(tmp_path):
    """--bf16 on two ranks is FSDP2's MixedPrecisionPolicy (bf16 gathers and compute, fp32 master
    weights and reduction); one process autocasts. Their updates agree within bf16 precision
    (measured: 0.8% of the update's norm, about two bf16 ulps), the master weights stay fp32, and
    bf16 did act (the update differs from fp32's by far more than fp32 rounding)."""
    from safetensors.torch import load_file

    script = os.path.join(REPO, "tests", "dist_step.py")
    _run([sys.executable, script, str(tmp_path / "one"), "token-mean", "1", "1"])
    _run([sys.executable, script, str(tmp_path / "fp32"), "token-mean", "1", "0"])
    _run(TORCHRUN + [script, str(tmp_path / "two"), "token-mean", "1", "1"])
    one, fp32, two = (load_file(tmp_path / f"{n}.safetensors") for n in ("one", "fp32", "two"))
    init = _initial()

    def rel(a, b):  # relative difference of the two updates
        num = sum(((a[k] - init[k]) - (b[k] - init[k])).double().norm() ** 2 for k in a)
        den = sum((b[k] - init[k]).double().norm() ** 2 for k in a)
        return (num / den).sqrt().item()

    assert all(v.dtype == torch.float32 for v in two.values())
    assert rel(two, one) < 0.03
    assert rel(two, fp32) > 1e-4
    s1, s2 = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    for k in ("loss", "grad_norm", "entropy"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-2), k


def _initial():
    from fasthint.toy.model import build_model, build_tokenizer

    torch.manual_seed(0)
    return build_model(build_tokenizer(), seed=0).state_dict()


def _train(out, cache, steps):
    return TORCHRUN + [os.path.join(REPO, "tests", "fit_toy_reward.py"), "--output_dir", str(out),
                       "--cache_dir", str(cache),
                       "--toy_warmstart_steps", "0", "--toy_train_size", "12", "--eval_data", "toy",
                       "--eval_max_prompts", "4", "--eval_samples", "0", "--prompts_per_step", "4",
                       "--num_generations", "4", "--max_new_tokens", "8", "--max_steps", str(steps),
                       "--save_steps", "1", "--progress_bar", "false", "--algo", "sage_light",
                       "--hint_provider", "solution", "--sage_light_min_acc", "0.5", "--sage_light_max_acc", "0.9",
                       "--num_threads", "1"]


def _metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]


@pytest.mark.slow
def test_two_rank_run_killed_and_resumed_logs_the_same_metrics(tmp_path):
    steps, cache = 5, tmp_path / "cache"
    _run(_train(tmp_path / "ref", cache, steps))
    ref = _metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == list(range(1, steps + 1))
    assert sum(r["grad_norm"] > 0 for r in ref) >= steps // 2 and any(r["hint/rate"] > 0 for r in ref)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train(out, cache, steps), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    done = list_checkpoints(str(out))
    assert done and done[-1][0] < steps, "the run finished before it could be killed"
    assert {f for f in os.listdir(done[-1][1]) if f.startswith("optimizer.rank")} == {
        "optimizer.rank0.safetensors", "optimizer.rank0.json", "optimizer.rank1.safetensors", "optimizer.rank1.json"}
    _run(_train(out, cache, steps))
    got = _metrics(out)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for ra, rb in zip(ref, got):
        for k in ra:
            same = (rb[k] is None) if ra[k] is None else rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9)
            assert same, (ra["step"], k)


@pytest.mark.slow
def test_dapo_and_batch_std_advantages_on_two_ranks_equal_one(tmp_path):
    """DAPO on 2 ranks keeps the same groups, runs the same rounds (drawing the same extra global
    batches) and gives the same batch-std advantages as one process (rewards depend only on the
    prompt, so the two runs see the same groups)."""
    script = os.path.join(REPO, "tests", "dist_rollout.py")
    _run([sys.executable, script, str(tmp_path / "one.json")])
    _run(TORCHRUN + [script, str(tmp_path / "two.json")])
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert one["info"]["dapo/rounds"] >= 2  # dynamic sampling did draw more prompts
    assert len(one["advantages"]) == 6 and one["advantages"].keys() == two["advantages"].keys()
    public = lambda info: {k: v for k, v in info.items() if not k.startswith("_")}  # noqa: E731 - rank-local lists
    assert public(one["info"]) == public(two["info"]) and one["sampler"] == two["sampler"]
    group_std = []
    for uid, a in one["advantages"].items():
        assert two["advantages"][uid] == pytest.approx(a, abs=1e-6)
        group_std.append(torch.tensor(a).std().item())
    assert max(group_std) - min(group_std) > 0.1  # batch scaling: group stds differ (not 1 each)


@pytest.mark.slow
def test_two_ranks_load_from_rank0_without_full_copies(tmp_path):
    """Under torchrun only rank 0 reads the checkpoint; the others build on the meta device and get
    their shards (and the rotary buffers, which are not in the state dict) from rank 0. Every rank's
    gathered model gives the checkpoint's logits, and the full state dict is the checkpoint's, tied
    embedding included."""
    from safetensors.torch import load_file

    from fasthint.toy.model import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-default values everywhere (norms included)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].double()
    script = os.path.join(REPO, "tests", "dist_load.py")
    _run(TORCHRUN + [script, str(ckpt), str(tmp_path / "two")])
    every = json.load(open(tmp_path / "two.json"))
    assert len(every) == 2
    for logits in every:
        torch.testing.assert_close(torch.tensor(logits, dtype=torch.float64), want, rtol=0, atol=1e-5)
    sd, ref = load_file(tmp_path / "two.safetensors"), model.state_dict()
    assert set(ref) <= set(sd) | {k for k in ref if "lm_head" in k}
    for k, v in sd.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_equal_one_process(tmp_path):
    """Multi-node torchrun as on two machines: two launchers of one process each (``--nnodes 2``)
    meet through the c10d rendezvous on an endpoint (here localhost); the step equals one process's
    with the same global batch (1e-7, as two ranks on one launcher). A node's rank is assigned by the
    rendezvous, so either launcher may be rank 0; both name the same output and rank 0 writes it."""
    from safetensors.torch import load_file

    script = os.path.join(REPO, "tests", "dist_step.py")
    _run([sys.executable, script, str(tmp_path / "one"), "token-mean", "1"])
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=fasthint-test",
            script, str(tmp_path / "two"), "token-mean", "1"]
    procs = [subprocess.Popen(node, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    init = {k: v for k, v in _initial().items() if k in one}
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 5e-5
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=2.0 ** -22, atol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_weight_stream_one_layer_at_a_time_in_the_engine_dtype(tmp_path, bf16):
    """What the vLLM engine receives after each step (``dist.full_parameters``) on two FSDP2 ranks:
    every parameter of the LM once under each of its Hugging Face names (the tied head too), whole, cast to
    bf16 on the trainer's side, exactly the one-process weights cast to bf16 (the mixed-precision
    gather casts the same fp32 values), with never more than one decoder layer unsharded."""
    from safetensors.torch import load_file

    from fasthint.toy.model import build_model, build_tokenizer

    _run(TORCHRUN + [os.path.join(REPO, "tests", "dist_params.py"), str(tmp_path / "s"), str(int(bf16))])
    got, info = load_file(tmp_path / "s.safetensors"), json.load(open(tmp_path / "s.json"))
    want = dict(build_model(build_tokenizer(), seed=0).named_parameters(remove_duplicate=False))
    assert "lm_head.weight" in want  # tied to the embeddings: sent under both names (vLLM's CPU loader needs both)
    assert sorted(info["order"]) == sorted(want)  # each once
    for name, p in want.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], p.detach().to(torch.bfloat16)), name
    assert info["most_whole_layers"] == 1
