"""/classify through classification heads: registry (matching, refusal, pick-up without restart),
batching of concurrent requests into shared engine calls, and the HTTP behaviour on a tiny model.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_app_heads.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.heads import HeadBatcher, HeadRegistry
from model.checkpoint import load_checkpoint
from model.features import encode_texts, extract_features, load_feature_model, precision_unavailable
from model.head import ClassifierHead, HeadInfo, base_identity, classify_ids, load_head, save_head
from tests.test_app_support import app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

LABELS = ["lost_card", "transfer", "balance"]


def _save(adapters: Path, name: str, labels: list[str], base: dict[str, Any], seed: int = 0) -> None:
    torch.manual_seed(seed)
    head = ClassifierHead(64, len(labels))
    save_head(adapters / name, head, HeadInfo(labels=labels, layer=1, pooling="mean", base=base))


# ---------------------------------------------------------------------------- registry
def test_registry_matches_label_sets_and_refuses_other_bases(tmp_path: Path) -> None:
    base = {"name": "m", "weights_sha256": "a" * 64}
    _save(tmp_path, "intents", LABELS, base)
    _save(tmp_path, "other_base", ["x", "y"], {"name": "m2", "weights_sha256": "b" * 64})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "head.json").write_text("{not json")
    (tmp_path / "lora_only").mkdir()  # an adapter dir without a head is none of the registry's business
    reg = HeadRegistry(tmp_path, base)
    reg.refresh()
    assert sorted(reg.heads) == ["intents"]
    assert sorted(reg.errors) == ["broken", "other_base"] and "retrain it with --base" in reg.errors["other_base"]
    assert reg.match(list(reversed(LABELS)), None)[0] == "intents"  # order-free
    assert reg.match(LABELS[:2], None) is None  # a subset is not the set
    assert reg.match([*LABELS, "lost_card"], None) is None  # nor is a list repeating a label
    assert reg.match(None, "intents")[0] == "intents"  # named: its own labels
    assert reg.match(["a", "b"], "intents") is None and reg.match(LABELS, "nope") is None


def test_registry_refuses_a_head_whose_features_cannot_run_here(tmp_path: Path, monkeypatch) -> None:
    import app.heads

    base = {"name": "m", "weights_sha256": "a" * 64}
    torch.manual_seed(0)
    save_head(tmp_path / "q4head", ClassifierHead(64, 2),
              HeadInfo(labels=["x", "y"], layer=1, pooling="mean", base=base, precision="q4"))
    monkeypatch.setattr(app.heads, "precision_unavailable",
                        lambda p: "no native kernels" if p == "q4" else None)
    reg = HeadRegistry(tmp_path, base)
    reg.refresh()
    assert reg.heads == {} and "no native kernels" in reg.errors["q4head"]


def test_registry_picks_up_new_changed_and_removed_heads(tmp_path: Path) -> None:
    base = {"name": "m", "weights_sha256": "a" * 64}
    reg = HeadRegistry(tmp_path, base)
    assert reg.match(LABELS, None) is None
    _save(tmp_path, "intents", LABELS, base)
    first = reg.match(LABELS, None)[1]
    _save(tmp_path, "intents", LABELS, base, seed=1)  # rewritten in place (new mtime)
    second = reg.match(LABELS, None)[1]
    assert second is not first and not torch.equal(second.head.net[-1].weight, first.head.net[-1].weight)
    shutil.rmtree(tmp_path / "intents")
    assert reg.match(LABELS, None) is None and reg.heads == {}


# ---------------------------------------------------------------------------- batching
class FakeClient:
    """EngineClient.call's contract: run fn(*args) elsewhere; here after a short await, counting calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def call(self, fn: Any, *args: Any) -> Any:
        self.calls.append(len(args[0]))
        await asyncio.sleep(0.01)
        return fn(*args)


