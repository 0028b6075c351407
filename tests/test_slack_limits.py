"""One rate limiter for Rotor's Slack calls: within Slack's limits, 429s pause the channel
(not the caller's slack_sdk), decisions and notices go first; and the fake that enforces them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from slack_sdk.errors import SlackApiError

from bot import slack_limits
from bot.slack import limited_client, web_client
from bot.slack_limits import DECISION, PROGRESS, LimitedClient, SlackLimiter, Tier, priority
from demo.slack_api import FakeSlack
from tests.waiting import wait_for


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


def posts(slack: FakeSlack, status: int = 200) -> list[float]:
    return [c.at for c in slack.calls_to("chat.postMessage") if c.status == status]


def test_the_enforcing_fake_answers_429_with_retry_after_past_one_post_a_second(slack):
    slack.enforce_limits(post_burst=1)
    client = web_client("xoxb-test", slack.url, rate_limit_retry=False)
    client.chat_postMessage(channel="#a", text="one")
    with pytest.raises(SlackApiError) as limited:
        client.chat_postMessage(channel="#a", text="two")
    assert limited.value.response.status_code == 429  # and slack_sdk did not wait it out
    assert slack_limits.retry_after(limited.value) >= 1
    client.chat_postMessage(channel="#b", text="another channel has its own limit")
    assert [m.text for m in slack.messages] == ["one", "another channel has its own limit"]


def test_posts_through_the_limiter_stay_under_the_limit_and_land_once(slack):
    slack.enforce_limits()
    client = limited_client("xoxb-test", slack.url)
    for n in range(6):
        client.chat_postMessage(channel="#a", text=f"post {n}")
    assert [m.text for m in slack.messages] == [f"post {n}" for n in range(6)]
    assert not slack.limited()  # paced before Slack had to say so
    sent = posts(slack)
    assert sent[-1] - sent[0] >= (6 - slack_limits.POST.burst) / 1.0 - 0.1


def test_a_429_pauses_the_channel_for_retry_after_then_the_call_lands_once(slack):
    slack.rate_limit(1, retry_after=1)
    client = limited_client("xoxb-test", slack.url)
    client.chat_postMessage(channel="#a", text="once")
    limited, answered = posts(slack, 429), posts(slack)
    assert len(limited) == 1 and len(answered) == 1
    assert answered[0] - limited[0] >= 1.0  # Retry-After honoured, by the limiter
    assert [m.text for m in slack.messages] == ["once"]
    assert client.limiter.limited == 1


def test_a_retry_after_longer_than_a_call_may_wait_fails_at_once_as_rate_limited(slack):
    slack.rate_limit(1, retry_after=120)
    client = limited_client("xoxb-test", slack.url)
    started = time.monotonic()
    with pytest.raises(SlackApiError) as limited:
        client.chat_postMessage(channel="#a", text="later")
    assert limited.value.response.status_code == 429
    assert time.monotonic() - started < 60  # not 120: nobody sleeps through it
    assert not slack.messages
    with pytest.raises(slack_limits.Throttled):  # the channel stays paused for the others
        client.chat_postMessage(channel="#a", text="also later")
    client.chat_postMessage(channel="#b", text="other channels go on")
    assert [m.text for m in slack.messages] == ["other channels go on"]


def test_decisions_go_before_progress_waiting_for_the_same_channel(slack):
    limiter = SlackLimiter({"chat.postMessage": Tier(rate=1.0, burst=1)}, max_wait=60)
    client = LimitedClient(web_client("xoxb-test", slack.url), limiter)
    client.chat_postMessage(channel="#a", text="first")  # the burst is spent
    bucket = limiter._buckets[limiter.key("chat.postMessage", "#a")]

    def send(text: str, level: int) -> None:
        with priority(level):
            client.chat_postMessage(channel="#a", text=text)

    threads = [threading.Thread(target=send, args=(f"progress {n}", PROGRESS))
               for n in range(4)]
    for thread in threads:
        thread.start()
        # one at a time, so their order in line is known
        queued = threads.index(thread) + 1
        wait_for(lambda: len(bucket.waiting) + len(slack.messages) - 1,
                 lambda n, queued=queued: n >= queued, what="the progress post to queue")
    decision = threading.Thread(target=send, args=("approve?", DECISION))
    decision.start()
    line = wait_for(lambda: list(bucket.waiting) if decision.is_alive() else [(DECISION, -1)],
                    lambda waiting: any(level == DECISION for level, _ in waiting),
                    what="the decision to queue")
    behind = sum(1 for level, _ in line if level == PROGRESS)
    for thread in [*threads, decision]:
        thread.join(60)
    texts = [m.text for m in slack.messages]
    assert sorted(texts) == sorted(["first", "approve?", *(f"progress {n}" for n in range(4))])
    assert behind >= 1  # progress posts were still waiting when the decision came...
    # ... and every one of them went after it, in the order they came.
    assert texts[-behind:] == [f"progress {n}" for n in range(4 - behind, 4)]
    assert texts.index("approve?") < len(texts) - behind


def test_an_urgent_caller_keeps_its_place_only_inside_the_block():
    assert slack_limits.current_priority() == PROGRESS
    with priority(DECISION):
        with priority(PROGRESS):  # nested progress inside a decision stays urgent
            assert slack_limits.current_priority() == DECISION
        assert slack_limits.current_priority() == DECISION
    assert slack_limits.current_priority() == PROGRESS


def test_a_channel_named_and_then_given_by_id_shares_one_limit(slack):
    slack.enforce_limits(post_burst=slack_limits.POST.burst)
    client = limited_client("xoxb-test", slack.url)
    channel = client.chat_postMessage(channel="#a", text="by name")["channel"]
    for n in range(slack_limits.POST.burst):
        client.chat_postMessage(channel=channel, text=f"by ID {n}")
    assert len(slack.messages) == 1 + slack_limits.POST.burst
    assert not slack.limited()  # the last waited its turn instead of meeting a 429
