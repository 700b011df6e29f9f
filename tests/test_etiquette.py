"""Crawl etiquette (issue 19 item 5): the User-Agent we send, X-Robots-Tag opt-outs and robots.txt
(RFC 9309), on both HTTP backends against real loopback servers, plus their grammars as tables."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from convert.config import ConfigError, load_config
from convert.fetch import FetchPolicy, fetch_bytes, robots
from convert.fetch.policy import DEFAULT_USER_AGENT
from convert.sources import Workdir, plan_source
from convert.specs import ItemError, Status
from convert.testing.images import jpeg_bytes
from convert.testing.rawhttp import RawServer, ok, raw_servers, reply
from convert.testing.tasks import fetch_policy, run_shard

JPEG = jpeg_bytes(40, 30, seed=9)
DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


def policy(**changes: object) -> FetchPolicy:
    """Made inside each test, so it takes the backend under test (a policy decides it once)."""
    base: dict[str, object] = {"allow_private_networks": True, "timeout": 1.0, "retries": 0, "item_timeout": 5}
    return FetchPolicy(**{**base, **changes})  # type: ignore[arg-type]


def outcome(url: str, pol: FetchPolicy) -> Status | bytes:
    try:
        return fetch_bytes(url, pol)
    except ItemError as exc:
        return exc.status


@pytest.fixture(autouse=True)
def _fresh_robots_cache() -> None:
    robots.cache.clear()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    with raw_servers() as make:
        yield make


# ---------------------------------------------------------------- X-Robots-Tag grammar


@pytest.mark.parametrize(
    "values, bot, expected",
    [
        (["noai"], "convert", "noai"),
        (["NoAI"], "convert", "noai"),  # case-insensitive
        (["nofollow, noimageai"], "convert", "noimageai"),  # a comma list
        (["nofollow", "noindex"], "convert", "noindex"),  # several headers
        (["otherbot: noai"], "convert", None),  # another bot's directive
        (["convert: noai"], "convert", "noai"),
        (["CONVERT: noindex, nofollow"], "convert", "noindex"),  # the bot scopes the rest of the value
        (["otherbot: noindex", "noai"], "convert", "noai"),  # the scope ends with its header
        (["noarchive, otherbot: noai"], "convert", None),
        (["noai, otherbot: nofollow"], "convert", "noai"),
        (["none"], "convert", "none"),  # none = noindex, nofollow
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], "convert", None),  # a valued directive, not a bot
        (["max-image-preview: none"], "convert", None),
        (["all", "nosnippet"], "convert", None),
        ([" noai "], "mybot", "noai"),
    ],
)
def test_x_robots_tag_grammar(values, bot, expected):
    assert robots.header_opt_out(values, bot, DIRECTIVES) == expected


def test_x_robots_tag_none_needs_noindex_or_nofollow_listed():
    assert robots.header_opt_out(["none"], "convert", ("noai",)) is None
    assert robots.header_opt_out(["noai"], "convert", ()) is None  # nothing disallowed: nothing parsed


def test_x_robots_tag_parsing_is_capped():
    huge = "x, " * 1_000_000 + "noai"  # 3 MB: parsed up to HEADER_CAP only, in well under a second
    start = time.perf_counter()
    assert robots.header_opt_out([huge], "convert", DIRECTIVES) is None
    assert time.perf_counter() - start < 0.5


def test_raw_header_lines_count_only_the_final_2xx_response():
    hop = [b"HTTP/1.1 302 Found\r\n", b"X-Robots-Tag: noai\r\n", b"Location: /b\r\n", b"\r\n"]
    final = [b"HTTP/1.1 200 OK\r\n", b"x-robots-tag: otherbot: noai\r\n", b"X-Robots-Tag: noimageai\r\n", b"\r\n"]
    assert robots.header_lines_opt_out(hop + final, "convert", DIRECTIVES) == "noimageai"
    assert robots.header_lines_opt_out(final[:1] + hop[1:] + [b"\r\n"], "convert", DIRECTIVES) == "noai"
    assert robots.header_lines_opt_out(hop, "convert", DIRECTIVES) is None  # a redirect's tags do not count


# ---------------------------------------------------------------- robots.txt grammar (RFC 9309)

RFC_EXAMPLE = """\
User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot

EOF
"""


@pytest.mark.parametrize(
    "bot, path, allowed",
    [  # RFC 9309 section 5.1
        ("foobot", "/example/page.html", True),
        ("foobot", "/example/allowed.gif", True),
        ("foobot", "/example/other.html", False),
        ("foobot", "/", False),
        ("FooBot", "/example/page.html", True),  # product tokens match case-insensitively
        ("barbot", "/example/page.html", False),
        ("bazbot", "/example/page.html", False),
        ("barbot", "/example/other.html", True),
        ("quxbot", "/example/page.html", True),  # its group is empty: everything allowed
        ("quxbot", "/a.gif", True),
        ("otherbot", "/a.gif", False),  # no group of its own: the * group
        ("otherbot", "/a.gif?x=1", True),  # $ anchors at the end of path + query
        ("otherbot", "/example/x", False),
        ("otherbot", "/publications/x", True),
        ("otherbot", "/robots.txt", True),  # always allowed
    ],
)
def test_rfc9309_example(bot, path, allowed):
    rules = robots.parse(RFC_EXAMPLE, bot.lower())
    assert rules.allowed("http://example.com" + path) is allowed


def test_rfc9309_longest_match_and_allow_wins_a_tie():
    rules = robots.parse(
        "User-Agent: foobot\nAllow: /example/page/\nDisallow: /example/page/disallowed.gif\n", "foobot"
    )
    assert rules.allowed("http://h/example/page/") and not rules.allowed("http://h/example/page/disallowed.gif")
    tie = robots.parse("user-agent: *\ndisallow: /folder\nallow: /folder\n", "x")
    assert tie.allowed("http://h/folder/a")  # same length: allow wins
    order = robots.parse("User-agent: *\nDisallow: /\nAllow: /images/\n", "x")
    assert order.allowed("http://h/images/a.jpg")  # longest match, not file order (urllib.robotparser: first match)
    wild = robots.parse("User-agent: *\nDisallow: /*.php$\nDisallow: /fish*\nAllow: /fish/ok\n", "x")
    assert not wild.allowed("http://h/a/b.php") and wild.allowed("http://h/a/b.php?x")
    assert not wild.allowed("http://h/fishheads") and wild.allowed("http://h/fish/ok/1")


def test_rfc9309_groups_for_the_same_agent_merge_and_comments_are_ignored():
    text = "User-agent: a # ours\nDisallow: /x\n\nUser-agent: b\nDisallow: /y\n\nUser-agent: a\nDisallow: /z # too\n"
    rules = robots.parse(text, "a")
    assert not rules.allowed("http://h/x") and not rules.allowed("http://h/z") and rules.allowed("http://h/y")
    assert robots.parse("Disallow: /\n", "a").allowed("http://h/")  # rules before any user-agent: none


@pytest.mark.parametrize(
    "pattern, path, matches",
    [  # RFC 9309 section 2.2.2: percent-encoding is normalised on both sides
        ("/foo/bar?baz=quz", "/foo/bar?baz=quz", True),
        ("/foo/bar?baz=https://foo.bar", "/foo/bar?baz=https%3A%2F%2Ffoo.bar", True),
        ("/foo/bar/\u30c4", "/foo/bar/%E3%83%84", True),
        ("/foo/bar/%E3%83%84", "/foo/bar/%e3%83%84", True),
        ("/foo/bar/%62%61%7A", "/foo/bar/baz", True),
        ("/foo/bar/baz", "/foo/bar/qux", False),
    ],
)
def test_rfc9309_percent_encoding(pattern, path, matches):
    rules = robots.parse(f"User-agent: *\nDisallow: {pattern}\n", "x")
    assert rules.allowed("http://h" + path) is not matches


def test_robots_status_mapping():
    assert robots.rules_for(404, b"", "x").allowed("http://h/a")  # 4xx: no rules
    assert robots.rules_for(200, b"User-agent: *\nDisallow: /\n", "x").allowed("http://h/a") is False
    for unreachable in (robots.rules_for(503, b"", "x"), robots.rules_for(None, b"", "x", "refused")):
        assert not unreachable.allowed("http://h/a")
        assert robots.refusal(unreachable, "x").status is Status.CONNECTION_ERROR  # --retry-failed asks again
    assert robots.refusal(robots.rules_for(200, b"User-agent: *\nDisallow: /\n", "x"), "x").status is Status.OPTED_OUT


def test_robots_cache_is_a_bounded_lru_with_a_ttl(monkeypatch):
    cache = robots.Cache(maxsize=2)
    for name in "abc":
        cache.put((name,), robots.ALLOW_ALL)
    assert cache.get(("a",)) is None and cache.get(("c",)) is robots.ALLOW_ALL
    monkeypatch.setattr(robots, "ROBOTS_TTL", 0.05)
    cache.put(("d",), robots.ALLOW_ALL)
    time.sleep(0.1)
    assert cache.get(("d",)) is None


# ---------------------------------------------------------------- settings


def test_settings_and_their_one_line_errors():
    cfg = load_config(
        None,
        {"source.uri": "x.txt", "output.uri": "out", "fetch.user_agent_token": "mybot", "fetch.robots_txt": "respect"},
    )
    pol = fetch_policy(cfg)
    assert pol.user_agent_header == DEFAULT_USER_AGENT + " mybot" and pol.bot == "mybot"
    assert pol.robots_txt == "respect" and pol.disallowed_header_directives == DIRECTIVES
    assert DEFAULT_USER_AGENT.startswith("convert/") and "+https://" in DEFAULT_USER_AGENT
    assert FetchPolicy().bot == "convert"  # no token: the User-Agent's product token
    for key, value in [
        ("fetch.user_agent_token", "my bot"),
        ("fetch.user_agent", "x\r\nX-Evil: 1"),
        ("fetch.robots_txt", "maybe"),
        ("fetch.disallowed_header_directives", ["no ai"]),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, {"source.uri": "x.txt", "output.uri": "out", key: value})
        assert key.split(".")[1] in str(info.value) and "\n" not in str(info.value).strip()


# ---------------------------------------------------------------- both backends: headers

pytestmark_backends = pytest.mark.usefixtures("http_backend")


@pytestmark_backends
def test_user_agent_and_token_are_sent(raw_server, http_backend):
    assert policy().uses_curl is (http_backend == "curl")  # decided when the policy was made
    srv = raw_server(reply(ok(JPEG), keep=True))
    assert fetch_bytes(srv.url + "/a.jpg", policy(user_agent_token="mybot")) == JPEG
    assert f"user-agent: {DEFAULT_USER_AGENT} mybot\r\n".lower().encode() in srv.heads[0].lower()


@pytestmark_backends
@pytest.mark.parametrize(
    "tags, token, expected",
    [
        (b"X-Robots-Tag: noai\r\n", None, Status.OPTED_OUT),
        (b"X-Robots-Tag: otherbot: noai\r\n", None, "kept"),
        (b"X-Robots-Tag: mybot: noimageai\r\n", "mybot", Status.OPTED_OUT),
        (b"X-Robots-Tag: nofollow\r\nx-robots-tag: NOINDEX\r\n", None, Status.OPTED_OUT),
        (b"X-Robots-Tag: none\r\n", None, Status.OPTED_OUT),
        (b"X-Robots-Tag: noarchive, nosnippet\r\n", None, "kept"),
    ],
)
def test_x_robots_tag_on_both_backends(raw_server, tags, token, expected):
    srv = raw_server(reply(ok(JPEG, tags), keep=True))
    got = outcome(srv.url + "/a.jpg", policy(user_agent_token=token))
    assert got == (JPEG if expected == "kept" else expected)


@pytestmark_backends
def test_opt_out_message_and_empty_body_and_error_statuses(raw_server):
    empty = raw_server(reply(ok(b"", b"X-Robots-Tag: noai\r\n")))
    with pytest.raises(ItemError) as info:
        fetch_bytes(empty.url + "/a.jpg", policy())
    assert info.value.status is Status.OPTED_OUT and info.value.message == "X-Robots-Tag: noai"
    missing = raw_server(reply(b"HTTP/1.1 404 Not Found\r\nX-Robots-Tag: noai\r\nContent-Length: 0\r\n\r\n"))
    assert outcome(missing.url + "/a.jpg", policy()) is Status.NOT_FOUND  # the status decides first
    assert outcome(empty.url + "/a.jpg", policy(disallowed_header_directives=())) == b""  # nothing disallowed


@pytestmark_backends
def test_a_redirect_hops_tags_do_not_count_only_the_final_responses(raw_server):
    final = raw_server(reply(ok(JPEG), keep=True))
    hop = raw_server(
        reply(
            b"HTTP/1.1 302 Found\r\nX-Robots-Tag: noai\r\nLocation: %s/b.jpg\r\n"
            b"Content-Length: 0\r\n\r\n" % final.url.encode(),
            keep=True,
        )
    )
    assert fetch_bytes(hop.url + "/a.jpg", policy()) == JPEG


def _slow_body(tags: bytes, size: int = 3000) -> Callable[[socket.socket, bytes], None]:
    """Headers at once, then a `size`-byte body at one byte a second (until the client leaves)."""

    def respond(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (size, tags))
        for _ in range(size):
            time.sleep(1.0)
            conn.sendall(b"x")

    return respond


@pytestmark_backends
def test_opted_out_body_is_not_read(raw_server):
    srv = raw_server(_slow_body(b"X-Robots-Tag: noai\r\n"))
    start = time.monotonic()
    assert outcome(srv.url + "/a.jpg", policy(timeout=3.0, item_timeout=10)) is Status.OPTED_OUT
    assert time.monotonic() - start < 1.5  # decided by the headers, not after the body (or its stall)


@pytestmark_backends
@pytest.mark.parametrize("size", [60_000, 1_000_000])
def test_a_huge_x_robots_tag_header_breaks_nothing(raw_server, size):
    tag = b"X-Robots-Tag: " + b"x," * (size // 2) + b"noai\r\n"
    srv = raw_server(reply(ok(JPEG, tag)))
    start = time.monotonic()
    got = outcome(srv.url + "/a.jpg", policy())
    assert time.monotonic() - start < 3
    # beyond the parse cap the directive is not seen (60 kB); a 1 MB header line is refused by
    # both HTTP clients (http.client: 64 KiB per line, libcurl: 100 KiB) as a connection error
    assert got == (JPEG if size < 65_536 else Status.CONNECTION_ERROR)


@pytestmark_backends
def test_opted_out_items_are_counted_and_not_stored(tmp_path, raw_server):
    keep = raw_server(reply(ok(JPEG), keep=True))
    noai = raw_server(reply(ok(JPEG, b"X-Robots-Tag: noai\r\n"), keep=True))
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{keep.url}/a.jpg\n{noai.url}/b.jpg\n{keep.url}/c.jpg\n")
    cfg = load_config(
        None,
        {
            "source.uri": str(listing),
            "output.uri": str(tmp_path / "out"),
            "image.size": 8,
            "fetch.allow_private_networks": True,
        },
    )
    (spec,) = plan_source(cfg.source, 10_000, Workdir(str(tmp_path / "work"))).specs
    record = run_shard(spec, cfg)
    assert [r.status for r in record.ledger] == [Status.OK, Status.OPTED_OUT, Status.OK]
    assert record.ok == 2


# ---------------------------------------------------------------- both backends: robots.txt


@pytestmark_backends
def test_robots_txt_respected_once_per_host(http_server):
    http_server.put("/robots.txt", b"User-agent: *\nDisallow: /private/\n\nUser-agent: mybot\nDisallow: /\n")
    for name in ("private/a.jpg", "public/a.jpg", "public/b.jpg"):
        http_server.put(name, JPEG)
    pol = policy(robots_txt="respect")
    assert outcome(http_server.url_for("/private/a.jpg"), pol) is Status.OPTED_OUT
    assert outcome(http_server.url_for("/public/a.jpg"), pol) == JPEG
    assert outcome(http_server.url_for("/public/b.jpg"), pol) == JPEG
    assert http_server.hits("/private/a.jpg") == 0 and http_server.hits("/robots.txt") == 1  # cached per process
    assert outcome(http_server.url_for("/public/a.jpg"), policy(robots_txt="respect", user_agent_token="mybot")) is (
        Status.OPTED_OUT
    )
    assert outcome(http_server.url_for("/private/a.jpg"), policy()) == JPEG  # ignore: the default
    assert http_server.hits("/robots.txt") == 2  # once more for the other bot name, never for "ignore"


@pytestmark_backends
def test_robots_txt_statuses(http_server):
    http_server.put("/a.jpg", JPEG)
    pol = policy(robots_txt="respect")
    assert outcome(http_server.url_for("/a.jpg"), pol) == JPEG  # 404: no robots.txt, all allowed
    robots.cache.clear()
    http_server.fault("/robots.txt", statuses=[503])
    with pytest.raises(ItemError) as info:
        fetch_bytes(http_server.url_for("/a.jpg"), pol)
    assert info.value.status is Status.CONNECTION_ERROR and "robots.txt HTTP 503" in info.value.message
    assert http_server.hits("/a.jpg") == 1  # not fetched while its robots.txt fails


@pytestmark_backends
def test_robots_txt_unreachable_means_disallowed(http_server):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{dead.getsockname()[1]}/a.jpg"
    try:
        with pytest.raises(ItemError) as info:
            fetch_bytes(url, policy(robots_txt="respect"))
    finally:
        dead.close()
    assert info.value.status is Status.CONNECTION_ERROR and "robots.txt unreachable" in info.value.message


@pytestmark_backends
def test_a_100_mb_robots_txt_is_read_up_to_its_cap(raw_server):
    sent = [0]

    def respond(conn: socket.socket, head: bytes) -> bool:
        if b"/robots.txt" not in head.split(b"\r\n", 1)[0]:
            conn.sendall(ok(JPEG))
            return True
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nUser-agent: *\nDisallow: /x\n" % (100 << 20))
        pad = b"# " + b"p" * 1021 + b"\n"
        try:
            while sent[0] < 100 << 20:
                conn.sendall(pad)
                sent[0] += len(pad)
        except OSError:
            pass
        return False

    srv = raw_server(respond)
    start = time.monotonic()
    pol = policy(robots_txt="respect")
    assert outcome(srv.url + "/x/a.jpg", pol) is Status.OPTED_OUT
    assert outcome(srv.url + "/y/a.jpg", pol) == JPEG
    assert time.monotonic() - start < 5
    assert sent[0] < 20 << 20  # the client stopped reading soon after ROBOTS_CAP (socket buffers aside)


@pytestmark_backends
def test_robots_txt_redirect_to_a_private_address_is_refused(raw_server):
    private = raw_server(reply(ok(b"User-agent: *\nAllow: /\n")), host="127.0.0.2")
    site = raw_server(
        lambda conn, head: conn.sendall(
            ok(JPEG)
            if b"robots" not in head.split(b"\r\n", 1)[0]
            else b"HTTP/1.1 302 Found\r\nLocation: %s/robots.txt\r\nContent-Length: 0\r\n\r\n" % private.url.encode()
        )
    )
    guarded = policy(allow_private_networks=False, allowed_networks=("127.0.0.1/32",), robots_txt="respect")
    with pytest.raises(ItemError) as info:
        fetch_bytes(site.url + "/a.jpg", guarded)
    assert info.value.status is Status.CONNECTION_ERROR and "non-public address 127.0.0.2" in info.value.message
    assert private.heads == []  # the guard refused the hop before connecting
    assert len(site.heads) == 1  # robots.txt only: the image was not fetched


@pytestmark_backends
def test_robots_txt_for_many_items_of_one_host_is_fetched_once_in_a_shard(tmp_path, http_server):
    http_server.put("/robots.txt", b"User-agent: *\nDisallow: /no/\n")
    names = [f"{'no' if i % 3 == 0 else 'ok'}/{i}.jpg" for i in range(30)]
    for name in names:
        http_server.put(name, JPEG)
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{http_server.url_for(n)}\n" for n in names))
    cfg = load_config(
        None,
        {
            "source.uri": str(listing),
            "output.uri": str(tmp_path / "out"),
            "image.size": 8,
            "fetch.allow_private_networks": True,
            "fetch.robots_txt": "respect",
        },
    )
    (spec,) = plan_source(cfg.source, 10_000, Workdir(str(tmp_path / "work"))).specs
    statuses = [r.status for r in run_shard(spec, cfg).ledger]
    assert statuses == [Status.OPTED_OUT if n.startswith("no/") else Status.OK for n in names]
    assert http_server.hits("/robots.txt") == 1


# ---------------------------------------------------------------- both backends: the host contacted


@pytestmark_backends
def test_errors_name_the_host_actually_contacted(raw_server):
    # "Connection: close": the server closes after each reply, and a client that raced it to reuse the
    # connection would fail the robots.txt fetch for a reason this test is not about (it flaked in CI)
    srv = raw_server(reply(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
    port = srv.url.rsplit(":", 1)[1]
    with pytest.raises(ItemError) as info:
        fetch_bytes(f"http://127.0.0.1:{port}\\@example.com/img.png", policy())
    assert srv.heads, "the request went to 127.0.0.1"
    assert f"127.0.0.1:{port}" in info.value.message and "//example.com" not in info.value.message
    with pytest.raises(ItemError):
        fetch_bytes(f"http://127.0.0.1:{port}\\@example.com/img.png", policy(robots_txt="respect"))
    assert srv.lines()[1] == "GET /robots.txt HTTP/1.1"  # robots.txt of the host contacted, not example.com's
