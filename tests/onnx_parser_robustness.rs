//! Robustness of the ONNX parser (`onnx::decode`) against hostile and damaged bytes: random byte
//! strings, protobuf-shaped random messages, truncations (every prefix of the tiny MLP; the first and
//! last 2 KiB of prefixes and random ones of the real model) and random bit flips, byte overwrites and
//! splices of `encode(&tiny_mlp(..))` and of a real PP-OCR model (the cls model, when
//! `scripts/fetch-models.sh` has fetched it). Every case must return `Ok` or `Err`: no panic, no
//! hang, no stack overflow. For each `Ok` the summary must build and the model must re-encode to a
//! canonical form (`encode(decode(encode(m))) == encode(m)`).
//!
//! Deterministic and bounded: one fixed seed, fixed case counts, a few seconds in a debug build. A
//! failing case is named by its kind and index and its bytes are written to the temp dir, so it can be
//! replayed. A decode slower than [`CASE_LIMIT`] fails; if the whole campaign has not finished within
//! [`HANG_LIMIT`] (a decode that never returns), the test fails naming the case it was on.
//!
//! Why not cargo-fuzz: it is not usable in this project's build. cargo-fuzz (libFuzzer) needs a
//! nightly toolchain (it builds with `-Z sanitizer=address` and nightly-only instrumentation flags),
//! the `cargo-fuzz` binary and a separate `fuzz/` crate depending on `libfuzzer-sys`; `make test` and
//! CI run on the stable toolchain only, with no extra tools or crates. So coverage-guided fuzzing is
//! left out, and this seeded campaign on stable stands in for it in every test run.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpress::onnx::{self, ModelSummary, builder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x6f6e_6e78_6675_7a7a;
/// The whole campaign must finish within this (it takes a few seconds in a debug build).
const HANG_LIMIT: Duration = Duration::from_secs(120);
/// No single decode may take longer than this (the largest input is ~0.6 MB).
const CASE_LIMIT: Duration = Duration::from_secs(5);

const RANDOM_CASES: u64 = 3000;
const SHAPED_CASES: u64 = 3000;
const MLP_MUTATIONS: u64 = 12_000;
const CLS_MUTATIONS: u64 = 400;
const CLS_TRUNCATIONS: u64 = 400;
/// Every prefix this close to the start and the end of the cls model is tried, as well as spaced ones.
const CLS_EDGE_PREFIXES: usize = 2048;
const CLS_FILE: &str = "ch_ppocr_mobile_v2.0_cls_infer.onnx";

/// The case being decoded, for the watchdog to name if it never returns.
type Current = Arc<Mutex<(&'static str, u64)>>;

#[derive(Default)]
struct Tally {
    ok: u64,
    err: u64,
}

struct Campaign {
    current: Current,
    tally: BTreeMap<&'static str, Tally>,
    slowest: (Duration, &'static str, u64, usize),
}

impl Campaign {
    /// Decodes one case; panics (naming the case and saving its bytes) if the parser panics, is slow,
    /// or accepts a model that does not re-encode canonically. Returns whether the bytes were accepted.
    fn check(&mut self, kind: &'static str, bytes: &[u8]) -> bool {
        let tally = self.tally.entry(kind).or_default();
        let index = tally.ok + tally.err;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (kind, index);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let model = onnx::decode(bytes).ok()?;
            std::hint::black_box(ModelSummary::of(&model));
            let canonical = onnx::encode(&model);
            let again = onnx::decode(&canonical).map(|m| onnx::encode(&m));
            Some((canonical, again))
        }));
        let accepted = matches!(outcome, Ok(Some(_)));
        let elapsed = start.elapsed();
        let fail = |why: String| -> ! {
            let file = format!("modelpress-robustness-{}-{index}.bin", kind.replace(' ', "-"));
            let path = std::env::temp_dir().join(file);
            let saved = match std::fs::write(&path, bytes) {
                Ok(()) => format!("saved to {}", path.display()),
                Err(e) => format!("not saved: {e}"),
            };
            panic!(
                "{kind} case {index} ({} bytes, {saved}): {why}; first bytes {:02x?}",
                bytes.len(),
                &bytes[..bytes.len().min(32)]
            );
        };
        match outcome {
            Err(panic) => fail(format!("decode panicked: {}", panic_message(&panic))),
            Ok(Some((canonical, again))) => {
                match again {
                    Ok(re) if re == canonical => {}
                    Ok(_) => fail("an accepted model does not re-encode to the same bytes".into()),
                    Err(e) => fail(format!("an accepted model fails to decode once re-encoded: {e}")),
                }
                tally.ok += 1;
            }
            Ok(None) => tally.err += 1,
        }
        if elapsed > CASE_LIMIT {
            fail(format!("decode took {elapsed:?}"));
        }
        if elapsed > self.slowest.0 {
            self.slowest = (elapsed, kind, index, bytes.len());
        }
        accepted
    }

    fn total(&self) -> u64 {
        self.tally.values().map(|t| t.ok + t.err).sum()
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// The real cls model, if fetched (same lookup as tests/onnx_real_models.rs).
fn cls_model() -> Option<PathBuf> {
    let dir = std::env::var_os("MODELPRESS_MODELS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
    let mut pending = vec![dir];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == CLS_FILE) {
                return Some(path);
            }
        }
    }
    None
}

