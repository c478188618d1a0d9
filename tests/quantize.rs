//! `quantize_int8_dynamic` on generated models, through the same pipeline jobs run: the result
//! loads in ONNX Runtime and in `onnx.checker`, stays close to the original, is smaller, and is
//! byte-identical when run twice.

mod common;

use std::path::Path;

use common::pipeline::run;
use modelpress::compress::Recipe;
use modelpress::onnx::builder::{self, DimSpec, GraphBuilder, attr_int};
use modelpress::onnx::proto::tensor_proto::DataType;
use modelpress::onnx::proto::{AttributeProto, ModelProto, NodeProto, attribute_proto::AttributeType};
use serde_json::json;

/// x[batch, 24] → Gemm(W stored [12, 24], transB=1, bias) → y[batch, 12]
fn gemm_model() -> ModelProto {
    let w: Vec<f32> = (0..12 * 24).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let b: Vec<f32> = (0..12).map(|i| i as f32 * 0.1).collect();
    GraphBuilder::new("gemm")
        .input("x", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(24)])
        .output("y", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(12)])
        .initializer_f32("w", &[12, 24], w)
        .initializer_f32("b", &[12], b)
        .node("Gemm", &["x", "w", "b"], &["y"], vec![attr_int("transB", 1)])
        .build()
}

#[test]
fn the_tiny_mlp_quantizes_per_tensor_and_per_channel() {
    for per_channel in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let report = run(
            &builder::tiny_mlp(5),
            json!([{"pass": "quantize_int8_dynamic", "per_channel": per_channel}]),
            dir.path(),
        )
        .unwrap();
        let result = dir.path().join("out/model.onnx");
        common::onnx_checker(&result);
        let model = modelpress::onnx::load(&result).unwrap();
        let summary = modelpress::onnx::ModelSummary::of(&model);
        let ops = summary.op_counts;
        assert_eq!(ops.get("MatMulInteger"), Some(&2), "{ops:?}");
        // Every weight is int8 now; what stays float are the biases and the scales.
        let weights = (builder::MLP_IN * builder::MLP_HIDDEN + builder::MLP_HIDDEN * builder::MLP_OUT) as u64;
        assert!(summary.parameters_by_dtype["int8"].elements >= weights);
        assert!(
            summary.parameters_by_dtype["float32"].elements < 100,
            "{:?}",
            summary.parameters_by_dtype
        );
        assert_eq!(ops.get("DynamicQuantizeLinear"), Some(&2));
        assert_eq!(ops.get("MatMul"), None);
        assert!(report.result.size_bytes < report.original.size_bytes);
        assert!(
            report.result.fidelity.cosine_similarity > 0.999,
            "{:?}",
            report.result.fidelity
        );
        assert!(
            report.passes[0].notes[0].starts_with("2 node(s) quantized"),
            "{:?}",
            report.passes
        );
    }
}

#[test]
fn gemm_with_transposed_weights_and_bias_quantizes_faithfully() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &gemm_model(),
        json!([{"pass": "quantize_int8_dynamic", "per_channel": true}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    assert!(
        report.result.fidelity.cosine_similarity > 0.999,
        "{:?}",
        report.result.fidelity
    );
    assert!(
        report.result.fidelity.max_abs_error < 0.1,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn weights_kept_in_constant_nodes_are_quantized_too() {
    let mut model = builder::tiny_mlp(6);
    let graph = model.graph.as_mut().unwrap();
    // Move w1 from an initializer into a Constant node, as Paddle exports do.
    let w1 = graph.initializer.remove(0);
    graph.node.insert(
        0,
        NodeProto {
            name: Some("w1_const".into()),
            op_type: Some("Constant".into()),
            output: vec!["w1".into()],
            attribute: vec![AttributeProto {
                name: Some("value".into()),
                r#type: Some(AttributeType::Tensor as i32),
                t: Some(w1),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "quantize_int8_dynamic"}]), dir.path()).unwrap();
    assert!(
        report.passes[0].notes[0].starts_with("2 node(s) quantized"),
        "{:?}",
        report.passes
    );
    assert!(
        report.passes[0].notes[0].contains("1 Constant node(s)"),
        "{:?}",
        report.passes
    );
}

#[test]
fn quantizing_twice_gives_byte_identical_models() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let recipe =
        json!([{"pass": "optimize", "level": "basic"}, {"pass": "quantize_int8_dynamic", "per_channel": true}]);
    run(&builder::tiny_mlp(7), recipe.clone(), a.path()).unwrap();
    run(&builder::tiny_mlp(7), recipe, b.path()).unwrap();
    assert_eq!(
        std::fs::read(a.path().join("out/model.onnx")).unwrap(),
        std::fs::read(b.path().join("out/model.onnx")).unwrap()
    );
}

#[test]
fn a_model_with_nothing_to_quantize_is_returned_unchanged_with_a_warning() {
    let model = GraphBuilder::new("relu")
        .input("x", DataType::Float, &[DimSpec::Fixed(4)])
        .output("y", DataType::Float, &[DimSpec::Fixed(4)])
        .node("Relu", &["x"], &["y"], vec![])
        .build();
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "quantize_int8_dynamic"}]), dir.path()).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("found nothing to quantize")),
        "{:?}",
        report.warnings
    );
    assert_eq!(report.result.fidelity.max_abs_error, 0.0);
}

