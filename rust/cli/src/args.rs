//! Command-line parsing for `sparselm generate | chat | info`, written by hand (no dependency).
//!
//! Owns the option names (they mirror the Python CLI and the keywords of `generate()`), the help
//! texts and the validation of option values. Parsing is pure: it never reads files or standard
//! input and never loads a model, so every usage error (exit code 2) surfaces before any work.
//! Sampling values are checked with the core's own `SamplingParams::validate`, so the CLI cannot
//! accept a value the engine would refuse.

use std::path::PathBuf;

use sparselm_core::{parse_dtype, Error as CoreError, SamplingParams};

pub const PROG: &str = "sparselm";

/// A usage problem: the message for `sparselm: error: ...`, exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Print a help text (the top-level one or a subcommand's).
    Help(String),
    Version,
    Generate(GenerateArgs),
    Chat(ChatArgs),
    Info(InfoArgs),
}

/// Where the model comes from and how it is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOpts {
    pub dir: PathBuf,
    /// `auto`, `f32`, `f16` or `bf16` (checked with the core's `parse_dtype`).
    pub dtype: String,
    /// Worker threads; 0: one per physical core.
    pub threads: usize,
    /// Positions of the KV cache; None: the model's context length.
    pub max_seq: Option<usize>,
}

/// Generation options; `None` fields fall back to generation_config.json, then to greedy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenOpts {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// Stop strings, already unescaped (`\n`, `\t`, `\r`, `\\`).
    pub stop: Vec<String>,
    /// Also print MLP sparsity and timings.
    pub stats: bool,
    /// Print no statistics at all.
    pub quiet: bool,
}

/// Where the prompt of `generate` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    /// `-`: read standard input.
    Stdin,
    /// Not given: standard input if it is not a terminal, else a usage error.
    Missing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateArgs {
    pub model: ModelOpts,
    pub gen: GenOpts,
    pub prompt: Prompt,
    /// Wrap the prompt in the chat template as a user message.
    pub chat: bool,
    /// System message (implies `chat`).
    pub system: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatArgs {
    pub model: ModelOpts,
    pub gen: GenOpts,
    pub system: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InfoArgs {
    pub model: ModelOpts,
    pub json: bool,
}

pub const HELP: &str = "\
sparselm: run PLM-architecture language models (MLA + squared-ReLU MLP) on CPUs.

usage: sparselm COMMAND [options]

commands:
  generate   continue a prompt, streaming the text
  chat       interactive multi-turn chat (one user message per line)
  info       show the model's config, dtype, kernel tier and size

options:
  -h, --help     show this help (or 'sparselm COMMAND --help')
  -V, --version  show the version

Exit codes: 0 success, 1 runtime error (bad model files, ...), 2 usage error.";

const MODEL_HELP: &str = "\
model:
  -m, --model PATH      model directory (alternative to the MODEL_DIR argument)
  --dtype DTYPE         weight format in memory: auto, f32, f16, bf16, q8_0, q4_0
                        (default: auto)
  --threads N           worker threads (default: one per physical core)
  --max-seq N           context length of the KV cache (default: the model's
                        max_position_embeddings)";

const GEN_HELP: &str = "\
generation (defaults: the model's generation_config.json, else greedy):
  --max-new-tokens N    at most N new tokens (default 256)
  --temperature T       0 = greedy; > 0 samples
  --top-k K             keep the K most likely tokens (0: off)
  --top-p P             nucleus sampling mass (1: off)
  --min-p P             min probability ratio (0: off)
  --repetition-penalty R  penalty on repeats (1: off)
  --seed S              sampler seed (reproducible sampling)
  --stop TEXT           stop string, repeatable; the output is cut right before it;
                        \\n, \\t, \\r and \\\\ are unescaped

output:
  --stats               also print MLP sparsity and detailed timings
  -q, --quiet           print no statistics on stderr
  -h, --help            show this help";

const GENERATE_HEAD: &str = "\
usage: sparselm generate [options] MODEL_DIR [PROMPT]

Continue PROMPT and print the completion as it is generated (statistics go to stderr).
PROMPT '-', or no PROMPT with standard input not a terminal, reads the prompt from standard
input. A prompt starting with '-' is read as one when it holds a space or is a number
('-5 degrees', '-5'); otherwise put '--' before it.

  --chat                wrap PROMPT in the chat template as a user message
  --system TEXT         system message (implies --chat)";

const CHAT_HEAD: &str = "\
usage: sparselm chat [options] MODEL_DIR

Chat with the model: one user message per line on standard input; each reply is streamed to
standard output. Commands: /reset (forget the conversation), /exit (or end of input), /help.
The conversation is re-rendered with the model's chat template every turn and the cached
prefix of the KV cache is reused, so only the new turn is computed.

  --system TEXT         system message of the conversation";

const INFO_HEAD: &str = "\
usage: sparselm info [options] MODEL_DIR

Load the model and show its config, parameter count, dtype, kernel tier, weight bytes,
tokenizer and generation defaults.

  --json                print one JSON object
  -h, --help            show this help";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Generate,
    Chat,
    Info,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Generate => "generate",
            Sub::Chat => "chat",
            Sub::Info => "info",
        }
    }

    /// The help text of this subcommand.
    fn help(self) -> String {
        match self {
            Sub::Generate => format!("{GENERATE_HEAD}\n\n{MODEL_HELP}\n\n{GEN_HELP}"),
            Sub::Chat => format!("{CHAT_HEAD}\n\n{MODEL_HELP}\n\n{GEN_HELP}"),
            Sub::Info => format!("{INFO_HEAD}\n\n{MODEL_HELP}"),
        }
    }
}

