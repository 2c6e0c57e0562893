//! The `sluice` binary: parses the command line and hands over to `cli`.
#![forbid(unsafe_code)]

use clap::Parser;
use sluice::cli::{self, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let code = match cli.command.unwrap_or(Command::Run(cli::RunArgs::default())) {
        Command::Check(args) => match args.path() {
            Some(file) => cli::check(file, &mut out, &mut err),
            None => 2,
        },
        Command::Explain(args) => cli::explain(&args, &mut out, &mut err),
        Command::Run(args) => cli::run(&args, &mut err),
        Command::Health(args) => cli::health(&args, &mut out, &mut err),
    };
    std::process::exit(code);
}