#[test]
fn an_opset_too_old_for_integer_ops_is_refused_with_the_reason() {
    let model = GraphBuilder::new("old").opset("", 10).build();
    let mut model = ModelProto { ..model };
    model.graph = builder::tiny_mlp(1).graph;
    let dir = tempfile::tempdir().unwrap();
    let err = run(&model, json!([{"pass": "quantize_int8_dynamic"}]), dir.path()).unwrap_err();
    assert_eq!(err.code(), "pass_failed");
    assert!(
        err.to_string().contains("opset 11") && err.to_string().contains("opset 10"),
        "{err}"
    );
}

#[test]
fn bad_parameters_are_refused_when_the_recipe_is_parsed() {
    for (recipe, expected) in [
        (
            json!([{"pass": "quantize_int8_dynamic", "op_types": ["Conv"]}]),
            "ConvInteger",
        ),
        (
            json!([{"pass": "quantize_int8_dynamic", "per_chanel": true}]),
            "unknown field",
        ),
    ] {
        let err = Recipe::parse(&recipe).unwrap_err().0;
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn int4_weight_only_packs_matmuls_into_matmulnbits_in_both_modes() {
    for symmetric in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let recipe = json!([{"pass": "quantize_int4_weight_only", "block_size": 16, "symmetric": symmetric}]);
        let report = run(&builder::tiny_mlp(8), recipe, dir.path()).unwrap();
        let result = dir.path().join("out/model.onnx");
        common::onnx_checker(&result);
        let model = modelpress::onnx::load(&result).unwrap();
        assert_eq!(modelpress::onnx::graph::opset_version(&model, "com.microsoft"), Some(1));
        let summary = modelpress::onnx::ModelSummary::of(&model);
        assert_eq!(
            summary.op_counts.get("com.microsoft::MatMulNBits"),
            Some(&2),
            "{:?}",
            summary.op_counts
        );
        assert_eq!(summary.op_counts.get("MatMul"), None);
        assert!(
            report.result.fidelity.cosine_similarity > 0.98,
            "{symmetric}: {:?}",
            report.result.fidelity
        );
        assert!(report.result.size_bytes < report.original.size_bytes);
    }
}

#[test]
fn int4_on_a_model_without_matmul_says_so() {
    let model = gemm_model();
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "quantize_int4_weight_only"}]), dir.path()).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("found no MatMul")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn int4_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let recipe = json!([{"pass": "quantize_int4_weight_only", "symmetric": false}]);
    run(&builder::tiny_mlp(9), recipe.clone(), a.path()).unwrap();
    run(&builder::tiny_mlp(9), recipe, b.path()).unwrap();
    assert_eq!(
        std::fs::read(a.path().join("out/model.onnx")).unwrap(),
        std::fs::read(b.path().join("out/model.onnx")).unwrap()
    );
}

fn summary_of(path: &Path) -> modelpress::onnx::ModelSummary {
    modelpress::onnx::ModelSummary::of(&modelpress::onnx::load(path).unwrap())
}

