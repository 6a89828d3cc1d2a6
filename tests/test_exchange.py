"""The exchange state machine, in memory: a list of events in, the exact actions out.

Each test plays one dialogue (tests/playbook.py gives the exchange recording ports) and
compares every action the exchange took, in order: what went upstream, what the client
was answered, when reading paused, what went back to the pool. What the end-to-end tests
show with real sockets, these show for every branch, including the ones that are hard to
time with sockets (a retry, a deadline, a 101 arriving with tunnel data).
"""

from __future__ import annotations

import pytest

from proxy.config import ServerConfig
from proxy.http import exchange as states
from proxy.http.exchange import MAX_BUFFERED
from proxy.http.message import HTTPError, RequestHead
from tests.playbook import APP, SPARE, Playbook, head, ok


def test_a_get_on_a_pooled_connection_goes_up_and_its_response_comes_back() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    assert play.take() == [
        ("pool.take", 8000, True),
        ("link.attach", 8000, False),
        ("link.send_request", b"GET / HTTP/1.1"),
    ]
    play.exchange.response_head(200, b"OK", b"1.1", ok())
    play.exchange.response_body(b"ok")
    play.exchange.response_end()
    assert play.take() == [
        ("client.respond", 200),
        ("client.body", b"ok"),
        ("pool.release", True),
        ("client.end",),
    ]
    assert play.exchange.state == states.COMPLETE


def test_a_new_connection_pauses_the_client_until_it_is_open() -> None:
    play = Playbook()
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    assert play.take() == [
        ("pool.take", 8000, False),
        ("client.pause_request",),
        ("pool.open", 8000),
    ]
    play.exchange.connected(play.link())
    assert play.take() == [
        ("link.attach", 8000, False),
        ("link.send_request", b"GET / HTTP/1.1"),
        ("client.resume_request",),
    ]


def test_a_body_that_arrives_before_the_connection_goes_after_the_head_in_order() -> None:
    play = Playbook()
    play.exchange.start()
    play.exchange.request_head(head(b"/upload", b"POST", [(b"Content-Length", b"6")]))
    play.exchange.request_body(b"abc")
    play.exchange.request_body(b"def")
    play.exchange.request_end()
    play.take()
    play.exchange.connected(play.link())
    assert play.take() == [
        ("link.attach", 8000, False),
        ("link.send_request", b"POST /upload HTTP/1.1"),
        ("link.send_body", b"abc"),
        ("link.send_body", b"def"),
        ("client.resume_request",),
    ]


def test_a_waiting_body_is_bounded() -> None:
    play = Playbook()
    play.exchange.request_head(head(b"/up", b"POST", [(b"Content-Length", b"%d" % 10**7)]))
    chunk = b"x" * 65536
    for _ in range(MAX_BUFFERED // len(chunk)):
        play.exchange.request_body(chunk)
    assert play.take() == []  # not its turn yet: it waits, reading goes on
    play.exchange.request_body(chunk)
    assert play.take() == [("client.pause_request",)]


def test_a_refused_request_waits_for_its_turn_and_nothing_of_it_goes_up() -> None:
    play = Playbook(pooled=True)
    play.exchange.refuse(HTTPError(400, "malformed request"))
    assert play.take() == []  # an earlier request is still being answered
    play.exchange.start()
    assert play.take() == [("client.error", 400)]
    assert play.exchange.state == states.FAILED


def test_a_policy_refusal_raises_before_anything_moves() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    with pytest.raises(HTTPError) as refused:
        play.exchange.request_head(head(fields=[(b"Transfer-Encoding", b"chunked, gzip")]))
    assert refused.value.status == 501
    assert play.take() == []


def test_a_host_that_differs_from_the_server_name_is_421() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    with pytest.raises(HTTPError, match="differs from the TLS server name") as refused:
        play.exchange.request_head(RequestHead(b"GET", b"/", b"1.1", [(b"Host", b"other.test")]))
    assert refused.value.status == 421


def test_100_continue_passes_and_the_body_follows() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    expect = [(b"Content-Length", b"2"), (b"Expect", b"100-continue")]
    play.exchange.request_head(head(b"/up", b"POST", expect))
    play.take()
    play.exchange.response_head(100, b"Continue", b"1.1", [])
    play.exchange.request_body(b"hi")
    play.exchange.request_end()
    play.exchange.response_head(200, b"OK", b"1.1", ok(b""))
    play.exchange.response_end()
    assert play.take() == [
        ("client.interim", 100),
        ("link.send_body", b"hi"),
        ("client.respond", 200),
        ("pool.release", True),
        ("client.end",),
    ]


def test_an_early_answer_leaves_the_connection_out_of_the_pool() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(b"/up", b"POST", [(b"Content-Length", b"100")]))
    play.take()
    play.exchange.response_head(413, b"Too Large", b"1.1", ok(b""))
    play.exchange.response_end()
    assert play.take() == [("client.respond", 413), ("pool.release", False), ("client.end",)]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"])
