//! `prune_structured` and `reconstruct` through the pipeline jobs run: pruned graphs stay valid
//! for ONNX Runtime and onnx.checker with smaller weights and fewer MACs, shared weights and
//! exclusions are respected, output is deterministic, and reconstruction recovers accuracy the
//! pruning lost on the digits classifier.

mod common;

use std::path::Path;

use common::pipeline::{run, run_on};
use modelpress::onnx::ModelProto;
use modelpress::onnx::builder::{DimSpec, GraphBuilder};
use modelpress::onnx::proto::tensor_proto::DataType;
use modelpress::report::{Report, TaskMetrics};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn weights(rng: &mut rand::rngs::StdRng, n: usize, fan_in: usize) -> Vec<f32> {
    let scale = (2.0 / fan_in as f32).sqrt();
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// input[batch,32] → MatMul(w1 32×64) → Add(b1) → Relu → MatMul(w2 64×10) → Add(b2).
fn mlp(seed: u64) -> ModelProto {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batch = DimSpec::Symbolic("batch");
    GraphBuilder::new("mlp")
        .input("input", DataType::Float, &[batch.clone(), DimSpec::Fixed(32)])
        .output("logits", DataType::Float, &[batch, DimSpec::Fixed(10)])
        .initializer_f32("w1", &[32, 64], weights(&mut rng, 32 * 64, 32))
        .initializer_f32("b1", &[64], weights(&mut rng, 64, 64))
        .initializer_f32("w2", &[64, 10], weights(&mut rng, 640, 64))
        .initializer_f32("b2", &[10], weights(&mut rng, 10, 10))
        .node("MatMul", &["input", "w1"], &["h0"], vec![])
        .node("Add", &["h0", "b1"], &["h1"], vec![])
        .node("Relu", &["h1"], &["h2"], vec![])
        .node("MatMul", &["h2", "w2"], &["h3"], vec![])
        .node("Add", &["h3", "b2"], &["logits"], vec![])
        .build()
}

fn initializer_dims(path: &Path) -> std::collections::BTreeMap<String, Vec<i64>> {
    let m = modelpress::onnx::load(path).unwrap();
    m.graph
        .unwrap()
        .initializer
        .iter()
        .map(|t| (t.name().to_string(), t.dims.clone()))
        .collect()
}

#[test]
fn pruning_half_the_hidden_units_shrinks_every_tensor_of_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(&mlp(1), json!([{"pass": "prune_structured", "ratio": 0.5}]), dir.path()).unwrap();
    let out = dir.path().join("out/model.onnx");
    common::onnx_checker(&out);
    let dims = initializer_dims(&out);
    assert_eq!(dims["w1"], vec![32, 32]);
    assert_eq!(dims["b1"], vec![32]);
    assert_eq!(dims["w2"], vec![32, 10]);
    assert_eq!(dims["b2"], vec![10]);
    assert_eq!(
        report.original.parameters - report.result.parameters,
        32 * 32 + 32 + 32 * 10
    );
    let notes = report.passes[0].notes.join("\n");
    assert!(notes.contains("64 -> 32 units"), "{notes}");
    // The MACs a sample costs go down with the units.
    let macs = |p: &Path| {
        modelpress::onnx::ModelSummary::of(&modelpress::onnx::load(p).unwrap())
            .estimated_macs
            .total
    };
    assert!(macs(&out) * 10 < macs(&dir.path().join("input.onnx")) * 6);
    // Still computes roughly the same function: the smallest half carried the least.
    assert!(
        report.result.fidelity.cosine_similarity > 0.5,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn the_activation_criterion_prunes_by_calibration_activity() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &mlp(1),
        json!([{"pass": "prune_structured", "ratio": 0.5, "criterion": "activation"}]),
        dir.path(),
    )
    .unwrap();
    let out = dir.path().join("out/model.onnx");
    common::onnx_checker(&out);
    assert_eq!(initializer_dims(&out)["w2"], vec![32, 10]);
    // It calibrated: the job set a calibration split aside (synthetic here, and flagged).
    assert!(
        report.passes[0].notes[0].contains("Activation"),
        "{:?}",
        report.passes[0].notes
    );
}

#[test]
fn shared_weights_and_excluded_nodes_are_left_alone() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // w2 is read by two MatMuls on different branches: pruning it for one would break the other.
    let model = GraphBuilder::new("shared")
        .input("input", DataType::Float, &[DimSpec::Fixed(1), DimSpec::Fixed(8)])
        .output("a", DataType::Float, &[DimSpec::Fixed(1), DimSpec::Fixed(4)])
        .output("b", DataType::Float, &[DimSpec::Fixed(1), DimSpec::Fixed(4)])
        .initializer_f32("w1", &[8, 16], weights(&mut rng, 128, 8))
        .initializer_f32("w1b", &[8, 16], weights(&mut rng, 128, 8))
        .initializer_f32("w2", &[16, 4], weights(&mut rng, 64, 16))
        .node("MatMul", &["input", "w1"], &["h"], vec![])
        .node("Relu", &["h"], &["hr"], vec![])
        .node("MatMul", &["hr", "w2"], &["a"], vec![])
        .node("MatMul", &["input", "w1b"], &["g"], vec![])
        .node("MatMul", &["g", "w2"], &["b"], vec![])
        .build();
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "prune_structured", "ratio": 0.5}]), dir.path()).unwrap();
    assert_eq!(report.result.parameters, report.original.parameters);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("found no prunable chain") && w.contains("shared")),
        "{:?}",
        report.warnings
    );

    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &mlp(1),
        json!([{"pass": "prune_structured", "ratio": 0.5, "exclude_nodes": ["MatMul_0"]}]),
        dir.path(),
    )
    .unwrap();
    assert_eq!(report.result.parameters, report.original.parameters);
}

