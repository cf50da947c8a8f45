"""`make tasks`: build the task adapters (and the Banking77 head), measure them, write one report.

    python -m training.make_tasks --data_dir ../shared/data                # make tasks
    python -m training.make_tasks --data_dir ../shared/data --quick        # make tasks-quick (minutes)

For each task of TASKS: evaluate the base model on a seeded sample of the dataset's test split,
train a LoRA adapter with `training.adapt` (selected on the validation split, bounded by a time
budget), evaluate base + adapter on the same sample, and time every stage. `report.md` and
`report.json` in `--out_dir` hold the quality table (before -> after, n, minutes) and the commands.

Every stage can be killed and the same command re-run: adapters resume from their state.pt and
an evaluation whose report already exists for the same model and settings is not repeated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import tasks
from training import adapt, evaluate
from training.common import TrainingError, build_config, config_dict, field, run_job, write_json


@dataclass(frozen=True)
class TaskSpec:
    """One adapter to build: the shared-data files it trains, selects and reports on."""
    name: str  # adapter name (and the adapt preset holding its hyper-parameters)
    task: str
    dataset: str  # directory under data_dir
    train: str
    val: str
    test: str
    metric: str  # key of training.evaluate's result
    target: float  # the acceptance threshold on the test split
    max_new_tokens: int  # generation budget when evaluating (references are ~20 / ~60 tokens)


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("translate-de", tasks.TRANSLATE, "multi30k_en_de", "train.jsonl.gz", "validation.jsonl",
             "test_2016_flickr.jsonl", "chrf", 45.0, 64),
    TaskSpec("summarize", tasks.SUMMARIZE, "dialogsum", "train.jsonl", "validation.jsonl", "test.jsonl", "rougeL",
             30.0, 96),
    TaskSpec("translate-zh", tasks.TRANSLATE, "tatoeba_en_zh", "train.jsonl.gz", "validation.jsonl", "test.jsonl",
             "chrf", 20.0, 48),
)
QUICK = dict(max_steps=2, eval_every=2, save_every=2, val_examples=4, max_records=16, warmup_steps=1, seq_len=512)


@dataclass
class MakeTasksConfig:
    data_dir: str = field("../shared/data", help="the shared data (one directory per dataset)")
    init_from: str = field("default", help="base checkpoint dir, or 'default' (SmolLM2-135M-Instruct)")
    adapters_dir: str = field("adapters", help="where adapters are published")
    out_dir: str = field("runs/tasks", help="report.md / report.json and the per-stage runs")
    only: list[str] = field(default_factory=list, help=f"build only these adapters (of {[t.name for t in TASKS]})")
    train_budget_min: float = field(30.0, help="training time budget per adapter, minutes (translate-de's "
                                    "420-step schedule needs ~29 on a 2-core CPU)")
    eval_limit: int = field(100, help="test examples per task (a seeded sample; 0 = the whole split)")
    quick: bool = field(False, help="a smoke run of minutes: 2 steps per adapter, 4 test examples")
    head: bool = field(True, help="also build the Banking77 classification head (training.head)")
    head_budget_min: float = field(10.0, help="time budget of the head's feature extraction, minutes")
    threads: int = field(1, help="CPU threads for torch")


def _cached_eval(cfg: evaluate.EvaluateConfig) -> dict[str, Any]:
    """evaluate.main, unless out_dir already holds a report for exactly this config and adapter bytes."""
    key = {"config": config_dict(cfg), "adapter": _digest(Path(cfg.adapter) / "adapter_model.safetensors")
           if cfg.adapter else None}
    key_path, report = Path(cfg.out_dir) / "key.json", Path(cfg.out_dir) / "report.json"
    if key_path.exists() and report.exists() and json.loads(key_path.read_text(encoding="utf-8")) == key:
        return json.loads(report.read_text(encoding="utf-8"))
    result = evaluate.main(cfg)
    write_json(key_path, key)
    return result


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter_config(cfg: MakeTasksConfig, spec: TaskSpec) -> adapt.AdaptConfig:
    data = Path(cfg.data_dir).resolve() / spec.dataset
    over: dict[str, Any] = dict(name=spec.name, init_from=cfg.init_from, train=[f"{spec.task}={data / spec.train}"],
                                val=[f"{spec.task}={data / spec.val}"], adapters_dir=cfg.adapters_dir,
                                out_dir=str(Path(cfg.out_dir) / "adapt" / spec.name),
                                time_budget_min=cfg.train_budget_min, threads=cfg.threads)
    if cfg.quick:
        over.update(QUICK)
    return build_config(adapt.AdaptConfig, adapt.PRESETS, spec.name, **over)


def _eval_config(cfg: MakeTasksConfig, spec: TaskSpec, adapter: str, tag: str) -> evaluate.EvaluateConfig:
    test = str(Path(cfg.data_dir).resolve() / spec.dataset / spec.test)
    return evaluate.EvaluateConfig(
        checkpoint=cfg.init_from, adapter=adapter, out_dir=str(Path(cfg.out_dir) / "eval" / f"{spec.name}-{tag}"),
        summarize=test if spec.task == tasks.SUMMARIZE else "", translate=test if spec.task == tasks.TRANSLATE else "",
        limit=4 if cfg.quick else cfg.eval_limit, max_new_tokens=8 if cfg.quick else spec.max_new_tokens, max_num_seqs=16,
        threads=cfg.threads)


def build_task(cfg: MakeTasksConfig, spec: TaskSpec) -> dict[str, Any]:
    """Evaluate before, train, evaluate after; one row of the report."""
    row: dict[str, Any] = {"adapter": spec.name, "task": spec.task, "dataset": spec.dataset,
                           "split": Path(spec.test).name.split(".")[0], "metric": spec.metric, "target": spec.target}
    before_report = _cached_eval(_eval_config(cfg, spec, "", "base"))
    summary = adapt.main(_adapter_config(cfg, spec))
    after_report = _cached_eval(_eval_config(cfg, spec, summary["adapter"], "adapter"))
    before, after = before_report["results"][spec.task], after_report["results"][spec.task]
    acfg = _adapter_config(cfg, spec)
    # minutes as measured when each stage really ran (a re-run reuses finished stages)
    row.update(n=after["examples"], before=round(before[spec.metric], 2), after=round(after[spec.metric], 2),
               met=after[spec.metric] >= spec.target, train_minutes=summary["train_minutes"],
               steps=summary["steps"], finished_schedule=summary["finished_schedule"],
               tokens_per_s=summary["tokens_per_s"], val_loss=summary["val_loss"],
               minutes={"eval_before": round(before_report["seconds"] / 60, 2), "train": summary["train_minutes"],
                        "eval_after": round(after_report["seconds"] / 60, 2)},
               command=f"python -m training.adapt --preset {spec.name} --train {acfg.train[0]} --val {acfg.val[0]}",
               samples=after.get("samples", [])[:2])
    return row


def head_stage(cfg: MakeTasksConfig) -> dict[str, Any]:
    """The Banking77 classification head on frozen features (`training.head`): one forward per text."""
    from training import head

    data = Path(cfg.data_dir).resolve() / "banking77"
    over: dict[str, Any] = dict(base=cfg.init_from, train=str(data / "train.jsonl"), test=str(data / "test.jsonl"),
                                adapters_dir=cfg.adapters_dir, threads=cfg.threads, progress=False,
                                time_budget_min=cfg.head_budget_min)
    if cfg.quick:
        over.update(layer=1, val_per_label=0, max_test=8, l2=[1e-3])
    t0 = time.perf_counter()
    metrics = head.main(build_config(head.HeadConfig, head.PRESETS, None, **over))
    return {"status": "built", "adapter": "banking77", "test_accuracy": metrics["test_accuracy"],
            "test_n": metrics["test_n"], "minutes": round((time.perf_counter() - t0) / 60, 2),
            "command": f"python -m training.head --train {over['train']} --test {over['test']}"}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Task adapters: quality on the shared test splits", "",
             f"Base model `{report['init_from']}`, CPU `{report['cpu']}`, {report['threads']} thread(s), "
             f"load average at the start {report['load_average']}. Stage minutes add up to "
             f"{_stage_total(report):.1f} min (this invocation: {report['minutes']:.1f} min of wall time).", "",
             "| task | dataset | split | n | metric | before | after | target | train min | steps | adapter |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['task']} | {r['dataset']} | {r['split']} | {r['n']} | {r['metric']} | {r['before']:.2f} | "
                     f"{r['after']:.2f} | {r['target']:g} {'(met)' if r['met'] else '(not met)'} | "
                     f"{r['train_minutes']:.1f} | {r['steps']}{'' if r['finished_schedule'] else ' (budget)'} | "
                     f"`{r['adapter']}` |")
    lines += ["", "Minutes per stage:", ""]
    lines += [f"- {r['adapter']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["minutes"].items())
              + f" ({r['tokens_per_s']:.0f} training tokens/s)" for r in report["rows"]]
    h = report["head"]
    head_line = (f"test accuracy {100 * h['test_accuracy']:.2f} % (n={h['test_n']}), {h['minutes']:.1f} min"
                 if h.get("status") == "built" else h["status"])
    lines += [f"- banking77 head (`{report['adapters_dir']}/banking77`): {head_line}", "", "Commands:", "", "```",
              f"python -m training.make_tasks {' '.join(report['argv'])}   # this report"]
    lines += [r["command"] + f" --time_budget_min {report['train_budget_min']:g}" for r in report["rows"]]
    lines += [h["command"]] if h.get("command") else []
    lines += [f"python -m training.evaluate --adapter {report['adapters_dir']}/{r['adapter']} "
              f"--{r['task']} <test file>   # the merged model through the engine" for r in report["rows"]]
    lines += ["```", "", f"Serving: `SEEDLING_ADAPTERS_DIR={report['adapters_dir']} make serve` serves every adapter "
              "(and the head) next to the base model, chosen per request by `model` (`GET /v1/models` lists them); "
              "an adapter written there later is picked up without a restart.", ""]
    for r in report["rows"]:
        lines += [f"- {r['adapter']} sample: `{json.dumps(s, ensure_ascii=False)}`" for s in r["samples"]]
    return "\n".join(lines) + "\n"


def _stage_total(report: dict[str, Any]) -> float:
    """Training minutes exclude model loading and validation passes; evaluation minutes are engine time."""
    head = report.get("head", {}).get("minutes", 0.0)
    return sum(sum(r["minutes"].values()) for r in report["rows"]) + head


def main(cfg: MakeTasksConfig, argv: list[str] | None = None) -> dict[str, Any]:
    import os
    import platform

    specs = [t for t in TASKS if not cfg.only or t.name in cfg.only]
    unknown = sorted(set(cfg.only) - {t.name for t in TASKS})
    if unknown:
        raise TrainingError(f"unknown --only {unknown}; choose from {[t.name for t in TASKS]}")
    missing = [str(Path(cfg.data_dir) / t.dataset) for t in specs if not (Path(cfg.data_dir) / t.dataset).exists()]
    if missing:
        raise TrainingError(f"data not found: {missing}; pass --data_dir (the shared data directory)")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"init_from": cfg.init_from, "cpu": _cpu_name() or platform.processor(),
                              "threads": cfg.threads, "load_average": [round(x, 1) for x in os.getloadavg()],
                              "adapters_dir": cfg.adapters_dir, "train_budget_min": cfg.train_budget_min,
                              "argv": argv or [], "config": config_dict(cfg), "rows": []}
    for spec in specs:
        report["rows"].append(build_task(cfg, spec))
        _write(cfg, report, t0)  # a partial report survives a later stage's failure
    report["head"] = head_stage(cfg) if cfg.head else {"status": "not run (--no-head)"}
    _write(cfg, report, t0)
    print((Path(cfg.out_dir) / "report.md").read_text(encoding="utf-8"))
    return report


def _write(cfg: MakeTasksConfig, report: dict[str, Any], t0: float) -> None:
    report["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    report.setdefault("head", {"status": "pending"})
    write_json(Path(cfg.out_dir) / "report.json", report)
    (Path(cfg.out_dir) / "report.md").write_text(markdown(report), encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cli(argv: list[str] | None = None, prog: str = "python -m training.make_tasks") -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return run_job(lambda cfg: main(cfg, args), MakeTasksConfig, {}, args, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
