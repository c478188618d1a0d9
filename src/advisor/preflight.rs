//! Pre-flight: before anything is measured, read what the model offers (which weight-bearing ops,
//! how many) and what this machine can do (CPU vector extensions, the provider), and turn that into
//! an ordered list of candidate recipes plus the candidates that cannot win, each with its reason.
//! Seconds of reasoning here save minutes of measuring candidates that were never going to be
//! chosen.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::goal::{Goal, Objective};
use crate::compress::Recipe;
use crate::compress::weights::is_weight_bearing;
use crate::eval::Provider;
use crate::onnx::ModelProto;
use crate::onnx::graph::GraphIndex;

/// Vector extensions that decide which quantized kernels are fast on this CPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512f: bool,
    /// AVX512-VNNI or AVX-VNNI: int8 dot products in one instruction (ORT's int8 GEMMs use them).
    pub vnni: bool,
    /// Hardware float16 arithmetic (AVX512-FP16); F16C alone only converts.
    pub fp16_arithmetic: bool,
}

impl CpuFeatures {
    /// Read from /proc/cpuinfo's flags; all false elsewhere (the advisor then assumes the worst).
    pub fn detect() -> CpuFeatures {
        let flags = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("flags"))
                    .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            })
            .unwrap_or_default();
        let has = |f: &str| flags.iter().any(|x| x == f);
        CpuFeatures {
            avx2: has("avx2"),
            avx512f: has("avx512f"),
            vnni: has("avx512_vnni") || has("avx_vnni"),
            fp16_arithmetic: has("avx512_fp16"),
        }
    }
}

/// One recipe to try, with the words the report uses for it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub label: String,
    pub recipe: Recipe,
    /// Labels of candidates this one is at least as lossy as: the same technique, coarser or with
    /// more on top. Once one of them has missed the accuracy budget, this one is skipped untried
    /// (it would miss it too), leaving the time budget to candidates that can still qualify.
    pub lossier_than: Vec<String>,
}

