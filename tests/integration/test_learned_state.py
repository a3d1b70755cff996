"""Learned bandit state in the store (SQLite and PostgreSQL), across a router restart, and
`foveal router evaluate` on what a running router logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import openai

from foveal.router.bandit_policy import BanditPolicy
from foveal.store import DecisionRecord, FeedbackRecord, Store
from foveal.testing.images import image_message
from foveal.testing.stack import LocalStack, running_stack

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def test_learned_state_upserts_gets_and_lists(store: Store) -> None:
    assert store.get_learned_state("linucb:acme") is None
    store.put_learned_state("linucb:acme", "acme", "linucb", {"n": 1})
    store.put_learned_state("linucb:acme", "acme", "linucb", {"n": 2, "arms": {"t1": [0.5]}})
    store.put_learned_state("lints:acme", "acme", "lints", {"n": 3})
    assert store.get_learned_state("linucb:acme") == {"n": 2, "arms": {"t1": [0.5]}}
    assert store.list_learned_state("linucb") == {"linucb:acme": {"n": 2, "arms": {"t1": [0.5]}}}
    assert store.list_learned_state("lints") == {"lints:acme": {"n": 3}}


def test_racing_upserts_of_one_key_never_fail(store: Store) -> None:
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                store.put_learned_state("lints:acme", "acme", "lints", {"writer": i, "j": j})
        except BaseException as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get_learned_state("lints:acme") in [{"writer": i, "j": 9} for i in range(4)]


def _decision(request_id: str, minutes: int, tenant: str = "acme") -> DecisionRecord:
    return DecisionRecord(
        request_id=request_id,
        tenant=tenant,
        tier="t4",
        chosen_tier="t4",
        requested_model="auto",
        policy="lints",
        reason="test",
        propensity=0.5,
        features={"context": [1.0]},
        created_at=T0 + timedelta(minutes=minutes),
    )


def test_decisions_with_feedback_come_in_pages_oldest_first(store: Store) -> None:
    # two decisions share a timestamp: pages continue by request id, nothing repeats
    times = {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3, "f": 4, "g": 5}
    store.add_decisions([_decision(rid, m) for rid, m in times.items()])
    store.add_decisions([_decision("z", 2, tenant="zed")])
    for rid, score in {"a": 1.0, "b": 0.0, "c": 0.5, "d": 1.0, "f": 0.25, "z": 1.0}.items():
        store.add_feedback(FeedbackRecord(rid, "zed" if rid == "z" else "acme", score))
    store.add_feedback(FeedbackRecord("g", "mallory", 1.0))  # not the decision's tenant

    rows = list(store.iter_decisions_with_feedback(tenant="acme", page_size=2))
    assert [d.request_id for d, _ in rows] == ["a", "b", "c", "d", "f"]
    assert [f.score for _, f in rows] == [1.0, 0.0, 0.5, 1.0, 0.25]
    assert all(d.request_id == f.request_id for d, f in rows)
    everyone = [d.request_id for d, _ in store.iter_decisions_with_feedback(page_size=3)]
    assert sorted(everyone) == ["a", "b", "c", "d", "f", "z"]
    window = store.iter_decisions_with_feedback(
        since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=4)
    )
    assert sorted(d.request_id for d, _ in window) == ["b", "c", "d", "z"]


async def _ask_and_rate(stack: LocalStack, n: int, score: float) -> list[str]:
    ids = []
    async with (
        openai.AsyncOpenAI(
            base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0
        ) as client,
        aiohttp.ClientSession(stack.http_url) as http,
    ):
        for i in range(n):
            text = "read the text" if i % 2 else "what colour is it"
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=[image_message(text)]
            )
            rid, token = raw.headers["x-foveal-request-id"], raw.headers["x-foveal-feedback-token"]
            body = {"request_id": rid, "token": token, "score": score}
            async with http.post("/v1/feedback", json=body) as resp:
                assert resp.status == 200, await resp.text()
            ids.append(rid)
    return ids


def _evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("FOVEAL_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "foveal", "router", "evaluate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


async def test_learned_state_survives_a_router_restart_and_the_log_can_be_evaluated(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'foveal.db'}"
    # only the shutdown writes
    policy = {"name": "lints", "bandit_persist_every": 1000, "bandit_persist_interval_s": 86400}
    async with running_stack(store_url=url, policy=policy) as stack:
        tenant = stack.settings.auth.default_tenant
        await _ask_and_rate(stack, 6, score=1.0)
        before = stack.core.policy
        assert isinstance(before, BanditPolicy)
        learned = before.bandit(tenant)
        assert learned is not None and learned.updates == 6
        state = json.dumps(learned.to_dict())
        other = Store(url)
        try:
            assert other.get_learned_state(f"lints:{tenant}") is None  # not due yet
        finally:
            other.close()
    async with running_stack(store_url=url, policy=policy) as stack:
        after = stack.core.policy
        assert isinstance(after, BanditPolicy) and after is not before
        restored = after.bandit(tenant)
        assert restored is not None and json.dumps(restored.to_dict()) == state
        await _ask_and_rate(stack, 2, score=0.0)
        assert restored.updates == 8

    done = _evaluate("--policy", "linucb", "--store", url, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_logged"] == 8 and result["skipped"] == {}
    by_name = {e["estimator"]: e for e in result["estimates"]}
    assert set(by_name) == {"logged", "ips", "snips", "dr"}
    assert by_name["logged"]["accuracy"]["value"] == 0.75  # six 1.0 and two 0.0
    for e in by_name.values():
        assert e["n"] == 8 and e["accuracy"]["low"] <= e["accuracy"]["high"]

    table = _evaluate("--policy", "lints", "--store", url, "--since", "1h", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "policy 'lints' on 8 logged decisions" in table.stdout and "dr" in table.stdout

    rules = _evaluate("--policy", "rules", "--store", url, cwd=tmp_path)
    assert rules.returncode == 1 and "'rules' cannot be evaluated off-policy" in rules.stderr
    empty = _evaluate(
        "--policy", "lints", "--store", f"sqlite:///{tmp_path / 'e.db'}", cwd=tmp_path
    )
    assert empty.returncode == 1 and "no logged decisions with feedback" in empty.stderr
    bad = _evaluate("--policy", "lints", "--store", url, "--since", "yesterday", cwd=tmp_path)
    assert bad.returncode == 2 and "neither an ISO time" in bad.stderr