#[test]
fn fp16_halves_the_weights_and_keeps_float32_at_the_edges() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(&builder::tiny_mlp(10), json!([{"pass": "fp16"}]), dir.path()).unwrap();
    let result = dir.path().join("out/model.onnx");
    common::onnx_checker(&result);
    let s = summary_of(&result);
    assert_eq!(s.inputs[0].dtype, "float32");
    assert_eq!(s.outputs[0].dtype, "float32");
    assert_eq!(
        s.parameters_by_dtype.get("float32"),
        None,
        "{:?}",
        s.parameters_by_dtype
    );
    assert_eq!(s.parameters_by_dtype["float16"].elements, s.parameters);
    assert_eq!(
        s.op_counts.get("Cast"),
        Some(&2),
        "one Cast in, one out: {:?}",
        s.op_counts
    );
    assert!(
        report.result.fidelity.cosine_similarity > 0.9999,
        "{:?}",
        report.result.fidelity
    );
    assert!(
        report.warnings.iter().any(|w| w.contains("slower on CPU")),
        "{:?}",
        report.warnings
    );

    // Without keep_io_types the inputs and outputs are float16 too; the evaluation feeds the
    // same samples converted to float16.
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &builder::tiny_mlp(10),
        json!([{"pass": "fp16", "keep_io_types": false}]),
        dir.path(),
    )
    .unwrap();
    let s = summary_of(&dir.path().join("out/model.onnx"));
    assert_eq!(
        (s.inputs[0].dtype.as_str(), s.outputs[0].dtype.as_str()),
        ("float16", "float16")
    );
    assert_eq!(s.op_counts.get("Cast"), None, "{:?}", s.op_counts);
    assert!(
        report.result.fidelity.cosine_similarity > 0.999,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn block_listed_operators_stay_in_float32_between_casts() {
    // x → MatMul → BatchNormalization (block-listed) → y
    let model = GraphBuilder::new("bn")
        .input("x", DataType::Float, &[DimSpec::Fixed(2), DimSpec::Fixed(4)])
        .output("y", DataType::Float, &[DimSpec::Fixed(2), DimSpec::Fixed(4)])
        .initializer_f32("w", &[4, 4], (0..16).map(|i| i as f32 / 10.0).collect())
        .initializer_f32("scale", &[4], vec![1.0; 4])
        .initializer_f32("bias", &[4], vec![0.5; 4])
        .initializer_f32("mean", &[4], vec![0.1; 4])
        .initializer_f32("var", &[4], vec![1e-9; 4])
        .node("MatMul", &["x", "w"], &["h"], vec![])
        .node(
            "BatchNormalization",
            &["h", "scale", "bias", "mean", "var"],
            &["y"],
            vec![],
        )
        .build();
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "fp16"}]), dir.path()).unwrap();
    let s = summary_of(&dir.path().join("out/model.onnx"));
    assert_eq!(
        s.parameters_by_dtype["float32"].elements, 16,
        "BN's 4x4 parameters stay float32"
    );
    assert_eq!(
        s.parameters_by_dtype["float16"].elements, 16,
        "the MatMul weight is float16"
    );
    assert!(
        report.result.fidelity.cosine_similarity > 0.999,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn fp16_refuses_what_it_cannot_type_and_clamps_out_of_range_weights() {
    // Loop's body outputs are beyond the type rules: refused with the reason, before ORT sees it.
    let lp = GraphBuilder::new("loop")
        .input("x", DataType::Float, &[DimSpec::Fixed(2)])
        .output("y", DataType::Float, &[DimSpec::Fixed(2)])
        .node("Identity", &["x"], &["h"], vec![])
        .node("Shrink", &["h"], &["y"], vec![])
        .build();
    let dir = tempfile::tempdir().unwrap();
    let err = run(&lp, json!([{"pass": "fp16"}]), dir.path()).unwrap_err();
    assert_eq!(err.code(), "pass_failed");
    assert!(err.to_string().contains("Shrink"), "{err}");

    let big = GraphBuilder::new("big")
        .input("x", DataType::Float, &[DimSpec::Fixed(4)])
        .output("y", DataType::Float, &[DimSpec::Fixed(4)])
        .initializer_f32("c", &[4], vec![1e-3, 1e6, -1e6, 2.0])
        .node("Mul", &["x", "c"], &["y"], vec![])
        .build();
    let dir = tempfile::tempdir().unwrap();
    let report = run(&big, json!([{"pass": "fp16"}]), dir.path()).unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("2 weight value(s) beyond float16's range")),
        "{:?}",
        report.warnings
    );
    assert!(
        report.result.fidelity.max_abs_error > 1000.0,
        "the clamped weights change the output, and the report shows it"
    );
}

