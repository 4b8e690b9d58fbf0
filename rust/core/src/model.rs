//! `Model`: config + immutable weights + RoPE tables + a thread pool, and the forward pass.
//!
//! `forward` reads top to bottom like the HF module it mirrors (plm-architecture.md §3):
//! embedding → per layer { RMSNorm → MLA → residual → RMSNorm → ReLU² MLP → residual } →
//! RMSNorm → tied output. Attention has two formulations on the same latent cache: dense
//! (decompress K/V of every cached position; used for prompts) and weight-absorbed (multi-query
//! attention over the latent itself; used for generated tokens).

use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::control::{Control, NEVER};
use crate::error::{Error, Result};
use crate::gemm;
use crate::kernels::kernels;
use crate::kv_cache::LatentCache;
use crate::loader::load_weights;
use crate::ops::{add, relu2_collect, relu2_count, rmsnorm, rope_adjacent, rope_tables, softmax};
use crate::state::State;
use crate::tensor::{matmul_blocks, matvec_blocks, DType, Matrix};
use crate::weights::{Down, LayerWeights, Weights};

thread_local! {
    /// The `(row, coefficient)` list of one head's absorbed query (`W_UK_hᵀ q_nope_h`), kept
    /// per worker thread so a decode step allocates nothing.
    static TERMS: std::cell::RefCell<Vec<(u32, f32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which attention formulation a forward call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMode {
    /// Dense for more than one token, absorbed for a single token.
    Auto,
    /// Decompress k_nope/v of every cached position with kv_b_proj (prefill).
    Dense,
    /// Absorb kv_b_proj into the query and output (decode).
    Absorbed,
}

impl AttnMode {
    pub fn parse(s: &str) -> Result<AttnMode> {
        match s {
            "auto" => Ok(AttnMode::Auto),
            "dense" => Ok(AttnMode::Dense),
            "absorbed" => Ok(AttnMode::Absorbed),
            _ => Err(Error::Argument(format!(
                "attention must be 'auto', 'dense' or 'absorbed', got '{s}'"
            ))),
        }
    }
}

/// A loaded model, shared (read-only) by any number of sessions.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pub dtype: DType,
    rope_cos: Vec<f32>, // [max_position_embeddings, dr/2]
    rope_sin: Vec<f32>, // [max_position_embeddings, dr/2]
    /// The threads of the process using the model (see [`Workers`]).
    workers: Mutex<Arc<Workers>>,
    threads: usize,
    use_team: bool,
    /// Skip the zero ReLU² neurons in the down projection (exact). Off only for benchmarks and
    /// tests, to measure what sparsity buys: with `SPARSELM_DENSE_MLP=1` at load, `W_down` is
    /// kept for a dense GEMV (`Down::Dense`: quantized formats in the GEMV layout, float ones
    /// in column blocks) and every neuron is read, as a dense engine does;
    /// `SPARSELM_DENSE_MLP=rows` keeps `W_downᵀ` and visits every row, zeros included.
    pub sparse_mlp: bool,
    /// Prompt GEMMs (T > 1) in bf16 × bf16 → f32 (`crate::gemm`), and int8 (VNNI) for
    /// matrices in the interleaved Q8_0/Q4_0 layout: on when the CPU has AVX512_BF16 and some
    /// weights are not f32; matrices stored in f32 keep the f32 path either way.
    /// `SPARSELM_EXACT_GEMM=1` keeps the f32 path for all.
    pub fast_gemm: bool,
    /// Prompt products of matrices in the interleaved Q8_0/Q4_0 layout run as int8 GEMMs
    /// (`gemm::matmul_q16`: the decode kernels' arithmetic, bit-identical to decoding token by
    /// token) on every CPU that has the 16-row kernels (AVX2 and up), with or without
    /// AVX512_BF16. Off with `SPARSELM_EXACT_GEMM=1`.
    pub int8_gemm: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("threads", &self.threads())
            .finish()
    }
}

/// A model's threads, in the process that started them: the rayon pool (prompts, loading) and
/// the decode step's spinning team (`crate::team`), as many threads as the pool; no team with
/// one thread, or with `SPARSELM_DECODE_TEAM=0` (decode then uses the pool).
///
/// After a `fork()` the child has none of these threads (only the forking thread is copied),
/// and waiting for them hung its first forward pass forever. So a model remembers the process
/// that started its threads; used in another one (a forked child: `multiprocessing`, a
/// pre-forking server) it starts that process's own on first use, and never drops the
/// parent's there (their shutdown would wait for threads that do not exist).
struct Workers {
    pid: u32,
    pool: ManuallyDrop<rayon::ThreadPool>,
    team: ManuallyDrop<Option<crate::team::Team>>,
}