def test_an_idempotent_request_is_sent_again_once_when_a_pooled_connection_dies(
    method: bytes,
) -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(method=method))
    play.exchange.request_end()
    play.take()
    play.exchange.upstream_lost("upstream closed the connection")
    assert play.take() == [("link.close",), ("client.pause_request",), ("pool.open", 8000)]
    fresh = play.link()
    play.exchange.connected(fresh)
    play.take()
    play.exchange.upstream_lost("upstream closed the connection")  # a new one: no second try
    assert play.take() == [("link.close",), ("client.error", 502)]


@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
def test_a_non_idempotent_request_is_never_sent_again(method: bytes) -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(method=method))
    play.exchange.request_end()
    play.take()
    play.exchange.upstream_lost("upstream closed the connection")
    assert play.take() == [("link.close",), ("client.error", 502)]


def test_no_retry_once_a_byte_of_the_answer_arrived() -> None:
    play = Playbook(pooled=True)
    link = play.context.pool.idle[0]
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    link.answered = True
    play.take()
    play.exchange.upstream_lost("upstream closed the connection")
    assert play.take() == [("link.close",), ("client.error", 502)]


def test_a_refused_upstream_is_marked_down_and_the_next_is_tried() -> None:
    play = Playbook(upstreams=(APP, SPARE))
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.take()
    play.exchange.connect_failed(APP, False, "Connection refused")
    assert play.take() == [("pool.mark_down", 8000), ("pool.open", 8001)]
    play.exchange.connect_failed(SPARE, False, "Connection refused")
    assert play.take() == [("pool.mark_down", 8001), ("client.error", 502)]


def test_a_connect_timeout_is_504() -> None:
    play = Playbook()
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.take()
    play.exchange.connect_failed(APP, True, "connect timed out")
    assert play.take() == [("pool.mark_down", 8000), ("client.error", 504)]


def test_a_websocket_handshake_answered_101_becomes_a_tunnel_with_what_followed() -> None:
    play = Playbook(pooled=True)
    upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    play.exchange.start()
    play.exchange.request_head(head(b"/ws", fields=upgrade))
    play.exchange.request_end()
    play.take()
    play.exchange.response_head(101, b"Switching Protocols", b"1.1", [(b"Upgrade", b"websocket")])
    play.exchange.response_end()  # llhttp's end of the 101 head: nothing happens
    play.exchange.switched(b"\x81\x02hi")
    assert play.take() == [("client.respond", 101), ("client.upgrade", b"\x81\x02hi")]
    assert play.exchange.state == states.SWITCHED


def test_a_websocket_handshake_answered_otherwise_never_returns_its_connection() -> None:
    play = Playbook(pooled=True)
    upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    play.exchange.start()
    play.exchange.request_head(head(b"/ws", fields=upgrade))
    play.exchange.request_end()
    play.take()
    play.exchange.response_head(403, b"Forbidden", b"1.1", ok(b""))
    play.exchange.response_end()
    assert play.take() == [("client.respond", 403), ("pool.release", False), ("client.end",)]