impl Plan {
    fn lossier(mut self, than: &[&Plan]) -> Plan {
        self.lossier_than = than.iter().map(|p| p.label.clone()).collect();
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuledOut {
    pub candidate: String,
    pub reason: String,
}

/// What the report shows of the pre-flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preflight {
    pub execution_provider: String,
    pub cpu: CpuFeatures,
    /// Weight-bearing nodes the passes can work on, by operator.
    pub compressible: BTreeMap<String, u64>,
    pub parameters: u64,
    pub ruled_out: Vec<RuledOut>,
    /// Candidate labels in the order they are tried.
    pub planned: Vec<String>,
    pub notes: Vec<String>,
}

fn recipe(steps: Value) -> Recipe {
    Recipe::parse(&steps).expect("the advisor's own recipes are valid")
}

/// Weight-bearing nodes by operator: MatMul/Gemm with a constant 2-D float weight, Conv with a
/// constant weight (initializer or `Constant` node), in the main graph.
pub fn census(model: &ModelProto) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let Some(g) = model.graph.as_ref() else {
        return counts;
    };
    let index = GraphIndex::new(g);
    for n in &g.node {
        if is_weight_bearing(n, &index, g) {
            *counts.entry(n.op_type().to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// The candidates worth measuring for `goal` on this model and machine, best first.
/// `compressible` is the model's [`census`].
pub fn plan(
    compressible: &BTreeMap<String, u64>,
    parameters: u64,
    goal: &Goal,
    provider: Provider,
    cpu: &CpuFeatures,
) -> (Preflight, Vec<Plan>) {
    let count = |op: &str| compressible.get(op).copied().unwrap_or(0);
    let (matmul, gemm, conv) = (count("MatMul"), count("Gemm"), count("Conv"));
    let latency = goal.cares_about_latency();
    let on_cpu = provider == Provider::Cpu;
    let mut ruled_out = Vec::new();
    let mut notes = Vec::new();
    let mut rule_out = |candidate: &str, reason: String| {
        ruled_out.push(RuledOut {
            candidate: candidate.into(),
            reason,
        })
    };

    let lossless = Plan {
        label: "graph optimization (lossless)".into(),
        recipe: recipe(json!([{"pass": "optimize", "level": "extended"}])),
        lossier_than: Vec::new(),
    };
    let dynamic = Plan {
        label: "int8 dynamic (per-channel)".into(),
        recipe: recipe(json!([{"pass": "quantize_int8_dynamic", "per_channel": true}])),
        lossier_than: Vec::new(),
    };
    let static_minmax = Plan {
        label: "int8 static (per-channel, minmax)".into(),
        recipe: recipe(json!([{"pass": "quantize_int8_static", "per_channel": true, "calibration": "minmax"}])),
        lossier_than: Vec::new(),
    };
    // One scale per tensor: the fewest bytes of metadata (CNNs with many small channels).
    let static_per_tensor = Plan {
        label: "int8 static (per-tensor, minmax)".into(),
        recipe: recipe(json!([{"pass": "quantize_int8_static", "per_channel": false, "calibration": "minmax"}])),
        lossier_than: Vec::new(),
    };
    let static_percentile = Plan {
        label: "int8 static (per-channel, percentile 99.99)".into(),
        recipe: recipe(
            json!([{"pass": "quantize_int8_static", "per_channel": true, "calibration": "percentile", "percentile": 99.99}]),
        ),
        lossier_than: Vec::new(),
    };
    // accuracy_level 4 computes MatMulNBits in int8 on CPU (faster); 0 stores no attribute
    // (smallest), with float32 compute.
    let level = if goal.objective == Objective::Fastest { 4 } else { 0 };
    let int4 = |block: u32| Plan {
        label: format!("int4 weight-only (block {block})"),
        recipe: recipe(json!([{"pass": "quantize_int4_weight_only", "block_size": block, "accuracy_level": level}])),
        lossier_than: Vec::new(),
    };
    let int4_then_int8 = Plan {
        label: "int4 weight-only (block 32) + int8 dynamic for Gemm".into(),
        recipe: recipe(json!([
            {"pass": "quantize_int4_weight_only", "block_size": 32, "accuracy_level": level},
            {"pass": "quantize_int8_dynamic", "per_channel": true}
        ])),
        lossier_than: Vec::new(),
    };
    // The weights quantization leaves in float32 (embeddings, biases, Conv kernels) halved.
    let int4_then_fp16 = Plan {
        label: "int4 weight-only (block 32) + float16 for the rest".into(),
        recipe: recipe(json!([
            {"pass": "quantize_int4_weight_only", "block_size": 32, "accuracy_level": level},
            {"pass": "fp16"}
        ])),
        lossier_than: Vec::new(),
    };
    let dynamic_then_fp16 = Plan {
        label: "int8 dynamic (per-channel) + float16 for the rest".into(),
        recipe: recipe(json!([
            {"pass": "quantize_int8_dynamic", "per_channel": true},
            {"pass": "fp16"}
        ])),
        lossier_than: Vec::new(),
    };
    // Structured pruning removes work, then reconstruct re-fits what follows to the original.
    let pruned = |ratio: f64, then: Option<Value>, what: &str| {
        let mut steps = vec![
            json!({"pass": "prune_structured", "ratio": ratio}),
            json!({"pass": "reconstruct"}),
        ];
        steps.extend(then);
        Plan {
            label: format!("structured pruning {:.0}% + reconstruct{what}", ratio * 100.0),
            recipe: recipe(Value::Array(steps)),
            lossier_than: Vec::new(),
        }
    };
    // Low-rank factors of the MatMul/Gemm weights, re-fitted by reconstruct, then `then`.
    let low_rank = |energy: f64, then: Option<Value>, what: &str| {
        let mut steps = vec![
            json!({"pass": "low_rank", "energy": energy}),
            json!({"pass": "reconstruct"}),
        ];
        steps.extend(then);
        Plan {
            label: format!("low-rank ({:.0}% energy) + reconstruct{what}", energy * 100.0),
            recipe: recipe(Value::Array(steps)),
            lossier_than: Vec::new(),
        }
    };
    let dynamic_step = json!({"pass": "quantize_int8_dynamic", "per_channel": true});
    let int4_step = json!({"pass": "quantize_int4_weight_only", "block_size": 32, "accuracy_level": level});
    let static_step = json!({"pass": "quantize_int8_static", "per_channel": true, "calibration": "minmax"});
    let fp16 = Plan {
        label: "float16".into(),
        recipe: recipe(json!([{"pass": "fp16"}])),
        lossier_than: Vec::new(),
    };

    let mut dynamic_ok = matmul + gemm > 0;
    if !dynamic_ok {
        rule_out(
            "int8 dynamic",
            format!(
                "dynamic quantization covers MatMul/Gemm weights; this model has none ({conv} Conv): ONNX Runtime has \
                 no fast dynamic ConvInteger kernel on {}",
                provider.as_str()
            ),
        );
    }
    if dynamic_ok && !on_cpu && latency {
        dynamic_ok = false;
        rule_out(
            "int8 dynamic",
            "MatMulInteger runs on the CPU under the CUDA provider (memory copies each way): it cannot win on latency"
                .into(),
        );
    }
    let int4_ok = matmul > 0;
    if !int4_ok {
        rule_out(
            "int4 weight-only",
            format!(
                "MatMulNBits replaces MatMul weights only; this model has no MatMul with a stored weight ({gemm} Gemm, \
                 {conv} Conv)"
            ),
        );
    }
    let mut static_ok = matmul + gemm + conv > 0;
    if !static_ok {
        rule_out(
            "int8 static",
            "no MatMul/Gemm/Conv with a stored weight to quantize".into(),
        );
    } else if !on_cpu && latency {
        static_ok = false;
        rule_out(
            "int8 static",
            "the CUDA provider has no int8 QLinear kernels (they need TensorRT): a QDQ model runs in float with \
             extra quantize/dequantize kernels, so it cannot win on latency"
                .into(),
        );
    }
    let mut fp16_ok = true;
    if on_cpu && latency {
        fp16_ok = false;
        rule_out(
            "float16",
            format!(
                "ONNX Runtime's CPU provider has float16 kernels for few ops and runs the rest through casts to \
                 float32 (whether or not the CPU has AVX512-FP16: {}): float16 does not win on CPU latency, which the \
                 goal names",
                if cpu.fp16_arithmetic {
                    "this one has"
                } else {
                    "this one has not"
                }
            ),
        );
    }
    if on_cpu && static_ok && !cpu.vnni {
        notes.push(
            "this CPU has no VNNI: int8 kernels use AVX2 multiply-adds, so int8 speed-ups are smaller than on \
             VNNI/AMX machines"
                .into(),
        );
    }
    if parameters < 10_000 {
        notes.push(format!(
            "the model has only {parameters} parameters: fixed costs (graph overhead, quantize/dequantize ops) can \
             outweigh any saving"
        ));
    }

    // A chain needs a producer and a consumer with stored weights.
    let prunable = matmul + gemm >= 2 || conv >= 2;
    if !prunable {
        rule_out(
            "structured pruning",
            "needs two weight-bearing layers in a row (MatMul/Gemm or Conv); this model has fewer".into(),
        );
    }
    let mut plans: Vec<Plan> = Vec::new();
    let mut add = |ok: bool, p: &Plan| {
        if ok {
            plans.push(p.clone())
        }
    };
    match goal.objective {
        Objective::Smallest => {
            let int4_32 = int4(32);
            let pruned_int4 = pruned(0.3, Some(int4_step.clone()), " + int4 weight-only").lossier(&[&int4_32]);
            add(int4_ok && fp16_ok, &int4_then_fp16);
            add(int4_ok && gemm > 0, &int4_then_int8);
            add(int4_ok, &int4_32);
            add(prunable && int4_ok, &pruned_int4);
            add(
                prunable && int4_ok,
                &pruned(0.5, Some(int4_step.clone()), " + int4 weight-only").lossier(&[&int4_32, &pruned_int4]),
            );
            add(
                int4_ok,
                &low_rank(0.9, Some(int4_step.clone()), " + int4 weight-only").lossier(&[&int4_32]),
            );
            add(int4_ok, &int4(128).lossier(&[&int4_32]));
            add(static_ok, &static_minmax);
            add(static_ok, &static_per_tensor.lossier(&[&static_minmax]));
            add(
                prunable && static_ok,
                &pruned(0.3, Some(static_step.clone()), " + int8 static").lossier(&[&static_minmax]),
            );
            add(dynamic_ok, &dynamic);
            add(dynamic_ok && fp16_ok, &dynamic_then_fp16.lossier(&[&dynamic]));
            add(static_ok, &static_percentile);
            add(fp16_ok, &fp16);
            add(true, &lossless);
        }
        Objective::Fastest => {
            let pruned_only = pruned(0.3, None, "");
            let low_rank_only = low_rank(0.9, None, "");
            add(true, &lossless);
            add(static_ok, &static_minmax);
            add(dynamic_ok, &dynamic);
            add(prunable, &pruned_only);
            add(
                prunable && static_ok,
                &pruned(0.3, Some(static_step.clone()), " + int8 static").lossier(&[&pruned_only, &static_minmax]),
            );
            add(matmul + gemm > 0, &low_rank_only);
            add(
                dynamic_ok,
                &low_rank(0.9, Some(dynamic_step.clone()), " + int8 dynamic").lossier(&[&low_rank_only, &dynamic]),
            );
            add(int4_ok, &int4(32));
            add(static_ok, &static_percentile);
            add(fp16_ok, &fp16);
        }
        Objective::MostAccurate => {
            add(true, &lossless);
            add(fp16_ok, &fp16);
            add(dynamic_ok, &dynamic);
            add(static_ok, &static_percentile);
            add(static_ok, &static_minmax);
            add(int4_ok, &int4(32));
        }
    }
    // Smallest first puts the conservative candidates last, where a time budget can cut the search
    // before them: when every aggressive candidate misses the accuracy budget, the job would then
    // end with no result although a safe one existed (PP-OCRv4 rec, 45 s: ten candidates tried,
    // none within 0.001 cosine; float16 is, at half the size). So the most conservative
    // candidate that still compresses runs second, as the fallback the decision can always weigh.
    if goal.objective == Objective::Smallest {
        let fallback = [
            fp16.label.as_str(),
            dynamic.label.as_str(),
            static_percentile.label.as_str(),
        ]
        .iter()
        .find_map(|label| plans.iter().position(|p| p.label == *label));
        if let Some(at) = fallback.filter(|&at| at > 1) {
            let p = plans.remove(at);
            plans.insert(1, p);
        }
    }
    // "Most accurate under a size cap" needs the small candidates too, after the accurate ones.
    if goal.objective == Objective::MostAccurate && goal.constraints.max_size_bytes.is_some() {
        let small = plan(
            compressible,
            parameters,
            &Goal {
                objective: Objective::Smallest,
                ..goal.clone()
            },
            provider,
            cpu,
        )
        .1;
        for p in small {
            if !plans.iter().any(|q| q.label == p.label) {
                plans.push(p);
            }
        }
    }
    let preflight = Preflight {
        execution_provider: provider.as_str().into(),
        cpu: cpu.clone(),
        compressible: compressible.clone(),
        parameters,
        ruled_out,
        planned: plans.iter().map(|p| p.label.clone()).collect(),
        notes,
    };
    (preflight, plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(ops: &[(&str, u64)]) -> BTreeMap<String, u64> {
        ops.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn goal(objective: &str) -> Goal {
        Goal::parse(&json!({"objective": objective}), crate::eval::dataset::Task::Generic).unwrap()
    }

    #[test]
    fn a_cnn_rules_out_int4_and_dynamic_int8_with_reasons() {
        let (pre, plans) = plan(
            &census(&[("Conv", 12)]),
            100_000,
            &goal("smallest"),
            Provider::Cpu,
            &CpuFeatures::default(),
        );
        let ruled: Vec<&str> = pre.ruled_out.iter().map(|r| r.candidate.as_str()).collect();
        assert!(
            ruled.contains(&"int4 weight-only") && ruled.contains(&"int8 dynamic"),
            "{ruled:?}"
        );
        assert!(pre.ruled_out.iter().all(|r| !r.reason.is_empty()));
        assert!(
            plans
                .iter()
                .all(|p| !p.label.contains("int4") && !p.label.contains("dynamic"))
        );
        assert!(plans.iter().any(|p| p.label.contains("int8 static")));
    }

    #[test]
    fn on_cuda_latency_rules_out_integer_kernels_but_keeps_fp16() {
        let s = census(&[("MatMul", 4), ("Conv", 2)]);
        let (pre, plans) = plan(&s, 100_000, &goal("fastest"), Provider::Cuda, &CpuFeatures::default());
        let ruled: Vec<&str> = pre.ruled_out.iter().map(|r| r.candidate.as_str()).collect();
        assert!(
            ruled.contains(&"int8 static") && ruled.contains(&"int8 dynamic"),
            "{ruled:?}"
        );
        assert!(plans.iter().any(|p| p.label == "float16"));
        assert_eq!(pre.execution_provider, "cuda");
    }

    #[test]
    fn fp16_is_ruled_out_for_cpu_latency_but_kept_for_size() {
        let s = census(&[("MatMul", 4)]);
        let cpu = CpuFeatures::default();
        let (pre, plans) = plan(&s, 100_000, &goal("fastest"), Provider::Cpu, &cpu);
        assert!(plans.iter().all(|p| p.label != "float16"));
        assert!(pre.ruled_out.iter().any(|r| r.candidate == "float16"));
        let (_, plans) = plan(&s, 100_000, &goal("smallest"), Provider::Cpu, &cpu);
        assert!(plans.iter().any(|p| p.label == "float16"));
        // The smallest-first order puts the 4-bit candidates before the 8-bit ones.
        let first_int4 = plans.iter().position(|p| p.label.contains("int4")).unwrap();
        let first_int8 = plans.iter().position(|p| p.label.contains("int8")).unwrap();
        assert!(first_int4 < first_int8);
    }

    #[test]
    fn smallest_first_tries_a_conservative_fallback_second() {
        let cpu = CpuFeatures::default();
        let labels = |ops: &[(&str, u64)], provider| {
            let (_, plans) = plan(&census(ops), 100_000, &goal("smallest"), provider, &cpu);
            plans.into_iter().map(|p| p.label).collect::<Vec<_>>()
        };
        for ops in [
            &[("MatMul", 4)][..],
            &[("Conv", 12)],
            &[("MatMul", 4), ("Gemm", 2), ("Conv", 3)],
        ] {
            let plans = labels(ops, Provider::Cpu);
            assert_eq!(plans[1], "float16", "{ops:?}: {plans:?}");
            assert_eq!(plans.iter().filter(|l| *l == "float16").count(), 1, "{plans:?}");
            assert!(plans[0].contains("int4") || plans[0].contains("int8"), "{plans:?}");
        }
        // Without float16 in the plan, the per-channel dynamic int8 candidate is the fallback.
        let (_, plans) = plan(
            &census(&[("MatMul", 4)]),
            100_000,
            &Goal::parse(
                &json!({"objective": "smallest", "constraints": {"max_latency_ms": {"value": 10.0}}}),
                crate::eval::dataset::Task::Generic,
            )
            .unwrap(),
            Provider::Cpu,
            &cpu,
        );
        let plans: Vec<&str> = plans.iter().map(|p| p.label.as_str()).collect();
        assert!(!plans.contains(&"float16"), "{plans:?}");
        assert_eq!(plans[1], "int8 dynamic (per-channel)", "{plans:?}");
    }

    #[test]
    fn coarser_and_stacked_candidates_name_the_ones_they_are_lossier_than() {
        let cpu = CpuFeatures::default();
        let ops = census(&[("MatMul", 4), ("Gemm", 2), ("Conv", 3)]);
        for objective in ["smallest", "fastest"] {
            let (_, plans) = plan(&ops, 100_000, &goal(objective), Provider::Cpu, &cpu);
            let labels: Vec<&str> = plans.iter().map(|p| p.label.as_str()).collect();
            for p in &plans {
                for less_lossy in &p.lossier_than {
                    // Named by label, and planned earlier: its measurement exists when this one's turn comes.
                    let at = labels.iter().position(|l| l == less_lossy);
                    let here = labels.iter().position(|l| *l == p.label).unwrap();
                    assert!(
                        at.is_some_and(|at| at < here),
                        "{objective}: {} after {less_lossy}: {labels:?}",
                        p.label
                    );
                }
            }
            let lossier = |label: &str| {
                plans
                    .iter()
                    .find(|p| p.label == label)
                    .map(|p| p.lossier_than.clone())
                    .unwrap_or_else(|| panic!("{objective}: {label} not planned: {labels:?}"))
            };
            if objective == "smallest" {
                assert_eq!(lossier("int4 weight-only (block 128)"), ["int4 weight-only (block 32)"]);
                assert_eq!(
                    lossier("int8 static (per-tensor, minmax)"),
                    ["int8 static (per-channel, minmax)"]
                );
                assert!(lossier("int4 weight-only (block 32)").is_empty());
                assert!(lossier("float16").is_empty());
            } else {
                assert_eq!(
                    lossier("structured pruning 30% + reconstruct + int8 static"),
                    [
                        "structured pruning 30% + reconstruct",
                        "int8 static (per-channel, minmax)"
                    ]
                );
            }
        }
    }
}
