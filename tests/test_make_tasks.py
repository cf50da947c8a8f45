"""`make tasks-quick` on tiny fixtures laid out like ../shared/data: every stage runs, the report holds
the quality table, and a re-run reuses the finished adapters and evaluations."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tests.fixtures.training_corpus import task_records, write_jsonl
from training import make_tasks


def _shared_like(root: Path) -> Path:
    recs = task_records(seed=3, n=24)
    zh = [{**r, "tgt": "我喜欢读书。", "tgt_lang": "zh"} for r in recs["translate"]]
    for spec, rows in (("multi30k_en_de", recs["translate"]), ("dialogsum", recs["summarize"]), ("tatoeba_en_zh", zh)):
        task = next(t for t in make_tasks.TASKS if t.dataset == spec)
        for name, part in ((task.train, rows[:16]), (task.val, rows[16:20]), (task.test, rows[20:])):
            path = root / spec / name
            if name.endswith(".gz"):
                path.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(path, "wt", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in part)
            else:
                write_jsonl(path, part)
    intents = [{"text": f"{w} my card please {i}", "label": lab} for i in range(6)
               for lab, w in (("card_arrival", "where is"), ("lost_card", "I lost"), ("exchange_rate", "what rate for"))]
    write_jsonl(root / "banking77" / "train.jsonl", intents)
    write_jsonl(root / "banking77" / "test.jsonl", intents[:6])
    return root


def test_quick_run_builds_adapters_and_writes_the_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = _shared_like(tmp_path / "data")
    argv = ["--quick", "--data_dir", str(data), "--init_from", str(tiny_checkpoint),
            "--adapters_dir", str(tmp_path / "adapters"), "--out_dir", str(tmp_path / "out")]
    assert make_tasks.cli(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["adapter"]: r for r in report["rows"]}
    assert set(rows) == {"translate-de", "summarize", "translate-zh"}
    assert rows["summarize"]["metric"] == "rougeL" and rows["translate-de"]["split"] == "test_2016_flickr"
    assert all(r["n"] == 4 and r["steps"] == 2 and 0 <= r["after"] <= 100 for r in rows.values())
    for name in rows:
        assert (tmp_path / "adapters" / name / "adapter_model.safetensors").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| translate | multi30k_en_de | test_2016_flickr | 4 | chrf |" in md
    assert report["head"]["status"] == "built" and 0 <= report["head"]["test_accuracy"] <= 1
    assert (tmp_path / "adapters" / "banking77").is_dir() and "banking77 head" in md
    # re-running the same command reuses everything: same numbers, adapters untouched
    before = (tmp_path / "adapters" / "summarize" / "adapter_model.safetensors").read_bytes()
    assert make_tasks.cli(argv) == 0
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["before"], r["after"]) for r in again["rows"]] == [(r["before"], r["after"]) for r in report["rows"]]
    assert (tmp_path / "adapters" / "summarize" / "adapter_model.safetensors").read_bytes() == before
