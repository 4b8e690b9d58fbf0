//! The tensor table (every tensor PLM needs: name, shape, role) and the in-memory weights.
//!
//! The loader, the validator and the tests all use `tensor_table`, so a name or shape is
//! written down exactly once.

use crate::config::ModelConfig;
use crate::tensor::Matrix;

/// How a tensor is stored after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A 1-D norm gain, kept in f32.
    Norm,
    /// A weight matrix `[out, in]`, stored in the session dtype.
    Matrix,
    /// `mlp.down_proj` `[hidden, inter]`, stored transposed `[inter, hidden]` (neuron-major) so
    /// the sparse down projection reads one contiguous row per active neuron.
    MatrixTransposed,
}

/// One expected tensor.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

/// Every tensor a PLM checkpoint must hold, in file (`[out, in]`) shapes.
pub fn tensor_table(c: &ModelConfig) -> Vec<TensorSpec> {
    let (d, h) = (c.hidden_size, c.num_attention_heads);
    let spec = |name: String, shape: Vec<usize>, role| TensorSpec { name, shape, role };
    let mut t = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, d],
        Role::Matrix,
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        t.extend([
            spec(format!("{p}.input_layernorm.weight"), vec![d], Role::Norm),
            spec(
                format!("{p}.self_attn.q_proj.weight"),
                vec![h * c.qk_head_dim(), d],
                Role::Matrix,
            ),
            spec(
                format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                vec![c.latent_dim(), d],
                Role::Matrix,
            ),
            spec(
                format!("{p}.self_attn.kv_a_layernorm.weight"),
                vec![c.kv_lora_rank],
                Role::Norm,
            ),
            spec(
                format!("{p}.self_attn.kv_b_proj.weight"),
                vec![h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
                Role::Matrix,
            ),
            spec(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, h * c.v_head_dim],
                Role::Matrix,
            ),
            spec(
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                Role::Norm,
            ),
            spec(
                format!("{p}.mlp.up_proj.weight"),
                vec![c.intermediate_size, d],
                Role::Matrix,
            ),
            spec(
                format!("{p}.mlp.down_proj.weight"),
                vec![d, c.intermediate_size],
                Role::MatrixTransposed,
            ),
        ]);
    }
    t.push(spec("model.norm.weight".into(), vec![d], Role::Norm));
    if !c.tie_word_embeddings {
        t.push(spec(
            "lm_head.weight".into(),
            vec![c.vocab_size, d],
            Role::Matrix,
        ));
    }
    t
}

/// One decoder layer's weights.
#[derive(Debug)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>, //  [d]
    pub q_proj: Matrix,       //  [H·(dn+dr), d]
    pub kv_a: Matrix,         //  [r+dr, d]       rows 0..r latent c, r.. shared rope key
    pub kv_a_norm: Vec<f32>,  //  [r]
    pub kv_bk: Matrix,        //  [H·dn, r]       W_UK: kv_b_proj's k_nope rows, head by head
    pub kv_bv: Matrix,        //  [H·dv, r]       W_UV: kv_b_proj's v rows, head by head
    pub o_proj: Matrix,       //  [d, H·dv]
    pub post_norm: Vec<f32>,  //  [d]
    pub up: Matrix,           //  [I, d]
    pub down: Down,           //  down_proj, in the layout the MLP reads it
}

/// `mlp.down_proj`, in one of two layouts chosen at load (`SPARSELM_DENSE_MLP`).
#[derive(Debug)]
pub enum Down {
    /// `W_downᵀ` `[I, d]`, row j = neuron j (the planar int8 layout for Q8_0/Q4_0): the
    /// sparse down projection reads only the rows of non-zero neurons. The default.
    Transposed(Matrix),
    /// `W_down` `[d, I]` for a dense GEMV that reads every neuron's weights on every token (the
    /// dense baseline): Q8_0/Q4_0 as one matrix in the GEMV layout, quantized along the
    /// intermediate dimension; float formats cut into column blocks of
    /// [`DOWN_COL_BLOCK`](crate::tensor::DOWN_COL_BLOCK) neurons
    /// ([`matvec_blocks`](crate::tensor::matvec_blocks)).
    Dense(Vec<Matrix>),
}

impl Down {
    /// Bytes held by the weights.
    pub fn nbytes(&self) -> usize {
        match self {
            Down::Transposed(m) => m.nbytes(),
            Down::Dense(blocks) => blocks.iter().map(Matrix::nbytes).sum(),
        }
    }

    /// Weight bytes of one neuron (a row of `W_downᵀ`, a column of `W_down`).
    pub fn bytes_per_neuron(&self) -> f64 {
        match self {
            Down::Transposed(m) => m.nbytes() as f64 / m.rows as f64,
            Down::Dense(blocks) => {
                self.nbytes() as f64 / blocks.iter().map(|m| m.cols).sum::<usize>().max(1) as f64
            }
        }
    }
}

/// All weights of a model; immutable after loading and shared by every session.
#[derive(Debug)]
pub struct Weights {
    pub embed: Matrix, // [V, d]
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,          // [d]
    pub lm_head: Option<Matrix>, // [V, d]; None when tied to `embed`
}

impl Weights {
    /// The output projection: `lm_head` or the tied embedding.
    pub fn output(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weight matrices (norms excluded).
    /// Every matrix a prompt multiplies is stored in f32 (a quantized load of widths that are
    /// not multiples of 32 keeps them all in f32).
    pub fn all_f32(&self) -> bool {
        let f32 = |m: &Matrix| m.dtype() == crate::tensor::DType::F32;
        f32(self.output())
            && self.layers.iter().all(|l| {
                [&l.q_proj, &l.kv_a, &l.kv_bk, &l.kv_bv, &l.o_proj, &l.up]
                    .into_iter()
                    .all(f32)
                    && match &l.down {
                        Down::Transposed(m) => f32(m),
                        Down::Dense(blocks) => blocks.iter().all(f32),
                    }
            })
    }

    pub fn nbytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, Matrix::nbytes);
        for l in &self.layers {
            n += l.q_proj.nbytes()
                + l.kv_a.nbytes()
                + l.kv_bk.nbytes()
                + l.kv_bv.nbytes()
                + l.o_proj.nbytes()
                + l.up.nbytes()
                + l.down.nbytes();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn plm_1_8b_parameter_count() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"plm","vocab_size":151936,"hidden_size":2048,"num_hidden_layers":32,
            "num_attention_heads":16,"intermediate_size":8192,"hidden_act":"relu2","kv_lora_rank":512,
            "q_lora_rank":null,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128,
            "rope_theta":100000.0,"max_position_embeddings":4096,"rms_norm_eps":1e-6,
            "tie_word_embeddings":true}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let total: usize = tensor_table(&cfg)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        // plm-architecture.md §2: 1,825,458,176 parameters.
        assert_eq!(total, 1_825_458_176);
    }
}
