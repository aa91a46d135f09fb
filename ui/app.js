// The window draws the view the agent's core gives it (the `view` command and `view` events) and sends
// each button press back as one command. Nothing here decides anything about sign-in or tokens.
"use strict";

const tauri = window.__TAURI__;
const invoke = (command, args) => tauri.core.invoke(command, args);

let current = null;
let page = "home";
let busy = false;
let reportedDrawn = false;

function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  }[c]));
}

function timeLeft(seconds) {
  if (seconds == null) return "";
  if (seconds <= 60) return "less than a minute";
  const minutes = Math.round(seconds / 60);
  if (minutes < 120) return `${minutes} minute${minutes === 1 ? "" : "s"}`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return `${hours} hour${hours === 1 ? "" : "s"}${rest ? ` ${rest} minute${rest === 1 ? "" : "s"}` : ""}`;
}

function button(id, label, kind = "") {
  const cls = kind ? `nhsuk-button nhsuk-button--${kind}` : "nhsuk-button";
  return `<button type="button" class="${cls}" id="${id}" data-module="nhsuk-button">${escapeHtml(label)}</button>`;
}

function actions(...buttons) {
  return `<div class="app-buttons app-actions">${buttons.join("")}</div>`;
}

function summaryRow(key, value, id) {
  return `<div class="nhsuk-summary-list__row"><dt class="nhsuk-summary-list__key">${escapeHtml(key)}</dt>` +
    `<dd class="nhsuk-summary-list__value" id="${id}">${escapeHtml(value)}</dd></div>`;
}

// One prompt at a time, over the screen (so the session details under it stay where they are), so that
// a prompt going away never moves another program's buttons under the pointer; the rest wait their turn.
function approvalsHtml(view) {
  const more = view.approvals.length > 1
    ? `<p class="nhsuk-body-s">${view.approvals.length - 1} more waiting.</p>` : "";
  return view.approvals.slice(0, 1).map((a) => `
    <section class="app-approval" role="alertdialog" aria-labelledby="approval-${a.id}-title" id="approval-${a.id}">
      <h2 class="nhsuk-heading-s" id="approval-${a.id}-title" tabindex="-1">${escapeHtml(a.program)} wants to use your Care Identity sign-in</h2>
      <p>Program: <code>${escapeHtml(a.path)}</code></p>
      ${a.warning ? `<div class="nhsuk-warning-callout" id="approval-${a.id}-warning"><h3 class="nhsuk-warning-callout__label">This program runs other programs</h3><p>${escapeHtml(a.warning)}</p></div>` : ""}
      <p>Only allow programs you expect, such as your clinical system.</p>
      <div class="app-buttons">
        ${button(`allow-once-${a.id}`, "Allow once")}
        ${button(`always-allow-${a.id}`, "Always allow", "secondary")}
        ${button(`deny-${a.id}`, "Deny", "warning")}
      </div>
      ${more}
    </section>`).join("");
}

function signedInHtml(view) {
  const role = view.role
    ? `${view.role.name}${view.role.org_name ? ` at ${view.role.org_name}` : ""} (${view.role.org_code})`
    : "No role selected";
  const expiring = view.expiring
    ? `<div class="nhsuk-warning-callout" id="expiring"><h3 class="nhsuk-warning-callout__label">Your session is ending</h3>
        <p>Your session ends in ${escapeHtml(timeLeft(view.seconds_left))}. Sign in again to carry on without losing access.</p></div>`
    : "";
  const noRoles = view.roles.length === 0
    ? `<div class="nhsuk-warning-callout" id="no-roles"><h3 class="nhsuk-warning-callout__label">You have no roles</h3>
        <p>Clinical systems cannot give you access. Ask your Registration Authority to assign you a role, then sign in again.</p></div>`
    : "";
  return `
    <h1 class="nhsuk-heading-l" tabindex="-1">Signed in</h1>
    ${expiring}${noRoles}
    <dl class="nhsuk-summary-list app-details">
      ${summaryRow("Name", view.name ?? view.uid, "name")}
      ${summaryRow("Role", role, "role")}
      ${summaryRow("Signed in with", view.authenticated_with ?? "Not stated", "method")}
      ${summaryRow("Assurance level", view.assurance ?? "Not stated", "assurance")}
      ${summaryRow("Session time left", timeLeft(view.seconds_left), "time-left")}
    </dl>
    ${actions(
      view.expiring ? button("renew", "Sign in again") : "",
      view.roles.length > 1 ? button("change-role", "Change role", "secondary") : "",
      button("logout", "Sign out", "warning"),
    )}`;
}

function screenHtml(view) {
  switch (view.state) {
    case "signing_in":
      return `<h1 class="nhsuk-heading-l" tabindex="-1">Continue in your browser</h1>
        <p>Your browser has opened the Care Identity sign-in page. Use your smartcard, Windows Hello or passkey there, then come back.</p>
        ${actions(button("cancel", "Cancel sign-in", "secondary"))}`;
    case "signed_in":
      return signedInHtml(view);
    case "locked":
      return `<h1 class="nhsuk-heading-l" tabindex="-1">Session locked</h1>
        <div class="nhsuk-inset-text"><p id="locked-reason">${escapeHtml(view.locked_reason)}</p></div>
        <p>${view.card_unlocks ? "Put your smartcard back, or sign in again, to carry on." : "Sign in again to carry on. Only the person who was signed in can unlock it."}</p>
        ${actions(button("unlock", "Sign in again"), button("logout", "Sign out", "warning"))}`;
    default:
      return `<h1 class="nhsuk-heading-l" tabindex="-1">Sign in</h1>
        <p>Sign in once to use your clinical systems on this computer.</p>
        ${actions(button("login", "Log in with my Care Identity"))}`;
  }
}

