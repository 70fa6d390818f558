// The operations page's only script: live progress, the API key, and the buttons that act.
// Pages are rendered by the server; this script never builds markup from data. It replaces parts
// of the page with HTML the server rendered (autoescaped) and sets text with textContent.
(function () {
  "use strict";
  var KEY = "dispatcher.apiKey";
  var body = document.body;
  var keysOn = body.dataset.keys === "on";
  var timer = null;

  function storedKey() {
    try { return sessionStorage.getItem(KEY); } catch (e) { return null; }
  }
  function setKey(value) {
    try {
      if (value) { sessionStorage.setItem(KEY, value); } else { sessionStorage.removeItem(KEY); }
    } catch (e) { /* storage refused: the key lasts as long as the page */ }
  }
  // The key travels only in this header, never in an address.
  function headers() {
    var h = { "Accept": "text/html, application/json" };
    var key = storedKey();
    if (keysOn && key) { h["X-API-Key"] = key; }
    return h;
  }
  function resolve(relative) { return new URL(relative, location.href).href; }
  function uiRoot() { return new URL(body.dataset.root || "./", location.href).pathname; }

  // Replace the page's header and main by those of the page at `url`, fetched with the key.
  function load(url, push, focus) {
    return fetch(url, { headers: headers(), cache: "no-store", credentials: "same-origin" }).then(function (r) {
      return r.text().then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var main = doc.querySelector("main");
        if (!main) { throw new Error("HTTP " + r.status); }
        if (r.status === 401 && storedKey()) { setKey(null); }
        if (push) { history.pushState(null, "", url); }
        document.title = doc.title;
        ["root", "api", "page"].forEach(function (name) { body.dataset[name] = doc.body.dataset[name] || ""; });
        document.querySelector("header.top").replaceWith(doc.querySelector("header.top"));
        document.querySelector("main").replaceWith(main);
        start();
        if (focus) { main.focus(); }
      });
    });
  }

  function showError(message) {
    var el = document.getElementById("action-error") || document.getElementById("key-error");
    if (el) { el.textContent = message; }
  }

  // -- live progress -------------------------------------------------------------------------
  function poll() {
    timer = null;
    var rows = document.querySelectorAll("main [data-job][data-final='false']");
    if (!rows.length) { return; }
    var query = Array.prototype.map.call(rows, function (row) {
      return "id=" + encodeURIComponent(row.dataset.job);
    }).join("&");
    if (rows[0].dataset.detail === "true") { query += "&detail=1"; }
    fetch(resolve(body.dataset.root + "progress?" + query), { headers: headers(), cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        var reload = false;
        (data ? data.jobs : []).forEach(function (job) {
          var row = document.querySelector("main [data-job='" + CSS.escape(job.id) + "']");
          if (!row) { return; }
          var state = row.querySelector("[data-state]");
          if (state) { state.textContent = job.state; state.className = "state state-" + job.state; }
          var progress = row.querySelector("[data-progress]");
          if (progress) { progress.innerHTML = job.html; }
          if (job.final) {
            row.dataset.final = "true";
            reload = reload || row.dataset.detail === "true";
          }
        });
        // A job page whose job just ended: its counts, chart and failures are final now.
        if (reload) { return load(location.href, false, false); }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(schedule);
  }
  function schedule() {
    if (timer !== null || document.hidden) { return; }
    if (!document.querySelector("main [data-job][data-final='false']")) { return; }
    timer = setTimeout(poll, 1000 * (parseFloat(body.dataset.poll) || 2));
  }
  document.addEventListener("visibilitychange", function () {
    if (document.hidden && timer !== null) { clearTimeout(timer); timer = null; }
    else { schedule(); }
  });

  // -- actions -------------------------------------------------------------------------------
  function act(method, url) {
    return fetch(resolve(url), { method: method, headers: headers(), cache: "no-store" }).then(function (r) {
      if (r.ok) { return load(location.href, false, false); }
      return r.json().then(function (e) { showError(e.message || ("HTTP " + r.status)); },
                           function () { showError("HTTP " + r.status); });
    }, function () { showError("The service did not answer."); });
  }

  function wire() {
    Array.prototype.forEach.call(document.querySelectorAll("main [data-needs-script]"), function (el) {
      el.hidden = false;
    });
    var cancel = document.querySelector("main [data-cancel]");
    var dialog = document.getElementById("cancel-dialog");
    if (cancel && dialog) {
      cancel.addEventListener("click", function () { dialog.showModal(); });
      dialog.addEventListener("close", function () {
        if (dialog.returnValue === "cancel") { act("DELETE", cancel.dataset.cancel); }
        else { cancel.focus(); }
      });
    }
    Array.prototype.forEach.call(document.querySelectorAll("main [data-retry]"), function (button) {
      button.addEventListener("click", function () { button.disabled = true; act("POST", button.dataset.retry); });
    });
    var form = document.getElementById("key-form");
    if (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        setKey(form.elements["api-key"].value.trim());
        load(location.href, false, true).catch(function () { showError("The service did not answer."); });
      });
      var input = form.elements["api-key"];
      if (input) { input.focus(); }
    }
    var state = document.getElementById("key-state");
    if (state && storedKey() && body.dataset.page !== "key") {
      state.hidden = false;
      document.getElementById("forget-key").addEventListener("click", function () {
        setKey(null);
        load(location.href, false, true);
      });
    }
  }

  function start() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    wire();
    schedule();
  }

  // -- navigation with a key: every page is fetched with the header -------------------------
  if (keysOn) {
    document.addEventListener("click", function (event) {
      var a = event.target.closest && event.target.closest("a[href]");
      if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) { return; }
      var url = new URL(a.href, location.href);
      if (url.origin !== location.origin || !url.pathname.startsWith(uiRoot()) || url.hash && url.pathname === location.pathname) { return; }
      event.preventDefault();
      load(url.href, true, true);
    });
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (form.id === "key-form" || (form.method || "get").toLowerCase() !== "get") { return; }
      event.preventDefault();
      var url = new URL(form.getAttribute("action") || location.href, location.href);
      url.search = new URLSearchParams(new FormData(form)).toString();
      load(url.href, true, true);
    });
    window.addEventListener("popstate", function () { load(location.href, false, false); });
  }

  if (keysOn && body.dataset.page === "key" && storedKey()) {
    load(location.href, false, false);
  } else {
    start();
  }
}());
