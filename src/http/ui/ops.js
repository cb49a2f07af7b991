// The operations page: asks for the admin token (kept in sessionStorage, so it dies with the
// tab) and reads the admin API with it every two seconds: inventory per SKU, checkouts by
// state, orders by status, outbox lag, recent failures and compensations, flash sales.
"use strict";

(() => {
  const { api, errorMessage, el, money, replace } = hf;
  const $ = (id) => document.getElementById(id);
  const KEY = "holdfast.admin";
  const EVERY_MS = 2000;
  let timer = null;

  function adminToken() {
    return sessionStorage.getItem(KEY);
  }

  function showLogin(message) {
    clearInterval(timer);
    timer = null;
    $("board").classList.add("hidden");
    $("forget").classList.add("hidden");
    $("login").classList.remove("hidden");
    replace($("login-error"), message ? el("div", { class: "message error", "data-testid": "login-error" }, message) : null);
  }

  function showBoard() {
    $("login").classList.add("hidden");
    $("board").classList.remove("hidden");
    $("forget").classList.remove("hidden");
  }

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const given = $("token").value.trim();
    if (!given) return;
    sessionStorage.setItem(KEY, given);
    $("token").value = "";
    await begin();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin();
  });

  async function inventory(token) {
    const rows = [];
    let cursor = null;
    do {
      const page = await api("GET", "/v1/admin/inventory?limit=500" +
        (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""), { token });
      if (page.status !== 200) return page;
      rows.push(...page.body.data);
      cursor = page.body.next_cursor;
    } while (cursor);
    return { status: 200, body: rows };
  }

  function counts(target, map) {
    const entries = Object.entries(map || {});
    replace($(target), entries.length
      ? entries.map(([name, n]) => el("tr", { "data-name": name },
          el("td", {}, el("span", { class: "status " + name }, name)), el("td", { class: "num" }, n)))
      : el("tr", {}, el("td", { class: "muted", colspan: 2 }, "none yet")));
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "everything published";
    if (seconds < 120) return "oldest waiting " + seconds.toFixed(1) + " s";
    return "oldest waiting " + Math.round(seconds / 60) + " min";
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "–";
  }

  async function refresh() {
    const token = adminToken();
    if (!token) return showLogin();
    let ops, stock;
    try {
      [ops, stock] = await Promise.all([api("GET", "/v1/admin/ops", { token }), inventory(token)]);
    } catch (_) {
      replace($("updated"), "service unreachable; retrying…");
      return;
    }
    if (ops.status === 401 || ops.status === 403) {
      sessionStorage.removeItem(KEY);
      return showLogin("That token was refused: " + errorMessage(ops));
    }
    if (ops.status !== 200 || stock.status !== 200) {
      replace($("updated"), "read failed: " + errorMessage(ops.status !== 200 ? ops : stock));
      return;
    }
    showBoard();
    const o = ops.body;
    counts("checkouts", o.checkouts_by_state);
    counts("orders", o.orders_by_status);
    $("outbox-unpublished").textContent = o.outbox.unpublished;
    replace($("outbox-age"), age(o.outbox.oldest_unpublished_age_seconds));
    replace($("dependencies"), o.dependencies.length
      ? o.dependencies.map((d) =>
        el("tr", { "data-dependency": d.name, class: d.status === "down" ? "out" : null },
          el("td", {}, d.name), el("td", { title: d.error || "" }, d.status)))
      : el("tr", {}, el("td", { class: "muted" }, "none configured (embedded shape)")));

    replace($("inventory"), stock.body.map((p) =>
      el("tr", { "data-sku": p.sku, class: p.available === 0 ? "out" : p.reserved > 0 ? "short" : null },
        el("td", {}, p.sku), el("td", {}, p.name),
        el("td", { class: "num", "data-col": "stock" }, p.stock),
        el("td", { class: "num", "data-col": "reserved" }, p.reserved),
        el("td", { class: "num", "data-col": "available" }, p.available),
        el("td", { class: "num" }, p.version))));

    replace($("sales"), o.flash_sales.length
      ? o.flash_sales.map((s) => el("tr", { "data-sale": s.id },
          el("td", {}, s.id.slice(0, 8)), el("td", {}, s.sku), el("td", { class: "num" }, s.units),
          el("td", { class: "num" }, s.tokens_held === null ? "?" : s.tokens_held),
          el("td", { class: "num" }, s.in_checkout), el("td", { class: "num" }, s.sold),
          el("td", {}, when(s.starts_at)), el("td", {}, s.ends_at ? when(s.ends_at) : "open")))
      : el("tr", {}, el("td", { class: "muted", colspan: 8 }, "no flash sales")));

    replace($("failures"), o.recent_failures.length
      ? o.recent_failures.map((f) => el("tr", { "data-checkout": f.checkout_id },
          el("td", {}, when(f.at)), el("td", {}, f.checkout_id.slice(0, 8)),
          el("td", {}, el("span", { class: "status " + f.state }, f.state)),
          el("td", {}, f.refund_due ? "money due back" : (f.decline_code || "")),
          el("td", { class: "num" }, money(f.total)), el("td", {}, f.payment_intent_id || "")))
      : el("tr", {}, el("td", { class: "muted", colspan: 6 }, "nothing has failed")));

    const overdue = o.overdue_invoices || [];
    replace($("overdue"), overdue.length
      ? overdue.map((i) => el("tr", { "data-invoice": i.id },
          el("td", {}, "#" + i.number), el("td", {}, i.company_id.slice(0, 8)),
          el("td", {}, i.order_id.slice(0, 8)), el("td", { class: "num" }, money(i.balance)),
          el("td", {}, when(i.due_at))))
      : el("tr", {}, el("td", { class: "muted", colspan: 5 }, "no invoice is overdue")));
    const holds = o.disputed_orders.map((id) => ["disputed: fulfilment on hold", id])
      .concat(o.authorizations_ending.map((id) => ["authorization ends within a day", id]));
    replace($("holds"), holds.length
      ? holds.map(([why, id]) => el("tr", { "data-order": id },
          el("td", {}, id), el("td", {}, why)))
      : el("tr", {}, el("td", { class: "muted", colspan: 2 }, "no order on hold")));

    replace($("updated"), "updated " + new Date().toLocaleTimeString());
  }

  async function begin() {
    if (!adminToken()) return showLogin();
    await refresh();
    clearInterval(timer);
    if (adminToken()) timer = setInterval(refresh, EVERY_MS);
  }

  begin();
})();
