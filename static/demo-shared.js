// What the demo page's modules share: the gateway with the page's API key, storage, badges.

export const $ = (id) => document.getElementById(id);
export const DEMO_TAG = "demo";

export function readJson(storage, key, fallback) {
  try {
    return JSON.parse(storage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

export function apiKey() {
  return $("key").value.trim();
}

/** A request with the API key: `{ ok, status, body }` (body `{}` when not JSON); throws when the
 * gateway is unreachable. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const init = { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) };
  const response = await fetch(path, init);
  return { ok: response.ok, status: response.status, body: await response.json().catch(() => ({})) };
}

/** What a problem+json answer says, with its field errors. */
export function problemText(answer) {
  const fields = (answer.body.errors || []).map((e) => `${e.loc.join(".")}: ${e.msg}`).join("; ");
  return `${answer.body.detail || `HTTP ${answer.status}`}${fields ? ` (${fields})` : ""}`;
}

export function badge(status) {
  const element = document.createElement("span");
  element.className = "badge";
  element.textContent = status;
  element.dataset.status = status;
  return element;
}
