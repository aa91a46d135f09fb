//! Opening the sign-in's start URL: `$BROWSER` when set (the xdg convention: the address as its one
//! argument, or in place of `%s`), else the OS default browser; `--no-browser` prints the URL for the
//! person to open.
//!
//! A browser's command line can be read by every user of the computer (`/proc/PID/cmdline`), so a
//! started browser is not given the start URL itself: it is given a page in a file only this user can
//! read (0600, removed when the sign-in ends) that sends it on to the start URL — as Jupyter does with
//! its tokens.

use std::process::Stdio;
use std::sync::Arc;

#[derive(Clone)]
pub enum Browser {
    /// `$BROWSER`, else the OS default.
    System,
    /// A given command line (what `$BROWSER` holds).
    Command(String),
    /// Print the URL on stdout for a person to open (`--no-browser`).
    Print,
    /// Hand the URL to code (tests, the desktop app).
    Callback(Arc<dyn Fn(&str) + Send + Sync>),
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Browser::System => f.write_str("System"),
            Browser::Command(c) => write!(f, "Command({c:?})"),
            Browser::Print => f.write_str("Print"),
            Browser::Callback(_) => f.write_str("Callback"),
        }
    }
}

impl Browser {
    /// What the agent uses: `--no-browser` → print; `$BROWSER` set → that; else the OS default.
    pub fn from_env(no_browser: bool) -> Browser {
        if no_browser {
            return Browser::Print;
        }
        match std::env::var("BROWSER") {
            Ok(command) if !command.trim().is_empty() => Browser::Command(command),
            _ => Browser::System,
        }
    }

    /// Opens `url`; an error says what could not be started and that the URL can be opened by hand.
    /// Keep what it returns until the sign-in ends: it holds the page the browser was given.
    pub fn open(&self, url: &str) -> Result<Opened, String> {
        match self {
            Browser::Print => {
                println!("To sign in, open this address in a browser: {url}");
                Ok(Opened { _page: None })
            }
            Browser::Callback(f) => {
                f(url);
                Ok(Opened { _page: None })
            }
            Browser::Command(_) | Browser::System => {
                let page = redirect_page(url)?;
                let address = url::Url::from_file_path(page.path())
                    .map_err(|()| "the sign-in page's path is not absolute".to_string())?;
                self.launch(address.as_str())?;
                Ok(Opened { _page: Some(page) })
            }
        }
    }

    /// Starts the browser on `address`.
    fn launch(&self, address: &str) -> Result<(), String> {
        let url = address;
        match self {
            Browser::Print | Browser::Callback(_) => Ok(()),
            Browser::Command(command) => {
                // xdg: a colon-separated list of commands; the first is used. On Windows the list is
                // separated by semicolons (as PATH is there): a colon is part of `C:\…`.
                let separator = if cfg!(windows) { ';' } else { ':' };
                let first = command.split(separator).next().unwrap_or(command).trim();
                let mut words: Vec<String> = first.split_whitespace().map(str::to_string).collect();
                if words.is_empty() {
                    return Err("$BROWSER is empty".into());
                }
                if words.iter().any(|w| w.contains("%s")) {
                    for w in &mut words {
                        *w = w.replace("%s", url);
                    }
                } else {
                    words.push(url.to_string());
                }
                spawn(&words[0], &words[1..])
            }
            Browser::System => {
                if let Ok(command) = std::env::var("BROWSER")
                    && !command.trim().is_empty()
                {
                    return Browser::Command(command).launch(url);
                }
                let (program, args): (&str, Vec<String>) = if cfg!(target_os = "macos") {
                    ("open", vec![url.into()])
                } else if cfg!(windows) {
                    (
                        "rundll32",
                        vec!["url.dll,FileProtocolHandler".into(), url.into()],
                    )
                } else {
                    ("xdg-open", vec![url.into()])
                };
                spawn(program, &args)
            }
        }
    }
}

/// What [`Browser::open`] gave a browser that must outlive the opening: the page it was sent to.
#[derive(Debug)]
pub struct Opened {
    _page: Option<tempfile::NamedTempFile>,
}

/// A page, in a new file only this user can read, that sends the browser on to `url`.
fn redirect_page(url: &str) -> Result<tempfile::NamedTempFile, String> {
    use std::io::Write;
    let escaped = url
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;");
    let mut page = tempfile::Builder::new()
        .prefix("cis2-signin-")
        .suffix(".html")
        .tempfile()
        .map_err(|e| format!("cannot write the sign-in page for the browser: {e}"))?;
    write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"0;url={escaped}\"><title>Signing in</title></head>\
<body><p><a href=\"{escaped}\">Continue to the Care Identity Service sign-in</a></p></body></html>"
    )
    .map_err(|e| format!("cannot write the sign-in page for the browser: {e}"))?;
    Ok(page)
}

fn spawn(program: &str, args: &[String]) -> Result<(), String> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start the browser ({program}: {e}); open the sign-in address by hand, or start the agent with --no-browser"))?;
    // Reap it whenever it ends, so no zombie is left behind.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}