#[test]
fn conv_batchnorm_and_swish_chains_are_pruned_into_valid_graphs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let ones = |n| vec![1.0f32; n];
    let conv = GraphBuilder::new("conv")
        .input(
            "x",
            DataType::Float,
            &[
                DimSpec::Fixed(1),
                DimSpec::Fixed(3),
                DimSpec::Fixed(8),
                DimSpec::Fixed(8),
            ],
        )
        .output(
            "y",
            DataType::Float,
            &[
                DimSpec::Fixed(1),
                DimSpec::Fixed(4),
                DimSpec::Fixed(4),
                DimSpec::Fixed(4),
            ],
        )
        .initializer_f32("k1", &[8, 3, 3, 3], weights(&mut rng, 216, 27))
        .initializer_f32("c1", &[8], weights(&mut rng, 8, 8))
        .initializer_f32("scale", &[8], ones(8))
        .initializer_f32("shift", &[8], weights(&mut rng, 8, 8))
        .initializer_f32("mean", &[8], weights(&mut rng, 8, 8))
        .initializer_f32("var", &[8], ones(8))
        .initializer_f32("k2", &[4, 8, 3, 3], weights(&mut rng, 288, 72))
        .node(
            "Conv",
            &["x", "k1", "c1"],
            &["h"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        )
        .node(
            "BatchNormalization",
            &["h", "scale", "shift", "mean", "var"],
            &["hb"],
            vec![],
        )
        .node("Relu", &["hb"], &["hr"], vec![])
        .node(
            "Conv",
            &["hr", "k2"],
            &["y"],
            vec![attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])],
        )
        .build();
    let swish = GraphBuilder::new("swish")
        .input("input", DataType::Float, &[DimSpec::Fixed(1), DimSpec::Fixed(16)])
        .output("out", DataType::Float, &[DimSpec::Fixed(1), DimSpec::Fixed(4)])
        .initializer_f32("w1", &[16, 32], weights(&mut rng, 512, 16))
        .initializer_f32("w2", &[32, 4], weights(&mut rng, 128, 32))
        .node("MatMul", &["input", "w1"], &["h"], vec![])
        .node("Sigmoid", &["h"], &["s"], vec![])
        .node("Mul", &["h", "s"], &["sw"], vec![])
        .node("MatMul", &["sw", "w2"], &["out"], vec![])
        .build();
    for (model, pruned, dims) in [(conv, "k2", vec![4, 4, 3, 3]), (swish, "w2", vec![16, 4])] {
        let dir = tempfile::tempdir().unwrap();
        let report = run(&model, json!([{"pass": "prune_structured", "ratio": 0.5}]), dir.path()).unwrap();
        let out = dir.path().join("out/model.onnx");
        common::onnx_checker(&out);
        assert_eq!(initializer_dims(&out)[pruned], dims, "{:?}", report.passes[0].notes);
        assert!(report.result.parameters < report.original.parameters);
        // A second run writes the same bytes.
        let again = tempfile::tempdir().unwrap();
        run(
            &model,
            json!([{"pass": "prune_structured", "ratio": 0.5}]),
            again.path(),
        )
        .unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(again.path().join("out/model.onnx")).unwrap());
    }
}

fn attr_ints(name: &str, values: &[i64]) -> modelpress::onnx::proto::AttributeProto {
    modelpress::onnx::proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(modelpress::onnx::proto::attribute_proto::AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn accuracy(r: &Report) -> (f64, f64) {
    match (&r.original.metrics, &r.result.metrics) {
        (Some(TaskMetrics::Classification(o)), Some(TaskMetrics::Classification(n))) => (o.accuracy, n.accuracy),
        _ => panic!("no classification metrics"),
    }
}

#[test]
fn reconstruct_recovers_accuracy_that_pruning_lost_on_digits() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits");
    let (model, dataset) = (fixtures.join("mlp.onnx"), fixtures.join("test.npz"));
    let prune = json!({"pass": "prune_structured", "ratio": 0.6});
    // Both runs are measured on the same samples: reconstruct calibrates, so its run holds the
    // calibration split out, and the pruning-only run is asked to do the same.
    let alone_dir = tempfile::tempdir().unwrap();
    let alone = run_on(&model, json!([prune.clone()]), alone_dir.path(), Some(&dataset), true).unwrap();
    let fixed_dir = tempfile::tempdir().unwrap();
    let fixed = run_on(
        &model,
        json!([prune, {"pass": "reconstruct"}]),
        fixed_dir.path(),
        Some(&dataset),
        false,
    )
    .unwrap();
    common::onnx_checker(&fixed_dir.path().join("out/model.onnx"));
    let (original, after_prune) = accuracy(&alone);
    let (original2, after_fix) = accuracy(&fixed);
    assert_eq!(original, original2, "both measured on the same samples");
    assert!(
        after_prune < original - 0.01,
        "pruning 60% should cost accuracy: {original} -> {after_prune}"
    );
    assert!(
        after_fix > after_prune + 0.005,
        "reconstruct should recover part of it: {after_prune} -> {after_fix} (original {original})"
    );
    assert!(
        fixed.result.fidelity.cosine_similarity > alone.result.fidelity.cosine_similarity,
        "fidelity {} vs {}",
        fixed.result.fidelity.cosine_similarity,
        alone.result.fidelity.cosine_similarity
    );
    let notes = fixed.passes[1].notes.join("\n");
    assert!(notes.contains("re-fitted"), "{notes}");
}
