//! The Linux launcher's logic (the `cis2-agent` program): hand a second launch to the running app,
//! else start the app. Shared by path with the library, whose tests hold the options it knows to
//! the app's own.

#[path = "handoff.rs"]
mod handoff;

use std::ffi::OsString;
use std::path::PathBuf;

/// The app the launcher starts: this program's file name with this suffix, in the same folder.
pub const APP_SUFFIX: &str = "-app";

/// Whether a running app would take these arguments as they are: only the app's own options, each
/// with its value. Anything else (`--help`, `--version`, a mistake) goes to the app, which answers
/// it as it always has, rather than opening the running app's window.
pub fn only_launch_options(args: &[OsString]) -> bool {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str() else {
            return false;
        };
        match arg {
            "--sandbox" | "--no-browser" | "--minimized" => {}
            "--config" | "--socket" => {
                if args.next().is_none() {
                    return false;
                }
            }
            _ if arg.starts_with("--config=") || arg.starts_with("--socket=") => {}
            _ => return false,
        }
    }
    true
}

/// Where the app is: beside this program.
pub fn app_path(launcher: PathBuf) -> PathBuf {
    let mut name = launcher.file_name().unwrap_or_default().to_os_string();
    name.push(APP_SUFFIX);
    launcher.with_file_name(name)
}

/// Hands over to the running app, or becomes the app.
pub fn run() {
    use std::os::unix::process::CommandExt;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if only_launch_options(&args) && handoff::to_running_app() {
        return;
    }
    let launcher = std::env::current_exe().unwrap_or_else(|_| "cis2-agent".into());
    let app = app_path(launcher);
    let mut command = std::process::Command::new(&app);
    // The name the person ran, so the app's usage and errors say `cis2-agent` as they always have.
    command
        .arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "cis2-agent".into()),
        )
        .args(&args);
    // The app would start itself again for this (see `shell::start_again_without_gl`): set here,
    // it is one start instead of two.
    if std::env::var_os("GDK_GL").is_none_or(|v| v.is_empty()) {
        command.env("GDK_GL", "disable");
    }
    let error = command.exec();
    eprintln!("cis2-agent: could not start {}: {error}", app.display());
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    /// Each option of the app, as a person would write it, is one the launcher hands over: an
    /// option added to the app but not here would otherwise start the app to answer it.
    #[test]
    fn every_option_of_the_app_is_handed_over() {
        let command = cis2_agent_app::command();
        let mut seen = 0;
        for option in command.get_arguments() {
            let Some(long) = option.get_long() else {
                continue;
            };
            if option.is_hide_set() || matches!(long, "help" | "version") {
                continue;
            }
            seen += 1;
            let takes_value = option.get_action().takes_values();
            let written = if takes_value {
                args(&[&format!("--{long}"), "/some/path"])
            } else {
                args(&[&format!("--{long}")])
            };
            assert!(only_launch_options(&written), "--{long} is not handed over");
            if takes_value {
                assert!(only_launch_options(&args(&[&format!(
                    "--{long}=/some/path"
                )])));
                assert!(
                    !only_launch_options(&args(&[&format!("--{long}")])),
                    "--{long} without its value"
                );
            }
        }
        assert_eq!(
            seen, 5,
            "the app's options changed: check the launcher knows them"
        );
        assert!(only_launch_options(&[]));
    }

    #[test]
    fn what_only_the_app_answers_is_not_handed_over() {
        for words in [
            &["--help"][..],
            &["-h"],
            &["--version"],
            &["-V"],
            &["--window"],
            &["--minimised"],
            &["--sandbox", "extra"],
        ] {
            assert!(!only_launch_options(&args(words)), "{words:?}");
        }
        // The app's own parser agrees that these are mistakes or questions, not a launch.
        for words in [&["--minimised"][..], &["--sandbox", "extra"], &["--config"]] {
            let argv = std::iter::once("cis2-agent").chain(words.iter().copied());
            assert!(
                cis2_agent_app::command()
                    .try_get_matches_from(argv)
                    .is_err(),
                "{words:?}"
            );
        }
    }

    #[test]
    fn the_app_is_beside_the_launcher() {
        assert_eq!(
            app_path(PathBuf::from("/usr/bin/cis2-agent")),
            PathBuf::from("/usr/bin/cis2-agent-app")
        );
    }
}
