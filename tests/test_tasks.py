"""model/tasks.py, the one home of task logic: training, evaluation and serving render the same prompt
ids; /classify cannot be decided by the order of `labels`; the calibration math against hand values."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from model import tasks
from tests.test_app_support import app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

LABELS = ["lost_or_stolen_card", "card_arrival", "exchange_rate", "top_up_failed"]


@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint)) as c:
        yield c


# ---------------------------------------------------------------------------- one prompt everywhere
class RecordingClient:
    """Stands in for app.engine_client.EngineClient: records the scoring jobs, answers fixed scores."""

    def __init__(self) -> None:
        self.jobs: list[tuple[list[int], list[list[int]]]] = []
        self.after: list[tuple[list[list[int]], list[int]]] = []  # channel: (label prompts, continuation)

    def reserve(self, n: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    async def score_each(self, jobs: list[tuple[list[int], list[list[int]]]], adapter: str | None = None
                         ) -> list[list[float]]:
        self.jobs += jobs
        return [[-float(i + 1) for i in range(len(conts))] for _, conts in jobs]

    async def score_after(self, prompts: list[list[int]], continuation: list[int], adapter: str | None = None
                          ) -> list[float]:
        self.after.append((prompts, continuation))
        return [-float(i + 1) for i in range(len(prompts))]


class ConnectedRequest:
    async def receive(self) -> dict[str, str]:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}


def serving_prompts(checkpoint: Path, tokenizer: Any, task: str, record: dict[str, Any], labels: list[str]
                    ) -> tuple[list[int], list[list[int]] | None]:
    """What the server feeds the engine for the same input (prompt ids, and for classify the scored answers)."""
    from app.service import Service

    recorder = RecordingClient()
    svc = Service(settings_for(checkpoint), tokenizer, recorder, "tiny", {}, None)  # type: ignore[arg-type]
    if task == tasks.SUMMARIZE:
        return svc.chat_prompt(tasks.summarize_messages(record["document"])), None
    if task == tasks.TRANSLATE:
        return svc.chat_prompt(tasks.translate_messages(record["src"], record["tgt_lang"], record["src_lang"])), None
    asyncio.run(svc.classify(ConnectedRequest(), [record["text"]], labels, False, 0.5))  # type: ignore[arg-type]
    if tasks.needs_channel(tasks.DEFAULT_CALIBRATION):  # the channel direction: the evaluator's too
        spec = tasks.ClassifySpec.build(labels)
        assert recorder.after == [(tasks.channel_prompts(tokenizer, spec), tasks.channel_continuation(tokenizer,
                                                                                                  record["text"]))]
    return recorder.jobs[0]


RECORDS = {
    tasks.SUMMARIZE: {"document": "Alice: hi Bob.\nBob: hello, the meeting moved to 3 pm.", "summary": "Moved to 3."},
    tasks.TRANSLATE: {"src": "The cat sleeps.", "tgt": "Die Katze schläft.", "src_lang": "en", "tgt_lang": "de"},
    tasks.CLASSIFY: {"text": "I lost my card yesterday", "label": "lost_or_stolen_card"},
}


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_training_evaluation_and_serving_render_the_same_prompt_ids(task: str, app_checkpoint: Path) -> None:  # noqa: F811
    from model.checkpoint import load_checkpoint
    from training.data import render_example, task_messages
    from training.evaluate import Classifier, prompt_ids

    tok = load_checkpoint(app_checkpoint).tokenizer
    record = RECORDS[task]
    trained = render_example(tok, task_messages(task, record, LABELS), task)  # SFT: prompt + answer, one sequence
    served, scored = serving_prompts(app_checkpoint, tok, task, record, LABELS)
    if task == tasks.CLASSIFY:
        spec = Classifier(engine=None, tokenizer=tok).spec(LABELS)
        evaluated = tasks.render_prompt(tok, spec.messages(record["text"]))  # what Classifier.logliks scores
        gold = spec.labels.index(record["label"])
        assert scored == tasks.label_continuations(tok, spec)
        # the tokens fine-tuning teaches after the prompt are the tokens /classify scores for the gold label
        assert trained.ids[len(served):len(served) + len(scored[gold])] == scored[gold]
    else:
        evaluated = prompt_ids(tok, task, record)
    assert served == evaluated == trained.ids[:len(served)]
    assert not any(trained.loss_mask[:len(served)]) and all(trained.loss_mask[len(served):-1])


def test_server_system_prompt_is_the_one_place_that_adds_a_system_message(app_checkpoint: Path) -> None:  # noqa: F811
    from model.checkpoint import load_checkpoint

    tok = load_checkpoint(app_checkpoint).tokenizer
    msgs = tasks.summarize_messages("Some text to summarize.")
    with_system = tasks.render_prompt(tok, msgs, "Be terse.")
    assert with_system == tasks.render_prompt(tok, [{"role": "system", "content": "Be terse."}, *msgs])
    assert with_system != tasks.render_prompt(tok, msgs)
    # a chat that brings its own system message keeps it
    own = [{"role": "system", "content": "Mine."}, *msgs]
    assert tasks.render_prompt(tok, own, "Be terse.") == tasks.render_prompt(tok, own)


# ---------------------------------------------------------------------------- label order
def test_classify_cannot_be_decided_by_label_order(client: TestClient) -> None:
    outcomes = []
    for perm in itertools.permutations(LABELS):
        r = client.post("/classify", json={"text": "I lost my card, please block it", "labels": list(perm)})
        assert r.status_code == 200, r.text
        body = r.json()
        outcomes.append((body["label"], {s["label"]: s["score"] for s in body["scores"]}))
    label, scores = outcomes[0]
    for other_label, other in outcomes[1:]:
        assert other_label == label
        assert all(abs(other[lab] - scores[lab]) <= 1e-6 for lab in LABELS)


def test_classify_descriptions_and_examples_are_order_free_and_validated(client: TestClient) -> None:
    labels = ["card", "rate", "top_up"]  # short: the tiny model has 256 positions
    desc, shots = {"rate": "fx"}, {"card": ["stolen", "gone"], "top_up": ["no top up"]}
    body = {"text": "my card?", "descriptions": desc, "examples": shots}
    a = client.post("/classify", json={**body, "labels": labels}).json()
    assert "label" in a, a
    b = client.post("/classify", json={**body, "labels": labels[::-1],
                                       "examples": {k: v[::-1] for k, v in reversed(shots.items())}}).json()
    assert a["label"] == b["label"] and a["scores"] == b["scores"]
    plain = client.post("/classify", json={"text": body["text"], "labels": labels}).json()
    assert plain["usage"]["prompt_tokens"] < a["usage"]["prompt_tokens"]  # they did go into the prompt
    for bad, param in [({"descriptions": {"nope": "x"}}, "descriptions"), ({"examples": {"nope": ["x"]}}, "examples"),
                       ({"examples": {"card": []}}, "examples"), ({"descriptions": {"card": ""}}, "descriptions")]:
        r = client.post("/classify", json={"text": "x", "labels": labels, **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(param), r.json()


def test_classify_spec_is_canonical_and_names_the_bad_field() -> None:
    shuffled = LABELS[:]
    random.Random(3).shuffle(shuffled)
    assert tasks.ClassifySpec.build(shuffled) == tasks.ClassifySpec.build(LABELS)
    assert tasks.ClassifySpec.build(LABELS).labels == tuple(sorted(LABELS))
    few, many = ["a", "b"], [f"l{i}" for i in range(tasks.LIST_LABELS_UP_TO + 1)]
    assert tasks.ClassifySpec.build(few).list_labels == (len(few) <= tasks.LIST_LABELS_UP_TO)
    assert not tasks.ClassifySpec.build(many).list_labels
    assert "- a\n- b" in tasks.ClassifySpec.build(few, list_labels=True).messages("x")[0]["content"]
    assert "- a" not in tasks.ClassifySpec.build(few, list_labels=False).messages("x")[0]["content"]
    for labels, kwargs, param in [([], {}, "labels"), (["a", "a"], {}, "labels"), (["a_b", "a b"], {}, "labels"),
                                  (["a"], {"descriptions": {"b": "x"}}, "descriptions"),
                                  (["a"], {"examples": {"a": ["x"] * 65}}, "examples")]:
        with pytest.raises(tasks.TaskError) as err:
            tasks.ClassifySpec.build(labels, **kwargs)
        assert err.value.param == param


# ---------------------------------------------------------------------------- the math
def test_calibrations_against_hand_values() -> None:
    ll, lengths, prior = [-2.0, -6.0], [1, 4], [-1.0, -8.0]
    assert tasks.label_scores(ll, lengths, prior, tasks.Calibration.NONE) == [-2.0, -6.0]
    assert tasks.label_scores(ll, lengths, prior, tasks.Calibration.MEAN) == [-2.0, -1.5]
    assert tasks.label_scores(ll, lengths, prior, tasks.Calibration.PRIOR) == [-1.0, 2.0]
    assert tasks.label_scores(ll, lengths, prior, tasks.Calibration.PRIOR_MEAN) == [-1.0, 0.5]
    probs = tasks.label_probabilities(ll, lengths, prior, tasks.Calibration.PRIOR)
    assert probs == pytest.approx([1 / (1 + math.e ** 3), 1 / (1 + math.e ** -3)])
    # multi-label: sigmoid of the per-token PMI with a prior, exp(mean log p) without one
    assert tasks.label_probabilities(ll, lengths, prior, tasks.Calibration.PRIOR, multi_label=True) == \
        pytest.approx([1 / (1 + math.e), 1 / (1 + math.e ** -0.5)])
    assert tasks.label_probabilities(ll, lengths, None, tasks.Calibration.MEAN, multi_label=True) == \
        pytest.approx([math.exp(-2.0), math.exp(-1.5)])
    # the prior: log of the mean probability over the content-free inputs, per label
    assert tasks.content_free_prior([[math.log(0.2), -1.0], [math.log(0.6), -1.0]]) == \
        pytest.approx([math.log(0.4), -1.0])
    with pytest.raises(ValueError, match="prior"):
        tasks.label_scores(ll, lengths, None, tasks.Calibration.PRIOR)


def test_channel_calibrations_against_hand_values() -> None:
    """channel: the text's log-likelihood after each label's prompt; channel+prior_mean adds the direct
    prior_mean scores, both as log-softmax over the labels, the direct ones weighted."""
    ll, lengths, prior, channel = [-2.0, -6.0], [1, 4], [-1.0, -8.0], [-30.0, -29.0]
    assert tasks.label_scores(None, lengths, None, tasks.Calibration.CHANNEL, channel) == channel
    direct = [-1.0, 0.5]  # prior_mean
    ls = lambda v: [x - math.log(sum(math.exp(y) for y in v)) for x in v]  # noqa: E731
    want = [c + tasks.CHANNEL_DIRECT_WEIGHT * d for c, d in zip(ls(channel), ls(direct), strict=True)]
    got = tasks.label_scores(ll, lengths, prior, tasks.Calibration.CHANNEL_PRIOR_MEAN, channel)
    assert got == pytest.approx(want)
    assert sum(tasks.label_probabilities(ll, lengths, prior, tasks.Calibration.CHANNEL_PRIOR_MEAN,
                                         channel=channel)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="channel"):
        tasks.label_scores(ll, lengths, prior, tasks.Calibration.CHANNEL)
    # multi_label stays direct (a channel score has no "as likely as no text" point): the prior PMI
    assert tasks.label_probabilities(ll, lengths, prior, tasks.Calibration.CHANNEL, multi_label=True) == \
        pytest.approx([1 / (1 + math.e), 1 / (1 + math.e ** -0.5)])
    assert tasks.needs_channel(tasks.Calibration.CHANNEL) and not tasks.needs_channel(tasks.Calibration.CHANNEL, True)
    assert not tasks.needs_direct(tasks.Calibration.CHANNEL) and tasks.needs_direct(tasks.Calibration.CHANNEL, True)
    assert tasks.needs_prior(tasks.Calibration.CHANNEL_PRIOR_MEAN) and not tasks.needs_prior(tasks.Calibration.CHANNEL)


def test_channel_prompts_and_continuation(app_checkpoint: Path) -> None:  # noqa: F811
    from model.checkpoint import load_checkpoint

    tok = load_checkpoint(app_checkpoint).tokenizer
    spec = tasks.ClassifySpec.build(["top_up_failed", "card"], descriptions={"card": "plastic"})
    prompts = tasks.channel_prompts(tok, spec)
    assert prompts == tasks.channel_prompts(tok, tasks.ClassifySpec.build(["card", "top_up_failed"],
                                                                          descriptions={"card": "plastic"}))
    assert prompts[0] == tasks.render_prompt(tok, [{"role": "user", "content": "Write a short message about: card "
                                                                               "(plastic)"}])
    assert prompts[1] == tasks.render_prompt(tok, [{"role": "user", "content": "Write a short message about: top "
                                                                               "up failed"}])
    short = tasks.channel_continuation(tok, " hi there ")
    assert short == tok.encode("hi there") + [tok.im_end_id]  # the whole text, then its end
    long = tasks.channel_continuation(tok, "word " * 200)
    assert long == tok.encode(("word " * 200).strip())[:tasks.CHANNEL_MAX_TOKENS]  # cut: no end token
    with pytest.raises(tasks.TaskError):
        tasks.channel_continuation(tok, "  ")


def test_length_rule() -> None:
    tasks.check_length(10, 16, 6)
    with pytest.raises(tasks.ContextTooLong) as err:
        tasks.check_length(10, 16, 7, "max_tokens")
    assert err.value.param == "max_tokens" and (err.value.prompt_tokens, err.value.needed) == (10, 7)
    with pytest.raises(tasks.ContextTooLong):
        tasks.check_length(16, 16)  # a prompt that leaves no room for one token
    with pytest.raises(tasks.TaskError, match="empty"):
        tasks.check_length(0, 16)
