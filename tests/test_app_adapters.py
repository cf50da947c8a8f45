"""LoRA adapters over HTTP: chosen per request by `model` (OpenAI and task routes), listed by /v1/models,
each answering with its merged model's oracle tokens, added while the server runs, broken ones refused
while the others keep serving."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from model.adapters import WEIGHTS_FILE, merge_adapter, read_adapter
from model.checkpoint import load_checkpoint
from model.generate import generate
from model.head import ClassifierHead, HeadInfo, base_identity, save_head
from model.sampling import SamplingParams
from model.tokenizer import render_chat
from tests.adapter_fixtures import write_lora
from tests.test_app_support import app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def adapters_dir(app_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("served_adapters")
    write_lora(app_checkpoint, root / "alpha", seed=1)
    write_lora(app_checkpoint, root / "beta", seed=2)
    info = HeadInfo(labels=["a", "b"], layer=1, pooling="mean", base=base_identity(app_checkpoint))
    save_head(root / "intents", ClassifierHead(64, 2), info)  # a classification head only: no LoRA
    return root


@pytest.fixture(scope="module")
def client(app_checkpoint: Path, adapters_dir: Path) -> Iterator[TestClient]:  # noqa: F811
    settings = settings_for(app_checkpoint, adapters_dir=str(adapters_dir), adapters_poll_s=0.2, api_keys=("sk-t",),
                            quantize="none")  # the oracle is the fp32 merged model
    with make_client(settings) as c:
        c.headers["Authorization"] = "Bearer sk-t"
        yield c


@pytest.fixture(scope="module")
def oracle(app_checkpoint: Path, adapters_dir: Path):  # noqa: F811
    """model name -> the chat answer model.generate gives (greedy, 8 tokens) on its merged weights."""
    ckpt = load_checkpoint(app_checkpoint)
    ids = render_chat(ckpt.tokenizer, MESSAGES, add_generation_prompt=True).ids
    params = SamplingParams(max_tokens=8, temperature=0)

    def answer(name: str) -> str:
        model = ckpt.model if name == "tiny" else merge_adapter(copy.deepcopy(ckpt.model),
                                                                 read_adapter(adapters_dir / name))
        out = generate(model.eval(), ids, params, stop_ids=ckpt.tokenizer.stop_ids)
        return ckpt.tokenizer.decode([t for t in out if t not in ckpt.tokenizer.stop_ids])

    return answer


def _chat(client: TestClient, model: str | None) -> dict:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, **({"model": model} if model else {})}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_lists_the_base_and_every_adapter(client: TestClient, adapters_dir: Path) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards][:4] == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny"),
                                                           ("intents", "tiny")]
    assert cards[1]["root"] == str(adapters_dir / "alpha")


def test_each_model_answers_with_its_merged_oracle_in_shared_steps(client: TestClient, oracle) -> None:
    names = ["tiny", "alpha", "beta"] * 2
    with ThreadPoolExecutor(len(names)) as pool:  # concurrent: base and both adapters in the same steps
        got = list(pool.map(lambda n: _chat(client, n), names))
    for name, body in zip(names, got, strict=True):
        assert body["model"] == name
        assert body["choices"][0]["message"]["content"] == oracle(name), name
    assert len({oracle(n) for n in ("tiny", "alpha", "beta")}) == 3  # the adapters change the answer


def test_openai_client_and_task_routes_take_model(client: TestClient, oracle) -> None:
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-t", http_client=client, max_retries=0)
    resp = oai.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0)
    assert resp.model == "beta" and resp.choices[0].message.content == oracle("beta")
    chat = client.post("/chat", json={"messages": MESSAGES, "max_tokens": 8, "model": "alpha"}).json()
    assert chat["model"] == "alpha" and chat["message"]["content"] == oracle("alpha")
    summary = client.post("/summarize", json={"text": "a b c", "max_tokens": 4, "model": "beta"})
    assert summary.status_code == 200 and summary.json()["model"] == "beta"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/chat", {"messages": MESSAGES}),
    ("/translate", {"text": "hi", "target_lang": "de"}),
])
def test_unknown_model_is_404_naming_model(client: TestClient, path: str, body: dict) -> None:
    resp = client.post(path, json={**body, "model": "nope", "max_tokens": 2})
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found" and "'nope'" in error["message"]


def test_adapter_added_while_serving_and_broken_one_refused(client: TestClient, app_checkpoint: Path,  # noqa: F811
                                                            adapters_dir: Path, oracle,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    broken = write_lora(app_checkpoint, adapters_dir / ".broken.tmp", seed=3)
    (broken / WEIGHTS_FILE).write_bytes(b"not safetensors")
    gamma = write_lora(app_checkpoint, adapters_dir / ".gamma.tmp", seed=4)  # published like training.adapt
    with caplog.at_level(logging.ERROR, logger="model.adapter_watch"):
        broken.rename(adapters_dir / "broken")
        gamma.rename(adapters_dir / "gamma")
        deadline = time.monotonic() + 60
        while "gamma" not in [c["id"] for c in client.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "gamma was not picked up"
            time.sleep(0.1)
        time.sleep(0.5)  # one more poll: broken has been tried too
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny", "alpha", "beta", "gamma", "intents"]
    assert any("adapter broken refused" in r.getMessage() and "cannot read" in r.getMessage()
               for r in caplog.records)
    assert _chat(client, "gamma")["choices"][0]["message"]["content"] == oracle("gamma")
    assert _chat(client, "alpha")["choices"][0]["message"]["content"] == oracle("alpha")
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES, "model": "broken"}).status_code == 404


def test_zero_shot_classify_scores_through_a_lora_adapter(client: TestClient, app_checkpoint: Path,  # noqa: F811
                                                          adapters_dir: Path) -> None:
    """`model` naming a LoRA adapter: /classify ranks the labels with the merged model's scores (the
    evaluator's Classifier on that model is the oracle), not the base model's."""
    import torch

    from model import tasks
    from model.engine import EngineConfig, LLMEngine
    from model.inference import load_for_serving
    from training.evaluate import Classifier

    body = {"text": "The sea was calm all day.", "labels": ["weather", "food", "sports"]}
    through = client.post("/classify", json={**body, "model": "alpha"})
    base = client.post("/classify", json=body).json()
    assert through.status_code == 200, through.text
    got = {s["label"]: s["score"] for s in through.json()["scores"]}
    served = load_for_serving(app_checkpoint, device=torch.device("cpu"), dtype=torch.float32,
                              adapters=[str(adapters_dir / "alpha")])
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=2, max_model_len=256))
    _, probs = Classifier(engine, served.tokenizer).classify(body["text"], body["labels"], tasks.DEFAULT_CALIBRATION)
    assert through.json()["model"] == "alpha"
    assert got == pytest.approx(dict(zip(body["labels"], probs, strict=True)), abs=1e-4)
    assert got != pytest.approx({s["label"]: s["score"] for s in base["scores"]}, abs=1e-4)
