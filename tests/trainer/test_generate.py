"""Generation phase against a scripted client: seeds per sample, aborts, dynamic sampling."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from megatron_rl.config.run import load_config
from megatron_rl.data.prompts import Problem
from megatron_rl.rewards.grade import Grade
from megatron_rl.rollout.types import Sample
from megatron_rl.trainer.generate import Generator


class ScriptedClient:
    """Answers every request with one sample; ``aborts[key]`` abort first for that many calls."""

    def __init__(self, aborts=None, correct=lambda uid, i: i % 2 == 0):
        self.aborts, self.correct, self.requests = dict(aborts or {}), correct, []

    async def generate(self, requests):
        (r,) = requests
        self.requests.append(r)
        uid, index = int(r.request_id.split("-u")[1].split("-")[0]), int(r.request_id.split("-i")[1].split("-")[0])
        key = (uid, index)
        if self.aborts.get(key, 0) > 0:
            self.aborts[key] -= 1
            return [Sample(r.request_id, 0, r.prompt_ids, [1], [-0.1], "abort")]
        text_id = 1 if self.correct(uid, index) else 2
        return [Sample(r.request_id, 0, r.prompt_ids, [text_id, 3], [-0.1, -0.2], "stop")]


class Pool:
    def submit(self, item):
        f = Future()
        f.set_result(Grade(1.0, "correct") if item.response == "right" else Grade(0.0, "wrong_answer"))
        return f


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "right" if ids[0] == 1 else "wrong"


class Stream:
    def __init__(self):
        self.next = 0

    def take(self, n):
        out = [Problem(uid=self.next + i, prompt_ids=[5, 6], answer="x", data_source="arithmetic", extra_info={})
               for i in range(n)]
        self.next += n
        return out


def gen(client, *over):
    cfg = load_config(None, ["train.prompts_per_step=2", "train.mini_batch_prompts=2", "rollout.n_samples=4", *over])
    return Generator(cfg, client, Pool(), Tok())


def test_every_sample_is_its_own_request_with_its_own_seed():
    client = ScriptedClient()
    out = asyncio.run(gen(client).step(Stream(), step=3))
    assert len(out.groups) == 2 and all(len(g) == 4 for g in out.groups)
    assert all(r.sampling.n == 1 for r in client.requests)
    assert len({r.sampling.seed for r in client.requests}) == 8
    assert [s.score for s in out.groups[0]] == [1.0, 0.0, 1.0, 0.0]
    # Same step, same problems: the same seeds (exact resume regenerates what it lost).
    again = ScriptedClient()
    asyncio.run(gen(again).step(Stream(), step=3))
    assert [r.sampling.seed for r in again.requests] == [r.sampling.seed for r in client.requests]


def test_aborted_samples_are_asked_again_then_their_group_is_dropped():
    client = ScriptedClient(aborts={(0, 1): 1, (1, 2): 5})
    out = asyncio.run(gen(client, "rollout.max_abort_retries=2").step(Stream(), step=0))
    assert [g[0].uid for g in out.groups] == [0]  # problem 1 kept aborting: its group is gone
    assert all(s.finish_reason == "stop" for g in out.groups for s in g)  # no abort is ever graded
    assert out.metrics["rollout/aborted"] == 1 + 3 and out.metrics["rollout/groups_dropped_aborted"] == 1
    retried = [r for r in client.requests if "-u0-i1-" in r.request_id]
    assert len(retried) == 2 and retried[0].sampling.seed == retried[1].sampling.seed


def test_dynamic_sampling_refills_with_new_problems_until_groups_differ():
    # Problems with even uid are all-correct (no signal); odd ones mixed.
    client = ScriptedClient(correct=lambda uid, i: uid % 2 == 0 or i == 0)
    out = asyncio.run(gen(client, "algorithm.dynamic_sampling=true").step(Stream(), step=0))
    assert [g[0].uid for g in out.groups] == [1, 3]
    assert out.metrics["sampling/rounds"] == 3.0 and [g[0].group for g in out.groups] == [0, 1]
