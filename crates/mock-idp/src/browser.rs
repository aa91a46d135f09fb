//! A scripted browser: it does what a person does at the sandbox's pages — open the authorize URL, pick a
//! test user and an authenticator, pick a role — and follows the final redirect to wherever the provider
//! sends it (normally the agent's loopback listener). Tests use it, and so does the
//! `cis2-scripted-browser` program that stands in for `$BROWSER`.

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

/// Keeps the provider's SSO cookie between sign-ins, as a browser profile does.
pub struct ScriptedBrowser {
    http: reqwest::Client,
    cookie: Option<String>,
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
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30));
        if let Some(pem) = extra_root_pem
            && let Ok(cert) = reqwest::Certificate::from_pem(pem.as_bytes())
        {
            builder = builder.add_root_certificate(cert);
        }
        ScriptedBrowser {
            http: builder.build().expect("HTTP client"),
            cookie: None,
        }
    }

    fn remember_cookie(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            if let Ok(text) = value.to_str()
                && let Some(pair) = text.split(';').next()
            {
                self.cookie = Some(pair.trim().to_string());
            }
        }
    }

    async fn send(
        &mut self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        let request = match &self.cookie {
            Some(cookie) => request.header(reqwest::header::COOKIE, cookie),
            None => request,
        };
        let response = request.send().await.map_err(|e| e.to_string())?;
        self.remember_cookie(&response);
        Ok(response)
    }

    /// Runs the script from the authorize URL to the final redirect.
    pub async fn sign_in(
        &mut self,
        authorize_url: &str,
        script: &Script,
    ) -> Result<Outcome, String> {
        let origin = {
            let url = url::Url::parse(authorize_url).map_err(|e| e.to_string())?;
            url.origin().ascii_serialization()
        };
        let mut response = self.send(self.http.get(authorize_url)).await?;
        let mut saw_role_page = false;
        for _ in 0..8 {
            if response.status().is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or("a redirect without Location")?
                    .to_string();
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
        let mut outcome = Outcome {
            redirect: location.clone(),
            callback_status: None,
            callback_body: None,
            saw_role_page,
        };
        if script.follow_callback {
            let response = self
                .http
                .get(&location)
                .send()
                .await
                .map_err(|e| e.to_string())?;
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
