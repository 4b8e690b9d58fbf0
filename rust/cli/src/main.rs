//! `sparselm`: the native command line for boards without Python (a Raspberry Pi, say).
//!
//! `sparselm generate MODEL_DIR PROMPT`, `sparselm chat MODEL_DIR`, `sparselm info MODEL_DIR`,
//! with the options of the Python CLI (`python/sparselm/cli.py`). This file is the entry point
//! only: parse, dispatch, and turn every error into `sparselm: error: ...` on stderr with exit
//! code 2 (usage) or 1 (runtime). Nothing a user or a file supplies may panic; a panic is a bug
//! and is reported as one, without a backtrace.

mod args;
mod commands;
mod error;
mod stream;
mod template;
mod text;

use std::io::Write;
use std::process::ExitCode;

use args::{Command, PROG};
use error::CliError;

/// Weights and the KV cache on transparent huge pages (see `sparselm_core::alloc`).
#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

fn run(argv: Vec<String>) -> Result<(), CliError> {
    match args::parse(&argv)? {
        Command::Help(text) => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
            out.flush()?;
            Ok(())
        }
        Command::Version => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{PROG} {}", env!("CARGO_PKG_VERSION"))?;
            out.flush()?;
            Ok(())
        }
        Command::Generate(a) => commands::generate(a),
        Command::Chat(a) => commands::chat(a),
        Command::Info(a) => commands::info(a),
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        commands::note(&format!(
            "{PROG}: internal error (this is a bug; please report it): {info}"
        ));
    }));
    let mut argv = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => argv.push(s),
            Err(bad) => {
                commands::note(&format!(
                    "{PROG}: error: argument {bad:?} is not valid UTF-8"
                ));
                return ExitCode::from(2);
            }
        }
    }
    match run(argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, CliError::BrokenPipe) {
                commands::note(&format!("{PROG}: error: {e}"));
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
