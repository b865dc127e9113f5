//! `amibake completions SHELL` and `amibake man`: shell completions and a man page, made
//! from the same clap definitions as the commands themselves, so they cannot drift.

use clap::{Args, CommandFactory};

use amibake::exit;

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn completions(args: CompletionsArgs) -> i32 {
    let mut command = Cli::command();
    clap_complete::generate(args.shell, &mut command, "amibake", &mut std::io::stdout());
    exit::OK
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write a page for amibake and one for each command (amibake-bake.1, …) into this
    /// directory, instead of amibake's own page on standard output.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

/// The man pages, in roff.
pub fn man(args: ManArgs) -> i32 {
    let written = match &args.dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => exit::OK,
        Err(e) => {
            let place = args
                .dir
                .as_ref()
                .map_or("standard output".into(), |d| d.display().to_string());
            eprintln!("error: cannot write the man pages to {place}: {e}");
            exit::BUILD_FAILED
        }
    }
}
