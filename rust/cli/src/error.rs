//! The CLI's error type and its exit codes: 2 for usage errors (bad options, arguments the
//! engine rejects), 1 for runtime errors (missing or malformed model files, a prompt that does
//! not fit), 141 when standard output was closed (`| head`), like other Unix tools, 130 for
//! Ctrl-C.

use std::fmt;

use crate::args::UsageError;

#[derive(Debug)]
pub enum CliError {
    Usage(String),
    Runtime(String),
    /// The reader of standard output went away: stop quietly.
    BrokenPipe,
    /// Ctrl-C stopped the work (where the CLI catches it: a reply of an interactive chat).
    Interrupted,
}

impl CliError {
    pub fn runtime(msg: impl Into<String>) -> CliError {
        CliError::Runtime(msg.into())
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
            CliError::BrokenPipe => 141,
            CliError::Interrupted => 130,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Runtime(m) => f.write_str(m),
            CliError::BrokenPipe => f.write_str("standard output was closed"),
            CliError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl From<UsageError> for CliError {
    fn from(e: UsageError) -> Self {
        CliError::Usage(e.0)
    }
}

/// Core errors: an invalid argument is a usage error (as `InvalidArgumentError` is in the
/// Python CLI); everything else (files, shapes, context) is a runtime error.
impl From<sparselm_core::Error> for CliError {
    fn from(e: sparselm_core::Error) -> Self {
        match e {
            sparselm_core::Error::Argument(m) => CliError::Usage(m),
            sparselm_core::Error::Interrupted => CliError::Interrupted,
            e => CliError::Runtime(e.to_string()),
        }
    }
}

/// Errors writing to standard output.
impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::Runtime(format!("cannot write to standard output: {e}"))
        }
    }
}
