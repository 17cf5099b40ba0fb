"""The web page over plain HTTP: headers, caching, compression, the no-JavaScript
form route and the served OpenAPI document. The browser tests are in tests/browser."""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import shutil
import subprocess
import urllib.parse

import pytest

from harness import DOMAIN, REPO, TARGET, free_port, http_request, wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def form_body(**fields) -> str:
    return urllib.parse.urlencode(fields)


def assert_html_security_headers(r):
    assert r.header("content-type") == "text/html; charset=utf-8", r.headers
    csp = r.header("content-security-policy")
    assert csp, r.headers
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    assert r.header("referrer-policy") == "no-referrer"
    assert r.header("x-content-type-options") == "nosniff"
    return directives


def inline_blocks(html: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest.mark.parametrize("path", ["/", "/manage"])
def test_pages_carry_security_headers_and_csp_hashes_of_their_inline_code(node, path):
    r = node.http("GET", path)
    assert r.status == 200, r.body
    directives = assert_html_security_headers(r)
    html = r.body.decode()
    scripts, styles = inline_blocks(html, "script"), inline_blocks(html, "style")
    assert len(scripts) == 1 and len(styles) == 1
    assert csp_hash(scripts[0]) in directives["script-src"].split()
    assert csp_hash(styles[0]) in directives["style-src"].split()
    # Self-contained: nothing is loaded from another origin.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "external reference in the page"


def test_index_shows_the_configured_limits_and_domain(node_factory):
    n = node_factory(config={"limits": {"max_days": 9, "max_usage": 4}})
    html = n.http("GET", "/").body.decode()
    assert 'id="days" name="days" type="number" min="1" max="9"' in html
    assert 'id="uses" name="uses" type="number" min="1" max="4"' in html
    assert "1 to 9." in html and "1 to 4." in html
    assert DOMAIN in html


def test_index_etag_gives_304_and_cache_control(node):
    r = node.http("GET", "/")
    etag = r.header("etag")
    assert etag and etag.startswith('W/"'), r.headers
    assert r.header("cache-control") == "no-cache"
    again = node.http("GET", "/", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    assert again.header("etag") == etag
    strong = etag[2:]
    assert node.http("GET", "/", headers={"If-None-Match": f'"nope", {strong}'}).status == 304
    assert node.http("GET", "/", headers={"If-None-Match": '"other"'}).status == 200


def test_html_and_json_are_compressed_when_the_client_accepts_it(node):
    plain = node.http("GET", "/")
    gz = node.http("GET", "/", headers={"Accept-Encoding": "gzip"})
    assert gz.header("content-encoding") == "gzip", gz.headers
    assert "accept-encoding" in gz.header("vary").lower()
    assert gzip.decompress(gz.body) == plain.body
    assert len(gz.body) < len(plain.body) / 2
    assert plain.header("content-encoding") is None

    alias = node.create_alias(days=1, max_usage=1)
    auth = {"Authorization": f"Bearer {alias['token']}", "Accept-Encoding": "gzip"}
    r = node.http("GET", f"/v1/aliases/{alias['id']}", headers=auth)
    assert r.status == 200 and r.header("content-encoding") == "gzip"
    assert b'"remaining":1' in gzip.decompress(r.body)


def test_brotli_is_offered_too(node):
    brotli = pytest.importorskip("brotli")
    plain = node.http("GET", "/manage")
    br = node.http("GET", "/manage", headers={"Accept-Encoding": "br"})
    assert br.header("content-encoding") == "br", br.headers
    assert brotli.decompress(br.body) == plain.body


def test_prometheus_scrapes_the_compressed_metrics(node, tmp_path):
    """A real Prometheus server (which asks for gzip) scrapes the node."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed")
    r = node.http("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.header("content-encoding") == "gzip"
    assert gzip.decompress(r.body).startswith(b"# HELP")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: tempalias\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{node.http_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        def scraped():
            q = urllib.parse.quote('tempalias_http_requests_total{job="tempalias",route="/metrics"}')
            res = http_request(f"http://127.0.0.1:{port}/api/v1/query?query={q}", timeout=2).json()
            up = http_request(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=2).json()
            return res["data"]["result"] and up["data"]["result"][0]["value"][1] == "1"

        wait_until(scraped, 30, "Prometheus to scrape the node", interval=0.25)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def test_openapi_document_is_served_as_in_the_repository(node):
    r = node.http("GET", "/openapi.yaml")
    assert r.status == 200
    assert r.header("content-type").startswith("application/yaml")
    assert r.body == (REPO / "docs" / "openapi.yaml").read_bytes()
    assert node.http("GET", "/openapi.yaml", headers={"If-None-Match": r.header("etag")}).status == 304


def test_form_post_creates_an_alias_and_answers_html(node):
    r = node.http("POST", "/create", form_body(target=TARGET, days="2", uses="1"), headers=FORM)
    assert r.status == 201, r.body
    assert_html_security_headers(r)
    assert r.header("cache-control") == "no-store"
    html = r.body.decode()
    address = re.search(r'id="alias" readonly value="([^"]+)"', html).group(1)
    token = re.search(r'id="token" readonly value="([0-9a-f]{64})"', html).group(1)
    alias_id = address.split("@")[0]
    assert address.endswith("@" + DOMAIN)
    assert f'href="/manage#id={alias_id}&amp;token={token}"' in html
    assert "1 of 1" in html and "UTC" in html
    # The page's token manages the alias through the API.
    shown = node.get_alias({"id": alias_id, "token": token})
    assert shown["max_usage"] == 1 and shown["target"] == TARGET
    assert node.rcpt_reply(address)[0] == 250


@pytest.mark.parametrize(
    "fields, field, words, status",
    [
        ({"target": TARGET, "days": "61"}, "days", "Choose from 1 to 60 days.", 400),
        ({"target": TARGET, "uses": "0"}, "uses", "Choose from 1 to 100 messages.", 400),
        ({"target": TARGET, "days": "2.5"}, "days", "Enter a whole number of days.", 400),
        ({"target": f"x@{DOMAIN}", "days": "1"}, "target", "This address cannot receive forwarded mail", 400),
        ({"target": "not an address", "days": "1"}, "target", "This address cannot receive forwarded mail", 400),
        ({"target": TARGET}, "days", "Give a number of days or a number of messages", 400),
        ({"days": "1"}, "target", "Enter the address", 400),
    ],
)
def test_form_errors_appear_next_to_their_field(node, fields, field, words, status):
    r = node.http("POST", "/create", form_body(**fields), headers=FORM)
    assert r.status == status, r.body
    assert_html_security_headers(r)
    html = r.body.decode()
    m = re.search(rf'<p id="{field}-error" class="error">([^<]*)</p>', html)
    assert m and words in m.group(1), html
    assert re.search(rf'id="{field}"[^>]*aria-invalid="true"', html)
    # What the visitor typed is kept.
    for name in ("target", "days", "uses"):
        if name in fields:
            assert re.search(rf'id="{name}" name="{name}"[^>]* value="{re.escape(fields[name])}"', html), name


def test_form_route_refuses_other_bodies_with_html(node):
    r = node.http("POST", "/create", {"target": TARGET, "days": 1})
    assert r.status == 415
    assert "x-www-form-urlencoded" in r.body.decode()
    r = node.http("POST", "/create", "target=" + "a" * 5000, headers=FORM)
    assert r.status == 413
    assert "larger than 4096 bytes" in r.body.decode()


def test_form_created_alias_counts_uses_like_any_other(node):
    r = node.http("POST", "/create", form_body(target=TARGET, uses="1", days=""), headers=FORM)
    assert r.status == 201
    html = r.body.decode()
    address = re.search(r'id="alias" readonly value="([^"]+)"', html).group(1)
    node.send([address], b"Subject: one\r\n\r\nhello\r\n")
    wait_until(lambda: len(node.captured()) == 1, 10, "the forwarded message")
    assert node.rcpt_reply(address)[0] == 550