def test_101_to_a_plain_request_is_refused_as_the_upstreams_fault() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    with pytest.raises(HTTPError, match="switched protocols without being asked"):
        play.exchange.response_head(101, b"Switching", b"1.1", [(b"Upgrade", b"h2c")])


def test_an_invalid_response_before_its_head_is_502_after_it_a_cut() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.take()
    play.exchange.upstream_invalid(HTTPError(502, "malformed response from upstream"))
    assert play.take() == [("client.error", 502)]

    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.exchange.response_head(200, b"OK", b"1.1", ok(b"0123456789"))
    play.take()
    play.exchange.upstream_invalid(HTTPError(502, "malformed response from upstream"))
    assert play.take() == [("client.cut",)]


def test_a_response_until_close_ends_with_the_upstreams_eof() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.exchange.response_head(200, b"OK", b"1.0", [])
    play.exchange.response_body(b"all of it")
    play.take()
    play.exchange.upstream_eof()
    assert play.take() == [("pool.release", False), ("client.end",)]


SHORT = ServerConfig(
    request_head_timeout=2,
    request_body_timeout=3,
    upstream_timeout=4,
    send_timeout=5,
)


def _expire_at(play: Playbook, seconds: float) -> None:
    play.clock.now += seconds
    play.exchange.expire(play.clock.now)


def test_deadlines_head_body_upstream_each_with_its_answer() -> None:
    play = Playbook(settings=SHORT)
    play.exchange.start()
    _expire_at(play, 1.9)
    assert play.take() == []
    _expire_at(play, 0.2)
    assert play.take() == [("client.error", 408)]

    play = Playbook(settings=SHORT, pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(b"/up", b"POST", [(b"Content-Length", b"10")]))
    play.exchange.request_body(b"12345")
    play.take()
    _expire_at(play, 2.9)
    play.exchange.request_body(b"678")  # progress moves the deadline
    _expire_at(play, 2.9)
    assert play.take() == [("link.send_body", b"678")]
    _expire_at(play, 0.2)
    assert play.take() == [("link.close",), ("client.error", 408)]

    play = Playbook(settings=SHORT, pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.take()
    _expire_at(play, 4.1)
    assert play.take() == [("link.close",), ("client.error", 504)]


def test_a_client_that_reads_slowly_is_not_blamed_on_the_upstream_until_send_timeout() -> None:
    play = Playbook(settings=SHORT, pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.exchange.request_end()
    play.exchange.response_head(200, b"OK", b"1.1", ok(b"x" * 100))
    play.exchange.client_writable(False)
    assert play.take()[-1] == ("link.pause_reading",)
    _expire_at(play, 4.5)  # past upstream_timeout: the wait is the client's
    assert play.take() == []
    _expire_at(play, 0.6)  # past send_timeout: cut both sides
    assert play.take() == [("link.close",), ("client.cut",)]


def test_a_client_gone_closes_the_upstream_connection() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head())
    play.take()
    play.exchange.client_gone()
    assert play.take() == [("link.close",)]
    assert play.exchange.state == states.FAILED


def test_a_head_request_tells_the_link_no_body_follows_its_response() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(method=b"HEAD"))
    assert play.take()[1] == ("link.attach", 8000, True)


def test_more_body_than_content_length_is_refused() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(b"/up", b"POST", [(b"Content-Length", b"3")]))
    with pytest.raises(HTTPError) as refused:
        play.exchange.request_body(b"four")
    assert refused.value.malformed


def test_a_body_of_unknown_length_ends_explicitly_upstream() -> None:
    play = Playbook(pooled=True)
    play.exchange.start()
    play.exchange.request_head(head(b"/up", b"POST", [(b"Transfer-Encoding", b"chunked")]))
    play.exchange.request_body(b"abc")
    play.exchange.request_end()
    assert play.take()[-2:] == [("link.send_body", b"abc"), ("link.send_end",)]
