// Creates an alias through the JSON API and shows the result on the page.
// Without JavaScript the same form posts to /create and the server answers
// with an HTML page, so everything here is an improvement, not a requirement.
(function () {
  "use strict";
  var form = document.getElementById("create");
  var maxDays = form.dataset.maxDays;
  var maxUses = form.dataset.maxUses;
  var fields = {
    target: document.getElementById("target"),
    days: document.getElementById("days"),
    uses: document.getElementById("uses")
  };
  var formError = document.getElementById("form-error");
  var submit = document.getElementById("submit");
  var result = document.getElementById("result");
  // The API's own checks are the single source of errors, shown next to fields.
  form.noValidate = true;

  function setError(name, text) {
    var input = fields[name];
    var p = document.getElementById(name + "-error");
    p.textContent = text || "";
    input.setAttribute("aria-invalid", text ? "true" : "false");
  }

  function clearErrors() {
    Object.keys(fields).forEach(function (n) { setError(n, ""); });
    formError.textContent = "";
  }

  function whole(name, label, max) {
    var v = fields[name].value.trim();
    if (v === "") return null;
    if (!/^[0-9]+$/.test(v)) {
      setError(name, "Enter a whole number of " + label + ".");
      return undefined;
    }
    var n = Number(v);
    // Too large for a JSON integer: the API's limit applies anyway.
    if (!Number.isSafeInteger(n)) {
      setError(name, "Choose from 1 to " + max + " " + label + ".");
      return undefined;
    }
    return n;
  }

  // Puts an API error next to the field it concerns, in plain words.
  function showApiError(status, body, retryAfter) {
    var code = body && body.error;
    var message = (body && body.message) || "";
    if (code === "invalid_target") {
      var detail = message.replace(/^target:\s*/, "");
      setError("target", "This address cannot receive forwarded mail: " + detail + ".");
    } else if (code === "target_limit_reached") {
      setError("target", "This address already has as many live aliases as this service allows. Revoke one, or wait until one expires.");
    } else if (code === "invalid_limit" || code === "limit_exceeded") {
      if (/^days\b/.test(message)) {
        setError("days", "Choose from 1 to " + maxDays + " days.");
      } else {
        setError("uses", "Choose from 1 to " + maxUses + " messages.");
      }
    } else if (code === "invalid_request" && /at least one/.test(message)) {
      setError("days", "Give a number of days or a number of messages, or both.");
    } else if (status === 429) {
      formError.textContent = "Too many new aliases from your address. Try again in " +
        (retryAfter || "a few") + " seconds.";
    } else if (status === 503) {
      formError.textContent = "The service cannot create an alias right now. Try again in a few seconds.";
    } else {
      formError.textContent = "The alias could not be created: " + (message || ("HTTP " + status)) + ".";
    }
    var firstBad = Object.keys(fields).map(function (n) { return fields[n]; })
      .filter(function (i) { return i.getAttribute("aria-invalid") === "true"; })[0];
    if (firstBad) firstBad.focus();
  }

  function localTime(iso) {
    return new Date(iso).toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit", timeZoneName: "short"
    });
  }

  function showAlias(a) {
    var link = location.origin + "/manage#id=" + encodeURIComponent(a.id) +
      "&token=" + encodeURIComponent(a.token);
    document.getElementById("alias").value = a.alias;
    document.getElementById("r-target").textContent = a.target;
    var t = document.getElementById("r-expires");
    t.dateTime = a.valid_until;
    t.textContent = localTime(a.valid_until);
    document.getElementById("r-remaining").textContent = a.remaining + " of " + a.max_usage;
    document.getElementById("r-notice").hidden = a.state !== "awaiting_confirmation";
    document.getElementById("manage-link").value = link;
    document.getElementById("manage").href = link;
    document.getElementById("copy-status").textContent = "";
    result.hidden = false;
    result.focus();
  }

  function copy(inputId) {
    var input = document.getElementById(inputId);
    var status = document.getElementById("copy-status");
    function done() { status.textContent = "Copied."; }
    function fallback() {
      input.select();
      try {
        document.execCommand("copy");
        done();
      } catch (e) {
        status.textContent = "Select the text and copy it by hand.";
      }
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(done, fallback);
    } else {
      fallback();
    }
  }
  document.getElementById("copy-alias").addEventListener("click", function () { copy("alias"); });
  document.getElementById("copy-link").addEventListener("click", function () { copy("manage-link"); });

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    clearErrors();
    var target = fields.target.value.trim();
    if (target === "") {
      setError("target", "Enter the address the alias should forward to.");
      fields.target.focus();
      return;
    }
    var days = whole("days", "days", maxDays);
    var uses = whole("uses", "messages", maxUses);
    if (days === undefined || uses === undefined) return;
    var body = { target: target };
    if (days !== null) body.days = days;
    if (uses !== null) body["max-usage"] = uses;
    submit.disabled = true;
    fetch("/v1/aliases", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body)
    }).then(function (resp) {
      return resp.json().catch(function () { return null; }).then(function (json) {
        if (resp.status === 201 && json) {
          showAlias(json);
        } else {
          showApiError(resp.status, json, resp.headers.get("Retry-After"));
        }
      });
    }, function () {
      formError.textContent = "The service could not be reached. Check your connection and try again.";
    }).then(function () { submit.disabled = false; });
  });
})();