/// Options with a value that every command takes.
const MODEL_OPTIONS: [&str; 4] = ["--model", "--dtype", "--threads", "--max-seq"];
/// Options with a value of `generate` and `chat`.
const GEN_OPTIONS: [&str; 9] = [
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--seed",
    "--stop",
    "--system",
];
/// Flags of `generate` and `chat`.
const GEN_FLAGS: [&str; 2] = ["--stats", "--quiet"];

/// Everything a subcommand's options can set, before the per-command assembly.
#[derive(Default)]
struct Raw {
    model: Option<String>,
    dtype: Option<String>,
    threads: Option<usize>,
    max_seq: Option<usize>,
    gen: GenOpts,
    chat: bool,
    system: Option<String>,
    json: bool,
    positionals: Vec<String>,
}

/// Parse the arguments after the program name.
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Command, UsageError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let Some((&first, rest)) = args.split_first() else {
        return Err(UsageError(
            "a COMMAND is required: generate, chat or info (see 'sparselm --help')".into(),
        ));
    };
    let sub = match first {
        "-h" | "--help" | "help" => return Ok(Command::Help(HELP.to_string())),
        "-V" | "--version" => return Ok(Command::Version),
        "generate" => Sub::Generate,
        "chat" => Sub::Chat,
        "info" => Sub::Info,
        other if other.starts_with('-') => {
            return Err(UsageError(format!(
                "unknown option '{other}' before the COMMAND (expected generate, chat or info; \
                 see 'sparselm --help')"
            )))
        }
        other => {
            return Err(UsageError(format!(
                "unknown command '{other}' (expected generate, chat or info; see 'sparselm --help')"
            )))
        }
    };
    let Some(raw) = parse_options(sub, rest)? else {
        return Ok(Command::Help(sub.help()));
    };
    assemble(sub, raw)
}