def test_concurrent_requests_share_engine_calls() -> None:
    client = FakeClient()
    batcher = HeadBatcher(client, lambda ids: [[float(x[0])] for x in ids], max_texts=64)  # type: ignore[arg-type]

    async def together() -> list[list[list[float]]]:
        return await asyncio.gather(*(batcher.classify([[i]]) for i in range(16)))

    assert asyncio.run(together()) == [[[float(i)]] for i in range(16)]  # each request gets its own answer
    assert client.calls == [16]

    async def one_then_fifteen() -> list[list[list[float]]]:
        first = asyncio.ensure_future(batcher.classify([[0]]))
        await asyncio.sleep(0.002)  # its engine call is running: a lone request never waits for company
        rest = await asyncio.gather(*(batcher.classify([[i]]) for i in range(1, 16)))
        return [await first, *rest]

    client.calls.clear()
    assert asyncio.run(one_then_fifteen()) == [[[float(i)]] for i in range(16)]
    assert client.calls == [1, 15]  # the 15 arrived while the first ran, and went together


def test_a_collection_window_lets_a_lone_request_wait_for_company() -> None:
    """window_s > 0: the first request of an idle batcher waits that long, so requests a moment
    behind it share its engine call; a full batch never waits."""
    client = FakeClient()
    batcher = HeadBatcher(client, lambda ids: [[float(x[0])] for x in ids], max_texts=8,  # type: ignore[arg-type]
                          window_s=0.05)

    async def one_then_seven() -> list[list[list[float]]]:
        first = asyncio.ensure_future(batcher.classify([[0]]))
        await asyncio.sleep(0.005)
        rest = await asyncio.gather(*(batcher.classify([[i]]) for i in range(1, 8)))
        return [await first, *rest]

    assert asyncio.run(one_then_seven()) == [[[float(i)]] for i in range(8)]
    assert client.calls == [8]

    async def full() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(*(batcher.classify([[i]]) for i in range(8)))
        return loop.time() - t0

    client.calls.clear()
    assert asyncio.run(full()) < 0.05 and client.calls == [8]


