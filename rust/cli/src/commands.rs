//! The three commands: `generate`, `chat` and `info`.
//!
//! Owns what goes where: generated text to stdout as it is produced (flushed per piece), and
//! statistics, prompts of the interactive chat and errors to stderr. The numerics are the core's
//! `Session`; the text side is `text::TextModel`; this module only wires them together.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use sparselm_core::control::NEVER;
use sparselm_core::weights::tensor_table;
use sparselm_core::{parse_dtype, Control, Model, SamplingParams, Session};

use crate::args::{ChatArgs, GenOpts, GenerateArgs, InfoArgs, ModelOpts, Prompt};
use crate::error::CliError;
use crate::stream::{IncrementalDetokenizer, StopFilter};
use crate::template::{ChatTemplate, Message};
use crate::text::{GenDefaults, TextModel};

/// Write a line to stderr; a closed stderr is not worth failing over.
pub fn note(msg: &str) {
    let _ = writeln!(io::stderr(), "{msg}");
}

/// The settings of one generation: the model's defaults overridden by the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub max_length: Option<usize>,
    pub stop: Vec<String>,
}

impl RunConfig {
    /// Apply the options that were given; an explicit --max-new-tokens also clears the
    /// `max_length` of generation_config.json, as in transformers.
    pub fn resolve(d: &GenDefaults, o: &GenOpts) -> Result<RunConfig, CliError> {
        let mut p = d.params.clone();
        p.temperature = o.temperature.unwrap_or(p.temperature);
        p.top_k = o.top_k.unwrap_or(p.top_k);
        p.top_p = o.top_p.unwrap_or(p.top_p);
        p.min_p = o.min_p.unwrap_or(p.min_p);
        p.repetition_penalty = o.repetition_penalty.unwrap_or(p.repetition_penalty);
        p.seed = o.seed.or(p.seed);
        p.validate()?;
        Ok(RunConfig {
            params: p,
            max_new_tokens: o.max_new_tokens.unwrap_or(d.max_new_tokens),
            max_length: if o.max_new_tokens.is_some() {
                None
            } else {
                d.max_length
            },
            stop: if o.stop.is_empty() {
                d.stop.clone()
            } else {
                o.stop.clone()
            },
        })
    }

    /// `max_new_tokens`, further limited by `max_length` for a prompt of this length.
    pub fn max_new_for(&self, prompt_len: usize) -> usize {
        match self.max_length {
            None => self.max_new_tokens,
            Some(ml) => self.max_new_tokens.min(ml.saturating_sub(prompt_len)),
        }
    }
}

/// What one generation produced.
#[derive(Debug)]
pub struct TurnOutcome {
    /// The text written to stdout (cut before any stop string).
    pub text: String,
    pub prompt_tokens: usize,
    /// Ids returned by the session (including any past a stop string's start).
    pub completion_tokens: usize,
    /// stop | length | context | stop_string
    pub finish: &'static str,
}

fn check_dir(dir: &Path) -> Result<(), CliError> {
    if dir.as_os_str().is_empty() {
        Err(CliError::Usage(
            "the model directory path must not be empty".into(),
        ))
    } else if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(CliError::runtime(format!(
            "{}: not a directory (expected a model directory)",
            dir.display()
        )))
    } else {
        Err(CliError::runtime(format!(
            "{}: model directory not found",
            dir.display()
        )))
    }
}