/// Parse a subcommand's options and positionals; `None` when `--help` was asked for.
fn parse_options(sub: Sub, args: &[&str]) -> Result<Option<Raw>, UsageError> {
    let cmd = sub.name();
    let mut raw = Raw::default();
    let mut i = 0;
    let mut only_positionals = false;
    while i < args.len() {
        let arg = args[i];
        i += 1;
        // As argparse (the Python CLI) reads them, text starting with '-' that holds a space or
        // is a number ("-5 degrees", "-5", "-.5") is a prompt, not an option.
        let text_like = arg.starts_with('-')
            && !arg.starts_with("--")
            && (arg.contains(' ') || negative_number(arg));
        if only_positionals || arg == "-" || !arg.starts_with('-') || text_like {
            raw.positionals.push(arg.to_string());
            continue;
        }
        if arg == "--" {
            only_positionals = true;
            continue;
        }
        // `--name=value`, `--name value`, or a short alias.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg, None),
        };
        let name = match name {
            "-h" => "--help",
            "-m" => "--model",
            "-q" => "--quiet",
            n => n,
        };
        let generates = matches!(sub, Sub::Generate | Sub::Chat);
        let takes_value =
            if MODEL_OPTIONS.contains(&name) || (generates && GEN_OPTIONS.contains(&name)) {
                true
            } else if name == "--help"
                || (generates && GEN_FLAGS.contains(&name))
                || (sub == Sub::Generate && name == "--chat")
                || (sub == Sub::Info && name == "--json")
            {
                false
            } else {
                return Err(UsageError(format!(
                    "{cmd}: unknown option '{name}' (see 'sparselm {cmd} --help')"
                )));
            };
        let value = if takes_value {
            match inline {
                Some(v) => v,
                None => {
                    let Some(&v) = args.get(i) else {
                        return Err(UsageError(format!("{cmd}: option {name} needs a value")));
                    };
                    i += 1;
                    v
                }
            }
        } else {
            if inline.is_some() {
                return Err(UsageError(format!("{cmd}: option {name} takes no value")));
            }
            ""
        };
        match name {
            "--help" => return Ok(None),
            "--model" => raw.model = Some(value.to_string()),
            "--dtype" => {
                // Unknown names are usage errors; a known name the loader cannot use (a dtype
                // not implemented) is reported by the loader as unsupported (exit 1).
                if let Err(e @ CoreError::Dtype(_)) = parse_dtype(value) {
                    return Err(UsageError(format!("{cmd}: --dtype: {e}")));
                }
                raw.dtype = Some(value.to_string());
            }
            "--threads" => {
                let n = positive(cmd, name, value)?;
                sparselm_core::cpu::resolve_threads(n)
                    .map_err(|why| UsageError(format!("{cmd}: --threads {why}")))?;
                raw.threads = Some(n);
            }
            "--max-seq" => raw.max_seq = Some(positive(cmd, name, value)?),
            "--max-new-tokens" => {
                raw.gen.max_new_tokens = Some(count(cmd, name, value, "an integer >= 0")?)
            }
            "--temperature" => raw.gen.temperature = Some(float(cmd, name, value)?),
            "--top-k" => {
                raw.gen.top_k = Some(count(cmd, name, value, "an integer >= 0 (0 disables it)")?)
            }
            "--top-p" => raw.gen.top_p = Some(float(cmd, name, value)?),
            "--min-p" => raw.gen.min_p = Some(float(cmd, name, value)?),
            "--repetition-penalty" => raw.gen.repetition_penalty = Some(float(cmd, name, value)?),
            "--seed" => raw.gen.seed = Some(int(cmd, name, value, "an integer in [0, 2^64)")?),
            "--stop" => {
                if value.is_empty() {
                    return Err(UsageError(format!(
                        "{cmd}: --stop strings must not be empty"
                    )));
                }
                raw.gen.stop.push(unescape(value));
            }
            "--system" => raw.system = Some(value.to_string()),
            "--stats" => raw.gen.stats = true,
            "--quiet" => raw.gen.quiet = true,
            "--chat" => raw.chat = true,
            "--json" => raw.json = true,
            _ => unreachable!("every accepted option is handled above"),
        }
    }
    check_sampling(cmd, &raw.gen)?;
    Ok(Some(raw))
}

