//! wbctl's man pages and shell completions, generated from its clap definitions (the hidden
//! `wbctl generate-docs` subcommand, run by `make deb`), so that they never drift from the
//! options the binary really takes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Section 8: wbctl is an administrator's command (it is installed in /usr/sbin).
pub const MAN_SECTION: &str = "8";

/// Writes `OUT/man/wbctl.8`, one `wbctl-SUB.8` per visible subcommand, and
/// `OUT/completions/{wbctl.bash,_wbctl,wbctl.fish}`; returns every file written. Hidden
/// subcommands get no page, but clap_complete offers them: leave them out of `cmd`.
pub fn generate(cmd: Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    // `help` is clap's own subcommand: it would get a page and a completion of its own.
    let mut cmd = cmd.disable_help_subcommand(true);
    // build() gives subcommands their display names ("wbctl-create"), the pages' names.
    cmd.build();
    let mut written = man_pages(&cmd, &out.join("man"))?;
    written.extend(completions(&mut cmd, &out.join("completions"))?);
    Ok(written)
}

fn man_pages(cmd: &Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let source = format!("wbctl {}", cmd.get_version().unwrap_or_default());
    let mut written = Vec::new();
    let visible = cmd.get_subcommands().filter(|s| !s.is_hide_set());
    for page in std::iter::once(cmd).chain(visible) {
        let man = clap_mangen::Man::new(page.clone())
            .section(MAN_SECTION)
            .source(source.clone())
            .manual("System Administration");
        written.push(man.generate_to(dir)?);
    }
    Ok(written)
}

fn completions(cmd: &mut Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let name = cmd.get_name().to_string();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| clap_complete::generate_to(shell, cmd, &name, dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn sample() -> Command {
        Command::new("wbctl")
            .version("9.8.7")
            .subcommand(
                Command::new("status")
                    .about("Show devices")
                    .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn writes_a_page_per_visible_subcommand_and_three_completions() {
        let out = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = generate(sample(), out.path())
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(out.path()).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "completions/_wbctl",
                "completions/wbctl.bash",
                "completions/wbctl.fish",
                "man/wbctl-status.8",
                "man/wbctl.8",
            ]
        );
        let page = fs::read_to_string(out.path().join("man/wbctl-status.8")).unwrap();
        assert!(
            page.starts_with(".ie \\n(.g .ds Aq"),
            "not roff: {page:.80}"
        );
        assert!(page.contains(".TH wbctl-status 8"), "{page}");
        assert!(page.contains("wbctl 9.8.7"), "{page}");
        assert!(page.contains("\\-\\-json"), "{page}");
        let bash = fs::read_to_string(out.path().join("completions/wbctl.bash")).unwrap();
        assert!(bash.contains("complete -F _wbctl"), "{bash}");
        let offered: Vec<&str> = bash.lines().filter(|l| l.contains("opts=\"")).collect();
        assert!(offered.iter().any(|l| l.contains("status")), "{bash}");
    }
}
