// dicom-ai console: live parts of a page, and confirmations. Plain JavaScript, no build.
//
// An element with data-live="/fragments/..." is refreshed every 2 s from that URL (the
// same template the page was rendered with). A refresh waits while the user works inside
// the element (focus in it), and swaps only when the HTML changed. A session that ended
// stops the refreshing and says so. A form with data-confirm asks before it is sent.
"use strict";

(function () {
  const PERIOD_MS = 2000;
  const shown = new WeakMap(); // element -> the fragment HTML it shows
  let stopped = false;

  function status(text, bad) {
    const where = document.getElementById("live-status");
    if (where) {
      where.textContent = text;
      where.classList.toggle("bad", Boolean(bad));
    }
  }

  function busy(element) {
    const active = document.activeElement;
    return active !== null && active !== document.body && element.contains(active) &&
      (active.tagName === "INPUT" || active.tagName === "TEXTAREA" || active.tagName === "SELECT");
  }

  async function refresh(element) {
    if (busy(element)) {
      return;
    }
    let response;
    try {
      response = await fetch(element.dataset.live, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { "X-Requested-With": "console.js" },
      });
    } catch (error) {
      status("offline", true);
      return;
    }
    if (response.status === 401) {
      stopped = true;
      status("session ended: reload to log in", true);
      return;
    }
    if (!response.ok) {
      status("update failed (" + response.status + ")", true);
      return;
    }
    const html = await response.text();
    if (busy(element)) {
      return;
    }
    if (shown.get(element) !== html) {
      element.innerHTML = html;
      shown.set(element, html);
    }
    status("live · " + new Date().toLocaleTimeString());
  }

  function tick(elements) {
    if (stopped || document.hidden) {
      return;
    }
    elements.forEach(refresh);
  }

  document.addEventListener("DOMContentLoaded", function () {
    // ?done=WORD said what an action did; a reload should not say it again.
    const url = new URL(window.location.href);
    if (url.searchParams.has("done")) {
      url.searchParams.delete("done");
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    const elements = Array.from(document.querySelectorAll("[data-live]"));
    if (elements.length > 0) {
      status("live");
      window.setInterval(function () { tick(elements); }, PERIOD_MS);
    }
    document.addEventListener("submit", function (event) {
      const form = event.target;
      if (form instanceof HTMLFormElement && form.dataset.confirm &&
          !window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    });
  });
})();