def test_batches_respect_max_texts_and_errors_reach_every_waiter() -> None:
    client = FakeClient()
    batcher = HeadBatcher(client, lambda ids: [[0.0]] * len(ids), max_texts=4)  # type: ignore[arg-type]

    async def run() -> None:
        await asyncio.gather(*(batcher.classify([[1], [2]]) for _ in range(5)))

    asyncio.run(run())
    assert client.calls == [4, 4, 2]  # whole requests, at most 4 texts per engine call

    def boom(ids: Any) -> Any:
        raise RuntimeError("engine broke")

    failing = HeadBatcher(client, boom)  # type: ignore[arg-type]

    async def run_failing() -> list[Any]:
        return await asyncio.gather(*(failing.classify([[1]]) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(run_failing()))


# ---------------------------------------------------------------------------- HTTP
def _intents(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        rows += [{"text": f"I lost my card number {i} yesterday", "label": "lost_card"},
                 {"text": f"please send money transfer {i} today", "label": "transfer"},
                 {"text": f"what is the balance of account {i}", "label": "balance"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def adapters(app_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    from training.head import cli

    root = tmp_path_factory.mktemp("heads")
    _intents(root / "train.jsonl", 8)
    out = root / "adapters"
    common = ["--base", str(app_checkpoint), "--train", str(root / "train.jsonl"), "--test", "", "--layer", "1",
              "--val_per_label", "0", "--l2", "1e-3", "--no-progress", "--adapters_dir", str(out)]
    assert cli([*common, "--precision", "fp32", "--name", "intents"]) == 0
    if precision_unavailable("q4") is None:
        assert cli([*common, "--precision", "q4", "--name", "intents_q4"]) == 0
    return out


def test_classify_uses_the_head_whatever_the_label_order(app_checkpoint: Path, adapters: Path) -> None:  # noqa: F811
    texts = ["I lost my card number 99 yesterday", "please send money transfer 5 today"]
    loaded = load_head(adapters / "intents")
    ckpt = load_checkpoint(app_checkpoint)
    expected = loaded.head(extract_features(ckpt.model, ckpt.tokenizer, texts, loaded.info.spec)).softmax(-1)
    with make_client(settings_for(app_checkpoint, adapters_dir=str(adapters))) as client:
        for labels in (LABELS, list(reversed(LABELS))):
            r = client.post("/classify", json={"text": texts, "labels": labels})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "intents"
            assert [item["label"] for item in body["results"]] == ["lost_card", "transfer"]
            for item, probs in zip(body["results"], expected, strict=True):
                got = {s["label"]: s["score"] for s in item["scores"]}
                assert got == pytest.approx(dict(zip(loaded.info.labels, probs.tolist(), strict=True)), abs=1e-5)
        # named by `model`, labels may be omitted; the base model's name forces zero-shot scoring
        assert client.post("/classify", json={"text": texts[0], "model": "intents"}).json()["label"] == "lost_card"
        zero = client.post("/classify", json={"text": texts[0], "labels": LABELS, "model": "tiny"})
        assert zero.status_code == 200 and zero.json()["model"] == "tiny"
        other = client.post("/classify", json={"text": texts[0], "labels": ["a", "b"]})
        assert other.status_code == 200 and other.json()["model"] == "tiny"  # no head for this set
        bad = client.post("/classify", json={"text": texts[0], "labels": ["a", "b"], "model": "intents"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "labels"
        missing = client.post("/classify", json={"text": texts[0], "labels": LABELS, "model": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


@pytest.mark.skipif(precision_unavailable("q4") is not None, reason="no native kernels")
def test_a_q4_head_is_served_on_the_q4_features_it_was_trained_on(app_checkpoint: Path,  # noqa: F811
                                                                   adapters: Path) -> None:
    """Concurrent requests batched together get what one text alone gets offline: q4 features do not
    depend on what they are batched with."""
    texts = ["I lost my card number 99 yesterday", "please send money transfer 5 today", "balance of account 3"]
    loaded = load_head(adapters / "intents_q4")
    tok = load_checkpoint(app_checkpoint).tokenizer
    stack = load_feature_model(app_checkpoint, 1, "q4")
    expected = [classify_ids(stack, loaded, encode_texts(tok, [t]), tok.pad_id)[0] for t in texts]
    with make_client(settings_for(app_checkpoint, adapters_dir=str(adapters))) as client:
        r = client.post("/classify", json={"text": texts, "model": "intents_q4"})
        assert r.status_code == 200, r.text
        for item, probs in zip(r.json()["results"], expected, strict=True):
            got = {s["label"]: s["score"] for s in item["scores"]}
            assert got == pytest.approx(dict(zip(loaded.info.labels, probs, strict=True)), abs=1e-6)


def test_heads_added_while_serving_and_broken_ones_refused(app_checkpoint: Path, adapters: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    live = tmp_path / "adapters"
    shutil.copytree(adapters, live)
    with make_client(settings_for(app_checkpoint, adapters_dir=str(live))) as client:
        assert client.post("/classify", json={"text": "hi", "labels": ["x", "y"]}).json()["model"] == "tiny"
        _save(live, "xy", ["x", "y"], base_identity(app_checkpoint))  # a new head, no restart
        assert client.post("/classify", json={"text": "hi", "labels": ["y", "x"]}).json()["model"] == "xy"
        (live / "broken").mkdir()
        shutil.copy(live / "xy" / "head.json", live / "broken" / "head.json")
        (live / "broken" / "head.safetensors").write_bytes(b"truncated")
        r = client.post("/classify", json={"text": "hi", "model": "broken"})
        assert r.status_code == 404 and "corrupt" in r.json()["error"]["message"]
        assert client.post("/classify", json={"text": "hi", "model": "xy"}).status_code == 200
        assert client.post("/classify", json={"text": "hi", "model": "intents"}).status_code == 200


def test_the_head_forward_runs_on_one_intra_op_thread() -> None:
    """intra_op_threads sets torch's thread count for the block only (the head's forward: one thread,
    app/heads.py HEAD_THREADS), and restores it even when the block fails."""
    from model.device import intra_op_threads

    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
