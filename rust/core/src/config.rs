//! `ModelConfig`: the PLM `config.json`, with Hugging Face field names, validated once.
//!
//! Unknown keys are tolerated (HF configs carry many). Anything that would make the forward
//! pass index out of bounds is rejected here, so the rest of the core can trust these numbers.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model hyper-parameters (HF `config.json` names).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(format!("missing required field '{key}'")))?;
        match v.as_u64() {
            Some(n) if n > 0 && n <= (1 << 40) => Ok(n as usize),
            _ => Err(self.err(format!("'{key}' must be a positive integer, got {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(self.err(format!("'{key}' must be a positive number, got {v}"))),
            },
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("'{key}' must be true or false, got {v}"))),
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

impl ModelConfig {
    /// Parse and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = Error::read_text(path).map_err(|e| match e {
            Error::Format { path, msg } => Error::Config { path, msg },
            e => e,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate a config from JSON text; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            msg: "expected a JSON object".into(),
        })?;
        let f = Fields { obj, path };

        match f.str("model_type") {
            Some("plm") => {}
            Some(other) => {
                return Err(f.err(format!(
                    "model_type '{other}' is not supported: sparselm runs PLM models (model_type \"plm\")"
                )))
            }
            None => return Err(f.err("missing required field 'model_type' (expected \"plm\")".into())),
        }
        if let Some(act) = f.get("hidden_act") {
            if act.as_str() != Some("relu2") {
                return Err(Error::Unsupported(format!(
                    "{}: hidden_act {act} is not supported (PLM uses \"relu2\")",
                    path.display()
                )));
            }
        }
        if f.get("q_lora_rank").is_some() {
            return Err(Error::Unsupported(format!(
                "{}: q_lora_rank is set; the low-rank query projection (q_a_proj/q_b_proj) is not \
                 implemented, only PLM's plain q_proj (q_lora_rank null)",
                path.display()
            )));
        }
        if let Some(rs) = f.get("rope_scaling") {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str);
            if kind != Some("default") {
                return Err(Error::Unsupported(format!(
                    "{}: rope_scaling {rs} is not supported (PLM uses none)",
                    path.display()
                )));
            }
        }
        if !f.bool_or("rope_interleave", true)? {
            return Err(Error::Unsupported(format!(
                "{}: rope_interleave=false (half-split RoPE) is not supported; PLM rotates adjacent pairs",
                path.display()
            )));
        }
        if f.bool_or("mlp_bias", false)? {
            return Err(Error::Unsupported(format!(
                "{}: mlp_bias=true is not supported (PLM has no biases)",
                path.display()
            )));
        }
        if f.bool_or("attention_bias", false)? {
            return Err(Error::Unsupported(format!(
                "{}: attention_bias=true is not supported (PLM has no biases)",
                path.display()
            )));
        }

        let cfg = ModelConfig {
            vocab_size: f.usize("vocab_size")?,
            hidden_size: f.usize("hidden_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            intermediate_size: f.usize("intermediate_size")?,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
            v_head_dim: f.usize("v_head_dim")?,
            rope_theta: f.f64_or("rope_theta", 10000.0)?,
            max_position_embeddings: f.usize("max_position_embeddings")?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Cross-field checks; limits keep every derived size far from overflow.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| Error::Config {
            path: PathBuf::from(path),
            msg,
        };
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "qk_rope_head_dim must be even (RoPE rotates pairs), got {}",
                self.qk_rope_head_dim
            )));
        }
        let limits = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("kv_lora_rank", self.kv_lora_rank, 1 << 14),
            ("qk_nope_head_dim", self.qk_nope_head_dim, 1 << 12),
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1 << 12),
            ("v_head_dim", self.v_head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 20,
            ),
        ];
        for (name, v, max) in limits {
            if v > max {
                return Err(err(format!(
                    "'{name}' = {v} exceeds the supported maximum {max}"
                )));
            }
        }
        // RoPE tables hold max_position_embeddings × qk_rope_head_dim floats (256 MiB here)
        if self.max_position_embeddings * self.qk_rope_head_dim > 1 << 26 {
            return Err(err(format!(
                "max_position_embeddings x qk_rope_head_dim = {} x {} exceeds the supported \
                 maximum 2^26",
                self.max_position_embeddings, self.qk_rope_head_dim
            )));
        }
        if self.rms_norm_eps >= 1.0 {
            return Err(err(format!(
                "rms_norm_eps must be small and positive, got {}",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }

    /// Per-head query/key width: nope + rope.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// MLA widths: (heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim).
    pub fn mla_dims(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.num_attention_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        )
    }

    /// Width of one latent cache row: kv_lora_rank + qk_rope_head_dim.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The config as a JSON object (HF names), for the bindings.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "model_type": "plm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "relu2",
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": Value::Null,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["PLMForCausalLM"], "model_type": "plm", "vocab_size": 151936,
            "hidden_size": 2048, "num_hidden_layers": 32, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 8192, "hidden_act": "relu2",
            "kv_lora_rank": 512, "q_lora_rank": null, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 100000.0,
            "rope_scaling": null, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "attention_bias": false, "torch_dtype": "bfloat16",
            "n_routed_experts": null, "rope_interleave": true
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn parses_plm_1_8b() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.hidden_size, 2048);
        assert_eq!(c.latent_dim(), 576);
        assert_eq!(c.qk_head_dim(), 192);
    }

    #[test]
    fn rejects_bad_values() {
        for (k, v) in [
            ("model_type", serde_json::json!("llama")),
            ("hidden_size", serde_json::json!(-3)),
            ("num_attention_heads", serde_json::json!(0)),
            ("qk_rope_head_dim", serde_json::json!(63)),
            ("vocab_size", serde_json::json!("many")),
            ("rms_norm_eps", serde_json::json!(-1.0)),
        ] {
            let mut c = base();
            c[k] = v;
            let e = parse(&c).unwrap_err();
            assert_eq!(e.kind(), "config", "{k}: {e}");
            assert!(e.to_string().contains(k) || k == "model_type", "{e}");
        }
        for (k, v) in [
            ("q_lora_rank", serde_json::json!(1536)),
            ("hidden_act", serde_json::json!(5)),
            ("hidden_act", serde_json::json!(["relu2"])),
            ("hidden_act", serde_json::json!("gelu")),
            ("mlp_bias", serde_json::json!(true)),
            ("attention_bias", serde_json::json!(true)),
        ] {
            let mut c = base();
            c[k] = v;
            let e = parse(&c).unwrap_err();
            assert_eq!(e.kind(), "unsupported", "{k}: {e}");
            assert!(e.to_string().contains(k), "{e}");
        }
        let mut c = base();
        c["mlp_bias"] = serde_json::json!(false);
        c["max_position_embeddings"] = serde_json::json!(1 << 20);
        c["qk_rope_head_dim"] = serde_json::json!(128); // 2^27 RoPE table entries
        let e = parse(&c).unwrap_err();
        assert!(e.to_string().contains("qk_rope_head_dim"), "{e}");
        c["qk_rope_head_dim"] = serde_json::json!(64);
        assert!(parse(&c).is_ok());
        assert_eq!(
            ModelConfig::from_json_str("{", Path::new("x"))
                .unwrap_err()
                .kind(),
            "config"
        );
    }
}
