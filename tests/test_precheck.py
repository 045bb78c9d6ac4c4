"""The early command-line checks (``fasthint.precheck``): they know every flag, give the full checks'
messages, and refuse nothing the full checks accept (hub ids, the toy, abbreviations, --help)."""
import dataclasses

import pytest

from fasthint.errors import ConfigError, DataError, FastHintError
from fasthint.precheck import DEFAULTS, OPTION_TYPES, check_args


def test_the_option_list_is_trainconfigs():
    from fasthint.config import TrainConfig, _field_type

    fields = dataclasses.fields(TrainConfig)
    want = {f.name: _field_type(f) for f in fields}
    assert OPTION_TYPES == want, "fasthint/precheck.py's option list is stale: run python scripts/config_table.py"
    defaults = {f.name: f.default for f in fields}
    assert {k: defaults[k] for k in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize("argv", [
    [], ["--data", "toy", "--model", "toy"], ["--data", "gsm8k"], ["--data", "openai/gsm8k"],
    ["--data", "gsm8k:main", "--eval_data", "openai/gsm8k:main"], ["--eval_data", ""],
    ["--max-steps", "3", "--max_st", "4", "--bf16", "none", "--learning_rate", "1e-5", "--save_steps", "2e1"],
    ["--progress_bar", "false", "--algo", "not-checked-here"],
], ids=lambda a: " ".join(a) or "defaults")
def test_what_the_full_checks_accept_passes(argv, tmp_path, monkeypatch):
    """The values come out as the full parser converts them (``--algo`` is left to the full checks)."""
    from fasthint.config import build_parser
    from fasthint.precheck import coerce

    monkeypatch.chdir(tmp_path)  # the default --output_dir, outputs/default, is created here
    values = check_args(argv)
    given = vars(build_parser().parse_args(argv))
    assert values == {k: coerce(k, v, OPTION_TYPES[k]) for k, v in given.items() if k != "config"}


def test_existing_files_a_yaml_config_and_help_pass(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {data}\nmax-steps: 5\noutput_dir: {tmp_path / 'new' / 'out'}\n")
    assert check_args(["--config", str(cfg), "--max_steps", "7"]) == {
        "data": str(data), "max_steps": 7, "output_dir": str(tmp_path / "new" / "out")}
    assert check_args(["--data", "missing.jsonl", "--help"]) is None  # the full parser prints the help


def _full_error(argv) -> str:
    from fasthint.config import parse_args

    with pytest.raises(FastHintError) as e:
        parse_args(argv)
    return str(e.value)


def test_the_same_messages_as_the_full_parser(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: [1\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("max_stepz: 1\n")
    cases = [["--bogus", "1"], ["--max_steps", "abc"], ["--progress_bar", "maybe"], ["extra"],
             ["--config", str(tmp_path / "none.yaml")], ["--config", str(bad_yaml)], ["--config", str(unknown_key)]]
    for argv in cases:
        with pytest.raises(ConfigError) as e:
            check_args(argv)
        assert str(e.value) == _full_error(argv), argv


def test_missing_data_files_and_unwritable_output_dirs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for flag in ("data", "eval_data"):
        for source in (str(tmp_path / "nope.jsonl"), "nope.parquet", "./nope", "a/b/c"):
            with pytest.raises(DataError, match=f"data file '{source}' not found: pass --{flag} PATH"):
                check_args([f"--{flag}", source, "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--output_dir .* is a file: pass a directory"):
        check_args(["--output_dir", str(a_file)])
    with pytest.raises(ConfigError, match="a_file is a file, not a folder"):
        check_args(["--output_dir", str(a_file / "out")])
