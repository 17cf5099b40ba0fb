// Shows one alias and revokes it. The id and token come from the URL
// fragment (#id=...&token=...), which browsers never send to the server, so
// the token stays out of request lines and access logs; it goes to the API
// only in the Authorization header.
(function () {
  "use strict";
  var params = new URLSearchParams(location.hash.replace(/^#/, ""));
  var id = params.get("id") || "";
  var token = params.get("token") || "";
  var message = document.getElementById("s-message");
  var error = document.getElementById("s-error");
  var details = document.getElementById("s-details");
  var revoke = document.getElementById("revoke");
  var refresh = document.getElementById("refresh");
  var confirmBox = document.getElementById("confirm");
  var yes = document.getElementById("confirm-yes");
  var no = document.getElementById("confirm-no");
  var STATES = {
    active: "Active: forwards mail",
    awaiting_confirmation: "Waiting: mail is refused until the target address confirms through the link we sent it",
    used_up: "Used up: no uses left, mail is refused",
    expired: "Expired: mail is refused",
    revoked: "Revoked: mail is refused"
  };

  function localTime(iso) {
    return new Date(iso).toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit", timeZoneName: "short"
    });
  }

  function setTime(elId, iso) {
    var t = document.getElementById(elId);
    t.dateTime = iso;
    t.textContent = localTime(iso);
  }

  function explain(status, retryAfter) {
    if (status === 401 || status === 404) {
      return "No such alias, or this link's token is wrong. (An alias is deleted some days after it expired.)";
    }
    if (status === 429) {
      return "Too many requests from your address. Try again in " + (retryAfter || "a few") + " seconds.";
    }
    if (status === 503) {
      return "The service cannot answer right now. Try again in a few seconds.";
    }
    return "Unexpected answer from the service (HTTP " + status + ").";
  }

  function show(a) {
    document.getElementById("s-alias").value = a.alias;
    document.getElementById("s-state").textContent = STATES[a.state] || a.state;
    document.getElementById("s-state").dataset.state = a.state;
    document.getElementById("s-target").textContent = a.target;
    document.getElementById("s-remaining").textContent = a.remaining + " of " + a.max_usage;
    setTime("s-expires", a.valid_until);
    setTime("s-created", a.created_at);
    details.hidden = false;
    revoke.hidden = a.state === "revoked";
    message.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
  }

  function api(method) {
    return fetch("/v1/aliases/" + encodeURIComponent(id), {
      method: method,
      headers: { "Authorization": "Bearer " + token, "Accept": "application/json" },
      cache: "no-store"
    });
  }

  function load() {
    error.textContent = "";
    return api("GET").then(function (resp) {
      if (resp.status !== 200) {
        error.textContent = explain(resp.status, resp.headers.get("Retry-After"));
        message.textContent = "";
        return;
      }
      return resp.json().then(show);
    }, function () {
      error.textContent = "The service could not be reached. Check your connection and try again.";
    });
  }

  if (!id || !token) {
    message.textContent = "";
    error.textContent = "This link is incomplete: it must end in #id=…&token=… as shown when the alias was created.";
    return;
  }

  refresh.addEventListener("click", load);
  revoke.addEventListener("click", function () {
    confirmBox.hidden = false;
    no.focus();
  });
  no.addEventListener("click", function () {
    confirmBox.hidden = true;
    revoke.focus();
  });
  yes.addEventListener("click", function () {
    yes.disabled = true;
    error.textContent = "";
    api("DELETE").then(function (resp) {
      if (resp.status === 204) {
        confirmBox.hidden = true;
        return load().then(function () { message.textContent = "The alias is revoked."; refresh.focus(); });
      }
      error.textContent = explain(resp.status, resp.headers.get("Retry-After"));
    }, function () {
      error.textContent = "The service could not be reached. The alias may or may not be revoked; refresh to see.";
    }).then(function () { yes.disabled = false; });
  });
  window.addEventListener("hashchange", function () { location.reload(); });
  load();
})();
