// qbo-daemon status page: keeps the page current without reloading it.
// Every element with data-live and an id is replaced by its fresh copy from the
// same URL every few seconds; relative times ("in 4 min") tick every second.
"use strict";

(function () {
  const POLL_MS = 5000;
  let lastUpdate = Date.now();
  let timer = null;
  let submitting = false; // a form was sent: the page is about to change

  // The same rules as qbo_daemon/ui/views.py relative().
  function span(seconds) {
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 90 * 60) return Math.round(seconds / 60) + " min";
    if (seconds < 36 * 3600) return Math.round(seconds / 3600) + " h";
    if (seconds < 365 * 86400) return Math.round(seconds / 86400) + " d";
    return (seconds / (365.25 * 86400)).toFixed(1) + " y";
  }

  function relative(when, now) {
    const seconds = (when - now) / 1000;
    if (Math.abs(seconds) < 1.5) return "now";
    const text = span(Math.abs(seconds));
    return seconds > 0 ? "in " + text : text + " ago";
  }

  function tick() {
    const now = Date.now();
    document.querySelectorAll("time[data-relative]").forEach(function (el) {
      const when = Date.parse(el.getAttribute("datetime"));
      if (!Number.isNaN(when)) el.textContent = relative(when, now);
    });
    const state = document.getElementById("live-state");
    if (state && state.dataset.state === "live") {
      const age = Math.round((now - lastUpdate) / 1000);
      state.querySelector(".live-text").textContent = age < 2 ? "Live" : "Live · " + age + " s ago";
    }
  }

  function setState(name, text) {
    const state = document.getElementById("live-state");
    if (!state) return;
    state.dataset.state = name;
    if (text) state.querySelector(".live-text").textContent = text;
  }

  function polling() {
    return (
      !submitting && document.body.dataset.poll !== "off" && document.getElementById("live-state")
    );
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    if (!polling()) return;
    if (document.hidden) return schedule();
    try {
      const response = await fetch(location.href, {
        credentials: "same-origin",
        redirect: "manual",
        cache: "no-store",
        headers: { Accept: "text/html" },
      });
      if (response.type === "opaqueredirect") {
        location.reload(); // signed out: the page itself redirects to the sign-in form
        return;
      }
      if (!response.ok) {
        setState("stale", "Stale · HTTP " + response.status);
        return schedule();
      }
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      if (!polling()) return; // a form was sent meanwhile
      document.querySelectorAll("[data-live][id]").forEach(function (el) {
        const active = document.activeElement;
        if (active && active !== document.body && el.contains(active)) return;
        const next = fresh.getElementById(el.id);
        if (!next) return;
        if (next.className !== el.className) el.className = next.className;
        if (next.innerHTML !== el.innerHTML) el.innerHTML = next.innerHTML;
      });
      lastUpdate = Date.now();
      setState("live");
      tick();
    } catch (error) {
      setState("offline", "Offline · retrying");
    }
    schedule();
  }

  function forgetNotice() {
    // A notice is shown once: polling the same URL must not bring it back.
    const url = new URL(location.href);
    if (url.searchParams.has("notice")) {
      url.searchParams.delete("notice");
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  }

  document.addEventListener("submit", function (event) {
    submitting = true;
    const button = event.submitter;
    if (button && button.dataset.busy) {
      button.textContent = button.dataset.busy;
      button.classList.add("busy");
    }
  });

  document.addEventListener("click", function (event) {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const field = document.getElementById(button.dataset.copy);
    if (!field) return;
    field.select();
    const done = function () {
      button.textContent = button.dataset.copied || "Copied";
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () {});
    } else if (document.execCommand("copy")) {
      done();
    }
  });

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && polling()) poll();
  });

  window.addEventListener("pageshow", function (event) {
    if (event.persisted) location.reload(); // back from the cache: show it as it is now
  });

  document.addEventListener("DOMContentLoaded", function () {
    forgetNotice();
    tick();
    setInterval(tick, 1000);
    if (polling()) schedule();
  });
})();
