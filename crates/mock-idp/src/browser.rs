//! A scripted browser: it does what a person does at the sandbox's pages — open the authorize URL, pick a
//! test user and an authenticator, pick a role — and follows the final redirect to wherever the provider
//! sends it (normally the agent's loopback listener). Tests use it, and so does the
//! `cis2-scripted-browser` program that stands in for `$BROWSER`.
//!
//! Like a browser it keeps cookies per site in a jar (reqwest's, RFC 6265: by host, not port) and
//! sends them wherever they belong — to the provider and to the agent's loopback listener, whose
//! start URL binds the sign-in to the browser with a cookie. It also opens the `file://` page the
//! agent hands a browser, following its `<meta http-equiv="refresh">`.

use std::time::Duration;

/// Who signs in, and how.
#[derive(Debug, Clone)]
pub struct Script {
    pub uid: String,
    /// An authenticator form value (`smartcard`, `passkey`, …).
    pub authenticator: String,
    /// The `person_roleid` to pick when a role page appears; `None` picks the first.
    pub role: Option<String>,
    /// Press Cancel on the sign-in page instead of signing in.
    pub cancel: bool,
    /// Follow the final redirect (GET it), as a real browser would.
    pub follow_callback: bool,
}

impl Script {
    pub fn new(uid: &str, authenticator: &str) -> Script {
        Script {
            uid: uid.into(),
            authenticator: authenticator.into(),
            role: None,
            cancel: false,
            follow_callback: true,
        }
    }
}

/// Where the provider sent the browser in the end, and what the callback answered if it was followed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub redirect: String,
    pub callback_status: Option<u16>,
    pub callback_body: Option<String>,
    /// Whether a role page was shown on the way.
    pub saw_role_page: bool,
    /// The `Cookie` header this browser sends with the final redirect (its binding to the agent's
    /// sign-in), so a test can deliver the redirect itself as this browser would.
    pub redirect_cookies: Option<String>,
}

impl Outcome {
    pub fn param(&self, name: &str) -> Option<String> {
        url::Url::parse(&self.redirect).ok().and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    }
}

/// Keeps cookies (the provider's SSO cookie, the agent's sign-in binding) between requests and
/// sign-ins, as a browser profile does.
pub struct ScriptedBrowser {
    http: reqwest::Client,
    jar: std::sync::Arc<reqwest::cookie::Jar>,
}

impl Default for ScriptedBrowser {
    fn default() -> Self {
        ScriptedBrowser::new(None)
    }
}

fn hidden(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].replace("&amp;", "&"))
}

