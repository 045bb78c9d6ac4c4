"""Dataset loading/validation, toy data determinism, config parsing and CLI error handling."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from fasthint.config import TrainConfig, parse_args
from fasthint.data import PromptSampler, load_dataset
from fasthint.errors import ConfigError, DataError
from fasthint.toy.task import make_splits


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_jsonl_columns_and_uids(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": 2, "hint": "add"},
                                      {"question": "x?", "answer": "\\frac{1}{2}", "solution": "s"},
                                      {"question": "amc", "answer": 12.0}])
    rows = load_dataset(p)
    assert [r["uid"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["question"] == "1+1?" and rows[0]["answer"] == "2" and rows[0]["hint"] == "add"
    assert rows[2]["answer"] == "12"


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", "2"]}), p)
    assert [r["answer"] for r in load_dataset(p)] == ["1", "2"]


def test_hint_column_forms_reach_the_dataset_provider(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fasthint.algorithms.hint_providers import DatasetHintProvider

    rows = [{"question": "q0", "answer": "1", "hint": "same"},
            {"question": "q1", "answer": "1", "hint": ["w", "m", "s"]},
            {"question": "q2", "answer": "1", "hint": {"level_3": "S", "level_1": "W", "level_2": "M"}},
            {"question": "q3", "answer": "1", "hint": None}]
    want = [{1: "same", 2: "same", 3: "same"}, {1: "w", 2: "m", 3: "s"}, {1: "W", 2: "M", 3: "S"}, None]
    assert DatasetHintProvider().hints(load_dataset(_jsonl(tmp_path / "d.jsonl", rows))) == want
    p = str(tmp_path / "d.parquet")  # a list column (parquet has no mixed types: one form per file)
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", "2"], "hint": [["x", "y", "z"], None]}), p)
    assert DatasetHintProvider().hints(load_dataset(p)) == [{1: "x", 2: "y", 3: "z"}, None]


@pytest.mark.parametrize("rows,match", [
    ([{"question": "q"}], "no 'answer' column .*pass --answer_column"),
    ([{"answer": "1", "question": "q"}, {"answer": "1"}], "row 1: empty or missing question"),
    ([{"question": "q", "answer": None}], "row 0: empty, missing or non-scalar answer"),
    ([{"question": "q", "answer": [1, 2]}], "row 0: empty, missing or non-scalar"),
    ([{"question": "q", "answer": "\\frac{"}], "cannot be parsed"),
    ([{"question": "q", "answer": "1", "hint": 3}], "'hint' must be a text, a list of 3 texts"),
    ([{"question": "q", "answer": "1", "hint": ["a", "b"]}], "row 0: column 'hint' must be"),
    ([{"question": "q", "answer": "1", "hint": {"level_1": "a", "level_2": "b"}}], "column 'hint' must be"),
    ([{"question": "q", "answer": "1", "solution": 5}], "'solution' must be text"),
])
def test_data_errors_name_the_row(tmp_path, rows, match):
    """With --strict_data a bad row stops the run naming the row; without, it is skipped (every row
    bad is an error naming the first)."""
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match):
        load_dataset(path, strict=True)
    if len(rows) > 1:  # the good row stays, the bad one is counted
        assert [i for i, _ in load_dataset(path).skipped] == [1]
        return
    with pytest.raises(DataError, match="no 'answer' column" if "column .*" in match else "rows were skipped"):
        load_dataset(path)


def test_missing_and_empty_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(str(tmp_path / "e.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_dataset(str(tmp_path / "b.jsonl"))


def test_toy_data_deterministic_and_solutions_correct():
    a_train, a_eval = make_splits(3, 300)
    b_train, b_eval = make_splits(3, 300)
    assert a_train == b_train and a_eval == b_eval
    assert make_splits(4, 300)[0] != a_train
    from fasthint.rewards import math_reward

    eval_q = {r["question"] for r in a_eval if r["level"] > 1}
    assert not eval_q & {r["question"] for r in a_train}  # held out above level 1
    assert {r["level"] for r in a_train} == {1, 2, 3, 4}
    for r in a_eval[::40]:
        assert eval(r["question"].rstrip("=?")) == int(r["answer"])  # noqa: S307 - our own arithmetic
        assert math_reward(r["solution"], r["answer"]) == 1.0
        assert r["answer"] not in r["hint"].split("=")[-1:] or r["level"] == 1


def test_prompt_sampler_epochs_and_resume():
    s = PromptSampler(10, 4, seed=1)
    seen = [i for _ in range(5) for i in next(s)]
    assert sorted(seen[:8]) == sorted(set(seen[:8])) and len(set(seen[:10])) == 10
    state = s.state()
    nxt = next(s)
    s2 = PromptSampler(10, 4, seed=1)
    s2.load_state(state)
    assert next(s2) == nxt


def test_parse_args_overrides_yaml_and_dashes(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nlearning-rate: 0.01\ndual_clip: 3\n")
    cfg = parse_args(["--config", str(y), "--max-steps", "9", "--temperature", "0.7", "--progress_bar", "false"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.dual_clip, cfg.temperature, cfg.progress_bar) == \
        (9, 0.01, 3.0, 0.7, False)
    assert parse_args([]) == TrainConfig().validate()


@pytest.mark.parametrize("algo,adv,agg,provider,mask_trunc", [
    ("grpo", "group", "token-mean", "dataset", False),
    ("dr_grpo", "none", "seq-mean-token-sum-norm", "dataset", False),
    ("dapo", "group", "token-mean", "dataset", True),
    ("sage", "group", "token-mean", "self", False),
    ("sage_light", "group", "token-mean", "self", False),
    ("guide", "group", "token-mean", "dataset", False),
    ("hint", "group", "token-mean", "dataset", False),
])
def test_algo_auto_settings_resolve_and_explicit_values_win(algo, adv, agg, provider, mask_trunc):
    cfg = parse_args(["--algo", algo])
    assert (cfg.adv_scale, cfg.loss_agg, cfg.hint_provider, cfg.mask_truncated) == (adv, agg, provider, mask_trunc)
    cfg = parse_args(["--algo", algo, "--adv_scale", "batch", "--loss_agg", "seq-mean-token-mean",
                      "--hint_provider", "solution", "--mask_truncated", "true"])
    assert (cfg.adv_scale, cfg.loss_agg, cfg.hint_provider, cfg.mask_truncated) == \
        ("batch", "seq-mean-token-mean", "solution", True)


@pytest.mark.parametrize("argv,match", [
    (["--algo", "ppo"], "--algo 'ppo' is not known"),
    (["--hint_level", "4"], "--hint_level must be 1, 2 or 3"),
    (["--hint_provider", "teacher"], "--hint_provider 'teacher'"),
    (["--sage_light_min_acc", "0.5", "--sage_light_max_acc", "0.2"], "min <= max"),
    (["--affinity_ratio", "sampling"], "unrecognized arguments: --affinity_ratio"),  # removed: see issue 16
    (["--max_steps", "abc"], "--max_steps expects int"),
    (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--algo", "ppo"], "--algo 'ppo' is not known"),
    (["--loss_agg", "sum"], "--loss_agg"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--prompt_template", "no placeholder"], "must contain {question}"),
])
def test_invalid_config(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fasthint.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_input_one_line_exit_2(tmp_path):
    out = _cli("--data", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"),
               "--cache_dir", str(tmp_path / "c"), "--toy_warmstart_steps", "0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "missing.jsonl" in err[0] and "--data" in err[0]
    out = _cli("--learning_rate", "zero")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--learning_rate" in out.stderr
    data = _jsonl(tmp_path / "ok.jsonl", [{"question": "1+1=?", "answer": "2"}])
    out = _cli("--model", str(tmp_path), "--data", data, "--eval_data", "", "--output_dir", str(tmp_path / "o2"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "config.json" in out.stderr


def test_cli_help_documents_options():
    out = _cli("--help")
    assert out.returncode == 0
    for opt in ("--model", "--data", "--algo", "--max_steps", "--output_dir", "--seed", "--num_generations",
                "--learning_rate", "--temperature", "--config", "--loss_agg"):
        assert opt in out.stdout