/// x[1, 3, 8, 8] → Conv(4 filters 3x3, bias) → Relu → y
fn conv_model() -> ModelProto {
    let w: Vec<f32> = (0..4 * 3 * 3 * 3)
        .map(|i| ((i * 29 % 53) as f32 / 26.0) - 1.0)
        .collect();
    GraphBuilder::new("conv")
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
                DimSpec::Fixed(6),
                DimSpec::Fixed(6),
            ],
        )
        .initializer_f32("w", &[4, 3, 3, 3], w)
        .initializer_f32("b", &[4], vec![0.1, -0.2, 0.3, 0.0])
        .node("Conv", &["x", "w", "b"], &["c"], vec![])
        .node("Relu", &["c"], &["y"], vec![])
        .build()
}

#[test]
fn static_int8_writes_qdq_around_convs_and_matmuls_calibrated_on_synthetic_data_when_there_is_none() {
    for (model, per_channel, symmetric) in [
        (conv_model(), true, true),
        (conv_model(), false, false),
        (builder::tiny_mlp(11), true, false),
    ] {
        for method in ["minmax", "percentile", "entropy"] {
            let dir = tempfile::tempdir().unwrap();
            let recipe = json!([{"pass": "quantize_int8_static", "calibration": method, "per_channel": per_channel,
                                 "symmetric_weights": symmetric}]);
            let report = run(&model, recipe, dir.path()).unwrap();
            let result = dir.path().join("out/model.onnx");
            common::onnx_checker(&result);
            let s = summary_of(&result);
            assert!(
                s.op_counts.get("QuantizeLinear").is_some_and(|&n| n >= 2),
                "{:?}",
                s.op_counts
            );
            let weight_type = if symmetric { "int8" } else { "uint8" };
            assert!(
                s.parameters_by_dtype[weight_type].elements > 0,
                "{:?}",
                s.parameters_by_dtype
            );
            assert!(
                report.result.fidelity.cosine_similarity > 0.98,
                "{method}: {:?}",
                report.result.fidelity
            );
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|w| w.contains("calibrated on synthetic inputs")),
                "{:?}",
                report.warnings
            );
        }
    }
}

#[test]
fn static_int8_per_channel_upgrades_an_opset_11_model_or_says_why_it_cannot() {
    // Conv → Unsqueeze(axes attribute, opset 11) → Squeeze → Relu: upgradable.
    let axes = |v: i64| AttributeProto {
        name: Some("axes".into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: vec![v],
        ..Default::default()
    };
    let mut model = conv_model();
    model.opset_import[0].version = Some(11);
    let g = model.graph.as_mut().unwrap();
    g.node[1].input[0] = "s".into();
    let squeeze = |name: &str, op: &str, input: &str, output: &str| NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: vec![input.into()],
        output: vec![output.into()],
        attribute: vec![axes(0)],
        ..Default::default()
    };
    g.node.insert(1, squeeze("unsq", "Unsqueeze", "c", "u"));
    g.node.insert(2, squeeze("sq", "Squeeze", "u", "s"));
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &model,
        json!([{"pass": "quantize_int8_static", "per_channel": true}]),
        dir.path(),
    )
    .unwrap();
    let notes = report.passes[0].notes.join(" | ");
    assert!(
        notes.contains("upgraded the model from opset 11 to 13 (rewrote: Squeeze, Unsqueeze)"),
        "{notes}"
    );
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    assert!(
        report.result.fidelity.cosine_similarity > 0.98,
        "{:?}",
        report.result.fidelity
    );
    // Per tensor needs no upgrade at opset 11.
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, json!([{"pass": "quantize_int8_static"}]), dir.path()).unwrap();
    assert!(!report.passes[0].notes.join(" ").contains("upgraded"));

    // A Softmax over a middle axis of a rank-3 tensor means something else at opset 13: refused.
    let mut soft = GraphBuilder::new("soft")
        .input(
            "x",
            DataType::Float,
            &[DimSpec::Fixed(2), DimSpec::Fixed(3), DimSpec::Fixed(4)],
        )
        .output(
            "y",
            DataType::Float,
            &[DimSpec::Fixed(2), DimSpec::Fixed(3), DimSpec::Fixed(4)],
        )
        .initializer_f32("w", &[4, 4], vec![0.5; 16])
        .node("MatMul", &["x", "w"], &["h"], vec![])
        .node("Softmax", &["h"], &["y"], vec![attr_int("axis", 1)])
        .build();
    soft.opset_import[0].version = Some(11);
    let dir = tempfile::tempdir().unwrap();
    let err = run(
        &soft,
        json!([{"pass": "quantize_int8_static", "per_channel": true}]),
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot be upgraded") && err.to_string().contains("changes meaning"),
        "{err}"
    );
}