/// One to three stacked mutations of `base`; `donor` supplies spliced-in bytes.
fn mutate(rng: &mut StdRng, base: &[u8], donor: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        if out.is_empty() {
            out.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..8) {
            // Flip 1..=8 random bits.
            0 => {
                for _ in 0..rng.random_range(1..=8) {
                    let i = rng.random_range(0..out.len());
                    out[i] ^= 1 << rng.random_range(0..8);
                }
            }
            // Overwrite a byte with a value that matters to varints and tags.
            1 => out[at] = [0x00, 0x01, 0x7f, 0x80, 0xff, rng.random()][rng.random_range(0..6)],
            // Delete a range.
            2 => {
                let end = (at + rng.random_range(1..=64)).min(out.len());
                out.drain(at..end);
            }
            // Duplicate a range of itself somewhere else.
            3 => {
                let end = (at + rng.random_range(1..=64)).min(out.len());
                let chunk = out[at..end].to_vec();
                let to = rng.random_range(0..=out.len());
                out.splice(to..to, chunk);
            }
            // Insert a chunk of the donor.
            4 if !donor.is_empty() => {
                let from = rng.random_range(0..donor.len());
                let end = (from + rng.random_range(1..=256)).min(donor.len());
                out.splice(at..at, donor[from..end].iter().copied());
            }
            // Overwrite a range with a chunk of the donor.
            5 if !donor.is_empty() => {
                let from = rng.random_range(0..donor.len());
                let n = rng.random_range(1..=64).min(donor.len() - from).min(out.len() - at);
                out[at..at + n].copy_from_slice(&donor[from..from + n]);
            }
            // Insert an overlong varint (a length or tag that never ends or is huge).
            6 => {
                let bomb: &[u8] =
                    [&[0xff; 10][..], &[0x80; 11], &[0xff, 0xff, 0xff, 0xff, 0x0f]][rng.random_range(0..3)];
                out.splice(at..at, bomb.iter().copied());
            }
            // Cut the tail and append random bytes.
            _ => {
                out.truncate(at);
                let n = rng.random_range(0..=32);
                out.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    out
}

/// A random protobuf-shaped message: valid tags and wire types, sometimes lying lengths, nested.
fn shaped(rng: &mut StdRng, depth: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.random_range(0..12) {
        let field: u64 = if rng.random_bool(0.8) {
            rng.random_range(1..=26)
        } else {
            rng.random_range(0..1 << 29)
        };
        let wire = [0u64, 1, 2, 2, 2, 5, 3, 4, 6, 7][rng.random_range(0..10)];
        varint(&mut out, (field << 3) | wire);
        match wire {
            0 => varint(&mut out, rng.random::<u64>() >> rng.random_range(0..64)),
            1 => out.extend(rng.random::<u64>().to_le_bytes()),
            5 => out.extend(rng.random::<u32>().to_le_bytes()),
            2 => {
                let body = if depth < 6 && rng.random_bool(0.6) {
                    shaped(rng, depth + 1)
                } else {
                    (0..rng.random_range(0..24)).map(|_| rng.random()).collect()
                };
                let len = match rng.random_range(0..10) {
                    0 => body.len() as u64 + rng.random_range(1..16),
                    1 => rng.random(),
                    _ => body.len() as u64,
                };
                varint(&mut out, len);
                out.extend(body);
            }
            _ => {}
        }
    }
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(out: &mut Vec<u8>, number: u64, body: &[u8]) {
    varint(out, (number << 3) | 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// A model whose graph nests `depth` levels of `If`-style subgraphs (graph → node → attribute g →
/// graph ...): a recursive decoder without a depth limit would overflow the stack.
fn nested_graphs(depth: usize) -> Vec<u8> {
    let mut graph = Vec::new();
    for _ in 0..depth {
        let mut attr = Vec::new();
        field(&mut attr, 1, b"then_branch");
        field(&mut attr, 6, &graph);
        let mut node = Vec::new();
        field(&mut node, 4, b"If");
        field(&mut node, 5, &attr);
        graph.clear();
        field(&mut graph, 1, &node);
    }
    let mut output = Vec::new();
    field(&mut output, 1, b"y");
    field(&mut graph, 12, &output);
    let mut model = vec![0x08, 0x08]; // ir_version 8
    field(&mut model, 7, &graph);
    let mut opset = Vec::new();
    opset.extend([0x10, 0x11]); // version 17
    field(&mut model, 8, &opset);
    model
}

fn run_campaign(current: Current) -> Campaign {
    let mut c = Campaign {
        current,
        tally: BTreeMap::new(),
        slowest: (Duration::ZERO, "", 0, 0),
    };
    let mut rng = StdRng::seed_from_u64(SEED);
    let mlps: Vec<Vec<u8>> = (0..4).map(|s| onnx::encode(&builder::tiny_mlp(s))).collect();
    let cls = cls_model().map(|p| std::fs::read(p).unwrap());

    // The seeds themselves must decode.
    for m in mlps.iter().chain(&cls) {
        assert!(onnx::decode(m).is_ok(), "a seed model does not decode");
    }

    for _ in 0..RANDOM_CASES {
        let len = if rng.random_bool(0.9) {
            rng.random_range(0..=256)
        } else {
            rng.random_range(0..=8192)
        };
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        c.check("random bytes", &bytes);
    }
    for _ in 0..SHAPED_CASES {
        let bytes = shaped(&mut rng, 0);
        c.check("protobuf-shaped", &bytes);
    }

    let mlp = &mlps[0];
    for len in 0..mlp.len() {
        let accepted = c.check("mlp prefix", &mlp[..len]);
        // Every strict prefix of the tiny MLP lacks at least its opset_import, which comes last.
        assert!(!accepted, "a {len}-byte prefix of the tiny MLP was accepted");
    }
    for _ in 0..MLP_MUTATIONS {
        let base = &mlps[rng.random_range(0..mlps.len())];
        let donor = match &cls {
            Some(cls) if rng.random_bool(0.2) => cls.as_slice(),
            _ => &mlps[rng.random_range(0..mlps.len())],
        };
        let bytes = mutate(&mut rng, base, donor);
        c.check("mlp mutation", &bytes);
    }

    if let Some(cls) = &cls {
        let n = cls.len();
        let mut prefixes: Vec<usize> = (0..CLS_EDGE_PREFIXES.min(n))
            .chain(n.saturating_sub(CLS_EDGE_PREFIXES)..n)
            .collect();
        prefixes.extend((0..CLS_TRUNCATIONS).map(|_| rng.random_range(0..n)));
        for len in prefixes {
            c.check("cls prefix", &cls[..len]);
        }
        for _ in 0..CLS_MUTATIONS {
            let donor = &mlps[rng.random_range(0..mlps.len())];
            let bytes = mutate(&mut rng, cls, donor);
            c.check("cls mutation", &bytes);
        }
    } else {
        eprintln!("{CLS_FILE} not found: real-model cases skipped (run scripts/fetch-models.sh)");
    }

    for depth in [1, 8, 16, 32, 33, 40, 1_000, 20_000] {
        let accepted = c.check("nested subgraphs", &nested_graphs(depth));
        // Up to MAX_SUBGRAPH_DEPTH levels are a model; deeper nesting is refused (by our limit or
        // prost's recursion limit, whichever comes first), never recursed into until the stack ends.
        let expected = depth <= onnx::MAX_SUBGRAPH_DEPTH;
        assert_eq!(accepted, expected, "{depth} nested subgraphs: accepted {accepted}");
    }
    c
}

#[test]
fn the_parser_never_panics_or_hangs_on_damaged_input() {
    let current: Current = Arc::new(Mutex::new(("start", 0)));
    let (tx, rx) = mpsc::channel();
    let watched = current.clone();
    std::thread::Builder::new()
        .name("robustness".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(|| run_campaign(watched))));
        })
        .unwrap();
    let c = match rx.recv_timeout(HANG_LIMIT) {
        Ok(Ok(c)) => c,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => {
            let (kind, index) = *current.lock().unwrap_or_else(|e| e.into_inner());
            panic!("no result after {HANG_LIMIT:?}: the parser hangs on {kind} case {index}");
        }
    };

    for (kind, t) in &c.tally {
        println!(
            "{kind:>18}: {:>6} cases, {:>6} Ok, {:>6} Err",
            t.ok + t.err,
            t.ok,
            t.err
        );
    }
    let (time, kind, index, len) = c.slowest;
    println!(
        "{:>18}: {} cases; slowest {kind} case {index} ({len} bytes) in {time:?}",
        "total",
        c.total()
    );

    let tally = |kind: &str| c.tally.get(kind).map_or((0, 0), |t| (t.ok, t.err));
    assert!(c.total() >= RANDOM_CASES + SHAPED_CASES + MLP_MUTATIONS);
    // Sanity of the campaign itself: mutations must reach both outcomes, or they test nothing.
    let (ok, err) = tally("mlp mutation");
    assert!(ok > 0 && err > 0, "mlp mutations: {ok} Ok, {err} Err");
}
