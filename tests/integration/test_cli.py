"""The `tempalias` command line as a newcomer meets it: summaries, errors
that explain themselves, tokens kept out of `ps`, help, completions, man page."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import socket
import subprocess

from harness import BIN, DOMAIN, TARGET, clean_env, free_port


def run(*args, env: dict | None = None, cwd=None, stdin: str | None = None, timeout: float = 30):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=clean_env({"NO_COLOR": "1", **(env or {})}), cwd=cwd, input=stdin)


def test_create_prints_a_summary_and_warns_that_the_token_is_shown_once(node):
    r = run("alias", "create", TARGET, "--days", "2", "--max-usage", "3", "--api", node.api)
    assert r.returncode == 0, r.stderr
    fields = dict(re.findall(r"^(alias|forwards to|state|expires|uses left|created|token) +(.+)$", r.stdout, re.M))
    assert fields["alias"].endswith("@" + DOMAIN), r.stdout
    assert fields["forwards to"] == TARGET
    assert fields["uses left"] == "3 of 3"
    assert fields["state"] == "active"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d [+-]\d\d:\d\d \(in (1 d 23 h|2 d 0 h)\)", fields["expires"]), fields
    assert re.fullmatch(r"[0-9a-f]{64}", fields["token"]), fields
    assert "shown only this once" in r.stderr, r.stderr
    assert "\x1b[" not in r.stdout + r.stderr, "NO_COLOR and no terminal: no escape codes"


def test_api_without_scheme_json_output_and_token_from_env_or_file(node, tmp_path):
    host_port = node.api.removeprefix("http://")
    r = run("alias", "create", TARGET, "--days", "1", "--api", host_port, "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    token = created["token"]

    # TEMPALIAS_TOKEN instead of --token (which `ps` would show).
    r = run("alias", "show", created["id"], "--api", host_port, env={"TEMPALIAS_TOKEN": token})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^uses left +100 of 100$", r.stdout, re.M), r.stdout
    assert "token" not in r.stdout

    # --token-file, and "-" for standard input.
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    r = run("alias", "show", created["id"], "--api", host_port, "--json", "--token-file", token_file)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["id"] == created["id"]
    r = run("alias", "revoke", created["id"], "--api", host_port, "--token-file", "-", stdin=token + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"revoked {created['id']}"
    assert node.get_alias(created)["state"] == "revoked"


def test_api_errors_print_the_message_not_the_raw_body(node):
    r = run("alias", "show", "abcdefghijkl", "--api", node.api, env={"TEMPALIAS_TOKEN": "0" * 64})
    assert r.returncode == 1
    assert r.stderr.strip() == "tempalias: no such alias, or the token does not match (404 not_found)", r.stderr
    r = run("alias", "create", "not-an-address", "--days", "1", "--api", node.api)
    assert r.returncode == 1
    assert "{" not in r.stderr and "400 invalid_target" in r.stderr, r.stderr
    r = run("alias", "show", "abcdefghijkl", "--api", node.api)
    assert r.returncode == 1 and "TEMPALIAS_TOKEN" in r.stderr, r.stderr


def test_flag_errors_name_the_flag():
    r = run("alias", "create", TARGET, "--days", "0")
    assert r.returncode == 2 and "--days" in r.stderr, r.stderr


def test_every_subcommand_has_help_with_defaults():
    r = run("serve", "--help")
    assert r.returncode == 0 and "--config <FILE>" in r.stdout and "--log-format <FORMAT>" in r.stdout, r.stdout
    r = run("cluster", "add-learner", "--help")
    assert "<ID>" in r.stdout and "never used before" in r.stdout, r.stdout
    r = run("alias", "create", "--help")
    assert "60 by default" in r.stdout and "100 by default" in r.stdout, r.stdout
    r = run("alias", "show", "--help")
    assert "shell history" in r.stdout, r.stdout


def test_completions_and_man_page():
    r = run("completions", "bash")
    assert r.returncode == 0 and "complete" in r.stdout and "check-config" in r.stdout, r.stdout[:200]
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n"], input=r.stdout, text=True, timeout=30).returncode == 0
    for shell in ("zsh", "fish"):
        r = run("completions", shell)
        assert r.returncode == 0 and "tempalias" in r.stdout, shell
    r = run("man")
    assert r.returncode == 0 and r.stdout.startswith(".ie") and ".TH tempalias 1" in r.stdout, r.stdout[:200]
    assert "check\\-config" in r.stdout


def test_a_second_node_on_one_data_directory_names_it_and_the_holder(node, tmp_path):
    env = {
        "TEMPALIAS_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "TEMPALIAS_SMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "TEMPALIAS_CLUSTER_LISTEN": f"127.0.0.1:{free_port()}",
    }
    r = run("serve", "--config", node.config_path, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    assert f"data_dir {node.data_dir} is in use by another tempalias process (pid {node.pid})" in r.stderr, r.stderr
    assert "Database already open" not in r.stderr


def test_a_node_that_cannot_bind_creates_no_state(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = run("serve", env={"TEMPALIAS_SMTP_LISTEN": f"127.0.0.1:{taken}",
                              "TEMPALIAS_HTTP_LISTEN": f"127.0.0.1:{free_port()}"}, cwd=tmp_path)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken} (smtp.listen, TEMPALIAS_SMTP_LISTEN)" in r.stderr, r.stderr
    assert not (tmp_path / "tempalias-data").exists(), "state was created before binding"


def test_an_unusable_data_directory_is_named_as_data_dir(tmp_path):
    # Below a regular file: no user, root included, can create it.
    (tmp_path / "file").write_text("x")
    r = run("serve", env={"TEMPALIAS_DATA_DIR": str(tmp_path / "file" / "data"),
                          "TEMPALIAS_HTTP_LISTEN": "127.0.0.1:0", "TEMPALIAS_SMTP_LISTEN": "127.0.0.1:0",
                          "TEMPALIAS_CLUSTER_LISTEN": "127.0.0.1:0"}, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"tempalias: data_dir {tmp_path / 'file' / 'data'} (TEMPALIAS_DATA_DIR) is not a writable directory"), r.stderr
    assert "cluster.secret" not in r.stderr


def test_cluster_status_with_a_foreign_secret_suggests_config_or_secret_file(node, tmp_path):
    (tmp_path / "tempalias-data").mkdir()
    (tmp_path / "tempalias-data" / "cluster.secret").write_text("an-old-secret-of-another-cluster\n")
    r = run("cluster", "--node", f"127.0.0.1:{node.cluster_port}", "status", cwd=tmp_path)
    assert r.returncode == 1
    assert "refused the cluster secret" in r.stderr and "--config" in r.stderr and "--secret-file" in r.stderr, r.stderr
    r = run("cluster", "--node", f"127.0.0.1:{node.cluster_port}", "--secret-file",
            node.data_dir / "cluster.secret", "status", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("leader: node 1"), r.stdout


def stderr_on_a_terminal(args, env: dict) -> bytes:
    """Runs the binary with stderr on a pseudo-terminal; returns what it wrote."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([str(BIN), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=follower, env=clean_env(env))
        os.close(follower)
        follower = None
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 1
        return out
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)


def test_colour_only_on_a_terminal_and_never_with_no_color():
    args = ["alias", "show", "abcdefghijkl", "--api", f"127.0.0.1:{free_port()}", "--token", "x"]
    assert b"\x1b[" in stderr_on_a_terminal(args, {})
    assert b"\x1b[" not in stderr_on_a_terminal(args, {"NO_COLOR": "1"})
    r = run(*args, env={"NO_COLOR": ""})
    assert "\x1b[" not in r.stderr and "cannot connect" in r.stderr, r.stderr