fn assemble(sub: Sub, raw: Raw) -> Result<Command, UsageError> {
    let cmd = sub.name();
    let mut pos = raw.positionals.into_iter();
    let model_dir =
        |positional: Option<String>, option: Option<String>| -> Result<PathBuf, UsageError> {
            match (positional, option) {
                (Some(_), Some(_)) => Err(UsageError(format!(
                    "{cmd}: give the model either as MODEL_DIR or with --model, not both"
                ))),
                (Some(d), None) | (None, Some(d)) => Ok(PathBuf::from(d)),
                (None, None) => Err(UsageError(format!(
                "{cmd}: the MODEL_DIR argument is required (the native CLI has no bundled model)"
            ))),
            }
        };
    let n_pos = pos.len();
    let (dir, prompt) = match sub {
        Sub::Generate => {
            if n_pos > 2 {
                return Err(UsageError(format!(
                    "generate: expected MODEL_DIR [PROMPT], got {n_pos} arguments (quote the prompt)"
                )));
            }
            // One positional is the prompt when --model names the model, else the model.
            let first = if n_pos == 2 || raw.model.is_none() {
                pos.next()
            } else {
                None
            };
            let dir = model_dir(first, raw.model)?;
            let prompt = match pos.next() {
                Some(p) if p == "-" => Prompt::Stdin,
                Some(p) if p.is_empty() => {
                    return Err(UsageError("generate: the prompt is empty".into()))
                }
                Some(p) => Prompt::Text(p),
                None => Prompt::Missing,
            };
            (dir, prompt)
        }
        Sub::Chat | Sub::Info => {
            if n_pos > 1 {
                let extra: Vec<String> = pos.skip(1).collect();
                return Err(UsageError(format!(
                    "{cmd}: unexpected argument(s): {}",
                    extra.join(" ")
                )));
            }
            (model_dir(pos.next(), raw.model)?, Prompt::Missing)
        }
    };
    let model = ModelOpts {
        dir,
        dtype: raw.dtype.unwrap_or_else(|| "auto".into()),
        threads: raw.threads.unwrap_or(0),
        max_seq: raw.max_seq,
    };
    Ok(match sub {
        Sub::Generate => Command::Generate(GenerateArgs {
            model,
            gen: raw.gen,
            prompt,
            chat: raw.chat || raw.system.is_some(),
            system: raw.system,
        }),
        Sub::Chat => Command::Chat(ChatArgs {
            model,
            gen: raw.gen,
            system: raw.system,
        }),
        Sub::Info => Command::Info(InfoArgs {
            model,
            json: raw.json,
        }),
    })
}

/// Reject sampling values the engine would reject, before any file is touched.
fn check_sampling(cmd: &str, g: &GenOpts) -> Result<(), UsageError> {
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: g.temperature.unwrap_or(d.temperature),
        top_k: g.top_k.unwrap_or(d.top_k),
        top_p: g.top_p.unwrap_or(d.top_p),
        min_p: g.min_p.unwrap_or(d.min_p),
        repetition_penalty: g.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: g.seed,
    };
    p.validate().map_err(|e| UsageError(format!("{cmd}: {e}")))
}

fn int<T: std::str::FromStr>(cmd: &str, name: &str, v: &str, what: &str) -> Result<T, UsageError> {
    v.trim()
        .parse()
        .map_err(|_| UsageError(format!("{cmd}: {name} must be {what}, got '{v}'")))
}

/// A count below 2^63, the range Python's `GenerationConfig` accepts (the two CLIs agree).
fn count(cmd: &str, name: &str, v: &str, what: &str) -> Result<usize, UsageError> {
    let n: u64 = int(cmd, name, v, what)?;
    if n >= 1 << 63 {
        return Err(UsageError(format!(
            "{cmd}: {name} must be in [0, 2^63), got '{v}'"
        )));
    }
    usize::try_from(n).map_err(|_| UsageError(format!("{cmd}: {name} is too large, got '{v}'")))
}

