"""Sub-addressing: `id+tag@domain` is the alias `id` (Postfix's recipient_delimiter)."""

from __future__ import annotations

from harness import DOMAIN, message


def test_tagged_address_is_the_bare_alias_counted_once_with_the_tag_in_received(node):
    alias = node.create_alias(days=1, max_usage=2)
    tagged = f"{alias['id']}+shop@{DOMAIN}"
    assert node.send([tagged], message("tagged", to=tagged)) == {}
    assert node.remaining(alias) == 1
    captured = node.captured()
    assert len(captured) == 1
    header = captured[0]["eml"].split(b"\r\n\r\n", 1)[0]
    # The `for` clause of our Received header keeps the tag, for the target's filters.
    assert f"for <{tagged}>".encode() in header, header
    assert captured[0]["meta"]["rcpt_to"] == [alias["target"]]

    # Two tags of one alias in one transaction: one message, one use.
    other = f"{alias['id']}+news@{DOMAIN}"
    assert node.send([other, tagged], message("twice", to=other)) == {}
    assert node.remaining(alias) == 0
    assert len(node.captured()) == 2

    # Used up: every tag is refused like the bare alias.
    code, _ = node.rcpt_reply(f"{alias['id']}+later@{DOMAIN}")
    assert code == 550


def test_a_tag_with_characters_that_cannot_go_into_a_header_is_refused(node):
    alias = node.create_alias(days=1, max_usage=1)
    code, _ = node.rcpt_reply(f'"{alias["id"]}+a b"@{DOMAIN}')
    assert code in (501, 550), code
    assert node.remaining(alias) == 1


def test_sub_addressing_can_be_turned_off(node_factory):
    node = node_factory(config={"smtp": {"recipient_delimiter": ""}})
    alias = node.create_alias(days=1, max_usage=1)
    code, _ = node.rcpt_reply(f"{alias['id']}+shop@{DOMAIN}")
    assert code == 550
    code, _ = node.rcpt_reply(alias["alias"])
    assert code == 250
