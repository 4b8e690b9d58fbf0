//! The text side of a checkpoint directory: `tokenizer.json` (the `tokenizers` crate),
//! `tokenizer_config.json` (special tokens, chat template), `chat_template.jinja`, and the
//! generation defaults and eos ids of `generation_config.json` / `config.json`.
//!
//! Mirrors `python/sparselm/tokenizer.py` and `GenerationConfig.from_hf_dict`: no BOS is ever
//! added, special tokens written in text are parsed as single special ids, and generation stops
//! on `<|im_end|>`, `<|endoftext|>`, the configured `eos_token` and every `eos_token_id`.
//! Nothing here touches weights or numerics.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sparselm_core::SamplingParams;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::CliError;
use crate::template::{ChatTemplate, Message};

/// Tokens that end a turn in Qwen2/PLM vocabularies (plm-architecture.md §4).
const DEFAULT_STOP_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];
/// Special-token entries of tokenizer_config.json passed to the chat template.
const SPECIAL_TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

/// A checkpoint's tokenizer, special tokens, chat template source and stop ids.
pub struct TextModel {
    pub tokenizer: Tokenizer,
    /// Jinja source of the chat template, if the checkpoint has one.
    pub chat_template: Option<String>,
    /// `(bos_token|eos_token|pad_token|unk_token, text)` for the ones that are set.
    pub special: Vec<(&'static str, String)>,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    dir: PathBuf,
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> CliError {
    CliError::runtime(format!("{}: {msg}", path.display()))
}

/// The JSON object in `path`, or None when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format_err(path, e)),
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(format_err(path, "expected a JSON object")),
        Err(e) => Err(format_err(path, format!("invalid JSON: {e}"))),
    }
}

/// A special token from tokenizer_config.json: a string or a serialized AddedToken.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// `eos_token_id` of a config: absent, an int, or a list of ints.
fn eos_ids(cfg: &Map<String, Value>, path: &Path) -> Result<Vec<u32>, CliError> {
    let bad = || format_err(path, "eos_token_id must be an int or a list of ints");
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match cfg.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|v| as_id(v).ok_or_else(bad)).collect(),
        Some(v) => Ok(vec![as_id(v).ok_or_else(bad)?]),
    }
}

impl TextModel {
    /// Load the tokenizer files of `dir`. `tokenizer.json` must exist.
    pub fn load(dir: &Path) -> Result<TextModel, CliError> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(CliError::runtime(format!(
                "no tokenizer.json in {} (the model directory needs the Hugging Face tokenizer files)",
                dir.display()
            )));
        }
        let mut tokenizer = Tokenizer::from_file(&tj)
            .map_err(|e| format_err(&tj, format!("cannot load the tokenizer: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_object(&cfg_path)?.unwrap_or_default();
        apply_added_tokens_decoder(&mut tokenizer, &cfg, &cfg_path)?;

        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| format_err(&jinja, e))?)
        } else {
            pick_template(cfg.get("chat_template"), &cfg_path)?
        };

        let special: Vec<(&'static str, String)> = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|&k| {
                cfg.get(k)
                    .and_then(token_content)
                    .map(|v| (k, v.to_string()))
            })
            .collect();

        let mut stop_ids = Vec::new();
        let eos_token = special
            .iter()
            .find(|(k, _)| *k == "eos_token")
            .map(|(_, v)| v.as_str());
        for t in DEFAULT_STOP_TOKENS.iter().copied().chain(eos_token) {
            if let Some(id) = tokenizer.token_to_id(t) {
                stop_ids.push(id);
            }
        }
        for name in ["config.json", "generation_config.json"] {
            let p = dir.join(name);
            if let Some(c) = read_json_object(&p)? {
                stop_ids.extend(eos_ids(&c, &p)?);
            }
        }
        let mut seen = std::collections::HashSet::new();
        stop_ids.retain(|id| seen.insert(*id));
        Ok(TextModel {
            tokenizer,
            chat_template,
            special,
            stop_ids,
            dir: dir.to_path_buf(),
        })
    }

    /// Token ids of `text`; special tokens written in it become single ids; no BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CliError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| CliError::runtime(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of generated ids (special tokens left out, as the Python API does).
    pub fn decode(&self, ids: &[u32]) -> Result<String, CliError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| CliError::runtime(format!("cannot decode token ids: {e}")))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The largest id of the vocabulary (added tokens included), if it has any.
    pub fn max_token_id(&self) -> Option<u32> {
        self.tokenizer.get_vocab(true).into_values().max()
    }

    /// The model directory the files were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The compiled chat template; a clear error when the checkpoint has none.
    pub fn compile_chat_template(&self) -> Result<ChatTemplate, CliError> {
        let Some(src) = &self.chat_template else {
            return Err(CliError::Usage(format!(
                "the tokenizer of {} has no chat template (no chat_template in \
                 tokenizer_config.json and no chat_template.jinja); chat needs an instruct model",
                self.dir.display()
            )));
        };
        ChatTemplate::new(src).map_err(CliError::runtime)
    }

    /// Render a conversation with the checkpoint's template, opening the assistant's turn.
    pub fn render_chat(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
    ) -> Result<String, CliError> {
        let special: Vec<(&str, &str)> =
            self.special.iter().map(|(k, v)| (*k, v.as_str())).collect();
        template
            .render(messages, true, &special)
            .map_err(CliError::Usage)
    }
}