/// argparse's negative-number pattern: `-` then digits, or digits, a point and digits
/// (`-5`, `-0.5`, `-.5`; not `-1e5` or `-inf`).
fn negative_number(arg: &str) -> bool {
    let Some(num) = arg.strip_prefix('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match num.split_once('.') {
        None => digits(num),
        Some((int, frac)) => (int.is_empty() || digits(int)) && digits(frac),
    }
}

fn positive(cmd: &str, name: &str, v: &str) -> Result<usize, UsageError> {
    match int::<usize>(cmd, name, v, "an integer >= 1")? {
        0 => Err(UsageError(format!(
            "{cmd}: {name} must be an integer >= 1, got '{v}'"
        ))),
        n => Ok(n),
    }
}

fn float(cmd: &str, name: &str, v: &str) -> Result<f32, UsageError> {
    match v.trim().parse::<f32>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(UsageError(format!(
            "{cmd}: {name} must be a finite number, got '{v}'"
        ))),
    }
}

/// Interpret `\n`, `\t`, `\r` and `\\` in a --stop value (shells make real newlines awkward).
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let rep = match chars.peek() {
                Some('n') => Some('\n'),
                Some('t') => Some('\t'),
                Some('r') => Some('\r'),
                Some('\\') => Some('\\'),
                _ => None,
            };
            if let Some(r) = rep {
                chars.next();
                out.push(r);
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Command {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Ok(c) => panic!("{args:?} parsed as {c:?}"),
            Err(e) => e.0,
        }
    }

    fn generate(args: &[&str]) -> GenerateArgs {
        match ok(args) {
            Command::Generate(g) => g,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn top_level() {
        assert_eq!(ok(&["--help"]), Command::Help(HELP.into()));
        assert_eq!(ok(&["-h"]), Command::Help(HELP.into()));
        assert_eq!(ok(&["--version"]), Command::Version);
        assert_eq!(ok(&["-V"]), Command::Version);
        assert!(err(&[]).contains("COMMAND is required"));
        assert!(err(&["frobnicate"]).contains("unknown command 'frobnicate'"));
        assert!(err(&["--frob"]).contains("unknown option '--frob'"));
    }

    #[test]
    fn subcommand_help() {
        let help = |args: &[&str]| match ok(args) {
            Command::Help(h) => h,
            c => panic!("{c:?}"),
        };
        assert!(help(&["generate", "--help"]).starts_with("usage: sparselm generate"));
        assert!(help(&["generate", "--help"]).contains("--max-new-tokens N"));
        assert!(help(&["chat", "-h"]).starts_with("usage: sparselm chat"));
        assert!(help(&["info", "m", "--help"]).contains("--json"));
        assert!(!help(&["info", "m", "--help"]).contains("--temperature"));
        // --help wins even when the rest would be incomplete or wrong.
        assert!(
            help(&["generate", "--help", "--top-k", "x"]).starts_with("usage: sparselm generate")
        );
    }

    #[test]
    fn generate_defaults() {
        let g = generate(&["generate", "/m", "Hello there"]);
        assert_eq!(g.model.dir, PathBuf::from("/m"));
        assert_eq!(g.model.dtype, "auto");
        assert_eq!(g.model.threads, 0);
        assert_eq!(g.model.max_seq, None);
        assert_eq!(g.prompt, Prompt::Text("Hello there".into()));
        assert_eq!(g.gen, GenOpts::default());
        assert!(!g.chat);
    }

    #[test]
    fn generate_every_option() {
        let g = generate(&[
            "generate",
            "--max-new-tokens",
            "12",
            "--temperature=0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--min-p",
            "0.05",
            "--repetition-penalty",
            "1.1",
            "--seed",
            "18446744073709551615",
            "--stop",
            "\\n\\n",
            "--stop=END",
            "--dtype",
            "bf16",
            "--threads",
            "2",
            "--max-seq",
            "512",
            "--stats",
            "-q",
            "/m",
            "hi",
            "--system",
            "be brief",
        ]);
        assert_eq!(g.gen.max_new_tokens, Some(12));
        assert_eq!(g.gen.temperature, Some(0.7));
        assert_eq!(g.gen.top_k, Some(40));
        assert_eq!(g.gen.top_p, Some(0.9));
        assert_eq!(g.gen.min_p, Some(0.05));
        assert_eq!(g.gen.repetition_penalty, Some(1.1));
        assert_eq!(g.gen.seed, Some(u64::MAX));
        assert_eq!(g.gen.stop, vec!["\n\n".to_string(), "END".to_string()]);
        assert!(g.gen.stats && g.gen.quiet);
        assert_eq!(g.model.dtype, "bf16");
        assert_eq!(g.model.threads, 2);
        assert_eq!(g.model.max_seq, Some(512));
        assert_eq!(g.system.as_deref(), Some("be brief"));
        assert!(g.chat, "--system implies --chat");
    }

    #[test]
    fn prompts() {
        assert_eq!(generate(&["generate", "/m", "-"]).prompt, Prompt::Stdin);
        assert_eq!(generate(&["generate", "/m"]).prompt, Prompt::Missing);
        assert_eq!(
            generate(&["generate", "/m", "--", "-5 degrees"]).prompt,
            Prompt::Text("-5 degrees".into())
        );
        // without `--` too, as argparse reads them: a space or a number makes it text
        for t in ["-5 degrees", "-5", "-0.5", "- x", "-x y"] {
            assert_eq!(
                generate(&["generate", "/m", t]).prompt,
                Prompt::Text(t.into()),
                "{t}"
            );
        }
        assert!(err(&["generate", "/m", "-x"]).contains("unknown option '-x'"));
        assert!(err(&["generate", "/m", "-inf"]).contains("unknown option"));
        assert!(err(&["generate", "/m", "-1e5"]).contains("unknown option"));
        assert_eq!(
            generate(&["generate", "/m", "-.5"]).prompt,
            Prompt::Text("-.5".into())
        );
        let g = generate(&["generate", "-m", "/m", "hi"]);
        assert_eq!(
            (g.model.dir, g.prompt),
            (PathBuf::from("/m"), Prompt::Text("hi".into()))
        );
        assert!(err(&["generate", "/m", "a", "b"]).contains("quote the prompt"));
        assert!(err(&["generate", "--model", "/m", "/n", "hi"]).contains("not both"));
        assert!(err(&["generate", "--model", "/m", "a", "b", "c"]).contains("got 3 arguments"));
        assert!(err(&["generate"]).contains("MODEL_DIR argument is required"));
        assert!(err(&["generate", "/m", ""]).contains("prompt is empty"));
    }

    #[test]
    fn chat_and_info() {
        match ok(&[
            "chat",
            "/m",
            "--system",
            "sys",
            "--temperature",
            "0.5",
            "--seed",
            "3",
        ]) {
            Command::Chat(c) => {
                assert_eq!(c.model.dir, PathBuf::from("/m"));
                assert_eq!(c.system.as_deref(), Some("sys"));
                assert_eq!(c.gen.temperature, Some(0.5));
                assert_eq!(c.gen.seed, Some(3));
            }
            c => panic!("{c:?}"),
        }
        match ok(&["info", "--json", "--dtype", "f16", "/m"]) {
            Command::Info(i) => assert!(i.json && i.model.dtype == "f16"),
            c => panic!("{c:?}"),
        }
        assert!(err(&["chat", "/m", "extra"]).contains("unexpected argument(s): extra"));
        assert!(err(&["chat", "-m", "/m", "/n"]).contains("not both"));
        assert!(err(&["chat", "/m", "/n", "/o"]).contains("unexpected argument(s): /n /o"));
        assert!(err(&["info"]).contains("MODEL_DIR argument is required"));
        assert!(err(&["info", "/m", "--model", "/n"]).contains("not both"));
    }

    #[test]
    fn options_belong_to_their_command() {
        assert!(err(&["info", "/m", "--temperature", "1"])
            .contains("info: unknown option '--temperature'"));
        assert!(err(&["chat", "/m", "--chat"]).contains("unknown option '--chat'"));
        assert!(err(&["generate", "/m", "x", "--json"]).contains("unknown option '--json'"));
        assert!(err(&["generate", "/m", "x", "--bogus=1"]).contains("unknown option '--bogus'"));
    }

    #[test]
    fn bad_values() {
        let cases: &[(&[&str], &str)] = &[
            (&["generate", "/m", "x", "--top-k"], "--top-k needs a value"),
            (
                &["generate", "/m", "x", "--top-k", "-1"],
                "--top-k must be an integer >= 0",
            ),
            (
                &["generate", "/m", "x", "--max-new-tokens", "many"],
                "--max-new-tokens must be an integer",
            ),
            (
                &["generate", "/m", "x", "--temperature", "hot"],
                "--temperature must be a finite number",
            ),
            (
                &["generate", "/m", "x", "--temperature", "nan"],
                "--temperature must be a finite number",
            ),
            (
                &["generate", "/m", "x", "--temperature", "-1"],
                "temperature must be",
            ),
            (
                &["generate", "/m", "x", "--top-p", "0"],
                "top_p must be in (0, 1]",
            ),
            (
                &["generate", "/m", "x", "--top-p", "1.5"],
                "top_p must be in (0, 1]",
            ),
            (
                &["generate", "/m", "x", "--min-p", "2"],
                "min_p must be in [0, 1]",
            ),
            (
                &["generate", "/m", "x", "--repetition-penalty", "0"],
                "repetition_penalty must be > 0",
            ),
            (
                &["generate", "/m", "x", "--seed", "-3"],
                "--seed must be an integer",
            ),
            (
                &["generate", "/m", "x", "--threads", "0"],
                "--threads must be an integer >= 1",
            ),
            (
                &["generate", "/m", "x", "--top-k", "9223372036854775808"],
                "--top-k must be in [0, 2^63)",
            ),
            (
                &[
                    "generate",
                    "/m",
                    "x",
                    "--max-new-tokens",
                    "18446744073709551615",
                ],
                "--max-new-tokens must be in [0, 2^63)",
            ),
            (
                &["generate", "/m", "x", "--threads", "100000"],
                "--threads 100000 is more than this machine can use",
            ),
            (
                &["generate", "/m", "x", "--max-seq", "0"],
                "--max-seq must be an integer >= 1",
            ),
            (
                &["generate", "/m", "x", "--dtype", "f64"],
                "unknown dtype 'f64'",
            ),
            (
                &["generate", "/m", "x", "--stop", ""],
                "--stop strings must not be empty",
            ),
            (
                &["generate", "/m", "x", "--stats=yes"],
                "--stats takes no value",
            ),
        ];
        for (args, want) in cases {
            let e = err(args);
            assert!(e.contains(want), "{args:?}: {e:?} lacks {want:?}");
            assert!(e.starts_with("generate: "), "{e}");
        }
        // Quantized dtypes are known names.
        assert_eq!(
            generate(&["generate", "/m", "x", "--dtype", "q8_0"])
                .model
                .dtype,
            "q8_0"
        );
    }

    #[test]
    fn unescapes_stop_strings() {
        assert_eq!(unescape(r"a\nb\tc\rd\\e"), "a\nb\tc\rd\\e");
        assert_eq!(unescape(r"\x\"), "\\x\\");
        assert_eq!(unescape(r"\\n"), "\\n");
        assert_eq!(unescape("héllo"), "héllo");
    }
}
