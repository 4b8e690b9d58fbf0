//! End-to-end tests of the `sparselm` binary on a tiny PLM checkpoint built here: config.json,
//! model.safetensors with small seeded random f32 weights (names and shapes from the core's
//! tensor table), a hand-written byte-level BPE tokenizer.json (the 256 byte tokens and the three
//! Qwen2 specials) and a tokenizer_config.json with the ChatML template. Nothing is downloaded.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sparselm_core::weights::{tensor_table, Role};
use sparselm_core::ModelConfig;

const BIN: &str = env!("CARGO_BIN_EXE_sparselm");

/// ChatML, as in the PLM-1.8B-Instruct tokenizer_config.json (plm-architecture.md §4).
const CHATML: &str = "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{%- endif %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const VOCAB: usize = 272; // 256 bytes + 3 specials + padding rows, as PLM pads its vocabulary
const CONTEXT: usize = 160;

/// A model directory in the system temp dir, removed on drop.
struct Checkpoint {
    dir: PathBuf,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Checkpoint {
    fn path(&self) -> &str {
        self.dir.to_str().expect("temp dir path is UTF-8")
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).unwrap();
    }
}

fn unique_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "sparselm-cli-test-{}-{tag}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic uniform numbers in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["PLMForCausalLM"], "model_type": "plm", "vocab_size": VOCAB,
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "hidden_act": "relu2", "kv_lora_rank": 16, "q_lora_rank": null,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
        "eos_token_id": 256, "torch_dtype": "float32"
    })
}

/// GPT-2's byte → printable character table of the ByteLevel pre-tokenizer.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Byte-level BPE without merges: id = byte value; then the three specials (256, 257, 258).
fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"}, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

fn tokenizer_config(chat_template: bool) -> String {
    let mut v = serde_json::json!({
        "add_bos_token": false, "bos_token": null, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": null, "model_max_length": CONTEXT,
        "tokenizer_class": "Qwen2Tokenizer",
    });
    if chat_template {
        v["chat_template"] = CHATML.into();
    }
    v.to_string()
}

/// A complete tiny checkpoint. The output head scores the specials and padding rows 0, so
/// greedy decoding always picks a byte token (some byte row always scores above 0) and the
/// generations run to --max-new-tokens.
fn checkpoint(tag: &str, chat_template: bool) -> Checkpoint {
    checkpoint_of(tag, chat_template, config_json(), false)
}

