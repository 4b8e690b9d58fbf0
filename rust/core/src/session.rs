//! `Session`: one conversation over a shared `Model`: its latent cache, scratch state, the ids
//! the cache holds, and an optional generation in progress. Used by the Python bindings and the
//! native CLI alike.

use std::sync::Arc;
use std::time::Instant;

use crate::control::{Control, NEVER};
use crate::error::{Error, Result};
use crate::kv_cache::LatentCache;
use crate::model::{AttnMode, Model};
use crate::sampler::{Sampler, SamplingParams};
use crate::state::State;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was sampled.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The cache is full.
    Context,
}

impl FinishReason {
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// Timing and sparsity counters of the last generation.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

struct Generation {
    sampler: Sampler,
    max_new: usize,
    generated: usize,
    stop_ids: Vec<u32>,
    /// The last returned id, not yet fed to the model.
    pending: Option<u32>,
    /// `State::logits[..V]` holds the logits to sample from next.
    logits_ready: bool,
}

pub struct Session {
    model: Arc<Model>,
    cache: LatentCache,
    state: State,
    tokens: Vec<u32>,
    gen: Option<Generation>,
    /// The last id a finished generation returned without feeding it (ended by its length or
    /// the context), until the cache changes.
    unfed: Option<u32>,
    finish: Option<FinishReason>,
    stats: GenStats,
}

impl Session {
    /// A session with a cache of `max_seq` positions (0: the model's context length).
    pub fn new(model: Arc<Model>, max_seq: usize) -> Result<Session> {
        let cache = model.new_cache(max_seq)?;
        let state = State::new(&model.config, cache.max_seq)?;
        Ok(Session {
            model,
            cache,
            state,
            tokens: Vec::new(),
            gen: None,
            unfed: None,
            finish: None,
            stats: GenStats::default(),
        })
    }