impl Workers {
    fn new(pool: rayon::ThreadPool, use_team: bool) -> Workers {
        let n = pool.current_num_threads();
        // A team that cannot start its threads leaves decode on the rayon pool.
        let team = (use_team && n > 1)
            .then(|| crate::team::Team::new(n).ok())
            .flatten();
        Workers {
            pid: std::process::id(),
            pool: ManuallyDrop::new(pool),
            team: ManuallyDrop::new(team),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if self.pid == std::process::id() {
            // SAFETY: each field is dropped once, here, and not used again.
            unsafe {
                ManuallyDrop::drop(&mut self.team);
                ManuallyDrop::drop(&mut self.pool);
            }
        }
        // else: threads of another process (we were forked); leaked on purpose
    }
}

fn start_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("sparselm-{i}"))
        .build()
        .map_err(|e| Error::Argument(format!("cannot start {threads} threads: {e}")))
}

/// Prompts of at most this many tokens run the down projection token by token on decode's
/// sparse path instead of the bf16 GEMM (whose per-call weight conversion dominates short
/// prompts; crossover measured in PERF NOTES, kernels/mod.rs).
pub const DOWN_PER_TOKEN_MAX: usize = 16;

/// Parse a dtype name of `load` (`auto` → None: keep the file's dtype).
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    match s {
        "auto" => Ok(None),
        "f32" | "float32" => Ok(Some(DType::F32)),
        "f16" | "float16" => Ok(Some(DType::F16)),
        "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
        "q8_0" => Ok(Some(DType::Q8_0)),
        "q4_0" => Ok(Some(DType::Q4_0)),
        _ => Err(Error::Dtype(format!(
            "unknown dtype '{s}'; expected one of auto, f32, f16, bf16, q8_0, q4_0"
        ))),
    }
}

impl Model {
    /// Load `dir/config.json` and its safetensors weights. `threads == 0`: one per physical
    /// core ([`crate::cpu::default_threads`]).
    pub fn load(dir: &Path, dtype: Option<DType>, threads: usize) -> Result<Model> {
        Self::load_with(dir, dtype, threads, &NEVER)
    }

