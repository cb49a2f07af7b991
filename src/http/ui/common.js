// Shared by the storefront and the operations page: API calls, DOM building, money.
// Pages build the DOM from data with `el()` and text nodes only, never innerHTML, so no
// product name or error message can inject markup.
"use strict";

const hf = (() => {
  /** One API call: resolves to {status, body} (body is parsed JSON or null); never throws
   *  for an HTTP status, only for a network failure. */
  async function api(method, path, { token, body, headers } = {}) {
    const init = { method, headers: Object.assign({}, headers || {}) };
    if (token) init.headers["Authorization"] = "Bearer " + token;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let parsed = null;
    if (text) {
      try { parsed = JSON.parse(text); } catch (_) { parsed = { raw: text }; }
    }
    return { status: response.status, body: parsed };
  }

  /** The contract's error code of an answer, if it is an error body. */
  function errorCode(answer) {
    return answer && answer.body && answer.body.error ? answer.body.error.code : null;
  }

  function errorMessage(answer) {
    return answer && answer.body && answer.body.error
      ? answer.body.error.message
      : "unexpected answer (" + (answer ? answer.status : "no answer") + ")";
  }

  /** el("div", {class: "x", "data-sku": "a"}, "text", child, ...) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Money is integer minor units plus a currency (never floats in the API). */
  function money(m) {
    if (!m) return "";
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: m.currency })
        .format(m.amount / 100);
    } catch (_) {
      return (m.amount / 100).toFixed(2) + " " + m.currency;
    }
  }

  function replace(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  return { api, errorCode, errorMessage, el, money, replace, newKey };
})();