impl ScriptedBrowser {
    /// `extra_root_pem`: a CA to trust for an HTTPS sandbox.
    pub fn new(extra_root_pem: Option<&str>) -> ScriptedBrowser {
        let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_provider(jar.clone())
            .timeout(Duration::from_secs(30));
        if let Some(pem) = extra_root_pem
            && let Ok(cert) = reqwest::Certificate::from_pem(pem.as_bytes())
        {
            builder = builder.add_root_certificate(cert);
        }
        ScriptedBrowser {
            http: builder.build().expect("HTTP client"),
            jar,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        request.send().await.map_err(|e| e.to_string())
    }

    /// Runs the script from the authorize URL — or from what the agent opens: its start URL, or a
    /// `file://` page leading there — to the final redirect.
    pub async fn sign_in(&mut self, opened: &str, script: &Script) -> Result<Outcome, String> {
        let mut url = url::Url::parse(opened).map_err(|e| e.to_string())?;
        if url.scheme() == "file" {
            url = follow_refresh_page(&url)?;
        }
        let mut response = self.send(self.http.get(url.as_str())).await?;
        // The agent's start URL (oidc::loopback's `/start/…`) sets its cookie and sends the browser on
        // to the provider: from there on, the provider's origin is the one whose pages are filled in.
        if url.path().starts_with("/start/") && response.status().is_redirection() {
            let location = location(&response)?;
            url = url.join(&location).map_err(|e| e.to_string())?;
            response = self.send(self.http.get(url.as_str())).await?;
        } else if url.path().starts_with("/start/") {
            let status = response.status();
            let page = response.text().await.unwrap_or_default();
            return Err(format!(
                "the agent's start page answered {status}: {}",
                strip_tags(&page)
            ));
        }
        let origin = url.origin().ascii_serialization();
        let mut saw_role_page = false;
        for _ in 0..8 {
            if response.status().is_redirection() {
                let location = location(&response)?;
                let base = url::Url::parse(&origin).map_err(|e| e.to_string())?;
                let next = base.join(&location).map_err(|e| e.to_string())?;
                // Redirects within the provider (interaction pages) are followed; the first one that
                // leaves it is the answer to the client.
                if next.origin().ascii_serialization() == origin {
                    response = self.send(self.http.get(next.as_str())).await?;
                    continue;
                }
                return self.finish(next.to_string(), script, saw_role_page).await;
            }
            let status = response.status();
            let page = response.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!(
                    "the provider answered {status}: {}",
                    strip_tags(&page)
                ));
            }
            let txn = hidden(&page, "txn").ok_or("the page has no sign-in form")?;
            let form: Vec<(&str, String)> = if page.contains("action=\"/sandbox/login\"") {
                if page.contains("id=\"error\"") {
                    return Err(format!("the sign-in page refused: {}", strip_tags(&page)));
                }
                vec![
                    ("txn", txn),
                    ("uid", script.uid.clone()),
                    ("authenticator", script.authenticator.clone()),
                    (
                        "action",
                        if script.cancel { "cancel" } else { "sign_in" }.into(),
                    ),
                ]
            } else {
                saw_role_page = true;
                let role = script
                    .role
                    .clone()
                    .or_else(|| hidden_first_radio(&page, "role"))
                    .ok_or("the role page offers no role")?;
                vec![("txn", txn), ("role", role), ("action", "continue".into())]
            };
            let action = if form.iter().any(|(k, _)| *k == "uid") {
                "/sandbox/login"
            } else {
                "/sandbox/select-role"
            };
            response = self
                .send(self.http.post(format!("{origin}{action}")).form(&form))
                .await?;
        }
        Err("the provider kept showing pages".into())
    }

    async fn finish(
        &mut self,
        location: String,
        script: &Script,
        saw_role_page: bool,
    ) -> Result<Outcome, String> {
        use reqwest::cookie::CookieStore;
        let redirect_cookies = url::Url::parse(&location)
            .ok()
            .and_then(|url| self.jar.cookies(&url))
            .and_then(|header| header.to_str().ok().map(str::to_string));
        let mut outcome = Outcome {
            redirect: location.clone(),
            callback_status: None,
            callback_body: None,
            saw_role_page,
            redirect_cookies,
        };
        if script.follow_callback {
            let response = self.send(self.http.get(&location)).await?;
            outcome.callback_status = Some(response.status().as_u16());
            outcome.callback_body = response.text().await.ok();
        }
        Ok(outcome)
    }

    /// GETs a URL with the browser's cookie (end session, for example) and returns status and body.
    pub async fn visit(&mut self, url: &str) -> Result<(u16, String), String> {
        let response = self.send(self.http.get(url)).await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await.unwrap_or_default()))
    }
}

fn location(response: &reqwest::Response) -> Result<String, String> {
    response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| "a redirect without Location".to_string())
}

/// Reads a local page and returns where its `<meta http-equiv="refresh" content="0;url=…">` leads.
fn follow_refresh_page(page: &url::Url) -> Result<url::Url, String> {
    let path = page
        .to_file_path()
        .map_err(|()| format!("{page} is not a local file"))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let marker = "content=\"0;url=";
    let start = text
        .find(marker)
        .ok_or_else(|| format!("{} has no refresh to follow", path.display()))?
        + marker.len();
    let end = text[start..].find('"').ok_or("an unterminated refresh")? + start;
    let target = text[start..end]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&amp;", "&");
    url::Url::parse(&target).map_err(|e| e.to_string())
}

fn hidden_first_radio(page: &str, name: &str) -> Option<String> {
    let marker = format!("type=\"radio\" name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].to_string())
}

fn strip_tags(page: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in page.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
