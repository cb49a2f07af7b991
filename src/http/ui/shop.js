// The storefront: catalogue with live availability, cart, checkout with a reservation
// countdown kept alive by heartbeats, payment with the simulator's test cards, the order
// followed until it is paid, and a flash-sale view when a sale is on. It only calls the
// public API (DESIGN §8); what it remembers (customer token, cart, checkout, flash-sale
// tokens) lives in localStorage so a reload picks up where the visitor was.
"use strict";

(() => {
  const { api, errorCode, errorMessage, el, money, replace, newKey } = hf;
  const $ = (id) => document.getElementById(id);

  const CATALOGUE_EVERY_MS = 3000;
  const ORDER_EVERY_MS = 1000;
  const FLASH_EVERY_MS = 5000;
  const TERMINAL_ORDER = ["paid", "fulfilled", "refunded", "payment_failed", "cancelled"];

  const store = {
    get(key) {
      try { return JSON.parse(localStorage.getItem("holdfast." + key)); } catch (_) { return null; }
    },
    set(key, value) {
      if (value === null || value === undefined) localStorage.removeItem("holdfast." + key);
      else localStorage.setItem("holdfast." + key, JSON.stringify(value));
    },
  };

  const state = {
    customer: store.get("customer"), // {id, name, token}
    cart: null, // the cart as the API shows it
    products: new Map(), // sku -> product
    checkout: null, // the live checkout
    heartbeat: null,
    ticker: null,
    orderPoll: null,
    sales: [], // flash sales, when the API offers them
    noSaleList: false,
  };

  function token() {
    return state.customer ? state.customer.token : null;
  }

  // ---- messages -------------------------------------------------------------------------

  function say(kind, text, testid) {
    const box = $("messages");
    replace(box, el("div", { class: "message " + kind, "data-testid": testid || "message-" + kind }, text));
  }

  function clearMessages() {
    replace($("messages"));
  }

  // ---- the visitor ----------------------------------------------------------------------

  /** A stored customer token, or a demo customer when the service offers one, or the
   *  sign-in form (a shop on real payments has no self-service customers). */
  async function ensureCustomer() {
    if (state.customer) {
      const probe = await api("GET", "/v1/orders?limit=1", { token: token() });
      if (probe.status !== 401) return true;
      state.customer = null;
      store.set("customer", null);
    }
    const made = await api("POST", "/v1/demo/customers");
    if (made.status === 201) {
      state.customer = made.body;
      store.set("customer", made.body);
      return true;
    }
    $("signin").classList.remove("hidden");
    return false;
  }

  function showWho() {
    replace($("who"), state.customer ? "Signed in as " + (state.customer.name || "customer") : "");
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const given = $("signin-token").value.trim();
    if (!given) return;
    const probe = await api("GET", "/v1/orders?limit=1", { token: given });
    if (probe.status !== 200) {
      say("error", "That token was not accepted.");
      return;
    }
    state.customer = { token: given, name: "customer" };
    store.set("customer", state.customer);
    $("signin").classList.add("hidden");
    clearMessages();
    await start();
  });

  // ---- catalogue ------------------------------------------------------------------------

  async function loadCatalogue() {
    const all = [];
    let cursor = null;
    do {
      const query = "/v1/products?limit=500" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
      const page = await api("GET", query);
      if (page.status !== 200) {
        replace($("catalogue-note"), "The catalogue is unavailable right now; retrying…");
        return;
      }
      all.push(...page.body.data);
      cursor = page.body.next_cursor;
    } while (cursor);
    const known = state.products.size > 0;
    state.products = new Map(all.map((p) => [p.sku, p]));
    replace($("catalogue-note"), all.length
      ? all.length + (all.length === 1 ? " product" : " products") + " · availability updates live"
      : "The catalogue is empty. Start the service with --demo for a sample shop.");
    if (!known || $("catalogue").children.length !== all.length) renderCatalogue();
    else updateAvailability();
    renderCart();
  }

  function availability(product) {
    const n = product.available;
    if (n <= 0) return { text: "Sold out", cls: "avail none" };
    if (n <= 3) return { text: "Only " + n + " left", cls: "avail low" };
    return { text: n + " available", cls: "avail" };
  }

  function renderCatalogue() {
    const cards = [...state.products.values()].map((p) => {
      const a = availability(p);
      return el("article", { class: "product" + (p.available <= 0 ? " soldout" : ""), "data-sku": p.sku },
        el("div", { class: "name" }, p.name),
        el("div", { class: "sku" }, p.sku),
        el("div", { class: "price" }, money(p.price)),
        el("div", { class: a.cls, "data-role": "available" }, a.text),
        el("button", {
          "data-role": "add",
          disabled: p.available <= 0,
          onclick: () => addToCart(p.sku),
        }, "Add to cart"));
    });
    replace($("catalogue"), cards);
  }

  function updateAvailability() {
    for (const card of $("catalogue").children) {
      const p = state.products.get(card.dataset.sku);
      if (!p) continue;
      const a = availability(p);
      const label = card.querySelector('[data-role="available"]');
      label.className = a.cls;
      label.textContent = a.text;
      card.classList.toggle("soldout", p.available <= 0);
      card.querySelector('[data-role="add"]').disabled = p.available <= 0;
    }
  }

  // ---- cart -----------------------------------------------------------------------------

  async function loadCart() {
    const id = store.get("cart");
    if (!id) return;
    const answer = await api("GET", "/v1/carts/" + encodeURIComponent(id), { token: token() });
    if (answer.status === 200 && answer.body.status !== "checked_out") state.cart = answer.body;
    else store.set("cart", null);
  }

  async function cartId() {
    if (state.cart) return state.cart.id;
    const made = await api("POST", "/v1/carts", { token: token() });
    if (made.status !== 201) throw new Error(errorMessage(made));
    state.cart = made.body;
    store.set("cart", made.body.id);
    return made.body.id;
  }

  async function addToCart(sku) {
    clearMessages();
    try {
      const id = await cartId();
      const line = (state.cart.lines || []).find((l) => l.sku === sku);
      const quantity = (line ? line.quantity : 0) + 1;
      await setLine(id, sku, quantity);
    } catch (e) {
      say("error", "Could not add to the cart: " + e.message);
    }
  }

  async function setLine(id, sku, quantity) {
    const path = "/v1/carts/" + encodeURIComponent(id) + "/lines/" + encodeURIComponent(sku);
    const answer = quantity > 0
      ? await api("PUT", path, { token: token(), body: { quantity } })
      : await api("DELETE", path, { token: token() });
    if (answer.status === 200) {
      state.cart = answer.body;
      renderCart();
    } else if (errorCode(answer) === "cart_not_open") {
      say("info", "This cart is being checked out; finish or cancel the checkout first.");
    } else {
      say("error", errorMessage(answer));
    }
  }

  function renderCart() {
    const lines = state.cart ? state.cart.lines : [];
    const open = !state.cart || state.cart.status === "open";
    let total = 0;
    let currency = "EUR";
    const items = lines.map((line) => {
      const p = state.products.get(line.sku);
      if (p) {
        total += p.price.amount * line.quantity;
        currency = p.price.currency;
      }
      return el("li", { "data-sku": line.sku },
        el("span", { class: "what" }, (p ? p.name : line.sku) + " × " + line.quantity),
        el("button", { class: "secondary", title: "one less", disabled: !open,
          onclick: () => setLine(state.cart.id, line.sku, line.quantity - 1) }, "−"),
        el("button", { class: "secondary", title: "one more", disabled: !open,
          onclick: () => setLine(state.cart.id, line.sku, line.quantity + 1) }, "+"));
    });
    replace($("cart-lines"), items);
    if (lines.length) {
      items.push(el("li", { class: "total" }, "Estimated total " + money({ amount: total, currency })));
      replace($("cart-lines"), items);
    }
    $("cart-empty").classList.toggle("hidden", lines.length > 0);
    $("checkout-button").disabled = !lines.length || !open || !!state.checkout;
  }

  // ---- checkout -------------------------------------------------------------------------

  $("checkout-button").addEventListener("click", async () => {
    clearMessages();
    if (!state.cart) return;
    const body = { cart_id: state.cart.id };
    const saleToken = flashTokenForCart();
    if (saleToken) body.flash_sale_token = saleToken;
    const answer = await api("POST", "/v1/checkouts", { token: token(), body });
    if (answer.status === 201) {
      beginCheckout(answer.body);
      return;
    }
    const code = errorCode(answer);
    if (code === "insufficient_stock") {
      const short = (answer.body.error.details || [])
        .map((d) => d.sku + ": " + d.requested + " wanted, " + d.available + " left").join("; ");
      say("error", "Not enough stock. " + short, "insufficient-stock");
      await loadCatalogue();
    } else if (code === "sold_out" || code === "admission_required" || code === "invalid_admission") {
      say("error", "This item is in a flash sale: take a token first. " + errorMessage(answer));
    } else {
      say("error", errorMessage(answer));
    }
  });

  function beginCheckout(checkout) {
    state.checkout = checkout;
    store.set("checkout", checkout.id);
    if (state.cart) state.cart.status = "checking_out";
    renderCart();
    showCheckout();
    // The units just held leave "available" at once, not at the next poll.
    loadCatalogue();
  }

  function showCheckout() {
    const c = state.checkout;
    $("checkout-panel").classList.remove("hidden");
    $("order-panel").classList.add("hidden");
    replace($("checkout-total"), "Total " + money(c.total));
    $("pay-button").disabled = false;
    startTimers();
  }

  function remainingMs() {
    return state.checkout ? Date.parse(state.checkout.expires_at) - Date.now() : 0;
  }

  /** The countdown ticks every second; heartbeats push the hold while the page is open,
   *  each a third of the window before it would lapse. */
  function startTimers() {
    stopTimers();
    const window = Math.max(1000, remainingMs());
    const tick = () => {
      const left = Math.max(0, remainingMs());
      const s = Math.ceil(left / 1000);
      const text = String(Math.floor(s / 60)).padStart(2, "0") + ":" + String(s % 60).padStart(2, "0");
      const node = $("countdown");
      node.textContent = text;
      node.classList.toggle("urgent", s <= 30);
    };
    tick();
    state.ticker = setInterval(tick, 1000);
    state.heartbeat = setInterval(heartbeat, Math.max(1000, Math.floor(window / 3)));
  }

  function stopTimers() {
    clearInterval(state.ticker);
    clearInterval(state.heartbeat);
    state.ticker = state.heartbeat = null;
  }

  async function heartbeat() {
    if (!state.checkout || state.checkout.state !== "reserved") return;
    const answer = await api("POST", "/v1/checkouts/" + state.checkout.id + "/heartbeat", { token: token() });
    if (answer.status === 200) {
      state.checkout = answer.body;
    } else if (errorCode(answer) === "checkout_expired") {
      endCheckout();
      say("error", "Your hold expired and the items went back on the shelf. Check out again.", "expired");
      await loadCart();
      renderCart();
    }
  }

  function selectedMethod() {
    const chosen = document.querySelector('input[name="pm"]:checked');
    return chosen ? chosen.value : "pm_card_visa";
  }

  $("pay-button").addEventListener("click", async () => {
    clearMessages();
    const c = state.checkout;
    if (!c) return;
    $("pay-button").disabled = true;
    // One key per attempt: a retry of this click (a lost answer) repeats the same request.
    const key = store.get("pay-key-" + c.id) || newKey();
    store.set("pay-key-" + c.id, key);
    let answer;
    try {
      answer = await api("POST", "/v1/checkouts/" + c.id + "/complete", {
        token: token(), body: { payment_method: selectedMethod() }, headers: { "Idempotency-Key": key },
      });
    } catch (e) {
      say("error", "The payment answer was lost; press Pay again to retry safely.");
      $("pay-button").disabled = false;
      return;
    }
    if (answer.status !== 200) {
      if (errorCode(answer) !== "idempotency_conflict") store.set("pay-key-" + c.id, null);
      say("error", errorMessage(answer));
      $("pay-button").disabled = false;
      return;
    }
    store.set("pay-key-" + c.id, null);
    afterPayment(answer.body);
  });

  function afterPayment(checkout) {
    state.checkout = checkout;
    switch (checkout.state) {
      case "completed":
        endCheckout();
        say("ok", "Payment accepted. Thank you!", "payment-ok");
        followOrder(checkout.order_id);
        break;
      case "payment_failed":
        endCheckout();
        say("error", "Your card was declined (" + (checkout.decline_code || "declined") +
          "). The items went back on the shelf; your cart is still here.", "declined");
        loadCart().then(renderCart);
        loadCatalogue();
        break;
      case "requires_action":
        stopTimers();
        $("checkout-panel").classList.add("hidden");
        $("auth-panel").classList.remove("hidden");
        break;
      default:
        // Still charging (the gateway's answer is not known yet): the order tells the end.
        endCheckout();
        say("info", "Your payment is being processed…");
        followOrder(checkout.order_id);
    }
  }

  async function authenticate(succeed) {
    const c = state.checkout;
    if (!c || !c.payment_intent_id) return;
    $("auth-ok").disabled = $("auth-fail").disabled = true;
    const answer = await api("POST", "/v1/demo/payments/" + encodeURIComponent(c.payment_intent_id) + "/authenticate",
      { token: token(), body: { succeed } });
    $("auth-ok").disabled = $("auth-fail").disabled = false;
    $("auth-panel").classList.add("hidden");
    if (answer.status !== 200) {
      say("error", errorMessage(answer));
    } else {
      say("info", succeed ? "Confirmed with your bank; waiting for the payment…" : "Authentication failed.");
    }
    endCheckout();
    followOrder(c.order_id);
  }
  $("auth-ok").addEventListener("click", () => authenticate(true));
  $("auth-fail").addEventListener("click", () => authenticate(false));

  $("cancel-button").addEventListener("click", async () => {
    const c = state.checkout;
    if (!c) return;
    const answer = await api("POST", "/v1/checkouts/" + c.id + "/cancel", { token: token() });
    endCheckout();
    if (answer.status === 200) say("info", "Checkout cancelled; the items went back on the shelf.");
    else say("error", errorMessage(answer));
    await loadCart();
    renderCart();
    await loadCatalogue();
  });

  function endCheckout() {
    stopTimers();
    state.checkout = null;
    store.set("checkout", null);
    $("checkout-panel").classList.add("hidden");
    renderCart();
  }

  /** A reload while a checkout is live resumes it. */
  async function resumeCheckout() {
    const id = store.get("checkout");
    if (!id) return;
    const answer = await api("GET", "/v1/checkouts/" + encodeURIComponent(id), { token: token() });
    if (answer.status !== 200) {
      store.set("checkout", null);
      return;
    }
    if (answer.body.state === "reserved") beginCheckout(answer.body);
    else if (answer.body.state === "requires_action") afterPayment(answer.body);
    else {
      store.set("checkout", null);
      followOrder(answer.body.order_id);
    }
  }

  // ---- order ----------------------------------------------------------------------------

  function followOrder(orderId) {
    clearInterval(state.orderPoll);
    $("order-panel").classList.remove("hidden");
    const poll = async () => {
      const answer = await api("GET", "/v1/orders/" + encodeURIComponent(orderId), { token: token() });
      if (answer.status !== 200) return;
      renderOrder(answer.body);
      if (TERMINAL_ORDER.includes(answer.body.status)) {
        clearInterval(state.orderPoll);
        state.orderPoll = null;
        if (answer.body.status === "paid" || answer.body.status === "fulfilled") {
          state.cart = null;
          store.set("cart", null);
          renderCart();
        } else {
          await loadCart();
          renderCart();
        }
        loadCatalogue();
      }
    };
    poll();
    state.orderPoll = setInterval(poll, ORDER_EVERY_MS);
  }

  function renderOrder(order) {
    const status = $("order-status");
    status.textContent = order.status;
    status.className = "status " + order.status;
    replace($("order-lines"), order.lines.map((l) => {
      const p = state.products.get(l.sku);
      return el("li", {}, el("span", { class: "what" }, (p ? p.name : l.sku) + " × " + l.quantity),
        el("span", {}, money(l.line_total)));
    }));
    replace($("order-total"), "Total " + money(order.total));
    replace($("order-id"), "Order " + order.id);
  }

  $("continue-button").addEventListener("click", () => {
    clearInterval(state.orderPoll);
    $("order-panel").classList.add("hidden");
    clearMessages();
  });

  // ---- flash sales ----------------------------------------------------------------------

  /** The flash-sale list is optional: a service without `GET /v1/flash-sales` (or with no
   *  sale on) simply shows no flash-sale view. */
  async function loadFlashSales() {
    if (state.noSaleList) return;
    let answer;
    try { answer = await api("GET", "/v1/flash-sales"); } catch (_) { return; }
    if (errorCode(answer) === "route_not_found") {
      // This service has no public sale list: stop asking, show no flash-sale view.
      state.noSaleList = true;
    }
    if (answer.status !== 200 || !answer.body) {
      state.sales = [];
    } else {
      state.sales = Array.isArray(answer.body) ? answer.body : (answer.body.data || []);
    }
    renderFlash();
  }

  function flashTokens() {
    return store.get("flash-tokens") || {};
  }

  function flashTokenForCart() {
    if (!state.cart) return null;
    const tokens = flashTokens();
    for (const sale of state.sales) {
      const held = tokens[sale.id];
      const inCart = state.cart.lines.some((l) => l.sku === sale.sku);
      if (held && inCart && Date.parse(held.expires_at) > Date.now()) return held.token;
    }
    return null;
  }

  function renderFlash() {
    const box = $("flash");
    const sale = state.sales[0];
    if (!sale) {
      box.classList.add("hidden");
      return;
    }
    const product = state.products.get(sale.sku);
    const held = flashTokens()[sale.id];
    const holding = held && Date.parse(held.expires_at) > Date.now();
    const left = sale.remaining !== undefined ? sale.remaining : sale.available;
    const soldOut = left === 0 || store.get("flash-soldout-" + sale.id);
    replace(box,
      el("span", { class: "title" }, "⚡ Flash sale"),
      el("span", {}, (product ? product.name : sale.sku) + (product ? " · " + money(product.price) : "")),
      sale.units !== undefined ? el("span", { class: "muted" }, sale.units + " units") : null,
      holding
        ? el("span", { "data-testid": "flash-token" }, "You hold a token until " +
            new Date(held.expires_at).toLocaleTimeString() + ". Add it to your cart and check out.")
        : soldOut
          ? el("strong", { "data-testid": "flash-soldout" }, "Sold out")
          : el("button", { "data-testid": "flash-take", onclick: () => takeToken(sale) }, "Take a token"));
    box.classList.remove("hidden");
  }

  async function takeToken(sale) {
    clearMessages();
    const answer = await api("POST", "/v1/flash-sales/" + encodeURIComponent(sale.id) + "/tokens", { token: token() });
    if (answer.status === 201 || answer.status === 200) {
      const tokens = flashTokens();
      tokens[sale.id] = answer.body;
      store.set("flash-tokens", tokens);
      await addToCart(sale.sku);
    } else if (errorCode(answer) === "sold_out") {
      store.set("flash-soldout-" + sale.id, true);
      say("info", "Sold out: every unit is taken or held. Held units come back if buyers give up.");
    } else {
      say("error", errorMessage(answer));
    }
    renderFlash();
  }

  // ---- start ----------------------------------------------------------------------------

  async function start() {
    showWho();
    await loadCatalogue();
    if (!token()) return;
    await loadCart();
    renderCart();
    await resumeCheckout();
    await loadFlashSales();
  }

  (async () => {
    setInterval(loadCatalogue, CATALOGUE_EVERY_MS);
    setInterval(loadFlashSales, FLASH_EVERY_MS);
    if (await ensureCustomer()) await start();
    else await loadCatalogue();
    showWho();
  })();
})();