/// Load the weights (after the cheap checks, so mistakes show before a long load). On a
/// terminal, unless `quiet`, a load that takes over a second shows its progress on stderr.
fn load_model(m: &ModelOpts, quiet: bool) -> Result<Arc<Model>, CliError> {
    let dtype = parse_dtype(&m.dtype)?;
    let model = if quiet || !io::stderr().is_terminal() {
        Model::load(&m.dir, dtype, m.threads)?
    } else {
        let dir = std::fs::canonicalize(&m.dir).unwrap_or_else(|_| m.dir.clone());
        let name = dir.file_name().unwrap_or(dir.as_os_str()).to_string_lossy();
        let ctl = Control::new();
        let t0 = std::time::Instant::now();
        let mut shown = None;
        let loaded = std::thread::scope(|s| {
            let waiter = std::thread::current();
            let ctl = &ctl;
            let worker = s.spawn(move || {
                let r = Model::load_with(&m.dir, dtype, m.threads, ctl);
                waiter.unpark();
                r
            });
            while !worker.is_finished() {
                std::thread::park_timeout(std::time::Duration::from_millis(100));
                let now = ctl.progress();
                if t0.elapsed().as_secs_f64() >= 1.0 && shown != Some(now) {
                    let _ = write!(io::stderr(), "{}", load_line(&name, now.0, now.1));
                    shown = Some(now);
                }
            }
            worker.join()
        });
        if shown.is_some() {
            let _ = write!(io::stderr(), "\r\x1b[K"); // erase the line
        }
        match loaded {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    };
    if let Some(n) = m.max_seq {
        let ctx = model.config.max_position_embeddings;
        if n > ctx {
            return Err(CliError::Usage(format!(
                "--max-seq {n} exceeds the model's context of {ctx} positions (max_position_embeddings)"
            )));
        }
    }
    Ok(Arc::new(model))
}

/// The progress line of a load (drawn over itself with `\r`).
fn load_line(name: &str, done: usize, total: usize) -> String {
    let pct = (100 * done).checked_div(total).unwrap_or(0);
    format!("\rloading {name}: {done}/{total} tensors ({pct}%)")
}

/// Positions a session of this command may use.
fn context_length(model: &Model, m: &ModelOpts) -> usize {
    m.max_seq.unwrap_or(model.config.max_position_embeddings)
}

/// Tokenize a prompt and check it fits the model.
/// The tokenizer must fit the model's embedding (as Python's `load()` checks): a tokenizer.json
/// of another model would otherwise run until a prompt or a sampled id falls outside it.
fn check_vocab(text: &TextModel, model: &Model) -> Result<(), CliError> {
    let v = model.config.vocab_size;
    let (n, max_id) = (text.vocab_size(), text.max_token_id());
    if n > v || max_id.is_some_and(|m| m as usize >= v) {
        return Err(CliError::runtime(format!(
            "the tokenizer in {} has {n} tokens (largest id {}) but the model's vocab_size is \
             {v}: tokenizer.json does not belong to this model",
            text.dir().display(),
            max_id.map_or("none".to_string(), |m| m.to_string()),
        )));
    }
    Ok(())
}

fn encode_prompt(text: &TextModel, model: &Model, prompt: &str) -> Result<Vec<u32>, CliError> {
    let ids = text.encode(prompt)?;
    if ids.is_empty() {
        return Err(CliError::Usage(
            "the prompt is empty (it encodes to no tokens)".into(),
        ));
    }
    let v = model.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= v) {
        return Err(CliError::runtime(format!(
            "the tokenizer produced id {bad}, but the model has only {v} embedding rows (vocab_size); \
             tokenizer.json does not belong to this model"
        )));
    }
    Ok(ids)
}

/// Run one generation on `session`, streaming text to `out`. A stop request on `ctl` ends
/// the prompt between layers (`CliError::Interrupted`, nothing of it cached) or the reply
/// before its next token (finish "interrupted", the text so far returned).
pub fn run_turn(
    session: &mut Session,
    text: &TextModel,
    ids: &[u32],
    cfg: &RunConfig,
    out: &mut impl Write,
    ctl: &Control,
) -> Result<TurnOutcome, CliError> {
    let max_new = cfg.max_new_for(ids.len());
    session.start_with(ids, cfg.params.clone(), max_new, &text.stop_ids, ctl)?;
    let mut detok = IncrementalDetokenizer::new();
    let mut stopper = StopFilter::new(&cfg.stop);
    let mut decode = |w: &[u32]| text.decode(w);
    let mut emitted = String::new();
    let mut emit = |piece: &str, emitted: &mut String| -> Result<(), CliError> {
        if !piece.is_empty() {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            emitted.push_str(piece);
        }
        Ok(())
    };
    let mut completion = 0;
    let mut interrupted = false;
    loop {
        if ctl.stop_requested() {
            interrupted = true;
            break;
        }
        let Some(tok) = session.next_token()? else {
            break;
        };
        completion += 1;
        let piece = detok.push(tok, &mut decode)?;
        emit(&stopper.push(&piece), &mut emitted)?;
        if stopper.stopped() {
            break;
        }
    }
    // An interrupted reply ends with what was shown: text held back as a possible start of a
    // stop string, or an unfinished character, is dropped (as the Python CLI does).
    if !stopper.stopped() && !interrupted {
        let tail = detok.flush(&mut decode)?;
        let mut rest = stopper.push(&tail);
        rest.push_str(&stopper.flush());
        emit(&rest, &mut emitted)?;
    }
    let finish = if stopper.stopped() {
        "stop_string"
    } else if interrupted {
        "interrupted"
    } else {
        // Every exit of the loop above without a stop string has a finish reason.
        session.finish_reason().map_or("cancelled", |r| r.name())
    };
    Ok(TurnOutcome {
        text: emitted,
        prompt_tokens: ids.len(),
        completion_tokens: completion,
        finish,
    })
}