#[test]
fn static_int8_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let recipe = json!([{"pass": "quantize_int8_static", "calibration": "percentile", "per_channel": true}]);
    run(&conv_model(), recipe.clone(), a.path()).unwrap();
    run(&conv_model(), recipe, b.path()).unwrap();
    assert_eq!(
        std::fs::read(a.path().join("out/model.onnx")).unwrap(),
        std::fs::read(b.path().join("out/model.onnx")).unwrap()
    );
}

/// The transformer encoder made by scripts/make-transformer-fixture.py (2 layers, 13 MatMuls with
/// constant weights, int64 token ids): every pass loads, passes the checker and stays close.
#[test]
fn every_pass_keeps_the_transformer_encoder_close() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/transformer/encoder.onnx"
    ))
    .unwrap();
    let model = modelpress::onnx::decode(&bytes).unwrap();
    let cases = [
        (json!([{"pass": "quantize_int8_dynamic", "per_channel": true}]), 0.999),
        (json!([{"pass": "quantize_int4_weight_only", "block_size": 32}]), 0.995),
        (json!([{"pass": "fp16"}]), 0.9999),
        (
            json!([{"pass": "quantize_int8_static", "per_channel": true, "calibration": "percentile"}]),
            0.99,
        ),
    ];
    for (recipe, min_cosine) in cases {
        let dir = tempfile::tempdir().unwrap();
        let report = run(&model, recipe.clone(), dir.path()).unwrap_or_else(|e| panic!("{recipe}: {e}"));
        common::onnx_checker(&dir.path().join("out/model.onnx"));
        assert!(
            report.result.size_bytes < report.original.size_bytes,
            "{recipe}: not smaller"
        );
        let cosine = report.result.fidelity.cosine_similarity;
        assert!(cosine > min_cosine, "{recipe}: cosine {cosine}");
    }
}

#[test]
fn fp16_after_quantization_halves_what_quantization_left_in_float() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/transformer/encoder.onnx"
    ))
    .unwrap();
    let model = modelpress::onnx::decode(&bytes).unwrap();
    let int4 = json!({"pass": "quantize_int4_weight_only", "block_size": 32});
    for first in [int4, json!({"pass": "quantize_int8_dynamic", "per_channel": true})] {
        let alone_dir = tempfile::tempdir().unwrap();
        let alone = run(&model, json!([first.clone()]), alone_dir.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let both = run(&model, json!([first.clone(), {"pass": "fp16"}]), dir.path()).unwrap();
        let out = dir.path().join("out/model.onnx");
        common::onnx_checker(&out);
        // The embeddings the quantizer leaves in float32 are halved ...
        assert!(
            both.result.size_bytes < alone.result.size_bytes * 9 / 10,
            "{first}: {} vs {}",
            both.result.size_bytes,
            alone.result.size_bytes
        );
        // ... while the quantized operators keep their float32 interface (between Casts).
        let summary = summary_of(&out);
        let quantized = ["com.microsoft::MatMulNBits", "MatMulInteger"];
        assert!(
            quantized.iter().any(|op| summary.op_counts.contains_key(*op)),
            "{:?}",
            summary.op_counts
        );
        let cosine = both.result.fidelity.cosine_similarity;
        assert!(
            cosine > alone.result.fidelity.cosine_similarity - 1e-3,
            "{first}: cosine {cosine}"
        );
    }
}