    /// [`Self::load`] under `ctl`: its progress counts the tensors converted, and a stop
    /// request ends the load with [`Error::Interrupted`] before the next tensor.
    pub fn load_with(
        dir: &Path,
        dtype: Option<DType>,
        threads: usize,
        ctl: &Control,
    ) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let threads = crate::cpu::resolve_threads(threads).map_err(|why| {
            Error::Argument(format!("threads={why}; 0 picks one per physical core"))
        })?;
        read_env_settings();
        let pool = start_pool(threads)?;
        // read once: the layout of W_down and the MLP's path must agree
        let mode = mlp_mode();
        let dense_down = mode == MlpMode::Dense;
        let (weights, dtype) =
            pool.install(|| load_weights(dir, &config, dtype, dense_down, ctl))?;
        Ok(Self::assemble(config, weights, dtype, pool, mode))
    }

    /// Assemble a model from already-built weights (tests, synthetic benchmarks).
    pub fn from_parts(
        config: ModelConfig,
        weights: Weights,
        dtype: DType,
        pool: rayon::ThreadPool,
    ) -> Model {
        Self::assemble(config, weights, dtype, pool, mlp_mode())
    }

    fn assemble(
        config: ModelConfig,
        weights: Weights,
        dtype: DType,
        pool: rayon::ThreadPool,
        mode: MlpMode,
    ) -> Model {
        let (rope_cos, rope_sin) = rope_tables(
            config.max_position_embeddings,
            config.qk_rope_head_dim,
            config.rope_theta,
        );
        let sparse_mlp = mode == MlpMode::Sparse;
        let exact = std::env::var("SPARSELM_EXACT_GEMM").is_ok_and(|v| !v.is_empty() && v != "0");
        // per matrix too (`matmul`): an f32 matrix keeps the f32 path in any model
        let fast_gemm = gemm::available() && !weights.all_f32() && !exact;
        let int8_gemm = !exact;
        let use_team =
            std::env::var("SPARSELM_DECODE_TEAM").map_or(true, |v| v.is_empty() || v != "0");
        let threads = pool.current_num_threads();
        Model {
            config,
            weights,
            dtype,
            rope_cos,
            rope_sin,
            workers: Mutex::new(Arc::new(Workers::new(pool, use_team))),
            threads,
            use_team,
            sparse_mlp,
            fast_gemm,
            int8_gemm,
        }
    }

    /// `Y = X Wᵀ` for `t` tokens: for prompts the int8 GEMM of interleaved matrices and the bf16
    /// GEMM of the others when enabled, else `Matrix::matmul`.
    fn matmul(&self, w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
        if t > 1 && self.int8_gemm && w.is_interleaved() {
            // int8 (VNNI, AMX-INT8 or AVX2), inputs quantized to Q8_0 as in decoding
            gemm::matmul_q16(w, x, t, y);
        } else if self.fast_gemm && t > 1 && w.dtype() != DType::F32 {
            gemm::matmul_nk(w, x, t, y);
        } else {
            w.matmul(x, t, y);
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Arithmetic of the prompt (multi-token) projections: `"bf16"` (AVX512_BF16 GEMMs, int8 for
    /// the interleaved Q8_0/Q4_0 matrices), `"int8"` (no bf16 GEMM here, but the Q8_0/Q4_0
    /// projections are int8 GEMMs with decoding's arithmetic) or `"f32"`.
    pub fn prompt_gemm(&self) -> &'static str {
        if self.fast_gemm {
            "bf16"
        } else if self.int8_gemm
            && self
                .weights
                .layers
                .iter()
                .any(|l| l.q_proj.is_interleaved() || l.up.is_interleaved())
        {
            "int8"
        } else {
            "f32"
        }
    }

    /// This process's threads of the model: the ones started at load, or in a forked child
    /// its own, started on first use (see [`Workers`]).
    fn workers(&self) -> Result<Arc<Workers>> {
        let mut w = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if w.pid != std::process::id() {
            *w = Arc::new(Workers::new(start_pool(self.threads)?, self.use_team));
        }
        Ok(Arc::clone(&w))
    }

    /// Run `f` on this model's thread pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        Ok(self.workers()?.pool.install(f))
    }

    /// A fresh latent cache of `max_seq` positions (0: the model's context length).
    pub fn new_cache(&self, max_seq: usize) -> Result<LatentCache> {
        let c = &self.config;
        let max_seq = if max_seq == 0 {
            c.max_position_embeddings
        } else {
            max_seq
        };
        if max_seq > c.max_position_embeddings {
            return Err(Error::Argument(format!(
                "max_seq {max_seq} exceeds the model's context length {}",
                c.max_position_embeddings
            )));
        }
        LatentCache::new(
            c.num_hidden_layers,
            max_seq,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
        )
    }

    /// Check token ids and context room for feeding `tokens` at `pos0`.
    pub fn check_tokens(&self, tokens: &[u32], pos0: usize, cache: &LatentCache) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Argument("no tokens to process".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::Argument(format!(
                "token id {bad} is out of range for vocab_size {}",
                self.config.vocab_size
            )));
        }
        if pos0 + tokens.len() > cache.max_seq {
            return Err(Error::Context {
                needed: pos0 + tokens.len(),
                max: cache.max_seq,
                what: format!("{pos0} cached + {} new tokens", tokens.len()),
            });
        }
        Ok(())
    }

    /// Process `tokens` at positions `pos0..pos0+T`, writing their latents into `cache`.
    /// Logits land in `st.logits`: `[T, V]` if `all_logits`, else `[V]` for the last token.
    /// `ctl` is checked before each layer and after the last: a stop request returns
    /// [`Error::Interrupted`], with latents of some layers written at positions past `pos0`
    /// (which the caller does not count as cached) and `st.logits` not updated. Its progress
    /// counts the layers done.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut LatentCache,
        st: &mut State,
        mode: AttnMode,
        all_logits: bool,
        ctl: &Control,
    ) -> Result<()> {
        self.check_tokens(tokens, pos0, cache)?;
        let c = &self.config;
        let t = tokens.len();
        st.ensure(c, t, all_logits);
        let (d, v) = (c.hidden_size, c.vocab_size);
        let eps = c.rms_norm_eps as f32;
        let dense = match mode {
            AttnMode::Auto => t > 1,
            AttnMode::Dense => true,
            AttnMode::Absorbed => false,
        };
        ctl.begin(c.num_hidden_layers);
        let mut pass = || -> Result<()> {
            // h = E[token]                                               [T, d]
            for (i, &tok) in tokens.iter().enumerate() {
                self.weights
                    .embed
                    .row_to_f32(tok as usize, &mut st.h[i * d..(i + 1) * d]);
            }
            for (l, lw) in self.weights.layers.iter().enumerate() {
                ctl.check()?;
                // a = RMSNorm(h; input_layernorm);  h += Attn(a)
                norm_rows(&st.h[..t * d], &lw.input_norm, eps, &mut st.a[..t * d]);
                self.attention(l, lw, t, pos0, cache, st, dense);
                add(&mut st.h[..t * d], &st.proj[..t * d]);
                // b = RMSNorm(h; post_attention_layernorm);  h += W_down relu(W_up b)²
                norm_rows(&st.h[..t * d], &lw.post_norm, eps, &mut st.a[..t * d]);
                self.mlp(l, lw, t, st);
                add(&mut st.h[..t * d], &st.proj[..t * d]);
                ctl.step();
            }
            // a stop asked for during the last layer: the logits are not wanted either
            ctl.check()?;
            // logits = E · RMSNorm(h; model.norm)
            let out = self.weights.output();
            if all_logits {
                norm_rows(&st.h[..t * d], &self.weights.norm, eps, &mut st.a[..t * d]);
                self.matmul(out, &st.a[..t * d], t, &mut st.logits[..t * v]);
            } else {
                let last = &st.h[(t - 1) * d..t * d];
                rmsnorm(last, &self.weights.norm, eps, &mut st.a[..d]);
                out.matvec(&st.a[..d], &mut st.logits[..v]);
            }
            Ok(())
        };
        let workers = self.workers()?;
        workers.pool.install(|| {
            // A single token's forward pass is ~200 short parallel regions: they run on the
            // spinning team; prompts (GEMMs) on the rayon pool.
            match workers.team.as_ref().filter(|_| t == 1) {
                Some(team) => crate::team::with_team(team, pass),
                None => pass(),
            }
        })
    }

    /// Multi-head latent attention of `t` tokens; result in `st.proj[..t·d]`.
    fn attention(
        &self,
        l: usize,
        lw: &LayerWeights,
        t: usize,
        pos0: usize,
        cache: &mut LatentCache,
        st: &mut State,
        dense: bool,
    ) {
        let c = &self.config;
        let d = c.hidden_size;
        let (nh, r, dn, dr, dv) = c.mla_dims();
        let qd = nh * (dn + dr);
        let half = dr / 2;
        let eps = c.rms_norm_eps as f32;
        // q = W_q a                       [T, H·(dn+dr)]
        self.matmul(&lw.q_proj, &st.a[..t * d], t, &mut st.q[..t * qd]);
        // [c ; k_rope] = W_kva a          [T, r+dr]
        self.matmul(&lw.kv_a, &st.a[..t * d], t, &mut st.kva[..t * (r + dr)]);
        for i in 0..t {
            let p = pos0 + i;
            let (cos, sin) = (
                &self.rope_cos[p * half..(p + 1) * half],
                &self.rope_sin[p * half..(p + 1) * half],
            );
            // cache[l, p] = [RMSNorm(c; kv_a_layernorm) ; RoPE(k_rope, p)]
            let kva = &st.kva[i * (r + dr)..(i + 1) * (r + dr)];
            let row = cache.row_mut(l, p);
            rmsnorm(&kva[..r], &lw.kv_a_norm, eps, &mut row[..r]);
            row[r..].copy_from_slice(&kva[r..]);
            rope_adjacent(&mut row[r..], cos, sin);
            // RoPE on every head's q_rope
            for h in 0..nh {
                let s = i * qd + h * (dn + dr) + dn;
                rope_adjacent(&mut st.q[s..s + dr], cos, sin);
            }
        }
        let scale = 1.0 / ((dn + dr) as f32).sqrt();
        if dense {
            self.attend_dense(lw, l, t, pos0, cache, st, scale);
        } else {
            self.attend_absorbed(lw, l, t, pos0, cache, st, scale);
        }
        // out = W_o [o_1; …; o_H]         [T, d]
        self.matmul(&lw.o_proj, &st.o[..t * nh * dv], t, &mut st.proj[..t * d]);
    }

    /// Dense attention: k_nope, v = W_kvb c for every cached position, then per-head softmax.
    fn attend_dense(
        &self,
        lw: &LayerWeights,
        l: usize,
        t: usize,
        pos0: usize,
        cache: &LatentCache,
        st: &mut State,
        scale: f32,
    ) {
        let (nh, r, dn, dr, dv) = self.config.mla_dims();
        let (qd, kd, vd, rd) = (nh * (dn + dr), nh * dn, nh * dv, r + dr);
        let n = pos0 + t;
        let layer = cache.layer(l);
        // latents c(u), u < n               [n, r]
        let mut lat = vec![0f32; n * r];
        for u in 0..n {
            lat[u * r..(u + 1) * r].copy_from_slice(&layer[u * rd..u * rd + r]);
        }
        // per head k_nope(u) [n, H·dn] and v(u) [n, H·dv]
        let (mut kk, mut vv) = (vec![0f32; n * kd], vec![0f32; n * vd]);
        self.matmul(&lw.kv_bk, &lat, n, &mut kk);
        self.matmul(&lw.kv_bv, &lat, n, &mut vv);
        let k = kernels();
        let q = &st.q;
        // Blocks of 4 queries (all heads) are the parallel tasks. Per head, scores come from
        // 4 queries × 4 keys register tiles (k_nope part + k_rope part), and the output from
        // 4-row AXPYs over the values: one pass over o_h per 4 keys.
        const QB: usize = 4;
        st.o[..t * nh * dv]
            .par_chunks_mut(QB * nh * dv)
            .enumerate()
            .for_each(|(qb, ob)| {
                let i0 = qb * QB;
                let g = ob.len() / (nh * dv); // queries in this block
                let nk = pos0 + i0 + g; // keys visible to the last query
                let mut s = vec![0f32; QB * nk]; // [g, nk] scores, then probabilities
                let (mut t1, mut t2) = ([0f32; 16], [0f32; 16]);
                for h in 0..nh {
                    let qh = |i: usize| i * qd + h * (dn + dr); // start of q_h of query i
                    let kn = |u: usize| u * kd + h * dn; // start of k_nope_h(u)
                    let mut u0 = 0;
                    if g == QB {
                        while u0 + 4 <= nk {
                            (k.tile4x4_f32)(&kk[kn(u0)..], kd, &q[qh(i0)..], qd, dn, &mut t1);
                            (k.tile4x4_f32)(
                                &layer[u0 * rd + r..],
                                rd,
                                &q[qh(i0) + dn..],
                                qd,
                                dr,
                                &mut t2,
                            );
                            for j in 0..4 {
                                for i in 0..QB {
                                    s[i * nk + u0 + j] = (t1[4 * j + i] + t2[4 * j + i]) * scale;
                                }
                            }
                            u0 += 4;
                        }
                    }
                    for i in 0..g {
                        let qi = &q[qh(i0 + i)..qh(i0 + i) + dn + dr];
                        for u in u0..nk {
                            let kr = &layer[u * rd + r..(u + 1) * rd];
                            s[i * nk + u] = ((k.dot_f32)(&qi[..dn], &kk[kn(u)..kn(u) + dn])
                                + (k.dot_f32)(&qi[dn..], kr))
                                * scale;
                        }
                    }
                    for i in 0..g {
                        // causal: query i sees keys 0..=pos0+i0+i
                        let n_i = pos0 + i0 + i + 1;
                        let p = &mut s[i * nk..i * nk + n_i];
                        softmax(p);
                        let o = &mut ob[i * nh * dv + h * dv..i * nh * dv + (h + 1) * dv];
                        o.fill(0.0);
                        let v = |u: usize| &vv[u * vd + h * dv..u * vd + (h + 1) * dv];
                        let mut u = 0;
                        while u + 4 <= n_i {
                            (k.axpy4_f32)(
                                &[p[u], p[u + 1], p[u + 2], p[u + 3]],
                                [v(u), v(u + 1), v(u + 2), v(u + 3)],
                                o,
                            );
                            u += 4;
                        }
                        for (uu, &pu) in p.iter().enumerate().skip(u) {
                            (k.axpy_f32)(pu, v(uu), o);
                        }
                    }
                }
            });
    }

    /// Weight-absorbed attention: q_lat = W_UKᵀ q_nope, scores against the latents themselves,
    /// o_h = W_UV (Σ_u P(u) c(u)). Multi-query over the latent cache (plm-architecture.md §3).
    fn attend_absorbed(
        &self,
        lw: &LayerWeights,
        l: usize,
        t: usize,
        pos0: usize,
        cache: &LatentCache,
        st: &mut State,
        scale: f32,
    ) {
        let (nh, r, dn, dr, dv) = self.config.mla_dims();
        let (qd, rd, ms) = (nh * (dn + dr), r + dr, cache.max_seq);
        let layer = cache.layer(l);
        let k = kernels();
        let (kv_bk, kv_bv) = (&lw.kv_bk, &lw.kv_bv);
        // Heads in groups are the parallel tasks, one group per thread (PLM-1.8B, 2 threads:
        // 8 heads each), and each task reads the layer's latent cache once: scores from
        // 4 keys × 4 heads register tiles, sub-group after sub-group of 4 heads while the 4 keys
        // are in L1; ctx from 4 heads × 64 columns rank updates, sub-group after sub-group per
        // 64-column strip (the cache is shared by all heads: multi-query attention on the
        // latent). At 900 cached positions the cache of a layer is 2 MB, read once per task.
        let hg = 4 * nh.div_ceil(4 * rayon::current_num_threads().max(1));
        for i in 0..t {
            let n = pos0 + i + 1;
            let q = &st.q[i * qd..(i + 1) * qd];
            let keys = &st.positions[..n];
            // one task per head group: its slices of o, q_lat, ctx and the scores
            let group = |gi: usize, [o, q_lat, ctx, s]: [&mut [f32]; 4]| {
                let h0 = gi * hg;
                let g = o.len() / dv; // heads in this group
                let g4 = g / 4 * 4; // of which in whole sub-groups of 4
                TERMS.with(|cell| {
                    let terms = &mut *cell.borrow_mut();
                    for hh in 0..g {
                        // q_lat_h = [W_UK_hᵀ q_nope_h ; q_rope_h]     [r + dr]
                        // (W_UK_hᵀ q_nope_h = Σ_j q_nope_h[j] · W_UK_h[j]), so one dot with
                        // a cache row [c(u) ; k_rope(u)] gives both terms of the score
                        let qh = &q[(h0 + hh) * (dn + dr)..(h0 + hh + 1) * (dn + dr)];
                        let row0 = (h0 + hh) * dn;
                        terms.clear();
                        terms.extend(
                            qh[..dn]
                                .iter()
                                .enumerate()
                                .map(|(j, &qj)| ((row0 + j) as u32, qj)),
                        );
                        let ql = &mut q_lat[hh * rd..(hh + 1) * rd];
                        kv_bk.axpy_consecutive(terms, &mut ql[..r]);
                        ql[r..].copy_from_slice(&qh[dn..]);
                    }
                });
                // s_h(u) = q_lat_h·[c(u) ; k_rope(u)] / sqrt(dn+dr)
                let mut u0 = 0;
                if g4 > 0 {
                    let mut tile = [0f32; 16];
                    while u0 + 4 <= n {
                        for sg in (0..g4).step_by(4) {
                            let qs = &q_lat[sg * rd..];
                            (k.tile4x4_f32)(&layer[u0 * rd..], rd, qs, rd, rd, &mut tile);
                            for j in 0..4 {
                                for hh in 0..4 {
                                    s[(sg + hh) * ms + u0 + j] = tile[4 * j + hh] * scale;
                                }
                            }
                        }
                        u0 += 4;
                    }
                }
                for hh in 0..g {
                    let ql = &q_lat[hh * rd..(hh + 1) * rd];
                    let from = if hh < g4 { u0 } else { 0 };
                    for u in from..n {
                        s[hh * ms + u] = (k.dot_f32)(ql, &layer[u * rd..(u + 1) * rd]) * scale;
                    }
                    softmax(&mut s[hh * ms..hh * ms + n]);
                }
                // ctx_h = Σ_u P_h(u) c(u)            [r]
                ctx[..g * r].fill(0.0);
                let mut c0 = 0;
                if g4 > 0 {
                    let mut tile = [0f32; 256];
                    while c0 + 64 <= r {
                        for sg in (0..g4).step_by(4) {
                            tile.fill(0.0);
                            let ss = &s[sg * ms..];
                            (k.rank4x64_f32)(ss, ms, keys, &layer[c0..], rd, &mut tile);
                            for hh in 0..4 {
                                ctx[(sg + hh) * r + c0..(sg + hh) * r + c0 + 64]
                                    .copy_from_slice(&tile[hh * 64..(hh + 1) * 64]);
                            }
                        }
                        c0 += 64;
                    }
                }
                for hh in 0..g {
                    // columns no strip covered: all of them for heads outside sub-groups
                    let from = if hh < g4 { c0 } else { 0 };
                    if from < r {
                        let cx = &mut ctx[hh * r + from..(hh + 1) * r];
                        for u in 0..n {
                            let cu = &layer[u * rd + from..u * rd + r];
                            (k.axpy_f32)(s[hh * ms + u], cu, cx);
                        }
                    }
                }
                // o_h = W_UV_h ctx_h                 [dv]
                for hh in 0..g {
                    kv_bv.dot_rows(
                        (h0 + hh) * dv,
                        &ctx[hh * r..(hh + 1) * r],
                        &mut o[hh * dv..(hh + 1) * dv],
                    );
                }
            };
            let bufs = [
                &mut st.o[i * nh * dv..(i + 1) * nh * dv],
                &mut st.q_lat[..],
                &mut st.ctx[..],
                &mut st.scores[..],
            ];
            let chunks = [hg * dv, hg * rd, hg * r, hg * ms];
            crate::team::par_chunks(bufs, chunks, group);
        }
    }

    /// ReLU² and the down projection of token `i` of `st.up` (decode's path): `st.proj[i·d..]`
    /// = Σ over the non-zero neurons of act_j · W_downᵀ[j]; `st.active` keeps the active list
    /// (every neuron, zeros included, when sparsity is switched off). Returns the number of
    /// non-zero neurons and the rows read.
    fn down_token(&self, down_t: &Matrix, i: usize, st: &mut State) -> (usize, usize) {
        let c = &self.config;
        let (d, ni) = (c.hidden_size, c.intermediate_size);
        let up = &mut st.up[i * ni..(i + 1) * ni];
        // act = relu(u)², active = {j : act_j ≠ 0}
        relu2_collect(up, &mut st.active);
        let nonzero = st.active.len();
        if !self.sparse_mlp {
            // Benchmark baseline: visit every neuron, zeros included.
            st.active.clear();
            st.active
                .extend(up.iter().enumerate().map(|(j, &a)| (j as u32, a)));
        }
        // y = Σ_{j active} act_j · W_downᵀ[j]     [d]
        // Partial ys (Matrix::sparse_axpy_par: one per span of the planar plan, else one per
        // thread), then the partials are added in order.
        let out = &mut st.proj[i * d..(i + 1) * d];
        let read = down_t.sparse_down(&st.active, &mut st.plan, &mut st.parts, out);
        (nonzero, read)
    }

    /// ReLU² MLP of `t` tokens; result in `st.proj[..t·d]`. The down projection visits only
    /// the neurons whose activation is non-zero (exact: the others contribute 0).
    fn mlp(&self, l: usize, lw: &LayerWeights, t: usize, st: &mut State) {
        let c = &self.config;
        let (d, ni) = (c.hidden_size, c.intermediate_size);
        // u = W_up b                        [T, I]
        self.matmul(&lw.up, &st.a[..t * d], t, &mut st.up[..t * ni]);
        let down_t = match &lw.down {
            Down::Transposed(m) => m,
            Down::Dense(w_down) => {
                // The dense baseline: y = W_down relu(u)², every neuron read.
                for i in 0..t {
                    let active = relu2_count(&mut st.up[i * ni..(i + 1) * ni]);
                    count_mlp(st, l, ni, active, (t == 1).then_some(ni));
                }
                let (x, y) = (&st.up[..t * ni], &mut st.proj[..t * d]);
                if t == 1 {
                    matvec_blocks(w_down, x, y);
                } else {
                    matmul_blocks(w_down, x, t, y, |m, x, t, y| self.matmul(m, x, t, y));
                }
                return;
            }
        };
        // One token (decode), or a short prompt: the decode down projection once per token.
        // For prompts the bf16 GEMM below widens every W_downᵀ row into bf16 panels on each
        // call (three quarters of a 4-token q4_0 prompt's time at PLM-1.8B); per token, the
        // rows are read as decode reads them, the second token on from cache (PERF NOTES in
        // kernels/mod.rs).
        let fast = self.fast_gemm && down_t.dtype() != DType::F32;
        if t == 1 || (fast && t <= DOWN_PER_TOKEN_MAX) {
            for i in 0..t {
                let (active, read) = self.down_token(down_t, i, st);
                count_mlp(st, l, ni, active, (t == 1).then_some(read));
            }
            return;
        }
        // Several tokens: groups of 4 tokens × tiles of 64 output columns, accumulated in
        // registers by the rank4x64 kernel over the neurons active in any of the 4 tokens.
        // Tiles are the parallel tasks, so each task's slice of W_downᵀ stays in cache while
        // it walks every token group.
        for i in 0..t {
            relu2_collect(&mut st.up[i * ni..(i + 1) * ni], &mut st.active);
            count_mlp(st, l, ni, st.active.len(), None);
        }
        if fast {
            // y = act · W_downᵀ, skipping neuron pairs that are zero in a whole 6-token tile
            gemm::matmul_kn(
                down_t,
                &st.up[..t * ni],
                t,
                self.sparse_mlp,
                &mut st.proj[..t * d],
            );
            return;
        }
        let groups = t.div_ceil(4);
        let mut act = vec![0f32; groups * 4 * ni]; // [groups·4, I], zero rows pad the last group
        act[..t * ni].copy_from_slice(&st.up[..t * ni]);
        let js: Vec<Vec<u32>> = (0..groups)
            .map(|g| {
                let a = &act[g * 4 * ni..(g + 1) * 4 * ni];
                (0..ni as u32)
                    .filter(|&j| !self.sparse_mlp || (0..4).any(|i| a[i * ni + j as usize] != 0.0))
                    .collect()
            })
            .collect();
        const TILE: usize = 64;
        let tiles: Vec<Vec<f32>> = (0..d.div_ceil(TILE))
            .into_par_iter()
            .map(|ti| {
                let c0 = ti * TILE;
                let mut out = vec![0f32; groups * 4 * TILE]; // [groups·4, 64]
                if c0 + TILE <= d {
                    down_t.rank4x64_groups(&act, ni, &js, c0, &mut out);
                } else {
                    // ragged last tile (d not a multiple of 64): per-row AXPYs
                    let w = d - c0;
                    for g in 0..groups {
                        for &j in &js[g] {
                            for i in 0..4 {
                                let a = act[(g * 4 + i) * ni + j as usize];
                                if a != 0.0 {
                                    let o = (g * 4 + i) * TILE;
                                    down_t.axpy_row(j as usize, c0, a, &mut out[o..o + w]);
                                }
                            }
                        }
                    }
                }
                out
            })
            .collect();
        for (ti, out) in tiles.iter().enumerate() {
            let (c0, w) = (ti * TILE, TILE.min(d - ti * TILE));
            for i in 0..t {
                st.proj[i * d + c0..i * d + c0 + w].copy_from_slice(&out[i * TILE..i * TILE + w]);
            }
        }
    }
}

