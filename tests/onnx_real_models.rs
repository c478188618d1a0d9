//! Real models through our codec: every `.onnx` file under `MODELPRESS_MODELS_DIR` (else
//! `.cache/models`, which `scripts/fetch-models.sh` fills; `make test` runs it first) must decode,
//! re-encode to the very same bytes, decode again to the same model, and give exactly the same ONNX
//! Runtime outputs as the original file on seeded synthetic inputs.
//!
//! No models is a failure, not a skip: a silently empty run would hide a broken fetch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use modelpress::eval::Runtime;
use modelpress::eval::fidelity;
use modelpress::eval::inputs::{self, DimPolicy};
use modelpress::eval::session::{OutputTensor, PreparedInputs};
use modelpress::onnx::{self, ModelSummary};

const SEED: u64 = 20240607;

fn models_dir() -> PathBuf {
    match std::env::var_os("MODELPRESS_MODELS_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"),
    }
}

/// Every `.onnx` file under the models folder, sorted; panics with instructions when there is none.
fn real_models() -> Vec<PathBuf> {
    let dir = models_dir();
    let mut found = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "onnx") {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(
        !found.is_empty(),
        "no .onnx models under {} (MODELPRESS_MODELS_DIR or .cache/models): run `scripts/fetch-models.sh` \
         (or `make test`, which runs it) to download them",
        dir.display()
    );
    found
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Concrete sizes for symbolic dimensions, per model: the sizes the model is used at. Models not
/// listed get batch 1 and 32 for every other dynamic axis (a multiple of 32, as detectors need).
fn dim_overrides(file: &str) -> BTreeMap<String, i64> {
    let pairs: &[(&str, i64)] = match file {
        // PP-OCRv4 recognition reads 48-pixel-high text lines, 320 wide: x is [N, 3, "?", W].
        "ch_PP-OCRv4_rec_infer.onnx" => &[("?", 48), ("p2o.DynamicDimension.1", 320)],
        // NudeNet's YOLOv8n detector is exported for 320x320 images: images is [batch, 3, height, width].
        "320n.onnx" => &[("height", 320), ("width", 320)],
        _ => &[],
    };
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn every_real_model_reencodes_to_identical_bytes() {
    let mut report = Vec::new();
    for path in real_models() {
        let file = name(&path);
        // The upload precheck (framing only, nothing read into memory) accepts every real model.
        onnx::precheck(&path).unwrap_or_else(|e| panic!("{file}: precheck failed: {e}"));
        let bytes = std::fs::read(&path).unwrap();
        let model = onnx::decode(&bytes).unwrap_or_else(|e| panic!("{file}: decode failed: {e}"));
        let encoded = onnx::encode(&model);
        if encoded != bytes {
            let at = encoded
                .iter()
                .zip(&bytes)
                .position(|(a, b)| a != b)
                .unwrap_or(encoded.len().min(bytes.len()));
            panic!(
                "{file}: re-encoded bytes differ from the file ({} vs {} bytes; first difference at offset {at})",
                encoded.len(),
                bytes.len()
            );
        }
        let again = onnx::decode(&encoded).unwrap_or_else(|e| panic!("{file}: re-decode failed: {e}"));
        assert!(again == model, "{file}: decode(encode(m)) != m");

        let summary = ModelSummary::of(&model);
        assert!(!summary.inputs.is_empty(), "{file}: summary has no inputs");
        assert!(!summary.outputs.is_empty(), "{file}: summary has no outputs");
        assert!(summary.parameters > 0, "{file}: summary counts no parameters");
        assert!(!summary.op_counts.is_empty(), "{file}: summary counts no operators");
        assert_eq!(
            summary.op_counts.values().sum::<u64>(),
            summary.nodes,
            "{file}: op census vs nodes"
        );
        assert!(
            summary.ir_version >= 3 && !summary.opsets.is_empty(),
            "{file}: {summary:?}"
        );
        report.push(format!(
            "{file}: {} bytes identical; ir {}, opset {}, {} nodes, {} parameters",
            bytes.len(),
            summary.ir_version,
            summary.opsets[0].version,
            summary.nodes,
            summary.parameters
        ));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn onnx_runtime_gives_identical_outputs_for_original_and_reencoded_files() {
    let runtime = Runtime::init("").expect("ONNX Runtime: run `make setup` or set ORT_DYLIB_PATH");
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for path in real_models() {
        let file = name(&path);
        let model = onnx::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let copy = tmp.path().join(&file);
        std::fs::write(&copy, onnx::encode(&model)).unwrap();

        let summary = ModelSummary::of(&model);
        let overrides = dim_overrides(&file);
        let policy = DimPolicy {
            batch: 1,
            default: 32,
            overrides: &overrides,
        };
        let tensors = inputs::synthetic(&summary.inputs, SEED, &policy).unwrap_or_else(|e| panic!("{file}: {e}"));
        let prepared = PreparedInputs::new(&tensors).unwrap_or_else(|e| panic!("{file}: {e}"));
        let run = |p: &Path| -> Vec<OutputTensor> {
            let mut session = runtime.session(p, 1).unwrap_or_else(|e| panic!("{file}: {e}"));
            prepared
                .run_and_collect(&mut session)
                .unwrap_or_else(|e| panic!("{file}: {e}"))
        };
        let original = run(&path);
        let reencoded = run(&copy);

        assert_eq!(original.len(), reencoded.len(), "{file}: output count");
        assert!(!original.is_empty(), "{file}: no outputs");
        for (a, b) in original.iter().zip(&reencoded) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape), "{file}: output name/shape");
            let (Some(va), Some(vb)) = (&a.values, &b.values) else {
                panic!("{file}: output {:?} is not a numeric tensor", a.name);
            };
            assert!(!va.is_empty(), "{file}: output {:?} is empty", a.name);
            let same_bits = va.len() == vb.len() && va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same_bits, "{file}: output {:?} differs bit for bit", a.name);
        }
        let fidelity = fidelity::compare(&original, &reencoded).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(fidelity.max_abs_error, 0.0, "{file}: {fidelity:?}");
        report.push(format!(
            "{file}: inputs {:?} -> outputs {:?}; max_abs_error {}, cosine {}",
            tensors.iter().map(|t| (&t.name, &t.shape)).collect::<Vec<_>>(),
            original.iter().map(|o| (&o.name, &o.shape)).collect::<Vec<_>>(),
            fidelity.max_abs_error,
            fidelity.cosine_similarity
        ));
    }
    println!("{}", report.join("\n"));
}
