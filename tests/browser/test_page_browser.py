"""The web page in a real browser (Debian's Chromium, headless): create an
alias with the keyboard, send mail to it, watch the uses go down on the status
page, revoke it there, and see SMTP refuse it; API errors next to their
fields; the form without JavaScript; a phone-sized viewport in dark mode."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from harness import DOMAIN, TARGET, message, wait_until


def no_console_errors(page):
    # A CSP violation (a hash that does not match) or a script error shows up
    # here; the browser's note on each 4xx answer of the API does not count.
    errors = [e for e in page.console_errors if not e.startswith("Failed to load resource")]
    assert errors == [], errors


def create_with_keyboard(page, target: str, days: str, uses: str):
    """Fills the form with the keyboard only and submits with Enter."""
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "target"
    page.keyboard.type(target)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "days"
    page.keyboard.press("Control+A")
    page.keyboard.type(days)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "uses"
    page.keyboard.press("Control+A")
    page.keyboard.type(uses)
    page.keyboard.press("Enter")


def test_create_send_watch_and_revoke(node, browser, artifacts):
    # A time zone far from UTC shows that the expiry is in the viewer's local time.
    page = browser(viewport={"width": 1000, "height": 900}, timezone_id="Asia/Tokyo", color_scheme="light")
    response = page.goto(node.api + "/")
    assert response.status == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.screenshot(path=artifacts / "01-form.png", full_page=True)

    create_with_keyboard(page, TARGET, "2", "3")
    page.wait_for_selector("#result:not([hidden])")
    address = page.input_value("#alias")
    alias_id = address.split("@")[0]
    assert re.fullmatch(rf"[a-z0-9]{{10,}}@{re.escape(DOMAIN)}", address), address
    assert page.text_content("#r-remaining") == "3 of 3"
    assert page.text_content("#r-target") == TARGET
    valid_until = page.get_attribute("#r-expires", "datetime")
    expiry = datetime.fromisoformat(valid_until.replace("Z", "+00:00"))
    assert abs(expiry - datetime.now(timezone.utc) - timedelta(days=2)) < timedelta(minutes=1)
    tokyo = expiry.astimezone(timezone(timedelta(hours=9)))
    shown = page.text_content("#r-expires")
    assert str(tokyo.day) in shown and f"{tokyo.minute:02d}" in shown and ("GMT+9" in shown or "JST" in shown), shown
    link = page.input_value("#manage-link")
    assert link.startswith(node.api + f"/manage#id={alias_id}&token=")
    assert page.get_attribute("#manage", "href") == link
    page.click("#copy-alias")
    page.wait_for_function("() => document.getElementById('copy-status').textContent !== ''")
    page.screenshot(path=artifacts / "02-created.png", full_page=True)
    no_console_errors(page)

    # The status page: the token is in the fragment, which never reaches the server.
    page.goto(link)
    page.wait_for_selector("#s-details:not([hidden])")
    assert page.input_value("#s-alias") == address
    assert page.text_content("#s-remaining") == "3 of 3"
    assert page.get_attribute("#s-state", "data-state") == "active"

    node.send([address], message("browser test"))
    wait_until(lambda: len(node.captured()) == 1, 15, "the forwarded message")
    page.click("#refresh")
    page.wait_for_function("() => document.getElementById('s-remaining').textContent === '2 of 3'")
    page.screenshot(path=artifacts / "03-status.png", full_page=True)

    # Revoke asks first; "Keep it" changes nothing.
    page.click("#revoke")
    assert page.is_visible("#confirm")
    assert page.evaluate("document.activeElement.id") == "confirm-no"
    page.screenshot(path=artifacts / "04-confirm.png", full_page=True)
    page.keyboard.press("Enter")
    assert page.is_hidden("#confirm")
    assert node.get_alias({"id": alias_id, "token": link.split("token=")[1]})["state"] == "active"

    page.click("#revoke")
    page.click("#confirm-yes")
    page.wait_for_function("() => document.getElementById('s-state').dataset.state === 'revoked'")
    assert page.is_hidden("#revoke")
    page.screenshot(path=artifacts / "05-revoked.png", full_page=True)
    no_console_errors(page)

    code, text = node.rcpt_reply(address)
    assert code == 550, (code, text)

    # The server never saw the token in a request line.
    logs = node.logs()
    assert link.split("token=")[1] not in logs


def test_api_errors_appear_next_to_their_field(node, browser, artifacts):
    page = browser(viewport={"width": 1000, "height": 900})
    page.goto(node.api + "/")
    page.fill("#target", TARGET)
    page.fill("#days", "61")
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('days-error').textContent !== ''")
    assert page.text_content("#days-error") == "Choose from 1 to 60 days."
    assert page.get_attribute("#days", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "days"
    assert page.is_hidden("#result")
    page.screenshot(path=artifacts / "06-error-days.png", full_page=True)

    page.fill("#target", f"someone@{DOMAIN}")
    page.fill("#days", "1")
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('target-error').textContent !== ''")
    assert "cannot receive forwarded mail" in page.text_content("#target-error")
    assert page.text_content("#days-error") == ""
    assert page.get_attribute("#days", "aria-invalid") == "false"

    page.fill("#target", TARGET)
    page.fill("#days", "")
    page.fill("#uses", "")
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('days-error').textContent !== ''")
    assert "Give a number of days or a number of messages" in page.text_content("#days-error")
    page.screenshot(path=artifacts / "07-error-target.png", full_page=True)
    no_console_errors(page)

    # A status link with a wrong token says so in plain words.
    page.goto(node.api + "/manage#id=abcdefghij12&token=" + "0" * 64)
    page.wait_for_function("() => document.getElementById('s-error').textContent !== ''")
    assert "No such alias" in page.text_content("#s-error")
    assert page.is_hidden("#s-details")


def test_form_without_javascript(node, browser, artifacts):
    page = browser(java_script_enabled=False, viewport={"width": 1000, "height": 900})
    page.goto(node.api + "/")
    # Without the script the browser's own checks apply (max="60" here) ...
    page.fill("#target", TARGET)
    page.fill("#days", "61")
    page.click("#submit")
    assert page.evaluate("document.getElementById('days').validity.rangeOverflow")
    assert page.url == node.api + "/"
    # ... and what only the server knows comes back next to its field.
    page.fill("#target", f"someone@{DOMAIN}")
    page.fill("#days", "1")
    with page.expect_navigation() as nav:
        page.click("#submit")
    assert nav.value.status == 400
    assert "cannot receive forwarded mail" in page.text_content("#target-error")
    assert page.input_value("#target") == f"someone@{DOMAIN}"
    page.screenshot(path=artifacts / "08-nojs-error.png", full_page=True)

    page.fill("#target", TARGET)
    page.fill("#uses", "1")
    with page.expect_navigation() as nav:
        page.click("#submit")
    assert nav.value.status == 201
    assert nav.value.headers["cache-control"] == "no-store"
    address = page.input_value("#alias")
    assert address.endswith("@" + DOMAIN)
    assert page.text_content("#r-remaining") == "1 of 1"
    assert page.text_content("#r-expires").endswith("UTC")
    href = page.get_attribute("#manage", "href")
    alias_id = address.split("@")[0]
    token = page.input_value("#token")
    assert href == f"/manage#id={alias_id}&token={token}"
    page.screenshot(path=artifacts / "09-nojs-created.png", full_page=True)
    assert node.get_alias({"id": alias_id, "token": token})["remaining"] == 1


def test_phone_viewport_in_dark_mode(node, browser, artifacts):
    page = browser(viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True,
                   has_touch=True, color_scheme="dark")
    page.goto(node.api + "/")
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(21, 23, 26)", bg  # the dark palette
    page.fill("#target", TARGET)
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])")
    # Nothing is wider than the screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for sel in ("#target", "#days", "#uses", "#alias", "#copy-alias", "#manage-link", "#copy-link"):
        box = page.locator(sel).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (sel, box)
    page.screenshot(path=artifacts / "10-phone-dark.png", full_page=True)
    page.goto(page.input_value("#manage-link"))
    page.wait_for_selector("#s-details:not([hidden])")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=artifacts / "11-phone-dark-status.png", full_page=True)
    no_console_errors(page)


def test_target_confirmation_in_the_browser(tmp_path, browser, artifacts):
    """With `[limits] confirm_targets`: the new alias says it waits, the status
    page shows it waiting, the mailed link's page confirms with its button
    (keyboard only), and the status page then shows it active."""
    import email
    import email.policy

    from harness import Node

    node = Node(tmp_path, "confirming", config={"limits": {"confirm_targets": True}})
    try:
        node.start()
        page = browser(viewport={"width": 1000, "height": 900}, color_scheme="light")
        page.goto(node.api + "/")
        create_with_keyboard(page, TARGET, "2", "3")
        page.wait_for_selector("#result:not([hidden])")
        assert page.is_visible("#r-notice"), "the result must say the alias waits for confirmation"
        link = page.input_value("#manage-link")
        page.goto(link)
        page.wait_for_selector("#s-details:not([hidden])")
        assert page.get_attribute("#s-state", "data-state") == "awaiting_confirmation"
        assert "confirms" in page.text_content("#s-state")
        page.screenshot(path=artifacts / "08-awaiting.png", full_page=True)

        mails = wait_until(lambda: [m for m in node.captured() if m["meta"]["mail_from"] == ""], 10, "the confirmation mail")
        body = email.message_from_bytes(mails[0]["eml"], policy=email.policy.default).get_body().get_content()
        url = re.search(r"http://\S+/v1/confirm/[0-9a-f]{64}", body).group(0)
        confirm_page = browser(viewport={"width": 1000, "height": 700}, color_scheme="dark")
        response = confirm_page.goto(url)
        assert response.status == 200 and response.headers["cache-control"] == "no-store"
        confirm_page.screenshot(path=artifacts / "09-confirm-link.png", full_page=True)
        # Opening the link confirmed nothing (mail scanners open links too).
        page.click("#refresh")
        page.wait_for_function("() => document.getElementById('s-message').textContent.startsWith('Updated')")
        assert page.get_attribute("#s-state", "data-state") == "awaiting_confirmation"

        confirm_page.keyboard.press("Tab")
        assert confirm_page.evaluate("document.activeElement.id") == "confirm"
        with confirm_page.expect_navigation():
            confirm_page.keyboard.press("Enter")
        assert confirm_page.text_content("#confirmation-title") == "Address confirmed"
        confirm_page.screenshot(path=artifacts / "10-confirmed.png", full_page=True)
        no_console_errors(confirm_page)

        page.click("#refresh")
        page.wait_for_function("() => document.getElementById('s-state').dataset.state === 'active'")
        no_console_errors(page)
    finally:
        node.cleanup()