#[test]
fn static_int8_quantizes_attention_matmuls_between_two_activations() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/transformer/encoder.onnx"
    ))
    .unwrap();
    let model = modelpress::onnx::decode(&bytes).unwrap();
    // The original's MatMuls with no stored weight (attention), by name.
    let g = model.graph.as_ref().unwrap();
    let constant = |name: &str| {
        g.initializer.iter().any(|t| t.name() == name)
            || g.node
                .iter()
                .any(|n| n.op_type() == "Constant" && n.output.iter().any(|o| o == name))
    };
    let attention: Vec<String> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "MatMul" && n.input.iter().all(|i| !constant(i)))
        .map(|n| n.name().to_string())
        .collect();
    assert!(
        attention.len() >= 4,
        "the encoder has attention MatMuls ({attention:?})"
    );
    // How many of them read both inputs from DequantizeLinear in `path`.
    let count = |path: &Path| {
        let m = modelpress::onnx::load(path).unwrap();
        let g = m.graph.unwrap();
        let producer = |name: &str| {
            g.node
                .iter()
                .find(|n| n.output.iter().any(|o| o == name))
                .map(|n| n.op_type().to_string())
        };
        g.node
            .iter()
            .filter(|n| attention.contains(&n.name().to_string()))
            .filter(|n| {
                n.input
                    .iter()
                    .all(|i| producer(i).as_deref() == Some("DequantizeLinear"))
            })
            .count()
    };
    let recipe = |on: bool| json!([{"pass": "quantize_int8_static", "per_channel": true, "activation_matmuls": on}]);
    let dir = tempfile::tempdir().unwrap();
    let report = run(&model, recipe(true), dir.path()).unwrap();
    let out = dir.path().join("out/model.onnx");
    common::onnx_checker(&out);
    assert_eq!(count(&out), attention.len());
    assert!(
        report.passes[0]
            .notes
            .iter()
            .any(|n| n.contains("between two activations"))
    );
    assert!(report.result.fidelity.cosine_similarity > 0.999);

    let dir = tempfile::tempdir().unwrap();
    run(&model, recipe(false), dir.path()).unwrap();
    assert_eq!(count(&dir.path().join("out/model.onnx")), 0);
}

