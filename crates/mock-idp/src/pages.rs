//! The pages a person sees at the sandbox provider. Plain HTML with the form field names documented in
//! docs/mock-idp.md, so a test can drive them over HTTP as well as a person can in a browser.

use crate::model::{Authenticator, User};
use crate::provider::PendingAuth;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:Arial,sans-serif;margin:0;background:#f0f4f5;color:#212b32}\
.banner{background:#d5281b;color:#fff;padding:8px 16px;font-weight:bold}\
header{background:#005eb8;color:#fff;padding:16px}main{max-width:640px;margin:24px auto;background:#fff;padding:24px}\
fieldset{border:0;padding:0;margin:0 0 16px}legend{font-weight:bold;margin-bottom:8px}\
label{display:block;padding:6px 0}button{font-size:1rem;padding:8px 16px;margin-right:8px}\
.primary{background:#007f3b;color:#fff;border:0}.error{border-left:4px solid #d5281b;padding:8px 12px;color:#d5281b}\
.hint{color:#4c6272}:focus{outline:3px solid #ffeb3b}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} – SANDBOX CIS2</title>\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{STYLE}</style></head><body>\
<div class=\"banner\" role=\"alert\">SANDBOX – this is not NHS CIS2. Test users only; no real patient or staff data.</div>\
<header>NHS Care Identity Service 2 · sandbox</header><main>{body}</main></body></html>",
        title = escape(title)
    )
}

pub fn error_page(message: &str) -> String {
    page(
        "Sign-in problem",
        &format!(
            "<h1>There is a problem</h1><p class=\"error\">{}</p>",
            escape(message)
        ),
    )
}

pub fn signed_out_page() -> String {
    page(
        "Signed out",
        "<h1>You have been signed out</h1><p>You can close this tab.</p>",
    )
}

pub fn login_page(
    pending: &PendingAuth,
    users: &[User],
    offered: &[Authenticator],
    error: Option<&str>,
) -> String {
    let mut body = format!("<h1>Sign in to {}</h1>", escape(&pending.client_name));
    if let Some(error) = error {
        body.push_str(&format!(
            "<p class=\"error\" id=\"error\">{}</p>",
            escape(error)
        ));
    }
    if !pending.acr_values.is_empty() {
        body.push_str(&format!(
            "<p class=\"hint\">This service asks for: {}</p>",
            escape(&pending.acr_values.join(", "))
        ));
    }
    body.push_str("<form method=\"post\" action=\"/sandbox/login\">");
    body.push_str(&format!(
        "<input type=\"hidden\" name=\"txn\" value=\"{}\">",
        escape(&pending.txn)
    ));
    body.push_str("<fieldset><legend>Test user</legend>");
    for (i, user) in users.iter().enumerate() {
        let roles = match user.roles.len() {
            0 => "no roles".to_string(),
            1 => "1 role".to_string(),
            n => format!("{n} roles"),
        };
        let ways: Vec<&str> = user.authenticators.iter().map(|a| a.label()).collect();
        body.push_str(&format!(
            "<label><input type=\"radio\" name=\"uid\" value=\"{uid}\"{checked}> {name} ({uid}) – {roles}; signs in with {ways}</label>",
            uid = escape(&user.uid),
            checked = if i == 0 { " checked" } else { "" },
            name = escape(&user.display_name()),
            ways = escape(&ways.join(", ")),
        ));
    }
    body.push_str("</fieldset><fieldset><legend>How to sign in</legend>");
    if offered.is_empty() {
        body.push_str("<p class=\"error\">No authenticator meets what this service asks for.</p>");
    }
    for (i, a) in offered.iter().enumerate() {
        body.push_str(&format!(
            "<label><input type=\"radio\" name=\"authenticator\" value=\"{}\"{}> {} (AAL{})</label>",
            a.form_value(),
            if i == 0 { " checked" } else { "" },
            a.label(),
            a.level()
        ));
    }
    body.push_str(
        "</fieldset><button class=\"primary\" type=\"submit\" name=\"action\" value=\"sign_in\">Sign in</button>\
<button type=\"submit\" name=\"action\" value=\"cancel\">Cancel</button></form>",
    );
    page("Sign in", &body)
}

pub fn role_page(pending: &PendingAuth, user: &User) -> String {
    let mut body = format!(
        "<h1>Select your role</h1><p>Signed in as {}. Choose the role to work in for {}.</p>",
        escape(&user.display_name()),
        escape(&pending.client_name)
    );
    body.push_str("<form method=\"post\" action=\"/sandbox/select-role\">");
    body.push_str(&format!(
        "<input type=\"hidden\" name=\"txn\" value=\"{}\">",
        escape(&pending.txn)
    ));
    body.push_str("<fieldset><legend>Role</legend>");
    for (i, role) in user.roles.iter().enumerate() {
        let org = user.org_name(&role.org_code).unwrap_or(&role.org_code);
        body.push_str(&format!(
            "<label><input type=\"radio\" name=\"role\" value=\"{}\"{}> {} – {} ({})</label>",
            escape(&role.person_roleid),
            if i == 0 { " checked" } else { "" },
            escape(&role.short_name()),
            escape(org),
            escape(&role.org_code),
        ));
    }
    body.push_str(
        "</fieldset><button class=\"primary\" type=\"submit\" name=\"action\" value=\"continue\">Continue</button>\
<button type=\"submit\" name=\"action\" value=\"cancel\">Cancel</button></form>",
    );
    page("Select your role", &body)
}