/// A checkpoint of `config`. With `says_a`, greedy decoding writes "aaa…" whatever the
/// context: every embedding row holds 50 in its first element, which then dominates the
/// residual stream, and the output head scores only `a`, by that element (the other rows 0).
fn checkpoint_of(
    tag: &str,
    chat_template: bool,
    config: serde_json::Value,
    says_a: bool,
) -> Checkpoint {
    let ck = Checkpoint {
        dir: unique_dir(tag),
    };
    let cfg = ModelConfig::from_json_str(&config.to_string(), Path::new("config.json")).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = tensor_table(&cfg)
        .into_iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let cols = *t.shape.last().unwrap();
            let scale = 1.0 / (cols as f32).sqrt();
            let values: Vec<f32> = match t.role {
                Role::Norm => vec![1.0; n],
                _ if t.name == "lm_head.weight" && says_a => (0..n)
                    .map(|i| {
                        if i == usize::from(b'a') * cols {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect(),
                _ if t.name == "lm_head.weight" => (0..n)
                    .map(|i| if i / cols < 256 { rng.next() } else { 0.0 })
                    .collect(),
                _ if t.name == "model.embed_tokens.weight" => (0..n)
                    .map(|i| {
                        if says_a && i % cols == 0 {
                            50.0
                        } else {
                            rng.next()
                        }
                    })
                    .collect(),
                _ => (0..n).map(|_| 2.0 * scale * rng.next()).collect(),
            };
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            (t.name, t.shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let st = safetensors::serialize(views, None).unwrap();
    std::fs::write(ck.dir.join("model.safetensors"), st).unwrap();
    ck.write("config.json", &config.to_string());
    ck.write("tokenizer.json", &tokenizer_json());
    ck.write("tokenizer_config.json", &tokenizer_config(chat_template));
    ck
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sparselm binary");
    if let Some(input) = stdin {
        // The binary may exit (e.g. on a usage error) before reading its input.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    assert_no_panic(o);
}

#[track_caller]
fn assert_no_panic(o: &Output) {
    let err = stderr(o);
    assert!(
        !err.contains("panicked")
            && !err.contains("internal error")
            && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// Exits with `code`, a single `sparselm: error:` line mentioning `want`, and no panic.
#[track_caller]
fn assert_fails(o: &Output, code: i32, want: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.starts_with("sparselm: error: "), "{err}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
    assert_no_panic(o);
}

const GREEDY: [&str; 4] = ["--max-new-tokens", "24", "--threads", "1"];

fn generate(ck: &Checkpoint, prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", ck.path(), prompt];
    args.extend(GREEDY);
    args.extend(extra);
    run(&args, None)
}

#[test]
fn generate_prints_text_deterministically() {
    let ck = checkpoint("generate", true);
    let a = generate(&ck, "Hello, world", &[]);
    assert_ok(&a);
    let text = stdout(&a);
    assert!(text.ends_with('\n'));
    assert!(text.trim_end_matches('\n').chars().count() >= 4, "{text:?}");
    let err = stderr(&a);
    assert!(err.contains("[prompt: 12 tokens,"), "{err}");
    assert!(
        err.contains("generated: 24 tokens") && err.contains("finish: length"),
        "{err}"
    );
    let b = generate(&ck, "Hello, world", &[]);
    assert_ok(&b);
    assert_eq!(text, stdout(&b), "greedy generation is deterministic");

    // The same prompt from standard input, and with several threads.
    let c = run(
        &[
            "generate",
            ck.path(),
            "-",
            "--max-new-tokens",
            "24",
            "--threads",
            "2",
        ],
        Some("Hello, world"),
    );
    assert_ok(&c);
    assert_eq!(text, stdout(&c));

    // --quiet prints no statistics; --stats adds the sparsity lines.
    let q = generate(&ck, "Hello, world", &["--quiet"]);
    assert_ok(&q);
    assert_eq!(stderr(&q), "");
    let s = generate(&ck, "Hello, world", &["--stats"]);
    assert_ok(&s);
    let err = stderr(&s);
    assert!(
        err.contains("[mlp sparsity: ")
            && err.contains("[layer sparsity: ")
            && err.contains("[weights skipped: ")
            && err.contains(" MB per token (")
            && err.contains("[time: prompt"),
        "{err}"
    );
}

#[test]
fn stop_strings_cut_the_output_exactly() {
    let ck = checkpoint("stop", true);
    let full = stdout(&generate(&ck, "Once upon a time", &["--quiet"]));
    let full = full.strip_suffix('\n').unwrap_or(&full).to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "{full:?}");
    // A two-character stop string from the middle of the text.
    let stop: String = chars[5..7].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let escaped = stop.replace('\\', "\\\\");
    let o = generate(&ck, "Once upon a time", &["--stop", &escaped]);
    assert_ok(&o);
    assert_eq!(stdout(&o).strip_suffix('\n').unwrap_or(&stdout(&o)), cut);
    assert!(stderr(&o).contains("finish: stop_string"), "{}", stderr(&o));
    // A stop string that never appears changes nothing.
    let o = generate(
        &ck,
        "Once upon a time",
        &["--quiet", "--stop", "\u{1F980}never"],
    );
    assert_eq!(stdout(&o).strip_suffix('\n').unwrap(), full);
}

#[test]
fn generation_config_defaults_apply() {
    let ck = checkpoint("genconfig", true);
    ck.write(
        "generation_config.json",
        r#"{"max_new_tokens": 3, "do_sample": false, "eos_token_id": [258]}"#,
    );
    let o = run(&["generate", ck.path(), "abc"], None);
    assert_ok(&o);
    assert!(stderr(&o).contains("generated: 3 tokens"), "{}", stderr(&o));
    let o = run(
        &["generate", ck.path(), "abc", "--max-new-tokens", "5"],
        None,
    );
    assert!(stderr(&o).contains("generated: 5 tokens"), "{}", stderr(&o));
    // Seeded sampling is reproducible.
    let sample = [
        "generate",
        ck.path(),
        "abc",
        "--temperature",
        "1.0",
        "--top-k",
        "40",
        "--seed",
        "7",
        "--quiet",
    ];
    let (a, b) = (run(&sample, None), run(&sample, None));
    assert_ok(&a);
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn chat_keeps_one_session_across_turns() {
    let ck = checkpoint("chat", true);
    let o = run(
        &["chat", ck.path(), "--max-new-tokens", "6", "--threads", "1"],
        Some("Hi there\n\nHow are you?\n/reset\nHi there\n"),
    );
    assert_ok(&o);
    let err = stderr(&o);
    assert!(err.contains("[conversation reset]"), "{err}");
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with("[prompt: ")).collect();
    assert_eq!(stats.len(), 3, "three turns answered: {err}");
    // The second turn re-renders the whole conversation but only evaluates the new part.
    assert!(stats[1].contains(" evaluated)"), "{}", stats[1]);
    // After /reset the first message is answered exactly as before (and as generate --chat).
    assert_eq!(stats[0].split(',').next(), stats[2].split(',').next());
    let g = run(
        &[
            "generate",
            ck.path(),
            "Hi there",
            "--chat",
            "--max-new-tokens",
            "6",
            "--threads",
            "1",
        ],
        None,
    );
    assert_ok(&g);
    let first = stdout(&g);
    let out = stdout(&o);
    assert!(out.len() > 2 * first.len(), "{out:?}");
    assert!(
        out.starts_with(&first) && out.ends_with(&first),
        "{out:?} vs {first:?}"
    );

    // /exit ends the conversation.
    let o = run(
        &["chat", ck.path(), "--quiet", "--max-new-tokens", "6"],
        Some("/exit\nnot answered\n"),
    );
    assert_ok(&o);
    assert_eq!(stdout(&o), "");
    // The rendered conversation given as plain text: specials in text become special ids.
    let rendered = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    let raw = run(
        &[
            "generate",
            ck.path(),
            rendered,
            "--max-new-tokens",
            "6",
            "--threads",
            "1",
        ],
        None,
    );
    assert_eq!(
        stdout(&raw),
        stdout(&g),
        "specials in the text are parsed as special ids"
    );
}

#[test]
fn chat_without_template_fails_clearly() {
    let ck = checkpoint("notemplate", false);
    let o = run(&["chat", ck.path()], Some("hi\n"));
    assert_fails(&o, 2, "has no chat template");
    let o = run(&["generate", ck.path(), "hi", "--system", "be brief"], None);
    assert_fails(&o, 2, "has no chat template");
    // Plain generation does not need one.
    assert_ok(&generate(&ck, "hi", &["--quiet"]));
}

#[test]
fn chat_rejects_input_that_is_not_utf8() {
    // before: the byte became U+FFFD silently (generate's stdin prompt already failed)
    let ck = checkpoint("chat-utf8", true);
    let mut child = Command::new(BIN)
        .args(["chat", ck.path(), "--max-new-tokens", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(b"Hi \xff there\n");
    let o = child.wait_with_output().unwrap();
    assert_fails(&o, 2, "the input line is not valid UTF-8");
}

#[test]
fn info_describes_the_model() {
    let ck = checkpoint("info", true);
    let o = run(&["info", ck.path(), "--threads", "1"], None);
    assert_ok(&o);
    let out = stdout(&o);
    for want in [
        "parameters",
        "dtype        f32",
        "kernel tier",
        "weights",
        "stop ids     258, 256",
        "chat template  yes",
        "greedy",
    ] {
        let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
        let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(&want), "{want:?} not in\n{out}");
    }
    let o = run(&["info", ck.path(), "--json", "--dtype", "bf16"], None);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cfg =
        ModelConfig::from_json_str(&config_json().to_string(), Path::new("config.json")).unwrap();
    let n: usize = tensor_table(&cfg)
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(v["num_parameters"], n);
    assert_eq!(v["dtype"], "bf16");
    assert_eq!(v["tokenizer_vocab_size"], 259);
    assert_eq!(v["stop_token_ids"], serde_json::json!([258, 256]));
    assert!(v["weight_bytes"].as_u64().unwrap() > 0);
    assert!(v["kernel_tier"].is_string());
    // the settings as written, not widened from f32 (was 0.699999988079071)
    ck.write(
        "generation_config.json",
        r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}"#,
    );
    let o = run(&["info", ck.path(), "--json"], None);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let g = &v["generation_config"];
    assert_eq!(
        (&g["temperature"], &g["top_p"], &g["repetition_penalty"]),
        (
            &serde_json::json!(0.7),
            &serde_json::json!(0.9),
            &serde_json::json!(1.1)
        )
    );
}

#[test]
fn help_and_version() {
    let o = run(&["--version"], None);
    assert_ok(&o);
    assert_eq!(
        stdout(&o),
        format!("sparselm {}\n", env!("CARGO_PKG_VERSION"))
    );
    for args in [
        &["--help"][..],
        &["generate", "--help"],
        &["chat", "-h"],
        &["info", "--help"],
    ] {
        let o = run(args, None);
        assert_ok(&o);
        assert!(stdout(&o).contains("usage: sparselm"), "{args:?}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let ck = checkpoint("usage", true);
    let p = ck.path();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "COMMAND is required"),
        (vec!["bogus"], "unknown command 'bogus'"),
        (
            vec!["generate", p, "hi", "--bogus"],
            "unknown option '--bogus'",
        ),
        (
            vec!["generate", p, "hi", "--temperature", "warm"],
            "--temperature must be a finite number",
        ),
        (
            vec!["generate", p, "hi", "--top-p", "0"],
            "top_p must be in (0, 1]",
        ),
        (
            vec!["generate", p, "hi", "--max-new-tokens"],
            "needs a value",
        ),
        (
            vec!["generate", p, "hi", "--dtype", "f8"],
            "unknown dtype 'f8'",
        ),
        (vec!["generate", p], "the prompt is empty"),
        (vec!["generate", p, "a", "b"], "quote the prompt"),
        (
            vec!["generate", p, "hi", "--max-seq", "100000"],
            "exceeds the model's context",
        ),
        (vec!["info"], "MODEL_DIR argument is required"),
        // one argument, not a directory: the prompt taken as MODEL_DIR, whatever stdin is
        // (stdin is /dev/null here: before, "the prompt is empty")
        (
            vec!["generate", "Once upon a time"],
            "'Once upon a time' was taken as MODEL_DIR",
        ),
        (
            vec!["generate", "", "hi"],
            "model directory path must not be empty",
        ),
        (
            vec!["info", "--model="],
            "model directory path must not be empty",
        ),
    ];
    for (args, want) in cases {
        let o = run(&args, None);
        assert_fails(&o, 2, want);
        assert_eq!(stdout(&o), "", "{args:?}");
    }
}

#[test]
fn runtime_errors_exit_1() {
    let missing = std::env::temp_dir().join(format!(
        "sparselm-cli-test-{}-does-not-exist",
        std::process::id()
    ));
    let missing = missing.to_str().unwrap();
    assert_fails(
        &run(&["generate", missing, "hi"], None),
        1,
        "model directory not found",
    );
    assert_fails(
        &run(&["chat", missing], Some("hi\n")),
        1,
        "model directory not found",
    );
    assert_fails(
        &run(&["info", missing], None),
        1,
        "model directory not found",
    );

    // A prompt longer than the context.
    let ck = checkpoint("runtime", true);
    let long = "x".repeat(64);
    assert_fails(
        &generate(&ck, &long, &["--max-seq", "32"]),
        1,
        "the prompt has 64 tokens but the context holds 32",
    );
    // A chat turn that does not fit ends a non-interactive chat with exit 1.
    assert_fails(
        &run(
            &["chat", ck.path(), "--max-seq", "40"],
            Some(&format!("{long}\n")),
        ),
        1,
        "the conversation has",
    );

    // Broken files: each is reported, none panics.
    let broken = checkpoint("broken", true);
    broken.write("tokenizer.json", "{ not json");
    assert_fails(
        &generate(&broken, "hi", &[]),
        1,
        "tokenizer.json: cannot load the tokenizer",
    );
    std::fs::remove_file(broken.dir.join("tokenizer.json")).unwrap();
    assert_fails(&generate(&broken, "hi", &[]), 1, "no tokenizer.json");
    // a tokenizer with an id past the model's embedding rows: refused at load (before, only a
    // prompt holding such an id failed), by generate, chat and info alike
    // (tokenizers numbers added tokens from the end of its vocabulary: 259, 260, ...)
    let mut tj: serde_json::Value = serde_json::from_str(&tokenizer_json()).unwrap();
    let added = tj["added_tokens"].as_array_mut().unwrap();
    let n = added.len();
    for i in 0..20 {
        added.push(serde_json::json!({
            "id": 256 + n + i, "content": format!("<|extra{i}|>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    broken.write("tokenizer.json", &tj.to_string());
    let want = format!("has 279 tokens (largest id 278) but the model's vocab_size is {VOCAB}");
    assert_fails(&generate(&broken, "hi", &[]), 1, &want);
    assert_fails(&run(&["chat", broken.path()], Some("hi\n")), 1, &want);
    assert_fails(&run(&["info", broken.path()], None), 1, &want);
    broken.write("tokenizer.json", &tokenizer_json());
    broken.write("model.safetensors", "garbage, not a safetensors file");
    assert_fails(&generate(&broken, "hi", &[]), 1, "model.safetensors");
    broken.write("config.json", r#"{"model_type": "llama"}"#);
    assert_fails(
        &generate(&broken, "hi", &[]),
        1,
        "model_type 'llama' is not supported",
    );
    broken.write("config.json", &config_json().to_string());
    broken.write(
        "generation_config.json",
        r#"{"do_sample": true, "top_p": 7}"#,
    );
    assert_fails(
        &generate(&broken, "hi", &[]),
        1,
        "generation_config.json: top_p must be in (0, 1]",
    );
}

#[test]
fn utf8_output_is_never_split() {
    // Multi-byte prompt characters are single bytes per token here, so the model sees (and may
    // produce) partial characters; stdout must still be valid UTF-8 (checked by `stdout()`).
    let ck = checkpoint("utf8", true);
    let o = generate(&ck, "Grüße, 世界 😀", &["--max-new-tokens", "40"]);
    assert_ok(&o);
    assert!(stdout(&o).trim_end_matches('\n').chars().count() >= 4);
}

#[test]
fn a_stop_request_interrupts_loading_and_prompts_cleanly() {
    // The core's `Control` (what the Python bindings set on Ctrl-C): checked before each tensor
    // of a load and each layer of a forward pass. Not the binary's behaviour, but this file
    // has the checkpoint builder.
    use sparselm_core::{AttnMode, Control, Error, Model, SamplingParams, Session};
    let ck = checkpoint("interrupt", false);
    let dir = Path::new(ck.path());
    let stopped = Control::new();
    stopped.stop();
    let e = Model::load_with(dir, None, 1, &stopped).unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    let (done, total) = stopped.progress();
    assert!(done == 0 && total > 0, "{done} of {total}");

    let third = Control::new();
    third.stop_after(3);
    let e = Model::load_with(dir, Some(sparselm_core::DType::Q4_0), 1, &third).unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    assert_eq!(third.progress(), (3, total));
    let ctl = Control::new();
    let model = std::sync::Arc::new(Model::load_with(dir, None, 1, &ctl).unwrap());
    assert_eq!(ctl.progress(), (total, total));
    let layers = model.config.num_hidden_layers;
    let mut s = Session::new(model.clone(), 0).unwrap();
    let want = s
        .feed(&[72, 105, 33], AttnMode::Auto, false)
        .unwrap()
        .to_vec();
    s.reset();
    s.feed(&[72], AttnMode::Auto, false).unwrap();
    let e = s
        .feed_with(&[105, 33], AttnMode::Auto, false, &stopped)
        .unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    assert_eq!(stopped.progress(), (0, layers));
    assert_eq!(s.tokens(), &[72], "a stopped feed caches none of its ids");
    // stopped after its first layer, the pass has written latents past the cached id: the
    // next feed overwrites them
    let one = Control::new();
    one.stop_after(1);
    let counters = s.state().counters();
    let e = s.feed_with(&[105, 7], AttnMode::Auto, false, &one);
    assert!(matches!(e, Err(Error::Interrupted)));
    assert_eq!(one.progress(), (1, layers));
    assert_eq!(s.tokens(), &[72]);
    // the sparsity counters do not count the stopped pass's first layer
    assert_eq!(s.state().counters(), counters);
    let got = s.feed(&[105, 33], AttnMode::Auto, false).unwrap();
    assert_eq!(got, &want[..]);

    let greedy = SamplingParams::default();
    let e = s.start_with(&[72, 105, 33, 10], greedy.clone(), 4, &[], &stopped);
    assert!(matches!(e, Err(Error::Interrupted)));
    assert_eq!(
        s.next_token().unwrap(),
        None,
        "no generation after a stopped start"
    );
    let first = s.generate(&[72, 105, 33, 10], greedy.clone(), 4, &[], |_| true);
    let mut fresh = Session::new(model, 0).unwrap();
    let again = fresh.generate(&[72, 105, 33, 10], greedy, 4, &[], |_| true);
    assert_eq!(first.unwrap(), again.unwrap());
}

/// Run `sparselm ARGS` on a new pseudo-terminal (its controlling terminal, as in a shell) and
/// return the master side.
///
/// Both ends are close-on-exec in this process: tests run on parallel threads, and a child
/// another test spawns meanwhile would otherwise inherit them (seen: each chat child held the
/// other test's /dev/ptmx and pts), as would our own child its master, so a test that fails
/// and drops the master would not hang the terminal up and its child would outlive the run.
/// The child gets SIGINT at its default disposition, as a shell's foreground job has it: a
/// test binary started with SIGINT ignored (a background job of a non-interactive shell)
/// passed that on, and Ctrl-C at the prompt then left the chat waiting (SigIgn 0x1006).
#[cfg(unix)]
fn on_terminal(args: &[&str]) -> (std::process::Child, std::fs::File) {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two fds, which the Files own from here on; fcntl on them.
    let (term, slave) = unsafe {
        let r = libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(r, 0, "openpty");
        for fd in [master, slave] {
            assert_eq!(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC), 0);
        }
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut cmd = Command::new(BIN);
    // try_clone: close-on-exec copies; the child's dup2 onto 0, 1 and 2 clears the flag there
    cmd.args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: the hook only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(|| {
            if libc::signal(libc::SIGINT, libc::SIG_DFL) == libc::SIG_ERR
                || libc::setsid() < 0
                || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start the sparselm binary");
    (child, term)
}

/// Kill `child` after a minute unless the returned flag is set first (once it is reaped): a
/// hung child would otherwise block the test's reads forever (killed, they fail instead).
#[cfg(unix)]
fn watchdog(child: &std::process::Child) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let pid = child.id() as libc::pid_t;
    let reaped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = std::sync::Arc::clone(&reaped);
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        if !watch.load(Ordering::SeqCst) {
            // SAFETY: a plain kill of our child, not yet waited for (so its pid is its own).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    reaped
}

/// Read the terminal until `want` has appeared; everything read so far.
#[cfg(unix)]
fn read_until(term: &mut std::fs::File, want: &str) -> String {
    use std::io::Read;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let n = term.read(&mut buf).expect("read the terminal");
        assert!(
            n > 0,
            "terminal closed before {want:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[cfg(unix)]
#[test]
fn interactive_chat_replies_and_ctrl_c_at_the_prompt_quits() {
    use std::os::unix::process::ExitStatusExt;
    let ck = checkpoint("tty", true);
    let (mut child, mut term) = on_terminal(&["chat", ck.path(), "--max-new-tokens", "5", "-q"]);
    let reaped = watchdog(&child);
    let banner = read_until(&mut term, "> ");
    assert!(banner.contains("Ctrl-C stops a reply"), "{banner}");
    term.write_all(b"Hello\r").unwrap();
    read_until(&mut term, "\n> "); // a reply, then the prompt again
    term.write_all(&[3]).unwrap(); // Ctrl-C, which the terminal turns into SIGINT
    let status = child.wait();
    reaped.store(true, Ordering::SeqCst);
    let status = status.unwrap();
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
}

#[cfg(unix)]
#[test]
fn interactive_chat_ctrl_c_during_a_reply_stops_only_the_reply() {
    // Big enough that a reply of 1500 tokens takes a few seconds: Ctrl-C lands mid-reply.
    let mut config = config_json();
    for (k, v) in [
        ("hidden_size", 256),
        ("num_hidden_layers", 8),
        ("num_attention_heads", 4),
        ("intermediate_size", 1024),
        ("kv_lora_rank", 64),
        ("qk_nope_head_dim", 32),
        ("qk_rope_head_dim", 16),
        ("v_head_dim", 32),
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    let ck = checkpoint_of("tty-stop", true, config, true);
    // The replies are "aaa…"; this stop string never matches ('!' never comes) but keeps the
    // last HOLD characters of a reply back, as a possible start of it.
    const HOLD: usize = 100;
    let stop = format!("{}!", "a".repeat(HOLD));
    let (mut child, mut term) = on_terminal(&[
        "chat",
        ck.path(),
        "--max-new-tokens",
        "1500",
        "--stop",
        &stop,
        "-q",
    ]);
    let reaped = watchdog(&child);
    read_until(&mut term, "> ");
    term.write_all(b"Hello\r").unwrap();
    read_until(&mut term, "Hello\r\na"); // the echo, then the reply's first shown text
    term.write_all(&[3]).unwrap(); // Ctrl-C: SIGINT to the chat, which stops the reply
    let seen = read_until(&mut term, "[reply interrupted]\r\n> ");
    // What came after the terminal's ^C: at most the piece of the token being decoded when
    // the signal came, not the HOLD characters held back (written before 56f0aac).
    let after = &seen[seen.find("^C").expect("the terminal echoes ^C") + 2..];
    let shown = after.trim_start_matches('a');
    assert!(after.len() - shown.len() <= 2, "{after:?}");
    assert_eq!(shown, "\r\n[reply interrupted]\r\n> ", "{seen:?}");
    // The conversation goes on: a second reply runs to its end (the held-back text released).
    term.write_all(b"Hi\r").unwrap();
    let second = read_until(&mut term, "\n> ");
    let reply = second
        .split_once("Hi\r\n")
        .map(|(_, r)| r.trim_end_matches("\r\n> "))
        .unwrap_or_default();
    assert!(
        reply.len() > HOLD && reply.bytes().all(|b| b == b'a'),
        "{second:?}"
    );
    term.write_all(b"/exit\r").unwrap();
    let status = child.wait();
    reaped.store(true, Ordering::SeqCst);
    assert!(status.unwrap().success());
}
