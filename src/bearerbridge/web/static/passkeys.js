// Passkeys (WebAuthn) for the forms web/passkeys.py makes: <form data-passkey="create|get"
// data-options="JSON">, each hidden in a [data-passkey-box] until this script finds WebAuthn.
// On submit it asks the browser (navigator.credentials), puts the answer, as JSON, in the
// form's `credential` field and posts the form. No other script, no inline script (CSP).
(function () {
  "use strict";
  if (window.bearerbridgePasskeys) { return; }  // the page may include this file twice
  window.bearerbridgePasskeys = true;

  function bytes(text) {  // base64url to an ArrayBuffer
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    var raw = atob(b64 + "===".slice((b64.length + 3) % 4));
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { out[i] = raw.charCodeAt(i); }
    return out.buffer;
  }

  function text(buffer) {  // an ArrayBuffer to base64url
    var raw = "", view = new Uint8Array(buffer);
    for (var i = 0; i < view.length; i++) { raw += String.fromCharCode(view[i]); }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (d) { return { type: d.type, id: bytes(d.id), transports: d.transports }; });
  }

  function publicKey(kind, o) {
    o.challenge = bytes(o.challenge);
    if (kind === "create") {
      o.user.id = bytes(o.user.id);
      o.excludeCredentials = descriptors(o.excludeCredentials);
    } else {
      o.allowCredentials = descriptors(o.allowCredentials);
    }
    return o;
  }

  function answer(kind, c) {  // the browser's PublicKeyCredential as the webauthn library reads it
    var r = c.response, json = {
      id: c.id, rawId: text(c.rawId), type: c.type, authenticatorAttachment: c.authenticatorAttachment,
      clientExtensionResults: c.getClientExtensionResults(), response: { clientDataJSON: text(r.clientDataJSON) }
    };
    if (kind === "create") {
      json.response.attestationObject = text(r.attestationObject);
      json.response.transports = r.getTransports ? r.getTransports() : [];
    } else {
      json.response.authenticatorData = text(r.authenticatorData);
      json.response.signature = text(r.signature);
      json.response.userHandle = r.userHandle ? text(r.userHandle) : null;
    }
    return JSON.stringify(json);
  }

  function say(form, message) {
    var error = form.querySelector("[data-passkey-error]");
    if (error) { error.textContent = message; error.hidden = !message; }
  }

  function ask(event) {
    var form = event.currentTarget, kind = form.getAttribute("data-passkey");
    if (form.elements.credential.value) { return; }  // the answer is in: post it
    event.preventDefault();
    say(form, "");
    var options = { publicKey: publicKey(kind, JSON.parse(form.getAttribute("data-options"))) };
    var asked = kind === "create" ? navigator.credentials.create(options) : navigator.credentials.get(options);
    asked.then(function (credential) {
      form.elements.credential.value = answer(kind, credential);
      form.submit();
    }, function (error) {
      say(form, error && error.name === "NotAllowedError"
        ? "No passkey was used: it was cancelled, or timed out. Try again."
        : "The browser could not use a passkey here (" + (error && error.name) + ").");
    });
  }

  function start() {
    if (!window.PublicKeyCredential || !navigator.credentials) { return; }  // the boxes stay hidden
    document.querySelectorAll("[data-passkey-box]").forEach(function (box) { box.hidden = false; });
    document.querySelectorAll("form[data-passkey]").forEach(function (form) {
      form.addEventListener("submit", ask);
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
}());
