//! `prune_unstructured`, `low_rank` and `cluster_weights` on generated models, through the same
//! pipeline jobs run (real ONNX Runtime, `onnx.checker`): each keeps the graph valid, changes a
//! weight shared by two nodes once, respects exclusions, says when it has nothing to do, and gives
//! byte-identical output when run twice. The digits classifier runs each pass through the HTTP API.

mod common;

use std::path::Path;

use common::TestApp;
use common::pipeline::run;
use modelpress::compress::Recipe;
use modelpress::compress::weight_targets::float_values;
use modelpress::onnx::builder::{self, DimSpec, GraphBuilder, attr_int};
use modelpress::onnx::proto::ModelProto;
use modelpress::onnx::proto::tensor_proto::DataType;
use modelpress::report::Report;
use serde_json::{Value, json};
use sqlx::PgPool;

fn result(dir: &Path) -> ModelProto {
    modelpress::onnx::load(&dir.join("out/model.onnx")).unwrap()
}

/// The float values of initializer `name`, or None when the model no longer has it.
fn weight(model: &ModelProto, name: &str) -> Option<Vec<f32>> {
    let g = model.graph.as_ref().unwrap();
    g.initializer.iter().find(|t| t.name() == name).and_then(float_values)
}

fn zeros(v: &[f32]) -> usize {
    v.iter().filter(|x| **x == 0.0).count()
}

fn op_count(model: &ModelProto, op: &str) -> usize {
    model
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type() == op)
        .count()
}

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// x[batch, 16] → MatMul(w) → Relu → MatMul(w) → y: one weight read by two nodes.
fn shared_weight_model() -> ModelProto {
    GraphBuilder::new("shared")
        .input("x", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(16)])
        .output("y", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(16)])
        .initializer_f32("w", &[16, 16], seeded(256, 1).iter().map(|v| v * 0.3).collect())
        .node("MatMul", &["x", "w"], &["h"], vec![])
        .node("Relu", &["h"], &["r"], vec![])
        .node("MatMul", &["r", "w"], &["y"], vec![])
        .build()
}