/// What `SPARSELM_DENSE_MLP` asks of the MLP (a benchmark and test switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlpMode {
    /// unset, empty or `0`: sparse down projection over `W_downᵀ` (the default)
    Sparse,
    /// `rows`: `W_downᵀ` as for `Sparse`, but every row visited, zeros included
    AllRows,
    /// anything else (`1`): `W_down` for a dense GEMV (`Down::Dense`: the GEMV layout for
    /// Q8_0/Q4_0, column blocks for float formats)
    Dense,
}

/// Read the process-wide settings taken from the environment (`SPARSELM_KERNEL`,
/// `SPARSELM_PREFETCH`, `SPARSELM_DOWN_LAYOUT`) now, before the long work of a load: each is
/// read once per process, and a warning about a bad value is printed on its first use, which
/// would otherwise fall in the middle of the load and of a caller's progress line.
fn read_env_settings() {
    crate::kernels::kernels();
    crate::kernels::prefetch_distance();
    crate::quant::down_layout();
    crate::quant::interleave_enabled();
}

fn mlp_mode() -> MlpMode {
    match std::env::var("SPARSELM_DENSE_MLP").as_deref() {
        Err(_) | Ok("" | "0") => MlpMode::Sparse,
        Ok("rows") => MlpMode::AllRows,
        Ok(_) => MlpMode::Dense,
    }
}

/// Sparsity telemetry of one token's MLP at layer `l`: `active` of its `ni` neurons are
/// non-zero; `read`, for a decoded token only (W_down telemetry is per decoded token), is the
/// number of W_down rows its down projection read.
fn count_mlp(st: &mut State, l: usize, ni: usize, active: usize, read: Option<usize>) {
    st.zeros[l] += (ni - active) as u64;
    st.neurons[l] += ni as u64;
    if let Some(read) = read {
        st.down_rows[l] += ni as u64;
        st.down_read[l] += read as u64;
    }
}

/// RMSNorm of each `[d]` row of `x` into `out`.
fn norm_rows(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
        rmsnorm(xr, g, eps, or);
    }
}