function autostartHtml(autostart) {
  const hint = !autostart.changeable
    ? "Your organisation starts it for everyone on this computer; only an administrator can change that."
    : autostart.machine_wide
      ? "Your organisation starts it for everyone on this computer. Untick to stop it starting for you."
      : "It starts in the tray, with this window closed, ready for your clinical systems.";
  return `<div class="nhsuk-form-group app-setting"><div class="nhsuk-checkboxes">
    <div class="nhsuk-checkboxes__item">
      <input class="nhsuk-checkboxes__input" id="autostart" type="checkbox" aria-describedby="autostart-hint"${autostart.enabled ? " checked" : ""}${autostart.changeable ? "" : " disabled"}>
      <label class="nhsuk-label nhsuk-checkboxes__label" for="autostart">Start CIS2 Agent when I sign in to this computer</label>
      <div class="nhsuk-hint nhsuk-checkboxes__hint" id="autostart-hint">${escapeHtml(hint)}</div>
    </div></div></div>`;
}

function settingsHtml(programs, autostart) {
  const rows = programs.length === 0
    ? "<p id=\"no-programs\">No programs have been remembered.</p>"
    : `<ul class="nhsuk-list nhsuk-list--border app-programs">${programs.map((p) => `
        <li><span><strong>${escapeHtml(p.allow ? "Allowed" : "Denied")}</strong>: <code>${escapeHtml(p.path ?? p.sha256)}</code></span>
        ${button(`forget-${p.id}`, "Forget", "secondary")}</li>`).join("")}</ul>`;
  return `<h1 class="nhsuk-heading-l" tabindex="-1">Settings</h1>
    ${autostartHtml(autostart)}
    <h2 class="nhsuk-heading-s">Programs allowed to use your sign-in</h2>
    <p>Programs you chose "Always allow" or "Deny" for. Forget one to be asked again next time.</p>
    ${rows}
    ${actions(button("back", "Back", "secondary"))}`;
}

function errorHtml(message) {
  if (!message) return "";
  return `<div class="nhsuk-error-summary" aria-labelledby="error-title" role="alert" tabindex="-1" id="error-summary">
    <h2 class="nhsuk-error-summary__title" id="error-title">There is a problem</h2>
    <div class="nhsuk-error-summary__body"><p id="error-text">${escapeHtml(message)}</p></div></div>`;
}

async function draw(view, settings) {
  const screenChanged = !current || current.state !== view.state;
  current = view;
  document.getElementById("sandbox-banner").hidden = !view.sandbox;
  document.getElementById("approvals").innerHTML = approvalsHtml(view);
  document.getElementById("error").innerHTML = errorHtml(view.error);
  document.getElementById("screen").innerHTML = page === "settings" && settings
    ? settingsHtml(settings.programs, settings.autostart) : screenHtml(view);
  document.body.dataset.state = page === "settings" ? "settings" : view.state;
  document.getElementById("settings-link").hidden = page === "settings";
  if (view.approvals.length > 0) document.querySelector(".app-approval h2")?.focus();
  else if (screenChanged) document.querySelector("#screen h1")?.focus();
  if (!reportedDrawn) {
    reportedDrawn = true;
    // After the next paint: the app logs how long the window took to open.
    requestAnimationFrame(() => setTimeout(() => invoke("drawn"), 0));
  }
}

async function settingsData() {
  if (page !== "settings") return null;
  return { programs: await invoke("remembered_programs"), autostart: await invoke("autostart") };
}

async function refresh(view) {
  const v = view ?? (await invoke("view"));
  await draw(v, await settingsData());
}

async function showError(message) {
  const v = await invoke("view");
  v.error = String(message);
  await draw(v, await settingsData());
}

async function act(command, args) {
  if (busy) return;
  busy = true;
  try {
    await refresh(await invoke(command, args));
  } catch (message) {
    await showError(message);
  } finally {
    busy = false;
  }
}

document.addEventListener("click", (event) => {
  const target = event.target.closest("button, a");
  if (!target) return;
  const id = target.id;
  if (id === "settings-link") {
    event.preventDefault();
    page = "settings";
    refresh();
    return;
  }
  if (id === "back") { page = "home"; refresh(); return; }
  if (id === "login" || id === "unlock" || id === "renew") { act("login"); return; }
  if (id === "cancel") { invoke("cancel_login").then(refresh); return; }
  if (id === "change-role") { act("change_role"); return; }
  if (id === "logout") { act("logout"); return; }
  const approval = id.match(/^(allow-once|always-allow|deny)-(\d+)$/);
  if (approval) { act("answer_approval", { id: Number(approval[2]), answer: approval[1] }); return; }
  const forget = id.match(/^forget-(.+)$/);
  if (forget) { invoke("forget_program", { id: forget[1] }).then(() => refresh()); }
});

document.addEventListener("change", (event) => {
  if (event.target.id !== "autostart") return;
  invoke("set_autostart", { enabled: event.target.checked })
    .then(() => refresh())
    .catch(showError);
});

// The app sends its view with the window (window.__CIS2_FIRST_VIEW__): drawn at once, then asked
// for again once changes are heard, in case one came in between.
const firstView = window.__CIS2_FIRST_VIEW__;
delete window.__CIS2_FIRST_VIEW__;
tauri.event.listen("view", (event) => refresh(event.payload)).then(() => { if (firstView) refresh(); });
setInterval(() => refresh(), 30000);
refresh(firstView);
