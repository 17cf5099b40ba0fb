"""`tempalias check-config`: 0 for a valid file, non-zero naming the key otherwise."""

from __future__ import annotations

import subprocess

import pytest

from harness import BIN, clean_env

VALID = """\
node_id  = 1
data_dir = "./tempalias-data"
domains  = ["tempalias.test"]

[http]
listen = "127.0.0.1:8080"

[smtp]
listen = "127.0.0.1:2525"
hostname = "mx1.tempalias.test"
max_message_size = 26214400

[relay]
mode = "capture"
capture_dir = "./tempalias-data/outbox"
smarthosts = ["smtp://127.0.0.1:2526"]

[limits]
max_days = 60
max_usage = 100

[cluster]
listen = "127.0.0.1:7001"
initial_members = { "1" = "127.0.0.1:7001" }
"""


def check(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return subprocess.run([str(BIN), "check-config", str(path)], capture_output=True, text=True,
                          timeout=30, env=clean_env(env), cwd=tmp_path)


def test_issue_example_config_is_valid(tmp_path):
    r = check(tmp_path, VALID)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_empty_file_is_valid_defaults(tmp_path):
    r = check(tmp_path, "")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "text,names",
    [
        # unknown keys, top level and in a section
        (VALID + "colour = 1\n", ["colour"]),
        (VALID.replace("max_message_size = 26214400", "max_mesage_size = 26214400"), ["max_mesage_size"]),
        (VALID + "\n[nonsense]\nx = 1\n", ["nonsense"]),
        # values of the wrong type
        (VALID.replace("max_message_size = 26214400", 'max_message_size = "big"'), ["max_message_size"]),
        (VALID.replace('mode = "capture"', 'mode = "carrier-pigeon"'), ["mode"]),
        # values that parse but cannot work
        (VALID.replace("max_message_size = 26214400", "max_message_size = 0"), ["smtp.max_message_size"]),
        (VALID.replace('listen = "127.0.0.1:8080"', 'listen = "nonsense"'), ["http.listen"]),
        (VALID.replace("max_days = 60", "max_days = 0"), ["limits.max_days"]),
        (VALID.replace('domains  = ["tempalias.test"]', "domains  = []"), ["domains"]),
        (VALID.replace("node_id  = 1", "node_id  = 2"), ["cluster.initial_members"]),
        (VALID.replace('smarthosts = ["smtp://127.0.0.1:2526"]', 'smarthosts = ["ftp://x:1"]')
         .replace('mode = "capture"', 'mode = "smarthost"'), ["relay.smarthosts"]),
        (VALID + "\n[log]\nformat = \"xml\"\n", ["log.format"]),
        (VALID.replace("[relay]\n", "[relay]\nreservation_lease_secs = 10\n"), ["relay.reservation_lease_secs"]),
        # broken TOML: the line is named
        (VALID.replace("max_usage = 100", "max_usage = = 100"),
         [f"config.toml:{VALID.splitlines().index('max_usage = 100') + 1}:"]),
    ],
)
def test_invalid_configs_exit_nonzero_naming_the_key(tmp_path, text, names):
    r = check(tmp_path, text)
    assert r.returncode != 0, f"accepted:\n{text}"
    for name in names:
        assert name in r.stderr, r.stderr
    assert "panicked" not in r.stderr


def test_unknown_environment_override_is_an_error(tmp_path):
    r = check(tmp_path, VALID, env={"TEMPALIAS_SMTP_MAX_MESAGE_SIZE": "1"})
    assert r.returncode != 0
    assert "max_mesage_size" in r.stderr.lower(), r.stderr


def test_environment_override_is_validated(tmp_path):
    r = check(tmp_path, VALID, env={"TEMPALIAS_SMTP_MAX_MESSAGE_SIZE": "0"})
    assert r.returncode != 0
    assert "smtp.max_message_size" in r.stderr, r.stderr
    r = check(tmp_path, VALID, env={"TEMPALIAS_SMTP_MAX_MESSAGE_SIZE": "1000", "TEMPALIAS_DOMAINS": '["b.example"]'})
    assert r.returncode == 0, r.stderr
    assert "b.example" in r.stdout


def test_missing_file_is_an_error(tmp_path):
    r = subprocess.run([str(BIN), "check-config", str(tmp_path / "nope.toml")], capture_output=True, text=True,
                       timeout=30, env=clean_env())
    assert r.returncode != 0
    assert "nope.toml" in r.stderr