/// `chat_template` is a string, or a list of {"name", "template"} (use "default").
fn pick_template(value: Option<&Value>, path: &Path) -> Result<Option<String>, CliError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named: Vec<(Option<&str>, &str)> = list
                .iter()
                .filter_map(|t| {
                    let template = t.get("template")?.as_str()?;
                    Some((t.get("name").and_then(Value::as_str), template))
                })
                .collect();
            if let Some((_, t)) = named.iter().find(|(n, _)| *n == Some("default")) {
                return Ok(Some(t.to_string()));
            }
            match named.as_slice() {
                [(_, t)] => Ok(Some(t.to_string())),
                [] => Err(format_err(
                    path,
                    "chat_template is a list without any {\"name\", \"template\"} entry",
                )),
                _ => Err(format_err(
                    path,
                    "chat_template lists several templates but no 'default'",
                )),
            }
        }
        Some(_) => Err(format_err(path, "chat_template must be a string")),
    }
}

/// Make sure every token of `added_tokens_decoder` exists with its declared id.
fn apply_added_tokens_decoder(
    tok: &mut Tokenizer,
    cfg: &Map<String, Value>,
    path: &Path,
) -> Result<(), CliError> {
    let Some(decoder) = cfg.get("added_tokens_decoder") else {
        return Ok(());
    };
    let decoder = match decoder {
        // an empty list is an empty table (as Python reads it); other values are errors
        Value::Null => return Ok(()),
        Value::Array(a) if a.is_empty() => return Ok(()),
        Value::Object(d) => d,
        _ => return Err(format_err(path, "added_tokens_decoder must be an object")),
    };
    let mut entries: Vec<(u32, &Value)> = Vec::with_capacity(decoder.len());
    for (key, spec) in decoder {
        let id = key
            .parse::<u32>()
            .ok()
            .filter(|_| token_content(spec).is_some());
        let Some(id) = id else {
            return Err(format_err(
                path,
                format!("bad added_tokens_decoder entry '{key}': {spec}"),
            ));
        };
        entries.push((id, spec));
    }
    entries.sort_by_key(|(id, _)| *id);
    for (want, spec) in entries {
        let content = token_content(spec).unwrap_or_default();
        let mut have = tok.token_to_id(content);
        if have.is_none() {
            let special = spec.get("special").and_then(Value::as_bool).unwrap_or(true);
            let added = AddedToken::from(content, special).normalized(!special);
            if special {
                tok.add_special_tokens(&[added]);
            } else {
                tok.add_tokens(&[added]);
            }
            have = tok.token_to_id(content);
        }
        if have != Some(want) {
            return Err(format_err(
                path,
                format!(
                    "added_tokens_decoder gives '{content}' id {want}, but tokenizer.json has it as id {}",
                    have.map_or("none".into(), |h| h.to_string())
                ),
            ));
        }
    }
    Ok(())
}

/// Generation defaults of a model directory (generation_config.json, else greedy / 256).
#[derive(Debug, Clone, PartialEq)]
pub struct GenDefaults {
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    /// Cap on prompt + generated tokens (HF `max_length`); cleared by an explicit --max-new-tokens.
    pub max_length: Option<usize>,
    pub stop: Vec<String>,
}

