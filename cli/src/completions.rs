//! `meshca completions SHELL` and `meshca man`: generated from the clap command, so every
//! subcommand, including ones added later, is in them without a list to keep up to date.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// `meshca completions` arguments.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, powershell or elvish.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `meshca man` arguments.
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write meshca.1 and one page per subcommand (meshca-issue.1, meshca-ca-list.1, ...)
    /// into DIR instead of printing meshca.1 on stdout.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// The clap command of the whole CLI, as the completions and man pages see it.
fn command() -> clap::Command {
    crate::Cli::command()
}

/// The completion script for `shell`.
pub fn completion_script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "meshca", &mut out);
    out
}

/// Every man page: `(file name, roff)`, meshca.1 first, then each subcommand's page.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        let mut page = Vec::new();
        man.render(&mut page)?;
        out.push((man.get_filename(), page));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out)?;
        }
        Ok(())
    }
    // Built once so that each subcommand knows its full name (`meshca-ca-list`).
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, &mut out)?;
    Ok(out)
}

pub fn run_completions(a: CompletionsArgs) -> anyhow::Result<()> {
    std::io::stdout()
        .lock()
        .write_all(&completion_script(a.shell))?;
    Ok(())
}

pub fn run_man(a: ManArgs) -> anyhow::Result<()> {
    let pages = man_pages()?;
    let Some(dir) = a.out_dir else {
        std::io::stdout().lock().write_all(&pages[0].1)?;
        return Ok(());
    };
    if !dir.exists() {
        std::fs::create_dir_all(&dir)?;
    }
    for (name, page) in &pages {
        let path = dir.join(name);
        meshca::fsutil::write_atomic(&path, page, meshca::fsutil::PUBLIC_MODE)?;
        println!("wrote {}", Path::new(&path).display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every visible subcommand, as its path of names (`["ca", "list"]`), from the clap
    /// command itself: a subcommand added later is checked without editing this test.
    fn subcommand_paths(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            subcommand_paths(sub, &path, out);
            out.push(path);
        }
    }

    fn all_subcommands() -> Vec<Vec<String>> {
        let mut out = Vec::new();
        subcommand_paths(&command(), &[], &mut out);
        assert!(out.len() > 10, "the CLI has more subcommands than {out:?}");
        out
    }

    #[test]
    fn completions_name_every_subcommand_for_every_shell() {
        use clap::ValueEnum;
        for shell in clap_complete::Shell::value_variants() {
            let script = String::from_utf8(completion_script(*shell)).unwrap();
            for path in all_subcommands() {
                let leaf = path.last().unwrap();
                assert!(
                    script.contains(leaf.as_str()),
                    "{shell} completions lack `meshca {}`",
                    path.join(" ")
                );
            }
        }
    }

    #[test]
    fn bash_completions_know_each_subcommand_path() {
        // clap_complete's bash script has one case arm per command path:
        // `meshca__subcmd__ca__subcmd__list)`; a hyphen in a name is written as `__subcmd__`
        // too (`istio-ca serve`: `meshca__subcmd__istio__subcmd__ca__subcmd__serve)`).
        let script = String::from_utf8(completion_script(clap_complete::Shell::Bash)).unwrap();
        for path in all_subcommands() {
            let names: Vec<String> = path.iter().map(|p| p.replace('-', "__subcmd__")).collect();
            let arm = format!("meshca__subcmd__{})", names.join("__subcmd__"));
            assert!(script.contains(&arm), "bash completions lack {arm}");
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let pages = man_pages().unwrap();
        assert_eq!(pages[0].0, "meshca.1");
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.starts_with(".ie \\n(.g .ds Aq"), "roff: {}", &top[..80]);
        assert!(top.contains(".TH meshca 1"), "{}", &top[..200]);
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for path in all_subcommands() {
            let file = format!("meshca-{}.1", path.join("-"));
            assert!(
                names.contains(&file.as_str()),
                "no man page {file} in {names:?}"
            );
            if path.len() == 1 {
                // The top page's SUBCOMMANDS section names each top-level command.
                assert!(
                    top.contains(&format!("meshca\\-{}(1)", path[0].replace('-', "\\-"))),
                    "meshca.1 does not list {}",
                    path[0]
                );
            }
        }
    }
}