/// The statistics lines of the last generation (without brackets).
pub fn stats_lines(session: &Session, o: &TurnOutcome, detailed: bool) -> Vec<String> {
    let s = session.stats();
    let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let evaluated = if s.prompt_tokens != o.prompt_tokens {
        format!(" ({} evaluated)", s.prompt_tokens)
    } else {
        String::new()
    };
    let mut lines = vec![format!(
        "prompt: {} tokens{evaluated}, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {}",
        o.prompt_tokens,
        rate(s.prompt_tokens, s.prompt_seconds),
        o.completion_tokens,
        rate(s.decode_tokens, s.decode_seconds),
        o.finish
    )];
    if detailed {
        let st = session.state();
        lines.push(match st.sparsity() {
            Some(x) => format!("mlp sparsity: {:.1}% of ReLU² neurons are zero", 100.0 * x),
            None => "mlp sparsity: n/a".into(),
        });
        let layers = st.layer_sparsity();
        if !layers.is_empty() {
            let parts: Vec<String> = layers
                .iter()
                .map(|x| format!("{:.0}%", 100.0 * x))
                .collect();
            lines.push(format!("layer sparsity: {}", parts.join(" ")));
        }
        if let Some(skipped) = session.down_bytes_skipped_per_token() {
            let dense = session.model().weights.nbytes() as f64;
            if dense > 0.0 {
                lines.push(format!(
                    "weights skipped: {:.2} MB of {:.2} MB per token ({:.1}%)",
                    skipped / 1e6,
                    dense / 1e6,
                    100.0 * skipped / dense
                ));
            }
        }
        lines.push(format!(
            "time: prompt {:.1} ms, decode {:.1} ms",
            s.prompt_seconds * 1e3,
            s.decode_seconds * 1e3
        ));
    }
    lines
}

fn print_stats(session: &Session, o: &TurnOutcome, g: &GenOpts) {
    if !g.quiet {
        for line in stats_lines(session, o, g.stats) {
            note(&format!("[{line}]"));
        }
    }
}

/// End the output with a newline, as the Python CLI does.
/// After Ctrl-C stopped a reply: the note on a line of its own after the terminal's `^C`, as
/// in the Python CLI.
fn reply_interrupted(out: &mut impl Write) -> Result<(), CliError> {
    out.write_all(b"\n")?;
    out.flush()?;
    note("[reply interrupted]");
    Ok(())
}