/// x[1, 3, 10, 10] → Conv(8 filters 3×3, bias) → Relu → Conv(4 filters 3×3) → y[1, 4, 6, 6]
fn conv_model() -> ModelProto {
    GraphBuilder::new("conv")
        .input(
            "x",
            DataType::Float,
            &[
                DimSpec::Fixed(1),
                DimSpec::Fixed(3),
                DimSpec::Fixed(10),
                DimSpec::Fixed(10),
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
        .initializer_f32("c1", &[8, 3, 3, 3], seeded(216, 2))
        .initializer_f32("b1", &[8], seeded(8, 3))
        .initializer_f32("c2", &[4, 8, 3, 3], seeded(288, 4))
        .node("Conv", &["x", "c1", "b1"], &["h"], vec![])
        .node("Relu", &["h"], &["r"], vec![])
        .node("Conv", &["r", "c2"], &["y"], vec![])
        .build()
}

/// x[batch, 48] → Gemm(W stored [40, 48], transB=1, bias) → y[batch, 40], W of rank 4 exactly.
fn low_rank_gemm_model() -> ModelProto {
    let (a, b) = (seeded(40 * 4, 5), seeded(4 * 48, 6));
    let w: Vec<f32> = (0..40 * 48)
        .map(|x| (0..4).map(|j| a[(x / 48) * 4 + j] * b[j * 48 + x % 48]).sum())
        .collect();
    GraphBuilder::new("gemm")
        .input("x", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(48)])
        .output("y", DataType::Float, &[DimSpec::Symbolic("batch"), DimSpec::Fixed(40)])
        .initializer_f32("w", &[40, 48], w)
        .initializer_f32("b", &[40], seeded(40, 7))
        .node("Gemm", &["x", "w", "b"], &["y"], vec![attr_int("transB", 1)])
        .build()
}

fn zstd_decodes_to_the_model(dir: &Path, report: &Report) {
    let zst = std::fs::read(dir.join("out/model.onnx.zst")).expect("model.onnx.zst is written");
    assert_eq!(report.result.compressed_size_bytes, zst.len() as u64);
    let plain = zstd::decode_all(zst.as_slice()).unwrap();
    assert_eq!(plain, std::fs::read(dir.join("out/model.onnx")).unwrap());
}

// ------------------------------------------------------------------ prune_unstructured

#[test]
fn per_layer_pruning_zeroes_the_smallest_half_of_every_weight_and_ships_a_zstd_copy() {
    let dir = tempfile::tempdir().unwrap();
    let original = builder::tiny_mlp(3);
    let report = run(
        &original,
        json!([{"pass": "prune_unstructured", "sparsity": 0.5}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let pruned = result(dir.path());
    for name in ["w1", "w2"] {
        let (before, after) = (weight(&original, name).unwrap(), weight(&pruned, name).unwrap());
        assert_eq!(zeros(&after), before.len() / 2, "{name}");
        // Every value kept is at least as large as every value zeroed, and kept values are unchanged.
        let largest_zeroed = before
            .iter()
            .zip(&after)
            .filter(|(_, a)| **a == 0.0)
            .map(|(b, _)| b.abs())
            .fold(0f32, f32::max);
        for (b, a) in before.iter().zip(&after) {
            if *a != 0.0 {
                assert_eq!(a, b);
                assert!(b.abs() >= largest_zeroed);
            }
        }
    }
    // Biases are not weights of MatMul/Gemm/Conv: untouched.
    assert_eq!(weight(&pruned, "b1"), weight(&original, "b1"));
    let layers = &report.passes[0].layers;
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0].weight, "w1");
    assert_eq!(layers[0].nodes, vec!["MatMul_0"]);
    assert_eq!(layers[0].sparsity, Some(0.5));
    assert_eq!(layers[0].sparsity_before, Some(0.0));
    assert!(report.result.sparsity > report.original.sparsity + 0.4);
    // The dense file is no smaller; the zstd copy is, and the report gives both sizes.
    assert!(report.result.size_bytes >= report.original.size_bytes - 64);
    assert!(report.result.compressed_size_bytes < report.original.compressed_size_bytes);
    zstd_decodes_to_the_model(dir.path(), &report);
    assert!(
        report.passes[0].notes[0].contains("model.onnx.zst"),
        "{:?}",
        report.passes
    );
}

#[test]
fn global_pruning_meets_the_target_over_all_weights_with_one_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let original = builder::tiny_mlp(4);
    let report = run(
        &original,
        json!([{"pass": "prune_unstructured", "sparsity": 0.7, "scope": "global"}]),
        dir.path(),
    )
    .unwrap();
    let pruned = result(dir.path());
    let (w1, w2) = (weight(&pruned, "w1").unwrap(), weight(&pruned, "w2").unwrap());
    let total = w1.len() + w2.len();
    assert_eq!(zeros(&w1) + zeros(&w2), (0.7 * total as f64).round() as usize);
    // One threshold: no kept value anywhere is smaller than a zeroed value anywhere.
    let orig: Vec<f32> = [weight(&original, "w1").unwrap(), weight(&original, "w2").unwrap()].concat();
    let now: Vec<f32> = [w1, w2].concat();
    let threshold = orig
        .iter()
        .zip(&now)
        .filter(|(_, a)| **a == 0.0)
        .map(|(b, _)| b.abs())
        .fold(0f32, f32::max);
    assert!(now.iter().filter(|a| **a != 0.0).all(|a| a.abs() >= threshold));
    // w1 (fan-in 16) has larger values than w2 (fan-in 32): the layers end up unequally sparse.
    let s: Vec<f64> = report.passes[0].layers.iter().map(|l| l.sparsity.unwrap()).collect();
    assert!((s[0] - s[1]).abs() > 0.05, "{s:?}");
}

#[test]
fn two_of_four_pruning_keeps_two_values_in_every_group_along_the_reduction_axis() {
    // Gemm with transB stores [N, K]: groups run along each row. Conv: along Cin·kh·kw.
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &low_rank_gemm_model(),
        json!([{"pass": "prune_unstructured", "pattern": "2:4"}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let w = weight(&result(dir.path()), "w").unwrap();
    for group in w.chunks(4) {
        assert_eq!(zeros(group), 2, "{group:?}");
    }
    assert_eq!(report.passes[0].layers[0].sparsity, Some(0.5));

    let dir = tempfile::tempdir().unwrap();
    run(
        &builder::tiny_mlp(2),
        json!([{"pass": "prune_unstructured", "pattern": "1:4"}]),
        dir.path(),
    )
    .unwrap();
    // MatMul stores [K, N]: groups run down each column.
    let w1 = weight(&result(dir.path()), "w1").unwrap();
    let n = builder::MLP_HIDDEN;
    for col in 0..n {
        for g in 0..builder::MLP_IN / 4 {
            let kept = (0..4).filter(|j| w1[(g * 4 + j) * n + col] != 0.0).count();
            assert!(kept <= 1, "column {col} group {g} keeps {kept}");
        }
    }
}

#[test]
fn conv_weights_are_pruned_and_the_model_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &conv_model(),
        json!([{"pass": "prune_unstructured", "sparsity": 0.3, "exclude_nodes": ["Conv_2"]}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let pruned = result(dir.path());
    assert_eq!(
        zeros(&weight(&pruned, "c1").unwrap()),
        (0.3f64 * 216.0).round() as usize
    );
    assert_eq!(weight(&pruned, "c2"), weight(&conv_model(), "c2"), "Conv_2 is excluded");
    assert!(
        report.passes[0]
            .notes
            .iter()
            .any(|n| n == "1 skipped: excluded by exclude_nodes"),
        "{:?}",
        report.passes[0].notes
    );
    assert!(
        report.result.fidelity.cosine_similarity > 0.8,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn a_shared_weight_is_pruned_once_for_both_readers_or_not_at_all_when_one_is_excluded() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &shared_weight_model(),
        json!([{"pass": "prune_unstructured", "sparsity": 0.25}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let pruned = result(dir.path());
    let g = pruned.graph.as_ref().unwrap();
    assert_eq!(g.initializer.len(), 1, "still one weight");
    assert_eq!(zeros(&weight(&pruned, "w").unwrap()), 64);
    assert_eq!(report.passes[0].layers.len(), 1);
    assert_eq!(report.passes[0].layers[0].nodes, vec!["MatMul_0", "MatMul_2"]);

    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &shared_weight_model(),
        json!([{"pass": "prune_unstructured", "sparsity": 0.25, "exclude_nodes": ["MatMul_2"]}]),
        dir.path(),
    )
    .unwrap();
    assert_eq!(weight(&result(dir.path()), "w"), weight(&shared_weight_model(), "w"));
    assert!(
        report.warnings.iter().any(|w| w.contains("model is unchanged")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn a_model_without_weights_to_prune_is_returned_unchanged_with_a_warning() {
    let model = GraphBuilder::new("relu")
        .input("x", DataType::Float, &[DimSpec::Fixed(4)])
        .output("y", DataType::Float, &[DimSpec::Fixed(4)])
        .node("Relu", &["x"], &["y"], vec![])
        .build();
    for recipe in [
        json!([{"pass": "prune_unstructured", "sparsity": 0.5}]),
        json!([{"pass": "low_rank"}]),
        json!([{"pass": "cluster_weights"}]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let report = run(&model, recipe.clone(), dir.path()).unwrap();
        assert!(
            report.warnings.iter().any(|w| w.contains("the model is unchanged")),
            "{recipe}: {:?}",
            report.warnings
        );
        assert_eq!(report.result.fidelity.max_abs_error, 0.0);
    }
}

// ------------------------------------------------------------------ low_rank

#[test]
fn a_low_rank_gemm_with_transposed_weight_and_bias_factorizes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &low_rank_gemm_model(),
        json!([{"pass": "low_rank", "energy": 0.9999}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let m = result(dir.path());
    assert_eq!(op_count(&m, "MatMul"), 1);
    assert_eq!(op_count(&m, "Gemm"), 1);
    let layer = &report.passes[0].layers[0];
    assert_eq!(layer.rank, Some(4));
    assert_eq!(layer.parameters_before, 40 * 48);
    assert_eq!(layer.parameters_after, 4 * (40 + 48));
    assert!(weight(&m, "w").is_none(), "the dense weight is gone");
    assert!(report.result.parameters < report.original.parameters);
    assert!(
        report.result.fidelity.cosine_similarity > 0.99999,
        "{:?}",
        report.result.fidelity
    );
}

#[test]
fn rank_ratio_and_min_saving_decide_which_layers_are_factorized() {
    // tiny_mlp: w1 [16, 32] and w2 [32, 10]. rank_ratio 0.25 gives ranks 4 and 3:
    // 4·48 = 192 of 512 (62% saved) and 3·42 = 126 of 320 (61% saved).
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &builder::tiny_mlp(8),
        json!([{"pass": "low_rank", "rank_ratio": 0.25, "exclude_nodes": ["MatMul_3"]}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let layers = &report.passes[0].layers;
    assert_eq!(layers.len(), 1, "MatMul_3 is excluded");
    assert_eq!(layers[0].weight, "w1");
    assert_eq!(layers[0].rank, Some(4));
    assert!(layers[0].retained_energy.unwrap() < 1.0);
    assert_eq!(op_count(&result(dir.path()), "MatMul"), 3);
    // Lossy: the outputs move, and the report says by how much.
    assert!(report.result.fidelity.max_abs_error > 0.0);

    // Random weights keep their energy spread over every singular value: 95% needs nearly full
    // rank, which saves nothing, so every layer stays dense and the notes say why.
    let dir = tempfile::tempdir().unwrap();
    let report = run(&builder::tiny_mlp(8), json!([{"pass": "low_rank"}]), dir.path()).unwrap();
    assert!(report.passes[0].layers.is_empty());
    assert!(
        report.passes[0]
            .notes
            .iter()
            .any(|n| n.contains("2 weight(s) kept dense") && n.contains("min_saving 0.2")),
        "{:?}",
        report.passes[0].notes
    );
    assert!(report.warnings.iter().any(|w| w.contains("model is unchanged")));
}

#[test]
fn a_shared_weight_is_factorized_once_and_both_readers_use_the_factors() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &shared_weight_model(),
        json!([{"pass": "low_rank", "rank_ratio": 0.25}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let m = result(dir.path());
    let g = m.graph.as_ref().unwrap();
    assert_eq!(
        g.initializer.len(),
        2,
        "one U and one V: {:?}",
        g.initializer.iter().map(|t| t.name()).collect::<Vec<_>>()
    );
    assert_eq!(op_count(&m, "MatMul"), 4);
    assert_eq!(report.passes[0].layers[0].nodes, vec!["MatMul_0", "MatMul_2"]);
}

// ------------------------------------------------------------------ cluster_weights

#[test]
fn clustering_stores_a_codebook_and_uint8_indices_expanded_by_gather() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &builder::tiny_mlp(9),
        json!([{"pass": "cluster_weights", "bits": 4, "min_elements": 0}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let m = result(dir.path());
    assert_eq!(op_count(&m, "Gather"), 2);
    assert_eq!(op_count(&m, "Cast"), 2);
    let g = m.graph.as_ref().unwrap();
    let indices: Vec<_> = g
        .initializer
        .iter()
        .filter(|t| t.data_type() == DataType::Uint8 as i32)
        .collect();
    assert_eq!(indices.len(), 2);
    assert!(indices.iter().all(|t| t.raw_data().iter().all(|&i| i < 16)));
    assert!(weight(&m, "w1").is_none(), "the float weight is gone");
    assert_eq!(op_count(&m, "Mul"), 2, "one scale per output channel");
    for layer in &report.passes[0].layers {
        assert!(layer.clusters.unwrap() <= 16);
        assert_eq!(layer.bytes_before, 4 * layer.parameters_before);
        // uint8 indices, the codebook, and one float scale per output column of the [K, N] weight.
        let columns = layer.shape[1] as u64;
        assert_eq!(
            layer.bytes_after,
            layer.parameters_before + 4 * layer.clusters.unwrap() + 4 * columns
        );
    }
    assert!(report.result.size_bytes < report.original.size_bytes);
    assert!(
        report.result.fidelity.cosine_similarity > 0.99,
        "{:?}",
        report.result.fidelity
    );
    zstd_decodes_to_the_model(dir.path(), &report);
    let note = &report.passes[0].notes[0];
    assert!(
        note.contains("one uint8") && note.contains("model.onnx.zst is smaller still"),
        "{note}"
    );
}

/// A clustered weight as the graph expands it: codebook[index], times its channel's scale.
fn expanded(model: &ModelProto, weight: &str) -> Vec<f32> {
    let g = model.graph.as_ref().unwrap();
    let find = |suffix: &str| g.initializer.iter().find(|t| t.name() == format!("{weight}_{suffix}"));
    let codebook = float_values(find("codebook").unwrap()).unwrap();
    let indices = find("indices").unwrap();
    let values: Vec<f32> = indices.raw_data().iter().map(|&i| codebook[i as usize]).collect();
    match find("channel_scales").and_then(float_values) {
        Some(scales) => {
            let inner = values.len() / scales.len();
            values.iter().enumerate().map(|(i, v)| v * scales[i / inner]).collect()
        }
        None => values,
    }
}

#[test]
fn per_channel_scales_keep_channels_of_very_different_magnitude_apart() {
    // Conv c1's 8 filters scaled by 10^-4 ... 10^3: one codebook for the raw values flattens the
    // small filters to zero; scaled per channel, every filter keeps its shape.
    let mut model = conv_model();
    let g = model.graph.as_mut().unwrap();
    let mut c1 = float_values(&g.initializer[0]).unwrap();
    for (i, v) in c1.iter_mut().enumerate() {
        *v *= 10f32.powi((i / 27) as i32 - 4);
    }
    g.initializer[0].raw_data = Some(c1.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into());
    // Relative error of the worst filter.
    let worst = |per_channel: bool| {
        let dir = tempfile::tempdir().unwrap();
        run(
            &model,
            json!([{"pass": "cluster_weights", "bits": 4, "min_elements": 0, "per_channel": per_channel}]),
            dir.path(),
        )
        .unwrap();
        common::onnx_checker(&dir.path().join("out/model.onnx"));
        let m = result(dir.path());
        assert_eq!(op_count(&m, "Mul"), if per_channel { 2 } else { 0 });
        let got = expanded(&m, "c1");
        (0..8)
            .map(|f| {
                let r = f * 27..(f + 1) * 27;
                let err: f32 = r.clone().map(|i| (got[i] - c1[i]).powi(2)).sum::<f32>().sqrt();
                let norm: f32 = r.map(|i| c1[i].powi(2)).sum::<f32>().sqrt();
                err / norm
            })
            .fold(0f32, f32::max)
    };
    let (tensor, channel) = (worst(false), worst(true));
    assert!(channel < 0.2, "per channel: worst filter off by {channel}");
    assert!(tensor > 0.9, "per tensor: worst filter off by {tensor}");
}

#[test]
fn clustering_respects_min_elements_exclusions_and_shared_weights() {
    // min_elements 400: w1 (512 values) is clustered, w2 (320) is not.
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &builder::tiny_mlp(9),
        json!([{"pass": "cluster_weights", "bits": 2, "min_elements": 400}]),
        dir.path(),
    )
    .unwrap();
    let layers = &report.passes[0].layers;
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].weight, "w1");
    assert!(layers[0].clusters.unwrap() <= 4);
    assert_eq!(weight(&result(dir.path()), "w2"), weight(&builder::tiny_mlp(9), "w2"));
    assert!(
        report.passes[0]
            .notes
            .iter()
            .any(|n| n.contains("fewer than min_elements (400)")),
        "{:?}",
        report.passes[0].notes
    );

    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &shared_weight_model(),
        json!([{"pass": "cluster_weights", "bits": 3}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    let m = result(dir.path());
    assert_eq!(op_count(&m, "Gather"), 1, "one codebook for the shared weight");
    let g = m.graph.as_ref().unwrap();
    let matmul_weights: Vec<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "MatMul")
        .map(|n| n.input[1].as_str())
        .collect();
    assert_eq!(matmul_weights[0], matmul_weights[1]);
    assert_eq!(report.passes[0].layers[0].nodes, vec!["MatMul_0", "MatMul_2"]);

    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &shared_weight_model(),
        json!([{"pass": "cluster_weights", "exclude_nodes": ["MatMul_0"]}]),
        dir.path(),
    )
    .unwrap();
    assert!(report.passes[0].layers.is_empty());
    assert_eq!(weight(&result(dir.path()), "w"), weight(&shared_weight_model(), "w"));
}

#[test]
fn clustering_a_pruned_model_keeps_its_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(
        &conv_model(),
        json!([{"pass": "prune_unstructured", "sparsity": 0.5}, {"pass": "cluster_weights", "bits": 3, "min_elements": 0}]),
        dir.path(),
    )
    .unwrap();
    common::onnx_checker(&dir.path().join("out/model.onnx"));
    assert!(report.result.sparsity >= 0.0);
    let m = result(dir.path());
    let g = m.graph.as_ref().unwrap();
    for layer in &report.passes[1].layers {
        let codebook = g
            .initializer
            .iter()
            .find(|t| t.name() == format!("{}_codebook", layer.weight))
            .and_then(float_values)
            .unwrap();
        assert!(codebook.contains(&0.0), "{codebook:?}");
        let zero = codebook.iter().position(|c| *c == 0.0).unwrap() as u8;
        let indices = g
            .initializer
            .iter()
            .find(|t| t.name() == format!("{}_indices", layer.weight))
            .unwrap();
        let zeroed = indices.raw_data().iter().filter(|&&i| i == zero).count();
        assert!(
            zeroed as u64 >= layer.parameters_before / 2,
            "{zeroed} of {}",
            layer.parameters_before
        );
    }
}

// ------------------------------------------------------------------ all three

#[test]
fn every_pass_is_deterministic() {
    for recipe in [
        json!([{"pass": "prune_unstructured", "sparsity": 0.6, "scope": "global"}]),
        json!([{"pass": "low_rank", "rank_ratio": 0.5}]),
        json!([{"pass": "cluster_weights", "bits": 5, "init": "quantile", "min_elements": 0}]),
    ] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        run(&builder::tiny_mlp(11), recipe.clone(), a.path()).unwrap();
        run(&builder::tiny_mlp(11), recipe.clone(), b.path()).unwrap();
        let (x, y) = (
            std::fs::read(a.path().join("out/model.onnx")).unwrap(),
            std::fs::read(b.path().join("out/model.onnx")).unwrap(),
        );
        assert!(x == y, "{recipe}: two runs differ");
        assert_ne!(
            x,
            modelpress::onnx::encode(&builder::tiny_mlp(11)),
            "{recipe} changed nothing"
        );
    }
}

#[test]
fn bad_parameters_are_refused_when_the_recipe_is_parsed() {
    for (recipe, expected) in [
        (json!([{"pass": "prune_unstructured"}]), "give a target \"sparsity\""),
        (json!([{"pass": "prune_unstructured", "sparsity": 1.2}]), "sparsity 1.2"),
        (json!([{"pass": "prune_unstructured", "pattern": "3:2"}]), "N:M"),
        (
            json!([{"pass": "low_rank", "energy": 0.9, "rank_ratio": 0.5}]),
            "not both",
        ),
        (json!([{"pass": "low_rank", "min_saving": 1}]), "min_saving"),
        (json!([{"pass": "cluster_weights", "bits": 1}]), "bits 1"),
        (
            json!([{"pass": "cluster_weights", "init": "random"}]),
            "unknown variant",
        ),
    ] {
        let err = Recipe::parse(&recipe).unwrap_err().0;
        assert!(err.contains(expected), "{recipe}: {err}");
    }
}

// ------------------------------------------------------------------ through the API, on digits

fn digits(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/digits/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Runs `recipe` as a classification job on the digits fixture; returns (job, report).
async fn digits_job(app: &TestApp, recipe: Value) -> (Value, Value) {
    let model_id = app.upload_ok(digits("mlp.onnx")).await;
    let dataset: Value = app
        .client
        .post(app.url("/v1/datasets?name=digits"))
        .header("content-type", "application/octet-stream")
        .body(digits("test.npz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = json!({"model_id": model_id, "recipe": recipe, "dataset_id": dataset["id"], "task": "classification"});
    let job: Value = app.submit(body).await.json().await.unwrap();
    let job = app.wait_for_job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let report = app
        .get(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    (job, report)
}

fn artifact_names(job: &Value) -> Vec<String> {
    let mut names: Vec<String> = job["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[sqlx::test]
async fn pruning_the_digits_classifier_ships_model_onnx_zst_and_a_per_layer_table(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (job, report) = digits_job(&app, json!([{"pass": "prune_unstructured", "sparsity": 0.5}])).await;
    assert_eq!(
        artifact_names(&job),
        vec!["model.onnx", "model.onnx.zst", "report.html", "report.json"]
    );
    let id = job["id"].as_str().unwrap();
    let zst = app.get(&format!("/v1/jobs/{id}/artifacts/model.onnx.zst")).await;
    assert_eq!(zst.status(), 200);
    assert_eq!(zst.headers()["content-type"], "application/zstd");
    let zst = zst.bytes().await.unwrap();
    let model = app
        .get(&format!("/v1/jobs/{id}/artifacts/model.onnx"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(zstd::decode_all(&zst[..]).unwrap(), model.to_vec());
    assert_eq!(report["result"]["compressed_size_bytes"], zst.len() as u64);
    assert!(
        report["result"]["compressed_size_bytes"].as_u64().unwrap()
            < report["original"]["compressed_size_bytes"].as_u64().unwrap()
    );
    let layers = report["passes"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["sparsity"], 0.5);
    // Half of every weight of a 97.8% classifier, the 320 of its last layer included, is not free:
    // the report shows what it costs (measured: 0.978 -> 0.898).
    let (before, after) = (
        report["comparison"]["original"].as_f64().unwrap(),
        report["comparison"]["result"].as_f64().unwrap(),
    );
    assert!(before > 0.97 && after > 0.85 && after < before, "{before} -> {after}");
    let html = app
        .get(&format!("/v1/jobs/{id}/report.html"))
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("per weight") && html.contains("50.0%"));
    app.stop().await;
}

#[sqlx::test]
async fn low_rank_and_clustering_jobs_on_the_digits_classifier_report_size_and_accuracy(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    // 90% of the energy: fc1 [64, 32] factorizes (about 40% fewer weights); fc2 [32, 10] would need
    // nearly full rank and stays dense.
    let (job, report) = digits_job(&app, json!([{"pass": "low_rank", "energy": 0.9}])).await;
    assert_eq!(artifact_names(&job), vec!["model.onnx", "report.html", "report.json"]);
    let layers = report["passes"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{layers:?}");
    assert_eq!(layers[0]["weight"].as_str(), Some("fc1.weight"));
    assert!(layers[0]["rank"].as_u64().unwrap() < 16, "{layers:?}");
    assert!(
        report["passes"][0]["notes"][1].as_str().unwrap().contains("fc2.weight"),
        "{}",
        report["passes"][0]["notes"]
    );
    assert!(report["result"]["parameters"].as_u64() < report["original"]["parameters"].as_u64());
    assert!(report["result"]["size_bytes"].as_u64() < report["original"]["size_bytes"].as_u64());
    let delta = report["comparison"]["delta"].as_f64().unwrap();
    assert!(
        delta.abs() <= 0.02,
        "low rank at energy 0.9 moved the accuracy by {delta}"
    );

    let (job, report) = digits_job(&app, json!([{"pass": "cluster_weights", "bits": 4}])).await;
    assert!(artifact_names(&job).contains(&"model.onnx.zst".to_string()));
    assert!(report["result"]["size_bytes"].as_u64().unwrap() * 2 < report["original"]["size_bytes"].as_u64().unwrap());
    let delta = report["comparison"]["delta"].as_f64().unwrap();
    assert!(delta.abs() <= 0.02, "4-bit clustering moved the accuracy by {delta}");
    app.stop().await;
}
