//! Decode speed against a plain read of memory, alternated in one process:
//! `cargo run --release --example decode_probe -p sparselm-core -- MODEL_DIR [DTYPE] [THREADS]`.
//!
//! The machine's bandwidth drifts between phases (about 33 and 60 GB/s with 2 threads here),
//! so every line pairs a few decode steps with a plain read of 1 GiB on as many threads just
//! before and after (the reference of that moment, not a ceiling). `SPARSE=0` visits every row
//! of `W_downᵀ` (as `SPARSELM_DENSE_MLP=rows`; `SPARSELM_DENSE_MLP=1` loads the dense GEMV MLP), `REPS=` sets
//! the number of lines, `STEPS=` the decode steps per line, `CTX=` the context at which the
//! session starts over (512).
use sparselm_core::membw::PlainRead;
use sparselm_core::model::{parse_dtype, AttnMode, Model};
use sparselm_core::sampler::argmax;
use sparselm_core::session::Session;
use sparselm_core::team::Team;
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |s| s.parse().expect(name))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: decode_probe MODEL_DIR [DTYPE] [THREADS]");
    let dtype = parse_dtype(&args.next().unwrap_or("q4_0".into())).expect("dtype");
    let threads: usize = args.next().map_or(2, |s| s.parse().expect("threads"));
    let (reps, steps) = (env("REPS", 40), env("STEPS", 8));
    let mut model = Model::load(std::path::Path::new(&dir), dtype, threads).expect("load");
    if std::env::var("SPARSE").is_ok() {
        model.sparse_mlp = env("SPARSE", 1) != 0;
    }
    let model = Arc::new(model);
    let mut s = Session::new(Arc::clone(&model), env("CTX", 512)).expect("session");

    let team = Team::new(threads).unwrap();
    let plain = PlainRead::new(1 << 30, threads).expect("1 GiB to read");
    let read = || plain.pass(&team);

    let prompt: Vec<u32> = (0..16u32).map(|i| 100 + i * 37).collect();
    let mut tok = 0u32;
    let mut decode = |n: usize| {
        let mut secs = 0.0;
        for _ in 0..n {
            if s.n_past() + 1 >= s.max_seq() || s.n_past() == 0 {
                s.reset();
                let l = s.feed(&prompt, AttnMode::Auto, false).expect("prompt");
                tok = argmax(l);
            }
            let t = Instant::now();
            let l = s.feed(&[tok], AttnMode::Auto, false).expect("decode");
            tok = argmax(l);
            secs += t.elapsed().as_secs_f64();
        }
        n as f64 / secs
    };
    decode(steps);
    for _ in 0..reps {
        let r = read();
        let d = decode(steps);
        let r2 = read();
        println!("{dtype:?} {threads}T: read {r:.1}/{r2:.1} GB/s, decode {d:.2} tok/s");
    }
}