    /// An independent session holding the same cached ids (their latents copied, the rest of
    /// the new cache left empty), with the same capacity, telemetry counters, stats and finish
    /// reason. A generation in progress is not carried over: the copy is as after a generation
    /// the caller stopped, its last returned id [`Self::pending`]. [`Error::Memory`] when the
    /// cache cannot be allocated.
    pub fn try_clone(&self) -> Result<Session> {
        let mut copy = Session::new(Arc::clone(&self.model), self.cache.max_seq)?;
        let rd = self.cache.row_dim();
        let (cached, per_layer) = (self.tokens.len() * rd, self.cache.max_seq * rd);
        for l in 0..self.cache.layers {
            let rows = l * per_layer..l * per_layer + cached;
            copy.cache.data[rows.clone()].copy_from_slice(&self.cache.data[rows]);
        }
        copy.state.set_counters(self.state.counters());
        copy.tokens.clone_from(&self.tokens);
        copy.unfed = self.pending();
        copy.finish = self.finish;
        copy.stats = self.stats.clone();
        Ok(copy)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    pub fn max_seq(&self) -> usize {
        self.cache.max_seq
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The last generated id when it is not in the cache yet: a returned id is fed to the
    /// model only when the next one is asked for, so after a generation that ended by its
    /// length or the context, or that the caller stopped (a stop string, a closed stream), the
    /// cache lacks it. A continuation starts from [`Self::tokens`] followed by this id. None
    /// after `feed`, `start`, `truncate` or `reset`, and after a stop id (the last returned id
    /// was fed before the stop id was sampled).
    pub fn pending(&self) -> Option<u32> {
        match &self.gen {
            Some(g) => g.pending,
            None => self.unfed,
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn stats(&self) -> &GenStats {
        &self.stats
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Weight bytes of `W_down` not read per decoded token: the rows of zero neurons the decode
    /// down projection skipped (rows read whole with their group in the planar int8 `groups`
    /// layout count as read), averaged over the decode steps since the state's counters were
    /// last reset. `None` before any decode step. Prompts are GEMMs and do not count.
    pub fn down_bytes_skipped_per_token(&self) -> Option<f64> {
        let st = &self.state;
        let m = &self.model;
        let ni = m.config.intermediate_size as u64;
        let tokens = st.down_rows.first().copied().unwrap_or(0) / ni.max(1);
        if tokens == 0 {
            return None;
        }
        let skipped: f64 = m
            .weights
            .layers
            .iter()
            .zip(st.down_rows.iter().zip(&st.down_read))
            .map(|(lw, (&n, &r))| n.saturating_sub(r) as f64 * lw.down.bytes_per_neuron())
            .sum();
        Some(skipped / tokens as f64)
    }

    pub fn reset(&mut self) {
        self.tokens.clear();
        self.gen = None;
        self.unfed = None;
        self.finish = None;
    }

    /// Forget every cached position >= n.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.gen = None;
        self.unfed = None;
    }

    /// Append `ids` to the cache. Returns the logits of the last id (`[V]`) or of every id
    /// (`[n, V]`, row-major) when `all_logits`.
    pub fn feed(&mut self, ids: &[u32], mode: AttnMode, all_logits: bool) -> Result<&[f32]> {
        self.feed_with(ids, mode, all_logits, &NEVER)
    }

    /// [`Self::feed`] under `ctl` (checked between layers and once more at the end): when
    /// stopped it returns [`Error::Interrupted`]. A failed feed caches none of `ids` and keeps
    /// [`Self::pending`] and the telemetry counters; only a generation in progress ends (as a
    /// fed id ends it anyway).
    pub fn feed_with(
        &mut self,
        ids: &[u32],
        mode: AttnMode,
        all_logits: bool,
        ctl: &Control,
    ) -> Result<&[f32]> {
        let pending = self.pending();
        let counters = self.state.counters();
        self.gen = None;
        self.unfed = None;
        let pos = self.tokens.len();
        let done = self
            .model
            .forward(
                ids,
                pos,
                &mut self.cache,
                &mut self.state,
                mode,
                all_logits,
                ctl,
            )
            // a stop asked for during the logits: still nothing is cached
            .and_then(|()| ctl.check());
        if let Err(e) = done {
            self.unfed = pending;
            self.state.set_counters(counters);
            return Err(e);
        }
        self.tokens.extend_from_slice(ids);
        let v = self.model.config.vocab_size;
        Ok(&self.state.logits[..if all_logits { ids.len() * v } else { v }])
    }

    /// Start generating after `prompt`. The longest common prefix with the cached ids is kept;
    /// the rest of the prompt is fed with dense attention.
    pub fn start(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
        max_new: usize,
        stop_ids: &[u32],
    ) -> Result<()> {
        self.start_with(prompt, params, max_new, stop_ids, &NEVER)
    }

    /// The ids of `prompt` [`Self::start`] keeps from the cache: the longest common prefix
    /// with the cached ids, but never the last prompt id (recomputed so its logits are there).
    pub fn kept_prefix(&self, prompt: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// [`Self::start`] under `ctl`, which the prompt's forward pass checks between layers.
    /// When stopped (or when the forward pass fails) it returns the error and the session holds
    /// no generation. When the prompt extends the cached ids (a continuation), nothing else
    /// changed: the same ids, [`Self::pending`], finish reason, counters and stats. Otherwise
    /// the cache keeps [`Self::kept_prefix`] ids (the feed may have overwritten the positions
    /// after them). Errors found before any work (an empty or too long prompt, bad ids, bad
    /// sampling parameters) change nothing: a generation in progress goes on.
    pub fn start_with(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
        max_new: usize,
        stop_ids: &[u32],
        ctl: &Control,
    ) -> Result<()> {
        let sampler = Sampler::new(params)?;
        if prompt.is_empty() {
            return Err(Error::Argument(
                "the prompt is empty: at least one token id is needed".into(),
            ));
        }
        if prompt.len() > self.cache.max_seq {
            return Err(Error::Context {
                needed: prompt.len(),
                max: self.cache.max_seq,
                what: format!("a prompt of {} tokens", prompt.len()),
            });
        }
        self.model.check_tokens(prompt, 0, &self.cache)?;
        let keep = self.kept_prefix(prompt);
        let extends = keep == self.tokens.len();
        let (pending, finish) = (self.pending(), self.finish);
        let counters = self.state.counters();
        self.truncate(keep);
        self.finish = None;
        self.state.reset_counters();
        let t0 = Instant::now();
        if let Err(e) = self.feed_with(&prompt[keep..], AttnMode::Auto, false, ctl) {
            self.state.set_counters(counters);
            if extends {
                (self.unfed, self.finish) = (pending, finish);
            }
            return Err(e);
        }
        self.stats = GenStats {
            prompt_tokens: prompt.len() - keep,
            prompt_seconds: t0.elapsed().as_secs_f64(),
            ..GenStats::default()
        };
        self.gen = Some(Generation {
            sampler,
            max_new,
            generated: 0,
            stop_ids: stop_ids.to_vec(),
            pending: None,
            logits_ready: true,
        });
        Ok(())
    }

    /// The next generated id, or None when the generation has ended (see `finish_reason`).
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        let t0 = Instant::now();
        let out = self.step();
        self.stats.decode_seconds += t0.elapsed().as_secs_f64();
        out
    }

    fn step(&mut self) -> Result<Option<u32>> {
        let Some(mut g) = self.gen.take() else {
            return Ok(None);
        };
        if g.generated >= g.max_new {
            self.finish = Some(FinishReason::Length);
            self.unfed = g.pending;
            return Ok(None);
        }
        if let Some(tok) = g.pending.take() {
            if self.tokens.len() >= self.cache.max_seq {
                self.finish = Some(FinishReason::Context);
                self.unfed = Some(tok);
                return Ok(None);
            }
            let pos = self.tokens.len();
            self.model.forward(
                &[tok],
                pos,
                &mut self.cache,
                &mut self.state,
                AttnMode::Auto,
                false,
                &NEVER,
            )?;
            self.tokens.push(tok);
            g.logits_ready = true;
        }
        debug_assert!(g.logits_ready);
        let v = self.model.config.vocab_size;
        let tok = g.sampler.sample(&mut self.state.logits[..v], &self.tokens);
        g.logits_ready = false;
        if g.stop_ids.contains(&tok) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        g.generated += 1;
        // Tokens handed out; `decode_seconds` is the time of every next_token call.
        self.stats.decode_tokens += 1;
        g.pending = Some(tok);
        self.gen = Some(g);
        Ok(Some(tok))
    }

    /// Greedy/sampled generation of up to `max_new` ids, calling `on_token` for each; stops
    /// early when it returns false.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
        max_new: usize,
        stop_ids: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        self.start(prompt, params, max_new, stop_ids)?;
        let mut out = Vec::new();
        while let Some(t) = self.next_token()? {
            out.push(t);
            if !on_token(t) {
                break;
            }
        }
        Ok(out)
    }
}