fn finish_line(out: &mut impl Write, text: &str) -> Result<(), CliError> {
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn read_stdin_prompt() -> Result<String, CliError> {
    let mut buf = Vec::new();
    io::stdin().read_to_end(&mut buf).map_err(|e| {
        CliError::runtime(format!("cannot read the prompt from standard input: {e}"))
    })?;
    String::from_utf8(buf)
        .map_err(|_| CliError::Usage("the prompt on standard input is not valid UTF-8".into()))
}

/// `sparselm generate`: stream a completion of the prompt.
pub fn generate(a: GenerateArgs) -> Result<(), CliError> {
    // The directory first: a wrong one must not wait for a prompt on standard input.
    if matches!(a.prompt, Prompt::Missing)
        && !a.model.dir.as_os_str().is_empty()
        && !a.model.dir.exists()
    {
        // one argument is the model directory here (no bundled model without Python)
        return Err(CliError::Usage(format!(
            "generate: '{}' was taken as MODEL_DIR, and no such directory exists: the native \
             CLI has no bundled model, so it needs `sparselm generate MODEL_DIR PROMPT` (or \
             MODEL_DIR and the prompt on standard input)",
            a.model.dir.display()
        )));
    }
    check_dir(&a.model.dir)?;
    let prompt = match a.prompt {
        Prompt::Text(t) => t,
        Prompt::Stdin => read_stdin_prompt()?,
        Prompt::Missing if !io::stdin().is_terminal() => read_stdin_prompt()?,
        Prompt::Missing => {
            return Err(CliError::Usage(
                "generate: the PROMPT argument is required (or pipe it on standard input)".into(),
            ));
        }
    };
    if prompt.is_empty() {
        return Err(CliError::Usage("generate: the prompt is empty".into()));
    }
    let text = TextModel::load(&a.model.dir)?;
    let cfg = RunConfig::resolve(&GenDefaults::load(&a.model.dir)?, &a.gen)?;
    let prompt = if a.chat {
        let template = text.compile_chat_template()?;
        let mut messages = Vec::new();
        if let Some(sys) = &a.system {
            messages.push(Message::new("system", sys));
        }
        messages.push(Message::new("user", &prompt));
        text.render_chat(&template, &messages)?
    } else {
        prompt
    };
    let model = load_model(&a.model, a.gen.quiet)?;
    check_vocab(&text, &model)?;
    let ids = encode_prompt(&text, &model, &prompt)?;
    let ctx = context_length(&model, &a.model);
    if ids.len() > ctx {
        return Err(CliError::runtime(format!(
            "the prompt has {} tokens but the context holds {ctx} (shorten the prompt, or use a larger --max-seq)",
            ids.len()
        )));
    }
    // A cache just big enough for this generation: less memory on small boards.
    let positions = ctx.min(
        ids.len()
            .saturating_add(cfg.max_new_for(ids.len()))
            .saturating_add(1),
    );
    let mut session = Session::new(model, positions)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let outcome = run_turn(&mut session, &text, &ids, &cfg, &mut out, &NEVER)?;
    finish_line(&mut out, &outcome.text)?;
    print_stats(&session, &outcome, &a.gen);
    Ok(())
}

#[cfg(unix)]
const CHAT_COMMANDS: &str =
    "commands: /reset forgets the conversation, /exit quits (so does end of input); Ctrl-C stops a reply";
#[cfg(not(unix))]
const CHAT_COMMANDS: &str =
    "commands: /reset forgets the conversation, /exit quits (so does end of input)";

/// `sparselm chat`: an interactive multi-turn conversation on one session.
pub fn chat(a: ChatArgs) -> Result<(), CliError> {
    check_dir(&a.model.dir)?;
    let text = TextModel::load(&a.model.dir)?;
    let template = text.compile_chat_template()?;
    let cfg = RunConfig::resolve(&GenDefaults::load(&a.model.dir)?, &a.gen)?;
    let model = load_model(&a.model, a.gen.quiet)?;
    check_vocab(&text, &model)?;
    let ctx = context_length(&model, &a.model);
    let mut session = Session::new(model, ctx)?;
    let stdin = io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        note(&format!("sparselm chat ({CHAT_COMMANDS})"));
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut history: Vec<Message> = Vec::new();
    let mut buf = Vec::new();
    loop {
        if interactive {
            out.write_all(b"> ")?;
            out.flush()?;
        }
        buf.clear();
        let n = stdin
            .lock()
            .read_until(b'\n', &mut buf)
            .map_err(|e| CliError::runtime(format!("cannot read standard input: {e}")))?;
        if n == 0 {
            if interactive {
                out.write_all(b"\n")?;
            }
            break;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            // as `generate -` does (and Python): not silently replaced by U+FFFD
            let e = CliError::Usage("chat: the input line is not valid UTF-8".into());
            if interactive {
                note(&format!("sparselm: error: {e}"));
                continue;
            }
            return Err(e);
        };
        let line = line.trim_end_matches(['\n', '\r']);
        let cmd_text = line.trim();
        if cmd_text.is_empty() {
            continue;
        }
        if cmd_text.starts_with('/') {
            let cmd = cmd_text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_lowercase();
            match cmd.as_str() {
                "/exit" | "/quit" => break,
                "/reset" => {
                    session.reset();
                    history.clear();
                    note("[conversation reset]");
                }
                "/help" => note(CHAT_COMMANDS),
                _ => note(&format!("unknown command {cmd}; {CHAT_COMMANDS}")),
            }
            continue;
        }
        let mut conversation = history.clone();
        if conversation.is_empty() {
            if let Some(sys) = &a.system {
                conversation.push(Message::new("system", sys));
            }
        }
        conversation.push(Message::new("user", line));
        // interactive: Ctrl-C during the reply stops the reply only (as in the Python CLI)
        let guard = interactive.then(CtrlCStopsReply::install);
        let ctl = if guard.is_some() { &REPLY } else { &NEVER };
        let turn = chat_turn(
            &mut session,
            &text,
            &template,
            &conversation,
            &cfg,
            &mut out,
            ctl,
        );
        drop(guard);
        match turn {
            Ok(outcome) => {
                if outcome.finish == "interrupted" {
                    reply_interrupted(&mut out)?;
                } else {
                    finish_line(&mut out, &outcome.text)?;
                    print_stats(&session, &outcome, &a.gen);
                }
                // an interrupted reply is kept as far as it was written
                conversation.push(Message::new("assistant", &outcome.text));
                history = conversation;
            }
            Err(CliError::BrokenPipe) => return Err(CliError::BrokenPipe),
            // Ctrl-C during the prompt: the turn is dropped
            Err(CliError::Interrupted) if interactive => reply_interrupted(&mut out)?,
            // A turn that does not fit must not end an interactive conversation.
            Err(e) if interactive => {
                note(&format!("sparselm: error: {e}"));
                note("[use /reset to start over]");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn chat_turn(
    session: &mut Session,
    text: &TextModel,
    template: &ChatTemplate,
    conversation: &[Message],
    cfg: &RunConfig,
    out: &mut impl Write,
    ctl: &Control,
) -> Result<TurnOutcome, CliError> {
    let prompt = text.render_chat(template, conversation)?;
    let ids = encode_prompt(text, session.model(), &prompt)?;
    if ids.len() > session.max_seq() {
        return Err(CliError::runtime(format!(
            "the conversation has {} tokens but the session holds {} positions",
            ids.len(),
            session.max_seq()
        )));
    }
    run_turn(session, text, ids.as_slice(), cfg, out, ctl)
}

/// The reply an interactive chat is writing: Ctrl-C asks it to stop.
static REPLY: Control = Control::new();

#[cfg(unix)]
extern "C" fn stop_reply(_: libc::c_int) {
    REPLY.stop(); // an atomic store: async-signal-safe
}

/// While alive, SIGINT (Ctrl-C) stops the reply through [`REPLY`] instead of ending the
/// process; dropped, the previous disposition is back (so Ctrl-C at the `>` prompt quits).
/// Where SIGINT is ignored (a background job of a script, `nohup`), it stays ignored, as
/// Python leaves it, so both CLIs ignore it there.
struct CtrlCStopsReply {
    #[cfg(unix)]
    old: Option<libc::sigaction>,
}

impl CtrlCStopsReply {
    fn install() -> CtrlCStopsReply {
        REPLY.reset();
        #[cfg(unix)]
        {
            // SAFETY: plain sigaction calls on zeroed structs; the handler only stores atomics.
            let old = unsafe {
                let mut now: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut now) != 0
                    || now.sa_sigaction == libc::SIG_IGN
                {
                    return CtrlCStopsReply { old: None };
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = stop_reply as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut sa.sa_mask);
                sa.sa_flags = libc::SA_RESTART;
                let mut old: libc::sigaction = std::mem::zeroed();
                (libc::sigaction(libc::SIGINT, &sa, &mut old) == 0).then_some(old)
            };
            CtrlCStopsReply { old }
        }
        #[cfg(not(unix))]
        CtrlCStopsReply {}
    }
}

impl Drop for CtrlCStopsReply {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(old) = &self.old {
            // SAFETY: restores the disposition saved by `install`.
            unsafe { libc::sigaction(libc::SIGINT, old, std::ptr::null_mut()) };
        }
    }
}

/// An f32 setting as the f64 of its shortest decimal form (0.7, not 0.699999988079071: the
/// number the file or the command line gave).
fn short(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// `sparselm info`: describe a model.
pub fn info(a: InfoArgs) -> Result<(), CliError> {
    let dir = &a.model.dir;
    check_dir(dir)?;
    let model = load_model(&a.model, false)?;
    let text = if dir.join("tokenizer.json").is_file() {
        let t = TextModel::load(dir)?;
        check_vocab(&t, &model)?;
        Some(t)
    } else {
        None
    };
    let gen = GenDefaults::load(dir)?;
    let c = &model.config;
    let n_params: usize = tensor_table(c)
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let raw_config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| c.to_json());
    let architectures: Vec<String> = raw_config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let tier = sparselm_core::kernels::kernels().tier.name();
    let ctx = context_length(&model, &a.model);
    let weight_bytes = model.weights.nbytes();
    let stop_ids: Vec<u32> = text
        .as_ref()
        .map(|t| t.stop_ids.clone())
        .unwrap_or_default();
    let tok_vocab = text.as_ref().map(TextModel::vocab_size);
    let has_template = text.as_ref().is_some_and(|t| t.chat_template.is_some());
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());

    let stdout = io::stdout();
    let mut out = stdout.lock();
    if a.json {
        let p = &gen.params;
        let v = json!({
            "path": path.display().to_string(),
            "model_type": "plm",
            "architectures": architectures,
            "num_parameters": n_params,
            "dtype": model.dtype.name(),
            "threads": model.threads(),
            "kernel_tier": tier,
            "weight_bytes": weight_bytes,
            "context_length": ctx,
            "vocab_size": c.vocab_size,
            "tokenizer_vocab_size": tok_vocab,
            "stop_token_ids": stop_ids,
            "chat_template": has_template,
            "generation_config": {
                "max_new_tokens": gen.max_new_tokens, "temperature": short(p.temperature),
                "top_k": p.top_k, "top_p": short(p.top_p), "min_p": short(p.min_p),
                "repetition_penalty": short(p.repetition_penalty),
                "seed": p.seed, "stop": gen.stop, "max_length": gen.max_length,
            },
            "config": raw_config,
        });
        let s = serde_json::to_string_pretty(&v).map_err(|e| CliError::runtime(e.to_string()))?;
        writeln!(out, "{s}")?;
        return Ok(());
    }
    let arch = if architectures.is_empty() {
        "?".to_string()
    } else {
        architectures.join(", ")
    };
    let stop = if stop_ids.is_empty() {
        "none".to_string()
    } else {
        stop_ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = [
        ("path", path.display().to_string()),
        ("model", format!("plm ({arch})")),
        (
            "parameters",
            format!(
                "{} ({:.2} M)",
                group_digits(n_params),
                n_params as f64 / 1e6
            ),
        ),
        ("dtype", model.dtype.name().to_string()),
        (
            "weights",
            format!(
                "{} bytes ({:.1} MiB) in memory",
                group_digits(weight_bytes),
                weight_bytes as f64 / (1 << 20) as f64
            ),
        ),
        ("threads", model.threads().to_string()),
        ("kernel tier", tier.to_string()),
        ("context", format!("{ctx} positions")),
        (
            "vocab",
            match tok_vocab {
                Some(n) => format!("{} (tokenizer: {n})", c.vocab_size),
                None => format!("{} (no tokenizer.json)", c.vocab_size),
            },
        ),
        ("stop ids", stop),
        (
            "chat template",
            if has_template { "yes" } else { "no" }.to_string(),
        ),
        ("generation", gen.describe()),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        writeln!(out, "{k:<width$}  {v}")?;
    }
    writeln!(out, "config:")?;
    if let Some(obj) = raw_config.as_object() {
        let kw = obj.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in obj {
            writeln!(out, "  {k:<kw$}  {v}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// 1234567 → "1,234,567".
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn load_line_shows_counts_and_percent() {
        assert_eq!(load_line("m", 0, 0), "\rloading m: 0/0 tensors (0%)");
        assert_eq!(
            load_line("PLM-1.8B", 97, 291),
            "\rloading PLM-1.8B: 97/291 tensors (33%)"
        );
    }

    /// The tests that change SIGINT's disposition, one at a time (tests run on threads of one
    /// process, which shares it).
    #[cfg(unix)]
    static SIGINT_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[cfg(unix)]
    #[test]
    fn ctrl_c_stops_the_reply_while_installed_and_the_old_handler_comes_back() {
        let _one = SIGINT_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: signal disposition queries and a raise with our handler installed.
        let current = || unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, std::ptr::null(), &mut sa);
            sa.sa_sigaction
        };
        // from the default disposition, whatever this process started with (a test run in the
        // background of a script starts with SIGINT ignored, which install keeps)
        // SAFETY: sigaction calls on zeroed structs; the original comes back at the end.
        let original = unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            let mut original: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, &dfl, &mut original);
            original
        };
        let before = current();
        REPLY.stop();
        let guard = CtrlCStopsReply::install();
        assert!(
            !REPLY.stop_requested(),
            "install re-arms the reply's control"
        );
        unsafe { libc::raise(libc::SIGINT) };
        assert!(REPLY.stop_requested());
        assert!(matches!(
            REPLY.check(),
            Err(sparselm_core::Error::Interrupted)
        ));
        drop(guard);
        assert_eq!(current(), before);
        // SAFETY: restores the disposition saved above.
        unsafe { libc::sigaction(libc::SIGINT, &original, std::ptr::null_mut()) };
    }

    #[cfg(unix)]
    #[test]
    fn an_ignored_ctrl_c_stays_ignored_during_a_reply() {
        let _one = SIGINT_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: sigaction calls on zeroed structs; the disposition is restored at the end.
        unsafe {
            let mut ign: libc::sigaction = std::mem::zeroed();
            ign.sa_sigaction = libc::SIG_IGN;
            let mut before: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, &ign, &mut before);
            let guard = CtrlCStopsReply::install();
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, std::ptr::null(), &mut now);
            assert_eq!(now.sa_sigaction, libc::SIG_IGN);
            drop(guard);
            libc::sigaction(libc::SIGINT, std::ptr::null(), &mut now);
            assert_eq!(now.sa_sigaction, libc::SIG_IGN);
            libc::sigaction(libc::SIGINT, &before, std::ptr::null_mut());
        }
    }

    #[test]
    fn cli_options_override_model_defaults() {
        let d = GenDefaults {
            params: SamplingParams {
                temperature: 0.7,
                top_k: 50,
                ..SamplingParams::default()
            },
            max_new_tokens: 64,
            max_length: Some(100),
            stop: vec!["X".into()],
        };
        let r = RunConfig::resolve(&d, &GenOpts::default()).unwrap();
        assert_eq!(
            (r.params.temperature, r.params.top_k, r.max_new_tokens),
            (0.7, 50, 64)
        );
        assert_eq!(r.max_new_for(90), 10, "max_length caps prompt + new tokens");
        assert_eq!(r.max_new_for(200), 0);
        assert_eq!(r.stop, vec!["X".to_string()]);
        let o = GenOpts {
            temperature: Some(0.0),
            max_new_tokens: Some(5),
            stop: vec!["Y".into()],
            ..GenOpts::default()
        };
        let r = RunConfig::resolve(&d, &o).unwrap();
        assert!(r.params.is_greedy());
        assert_eq!(
            (r.max_new_tokens, r.max_length),
            (5, None),
            "--max-new-tokens clears max_length"
        );
        assert_eq!(r.max_new_for(1000), 5);
        assert_eq!(r.stop, vec!["Y".to_string()]);
        let bad = GenOpts {
            top_p: Some(0.0),
            ..GenOpts::default()
        };
        assert!(matches!(
            RunConfig::resolve(&d, &bad),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn digits() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1_825_458_176), "1,825,458,176");
    }
}
