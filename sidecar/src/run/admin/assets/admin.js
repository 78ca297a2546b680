// herald admin page: live numbers (short polling of <base>/live every 5 s, paused while the tab is
// hidden) and confirmations of destructive buttons. No framework, no build step.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var url = document.body && document.body.getAttribute("data-live-url");
  if (!url) {
    return;
  }
  var status = document.getElementById("live-status");
  var failures = 0;

  // every element whose attribute `attr` is `key`
  function each(attr, key, fn) {
    var nodes = document.querySelectorAll("[" + attr + "]");
    for (var i = 0; i < nodes.length; i++) {
      if (nodes[i].getAttribute(attr) === key) {
        fn(nodes[i]);
      }
    }
  }

  function apply(data) {
    var text = data.text || {}, html = data.html || {}, attrs = data.attrs || {};
    var nodes = document.querySelectorAll("[data-live]");
    for (var i = 0; i < nodes.length; i++) {
      var k = nodes[i].getAttribute("data-live");
      if (Object.prototype.hasOwnProperty.call(text, k) && nodes[i].textContent !== text[k]) {
        nodes[i].textContent = text[k];
      }
    }
    Object.keys(html).forEach(function (k) {
      each("data-live-html", k, function (n) { n.innerHTML = html[k]; });
    });
    Object.keys(attrs).forEach(function (k) {
      each("data-live-attrs", k, function (n) {
        Object.keys(attrs[k]).forEach(function (a) { n.setAttribute(a, attrs[k][a]); });
      });
    });
  }

  function poll() {
    if (document.hidden) {
      return;
    }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) {
          window.location.reload();
          throw new Error("signed out");
        }
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        return r.json();
      })
      .then(function (data) {
        apply(data);
        failures = 0;
        if (status) {
          status.textContent = "Live: updated " + new Date().toLocaleTimeString();
        }
      })
      .catch(function (e) {
        failures += 1;
        if (status && failures > 1) {
          status.textContent = "Live updates paused: " + e.message;
        }
      });
  }

  window.setInterval(poll, 5000);
  document.addEventListener("visibilitychange", poll);
})();