impl Default for GenDefaults {
    fn default() -> Self {
        GenDefaults {
            params: SamplingParams::default(),
            max_new_tokens: 256,
            max_length: None,
            stop: Vec::new(),
        }
    }
}

impl GenDefaults {
    /// Read `dir/generation_config.json` if present.
    pub fn load(dir: &Path) -> Result<GenDefaults, CliError> {
        let path = dir.join("generation_config.json");
        match read_json_object(&path)? {
            None => Ok(GenDefaults::default()),
            Some(cfg) => GenDefaults::from_hf(&cfg).map_err(|m| format_err(&path, m)),
        }
    }

    /// transformers' semantics: `do_sample` false (or absent) means greedy whatever the
    /// temperature; when sampling, absent temperature/top_k/top_p take transformers' defaults
    /// (1.0 / 50 / 1.0). In greedy mode the stated filters (top_k, top_p, min_p) are kept all
    /// the same, for a `--temperature` that turns sampling on (absent ones stay off).
    /// repetition_penalty, max_new_tokens, max_length and stop_strings apply in both modes.
    /// Unknown keys are ignored. Mirrors `GenerationConfig.from_hf_dict`.
    pub fn from_hf(d: &Map<String, Value>) -> Result<GenDefaults, String> {
        let get = |k: &str| d.get(k).filter(|v| !v.is_null());
        let num = |k: &str, default: f64| -> Result<f32, String> {
            match get(k) {
                None => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| format!("'{k}' must be a number, got {v}")),
            }
        };
        let int = |k: &str| -> Result<Option<usize>, String> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| format!("'{k}' must be an integer >= 0, got {v}")),
            }
        };
        let mut g = GenDefaults::default();
        let do_sample = match get("do_sample") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(format!("'do_sample' must be true or false, got {v}")),
        };
        if do_sample {
            g.params.temperature = num("temperature", 1.0)?;
            g.params.top_k = int("top_k")?.unwrap_or(50);
        } else {
            g.params.top_k = int("top_k")?.unwrap_or(0);
        }
        g.params.top_p = num("top_p", 1.0)?;
        g.params.min_p = num("min_p", 0.0)?;
        g.params.repetition_penalty = num("repetition_penalty", 1.0)?;
        if let Some(n) = int("max_new_tokens")? {
            g.max_new_tokens = n;
        } else if let Some(n) = int("max_length")? {
            g.max_length = Some(n);
        }
        match get("stop_strings") {
            None => {}
            Some(Value::String(s)) => g.stop.push(s.clone()),
            Some(Value::Array(a)) => {
                for s in a {
                    match s.as_str() {
                        Some(s) if !s.is_empty() => g.stop.push(s.to_string()),
                        _ => {
                            return Err(format!(
                                "'stop_strings' must hold non-empty strings, got {s}"
                            ))
                        }
                    }
                }
            }
            Some(v) => {
                return Err(format!(
                    "'stop_strings' must be a string or a list of strings, got {v}"
                ))
            }
        }
        g.params.validate().map_err(|e| e.to_string())?;
        Ok(g)
    }

    /// A one-line description: "greedy" or the sampling settings.
    pub fn describe(&self) -> String {
        let p = &self.params;
        let mode = if p.is_greedy() {
            "greedy".to_string()
        } else {
            format!(
                "temperature {}, top_k {}, top_p {}",
                p.temperature, p.top_k, p.top_p
            )
        };
        match self.max_length {
            Some(n) => format!("{mode}, max_length {n}"),
            None => format!("{mode}, max_new_tokens {}", self.max_new_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(v: serde_json::Value) -> Result<GenDefaults, String> {
        GenDefaults::from_hf(v.as_object().unwrap())
    }

    #[test]
    fn generation_config_greedy_unless_do_sample() {
        let g = hf(serde_json::json!({"temperature": 0.7, "top_k": 20, "eos_token_id": [1, 2]}))
            .unwrap();
        assert!(g.params.is_greedy());
        assert_eq!(g.max_new_tokens, 256);
        // the stated filter is kept for a --temperature that samples; absent ones stay off
        assert_eq!(
            (g.params.top_k, g.params.top_p, g.params.min_p),
            (20, 1.0, 0.0)
        );
        let g = hf(serde_json::json!({"do_sample": false, "top_p": 0.8, "min_p": 0.05})).unwrap();
        assert!(g.params.is_greedy());
        assert_eq!(
            (g.params.top_k, g.params.top_p, g.params.min_p),
            (0, 0.8, 0.05)
        );
        let g = hf(
            serde_json::json!({"do_sample": true, "temperature": 0.7, "top_p": 0.8,
                                       "repetition_penalty": 1.05, "max_new_tokens": 64,
                                       "stop_strings": ["\n\n"]}),
        )
        .unwrap();
        assert_eq!(g.params.temperature, 0.7);
        assert_eq!(g.params.top_k, 50, "transformers' default top_k");
        assert_eq!(g.params.top_p, 0.8);
        assert_eq!(g.params.repetition_penalty, 1.05);
        assert_eq!(g.max_new_tokens, 64);
        assert_eq!(g.stop, vec!["\n\n".to_string()]);
        let g = hf(serde_json::json!({"max_length": 100, "stop_strings": "END"})).unwrap();
        assert_eq!((g.max_length, g.stop), (Some(100), vec!["END".to_string()]));
    }

    #[test]
    fn template_lists_and_empty_added_tokens_decoder() {
        let p = Path::new("tokenizer_config.json");
        let v = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(pick_template(Some(&v), p).unwrap().as_deref(), Some("D"));
        for empty in [serde_json::json!([]), serde_json::json!([{"name": "x"}])] {
            let e = pick_template(Some(&empty), p).unwrap_err().to_string();
            assert!(e.contains("without any"), "{e}");
        }
        let tj = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../python/sparselm/models/plm-tiny/tokenizer.json"),
        )
        .unwrap();
        let mut tok = Tokenizer::from_bytes(tj.as_bytes()).unwrap();
        let n = tok.get_vocab_size(true);
        let cfg = |v: serde_json::Value| {
            serde_json::json!({ "added_tokens_decoder": v })
                .as_object()
                .unwrap()
                .clone()
        };
        // an empty list is an empty table, as Python reads it (was "must be an object")
        apply_added_tokens_decoder(&mut tok, &cfg(serde_json::json!([])), p).unwrap();
        assert_eq!(tok.get_vocab_size(true), n);
        for odd in [serde_json::json!(0), serde_json::json!([1])] {
            let e = apply_added_tokens_decoder(&mut tok, &cfg(odd), p).unwrap_err();
            assert!(e.to_string().contains("must be an object"), "{e}");
        }
    }

    #[test]
    fn generation_config_errors() {
        assert!(hf(serde_json::json!({"do_sample": "yes"}))
            .unwrap_err()
            .contains("do_sample"));
        assert!(hf(serde_json::json!({"do_sample": true, "top_p": 0}))
            .unwrap_err()
            .contains("top_p"));
        assert!(hf(serde_json::json!({"do_sample": false, "top_p": 0}))
            .unwrap_err()
            .contains("top_p"));
        assert!(hf(serde_json::json!({"max_new_tokens": -1}))
            .unwrap_err()
            .contains("max_new_tokens"));
        assert!(hf(serde_json::json!({"stop_strings": [""]}))
            .unwrap_err()
            .contains("stop_strings"));
    }

    #[test]
    fn eos_id_forms() {
        let p = Path::new("config.json");
        let ids = |v: serde_json::Value| eos_ids(v.as_object().unwrap(), p);
        assert_eq!(ids(serde_json::json!({})).unwrap(), Vec::<u32>::new());
        assert_eq!(
            ids(serde_json::json!({"eos_token_id": 7})).unwrap(),
            vec![7]
        );
        assert_eq!(
            ids(serde_json::json!({"eos_token_id": [7, 9]})).unwrap(),
            vec![7, 9]
        );
        assert!(ids(serde_json::json!({"eos_token_id": "x"})).is_err());
    }

    #[test]
    fn template_choice() {
        let p = Path::new("tokenizer_config.json");
        let list = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(pick_template(Some(&list), p).unwrap().as_deref(), Some("D"));
        let one = serde_json::json!([{"name": "x", "template": "X"}]);
        assert_eq!(pick_template(Some(&one), p).unwrap().as_deref(), Some("X"));
        assert!(pick_template(Some(&serde_json::json!(3)), p).is_err());
        assert_eq!(pick_template(None, p).unwrap(), None);
    }
}