def test_serve_refuses_an_invalid_config_without_starting(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(VALID + "colour = 1\n")
    r = subprocess.run([str(BIN), "serve", "--config", str(path)], capture_output=True, text=True, timeout=30,
                       env=clean_env(), cwd=tmp_path)
    assert r.returncode != 0
    assert "colour" in r.stderr


def test_every_problem_is_reported_in_one_run_with_its_line(tmp_path):
    text = (VALID.replace('domains  = ["tempalias.test"]', 'domians  = ["tempalias.test"]')
            .replace("[smtp]", "[smpt]")
            .replace("max_days = 60", "max_days = 0")
            .replace('listen = "127.0.0.1:8080"', 'listen = "nonsense"'))
    lines = text.splitlines()

    def line_of(fragment: str) -> int:
        return next(i for i, l in enumerate(lines, 1) if fragment in l)

    r = check(tmp_path, text)
    assert r.returncode != 0
    err = r.stderr
    assert "4 problems" in err, err
    assert f"config.toml:{line_of('domians')}: domians: unknown key; did you mean domains?" in err, err
    assert f"config.toml:{line_of('[smpt]')}: smpt: unknown section [smpt]; did you mean [smtp]?" in err, err
    assert f"config.toml:{line_of('max_days')}: limits.max_days: must be greater than zero" in err, err
    assert f"config.toml:{line_of('nonsense')}: http.listen: " in err, err


def test_a_misspelt_environment_variable_is_named_with_a_suggestion(tmp_path):
    r = check(tmp_path, VALID, env={"TEMPALIAS_HTTP_LISTN": "127.0.0.1:9000"})
    assert r.returncode != 0
    assert "TEMPALIAS_HTTP_LISTN: not a configuration variable; did you mean TEMPALIAS_HTTP_LISTEN?" in r.stderr, r.stderr
    r = check(tmp_path, VALID, env={"TEMPALIAS_LIMITS_MAX_DAYS": "lots"})
    assert r.returncode != 0
    assert r.stderr.startswith("tempalias: TEMPALIAS_LIMITS_MAX_DAYS (limits.max_days): invalid type"), r.stderr


def test_listen_addresses_may_be_host_names(tmp_path):
    r = check(tmp_path, VALID.replace('listen = "127.0.0.1:8080"', 'listen = "localhost:8080"'))
    assert r.returncode == 0, r.stderr


def test_a_bad_flag_value_names_the_flag(tmp_path):
    r = subprocess.run([str(BIN), "serve", "--log-format", "xml"], capture_output=True, text=True, timeout=30,
                       env=clean_env(), cwd=tmp_path)
    assert r.returncode != 0
    assert "--log-format" in r.stderr, r.stderr
    assert not (tmp_path / "tempalias-data").exists()


def test_per_smarthost_password_files_are_checked_each_by_name(tmp_path):
    (tmp_path / "default.pw").write_text("default-secret\n")
    (tmp_path / "second.pw").write_text("second-secret\n")
    (tmp_path / "empty.pw").write_text("\n")
    smarthosts = """
[[relay.smarthosts]]
url = "smtps://fwd@a.example"

[[relay.smarthosts]]
url = "smtp+starttls://b.example"
user = "me@b.example"
password_file = "second.pw"
"""
    text = VALID.replace('smarthosts = ["smtp://127.0.0.1:2526"]', 'password_file = "default.pw"') \
        .replace('mode = "capture"', 'mode = "smarthost"').replace("[limits]", smarthosts + "\n[limits]")
    r = check(tmp_path, text)
    assert r.returncode == 0, r.stderr
    # Each missing or empty file is named with its smarthost; no secret is shown.
    r = check(tmp_path, text.replace('"default.pw"', '"nowhere.pw"').replace('"second.pw"', '"empty.pw"'))
    assert r.returncode != 0
    assert "relay.password_file: cannot read nowhere.pw" in r.stderr, r.stderr
    assert "relay.smarthosts: smtp+starttls://me@b.example@b.example:587: password_file: empty.pw is empty" in r.stderr, \
        r.stderr
    r = check(tmp_path, text.replace('"second.pw"', '"missing.pw"'))
    assert r.returncode != 0
    assert "smtp+starttls://me@b.example@b.example:587: password_file: cannot read missing.pw" in r.stderr, r.stderr
    # A misspelt key in an entry is named with a suggestion.
    r = check(tmp_path, text.replace('password_file = "second.pw"', 'pasword_file = "second.pw"'))
    assert r.returncode != 0
    assert 'unknown key "pasword_file"' in r.stderr and "did you mean password_file?" in r.stderr, r.stderr
    for out in (r.stdout, r.stderr):
        assert "default-secret" not in out and "second-secret" not in out


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_threads_sizes_the_runtime(node_factory, workers):
    node = node_factory(config={"worker_threads": workers})
    # The runtime's own count (tokio names its blocking-pool threads as it
    # names its workers, so /proc cannot tell them apart).
    assert f"tempalias_runtime_workers {workers}\n" in node.metrics()
    assert node.create_alias(days=1)["alias"]
