"""Datasets from wherever users keep them (Hugging Face ``datasets``): save_to_disk folders, CSV,
Arrow, Parquet, JSONL; column flags; bad rows skipped and counted, or fatal with --strict_data."""
import json

import pytest

from fasthint.data import Columns, load_dataset
from fasthint.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _tiny_cfg(tmp_path, **kw):
    import fasthint

    base = dict(max_steps=1, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), toy_warmstart_steps=0,
                eval_data="", prompts_per_step=2, num_generations=4, max_new_tokens=8, progress_bar=False)
    base.update(kw)
    return fasthint.TrainConfig(**base)


def test_save_to_disk_csv_and_arrow_with_renamed_columns(tmp_path):
    import datasets

    cols = Columns(question="prompt_text", answer="gold", hint="tips")
    ds = datasets.Dataset.from_dict({"prompt_text": ["1+1=?", "2+3=?"], "gold": ["2", "5"], "tips": ["add", None],
                                     "source": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    ds.to_csv(str(tmp_path / "d.csv"))
    for src, split, n in ((tmp_path / "one", "train", 2), (tmp_path / "dict", "test", 1), (tmp_path / "d.csv", "x", 2)):
        rows = load_dataset(str(src), split=split, columns=cols)
        assert len(rows) == n and not rows.skipped
        assert rows[-1]["question"] == "2+3=?" and rows[-1]["answer"] == "5" and rows[-1]["source"] == "b"
    assert load_dataset(str(tmp_path / "one"), columns=cols)[0]["hint"] == "add"
    with pytest.raises(DataError, match=r"splits \['test', 'train'\] and no 'validation': pass --data_split"):
        load_dataset(str(tmp_path / "dict"), split="validation", columns=cols)
    with pytest.raises(DataError, match="no 'question' or 'problem' column .*pass --question_column"):
        load_dataset(str(tmp_path / "one"))  # the default columns are not there: the flag is named
    with pytest.raises(DataError, match="no 'answer' column .*pass --answer_column"):
        load_dataset(str(tmp_path / "one"), columns=Columns(question="prompt_text"))
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert len(load_dataset(str(arrow), columns=cols)) == 2


def test_bad_rows_skipped_counted_or_fatal_when_strict(tmp_path):
    rows = [{"question": "ok", "answer": "1"}, {"question": "", "answer": "1"}, {"question": "q", "answer": None},
            {"question": "q", "answer": "\\frac{"}, {"question": "q", "answer": "2", "hint": 3},
            {"question": "fine", "answer": "3"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    got = load_dataset(path)
    assert [r["question"] for r in got] == ["ok", "fine"] and [r["uid"] for r in got] == ["0", "5"]
    assert [i for i, _ in got.skipped] == [1, 2, 3, 4] and got.total == 6
    assert "cannot be parsed" in got.skipped[2][1]
    with pytest.raises(DataError, match="row 1: empty or missing question"):
        load_dataset(path, strict=True)
    with pytest.raises(DataError, match="all 2 rows were skipped"):
        load_dataset(_jsonl(tmp_path / "e.jsonl", rows[1:3]))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing.parquet"))
    with pytest.raises(DataError, match="unknown format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_dataset(str(tmp_path / "d.txt"))


def test_hub_id_that_cannot_load_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # read at import: patch the
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)    # constants, not the environment
    with pytest.raises(DataError, match="cannot load 'no-such-user/no-such-dataset' from the Hugging Face hub"):
        load_dataset("no-such-user/no-such-dataset")


@pytest.mark.slow
def test_jsonl_with_four_bad_rows_trains_and_reports_skipped_rows(tmp_path):
    """Four bad rows of different kinds (no question, no answer, an answer math-verify cannot parse, a
    prompt over --max_prompt_length) are skipped; the run trains on the rest and logs
    data/skipped_rows = 4 in every metrics row."""
    import fasthint

    good = [{"question": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(6)]
    bad = [{"question": None, "answer": "1"}, {"question": "1+2=?"}, {"question": "3+3=?", "answer": "\\sqrt{"},
           {"question": "9+" * 200 + "1=?", "answer": "1"}]
    data = _jsonl(tmp_path / "d.jsonl", good[:3] + bad + good[3:])
    res = fasthint.fit(_tiny_cfg(tmp_path, data=data, max_steps=2, max_prompt_length=64),
                       reward_fn=lambda text, row: float(len(text) % 2))
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["data/skipped_rows"] for r in rows] == [4, 4] and res["last"]["step"] == 2


@pytest.mark.slow
def test_save_to_disk_dataset_with_renamed_columns_trains_two_steps(tmp_path):
    import datasets

    import fasthint

    n = 8
    datasets.Dataset.from_dict({"prompt_text": [f"{i}+1=?" for i in range(n)], "gold": [str(i + 1) for i in range(n)]}
                               ).save_to_disk(str(tmp_path / "ds"))
    cfg = _tiny_cfg(tmp_path, data=str(tmp_path / "ds"), question_column="prompt_text", answer_column="gold",
                    max_steps=2)
    res = fasthint.fit(cfg)  # the built-in math reward against the renamed gold column
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["data/skipped_rows"] == 0
    assert res["last"]["step"] == 2


def test_eval_set_keeps_its_standard_columns_when_training_columns_are_mapped(tmp_path):
    cols = Columns(question="prompt_text", answer="gold")
    bench = _jsonl(tmp_path / "math500.jsonl", [{"problem": "1+1=?", "answer": "2"}])
    assert load_dataset(bench, columns=cols, fallback=True)[0]["answer"] == "2"
    with pytest.raises(DataError, match="pass --question_column"):
        load_dataset(bench, columns=cols)  # the training set itself gets no fallback
    mapped = _jsonl(tmp_path / "e.jsonl", [{"prompt_text": "2+2=?", "gold": "4", "answer": "wrong"}])
    assert load_dataset(mapped, columns=cols, fallback=True)[0]["answer"] == "4"  # mapped columns win where present
