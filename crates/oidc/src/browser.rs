//! Opening the authorize URL: `$BROWSER` when set (the xdg convention: the URL as its one argument, or in
//! place of `%s`), else the OS default browser; `--no-browser` prints the URL for the person to open.

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
    pub fn open(&self, url: &str) -> Result<(), String> {
        match self {
            Browser::Print => {
                println!("To sign in, open this address in a browser: {url}");
                Ok(())
            }
            Browser::Callback(f) => {
                f(url);
                Ok(())
            }
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
                    return Browser::Command(command).open(url);
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
