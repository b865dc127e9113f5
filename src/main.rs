//! The `amibake` binary: parse the arguments and hand them to the command's own file in
//! `cli/`, which calls the library and prints the outcome once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::Cli;

fn main() -> ExitCode {
    // The sandboxed children fork, so they run before any runtime thread exists.
    if cli::internal::requested(std::env::args_os()) {
        return exit_code(cli::internal::run(cli::internal::Internal::parse()));
    }
    let cli = Cli::parse();
    amibake::aws::ebs::map_blocks_apart();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit_code(amibake::exit::BUILD_FAILED);
        }
    };
    exit_code(runtime.block_on(cli::dispatch(cli)))
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