/// Runs `modelpress compress --no-eval` on `input` and returns the `passes.json` it wrote to `out`.
fn compress_no_eval(input: &Path, out: &Path, recipe: &str) -> serde_json::Value {
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args([
            "compress",
            input.to_str().unwrap(),
            "--no-eval",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--recipe", recipe])
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    serde_json::from_slice(&std::fs::read(out.join("passes.json")).unwrap()).unwrap()
}

/// `compress --no-eval` runs the passes alone: the same model a measured run writes, byte for byte,
/// plus `passes.json` with each pass's record, and no report (nothing was measured).
#[test]
fn compress_without_evaluation_writes_the_same_model_and_only_the_pass_records() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mlp.onnx");
    std::fs::write(&input, modelpress::onnx::encode(&builder::tiny_mlp(11))).unwrap();
    let recipe = json!([{"pass": "quantize_int8_static"}, {"pass": "quantize_int4_weight_only"}]);
    let out = dir.path().join("bare");
    let passes = compress_no_eval(&input, &out, &recipe.to_string());
    assert!(
        !out.join("report.json").exists(),
        "--no-eval measured nothing, so it writes no report"
    );
    let names: Vec<&str> = passes["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pass"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["quantize_int8_static", "quantize_int4_weight_only"]);
    assert_eq!(
        passes["calibration_samples"], 32,
        "synthetic calibration without a dataset"
    );
    assert!(passes["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(passes["passes"][0]["duration_ms"].as_f64().unwrap() > 0.0);
    common::onnx_checker(&out.join("model.onnx"));

    assert_eq!(passes["onnxruntime_loaded"], true, "calibration runs the model");
    // Passes that run no model leave ONNX Runtime unloaded (its library is most of the memory).
    let weights_only = dir.path().join("weights-only");
    let bare = compress_no_eval(
        &input,
        &weights_only,
        r#"[{"pass": "quantize_int4_weight_only"}, {"pass": "fp16"}]"#,
    );
    assert_eq!(bare["onnxruntime_loaded"], false);
    assert!(bare["peak_memory_bytes"].as_u64().unwrap() < passes["peak_memory_bytes"].as_u64().unwrap());
    common::onnx_checker(&weights_only.join("model.onnx"));

    let measured = run(&builder::tiny_mlp(11), recipe, &dir.path().join("measured")).unwrap();
    assert_eq!(measured.passes.len(), 2);
    assert_eq!(
        std::fs::read(out.join("model.onnx")).unwrap(),
        std::fs::read(dir.path().join("measured/out/model.onnx")).unwrap()
    );
}

/// The largest |int8 code| among the model's int8 initializers.
fn largest_int8_code(path: &Path) -> i32 {
    let model = modelpress::onnx::load(path).unwrap();
    model
        .graph
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.data_type() == DataType::Int8 as i32)
        .flat_map(|t| t.raw_data.clone().unwrap_or_default().to_vec())
        .map(|b| (b as i8 as i32).abs())
        .max()
        .unwrap_or(0)
}

/// `reduce_range` keeps int8 weights within [-64, 64] (so ONNX Runtime's AVX2 kernels cannot
/// saturate); `false` uses the full range; unset follows this CPU (no VNNI: reduced), and the
/// report's notes say which range was used.
#[test]
fn reduce_range_bounds_int8_weights_and_defaults_by_cpu() {
    for pass in ["quantize_int8_dynamic", "quantize_int8_static"] {
        let mut largest = Vec::new();
        for reduce in [Some(true), Some(false), None] {
            let dir = tempfile::tempdir().unwrap();
            let mut step = json!({"pass": pass});
            if let Some(r) = reduce {
                step["reduce_range"] = json!(r);
            }
            let report = run(&builder::tiny_mlp(8), json!([step]), dir.path()).unwrap();
            let notes = report.passes[0].notes.join("; ");
            largest.push(largest_int8_code(&dir.path().join("out/model.onnx")));
            let reduced = reduce.unwrap_or_else(modelpress::compress::weights::reduce_range_by_default);
            assert!(
                notes.contains(if reduced {
                    "int8 weights in 7 bits"
                } else {
                    "int8 weights in the full 8 bits"
                }),
                "{pass} {reduce:?}: {notes}"
            );
            // Reduced, or left to the CPU, the result stays close to the original here. (Full range
            // on a CPU without VNNI is what saturates: cosine 0.991 for this MLP on an AVX2 EPYC.)
            if reduce != Some(false) {
                assert!(
                    report.result.fidelity.cosine_similarity > 0.999,
                    "{pass} {reduce:?}: {:?}",
                    report.result.fidelity
                );
            }
        }
        assert_eq!(largest[0], 64, "{pass}: reduce_range true");
        assert_eq!(largest[1], 127, "{pass}: reduce_range false");
        let auto = if modelpress::compress::weights::reduce_range_by_default() {
            64
        } else {
            127
        };
        assert_eq!(largest[2], auto, "{pass}: reduce_range unset");
    }
}

/// The element type of the quantized weight each DequantizeLinear reads and that weight's zero
/// points (as signed or unsigned by that type), by the weight's name.
fn weight_types(path: &Path) -> std::collections::HashMap<String, (i32, Vec<i32>)> {
    let graph = modelpress::onnx::load(path).unwrap().graph.unwrap();
    let init = |name: &str| graph.initializer.iter().find(|t| t.name() == name);
    graph
        .node
        .iter()
        .filter(|n| n.op_type() == "DequantizeLinear")
        .filter_map(|n| {
            let t = init(&n.input[0])?;
            let signed = t.data_type() == DataType::Int8 as i32;
            let zero_points = n
                .input
                .get(2)
                .and_then(|z| init(z))
                .and_then(|z| z.raw_data.clone())
                .unwrap_or_default()
                .iter()
                .map(|&b| if signed { i32::from(b as i8) } else { i32::from(b) })
                .collect();
            Some((
                n.input[0].trim_end_matches("_quantized").to_string(),
                (t.data_type(), zero_points),
            ))
        })
        .collect()
}

/// `symmetric_weights` unset gives a weight a zero point only where its range is skewed enough to
/// halve the rounding error (kernels with weight zero points are slower); `true` and `false` choose
/// for all, and the notes say what was chosen. Weights with a zero point are int8 (the codes and
/// zero point uint8's minus 128: the same values, faster kernels), or uint8 under `reduce_range`,
/// where int8 would lose a bit.
#[test]
fn static_int8_gives_zero_points_only_to_skewed_weights_unless_told() {
    // x[batch, 8] → MatMul(all-positive weight) → MatMul(weight symmetric around 0) → y[batch, 3]
    let skewed: Vec<f32> = (0..32).map(|i| 0.05 + (i * 7 % 32) as f32 / 32.0).collect();
    let centred: Vec<f32> = (0..12).map(|i| ((i * 5 % 12) as f32 / 5.5) - 1.0).collect();
    let model = GraphBuilder::new("skew")
        .input("x", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(8)])
        .output("y", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(3)])
        .initializer_f32("w_skewed", &[8, 4], skewed)
        .initializer_f32("w_centred", &[4, 3], centred)
        .node("MatMul", &["x", "w_skewed"], &["h"], vec![])
        .node("MatMul", &["h", "w_centred"], &["y"], vec![])
        .build();
    let (uint8, int8) = (DataType::Uint8 as i32, DataType::Int8 as i32);
    for reduce in [false, true] {
        // With a zero point: the type, the zero point of the all-positive weight (its range [0, max]
        // starts at the lowest code), and the words in the notes.
        let (asym, skewed_zp, words) = if reduce {
            (uint8, 0, "stored as uint8 with a zero point")
        } else {
            (int8, -128, "stored as int8 with a zero point")
        };
        for (symmetric, skewed_asym, centred_asym) in [
            (None, true, false),
            (Some(true), false, false),
            (Some(false), true, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut step = json!({"pass": "quantize_int8_static", "reduce_range": reduce});
            if let Some(s) = symmetric {
                step["symmetric_weights"] = json!(s);
            }
            let report = run(&model, json!([step]), dir.path()).unwrap();
            let result = dir.path().join("out/model.onnx");
            common::onnx_checker(&result);
            let types = weight_types(&result);
            let case = format!("reduce_range {reduce}, symmetric_weights {symmetric:?}: {types:?}");
            let (skewed_type, skewed_zps) = &types["w_skewed"];
            let (centred_type, centred_zps) = &types["w_centred"];
            assert_eq!(*skewed_type, if skewed_asym { asym } else { int8 }, "{case}");
            assert_eq!(*centred_type, if centred_asym { asym } else { int8 }, "{case}");
            assert_eq!(skewed_zps, &vec![if skewed_asym { skewed_zp } else { 0 }], "{case}");
            if !centred_asym {
                assert_eq!(centred_zps, &vec![0], "{case}");
            }
            let notes = report.passes[0].notes.join("; ");
            match symmetric {
                None => assert!(
                    notes.contains(&format!("1 of 2 weight tensor(s) {words}")),
                    "{case}: {notes}"
                ),
                Some(false) => assert!(
                    notes.contains(&format!("2 weight tensor(s) {words}")),
                    "{case}: {notes}"
                ),
                Some(true) => assert!(!notes.contains("with a zero point"), "{case}: {notes}"),
            }
            assert!(
                report.result.fidelity.cosine_similarity > 0.999,
                "{case}: {:?}",
                report.result.fidelity
            );
        }
    }
    // Per-channel zero points run, but ONNX Runtime cannot fuse them into its integer Conv kernel:
    // the report says so.
    let dir = tempfile::tempdir().unwrap();
    let step = json!({"pass": "quantize_int8_static", "per_channel": true, "symmetric_weights": false});
    let report = run(&model, json!([step]), dir.path()).unwrap();
    let warnings = report.warnings.join("; ");
    assert!(warnings.contains("per-channel weights with zero points"), "{warnings}");
    assert!(
        report.result.fidelity.cosine_similarity > 0.999,
        "{:?}",
        report.result.fidelity
    );
}
