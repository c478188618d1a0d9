//! Moving a model to a newer default-domain opset when a pass needs one (per-channel QDQ needs
//! opset 13). Only the operators whose signature or meaning changed between the model's opset and
//! the target are rewritten, each by its specification; an operator this module cannot convert
//! faithfully (a Softmax whose axis semantics would change on an input of unknown rank, a removed
//! operator, control flow) makes the upgrade refuse with the reason, never guess.

use super::graph::{self, NameGen, opset_version};
use super::proto::tensor_proto::DataType;
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, type_proto};

/// What an upgrade changed, for the pass's notes.
#[derive(Debug, Default)]
pub struct Upgraded {
    pub from: i64,
    pub to: i64,
    pub rewritten: Vec<String>,
}

/// Inputs of the operators whose conversion depends on their rank (Softmax and kin), for a caller
/// that can measure ranks the model does not declare.
pub fn rank_sensitive_inputs(model: &ModelProto) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else { return vec![] };
    g.node
        .iter()
        .filter(|n| matches!(n.op_type(), "Softmax" | "LogSoftmax" | "Hardmax"))
        .map(|n| n.input[0].clone())
        .collect()
}

/// Upgrades the default domain to `target` (only 13 is supported, from 7..=12). `known_ranks`
/// supplies ranks of values the model does not declare (measured by running it).
pub fn to_opset(
    model: &mut ModelProto,
    target: i64,
    known_ranks: &std::collections::HashMap<String, i64>,
) -> Result<Upgraded, String> {
    let from = opset_version(model, "").ok_or("the model imports no default-domain opset")?;
    if from >= target {
        return Ok(Upgraded {
            from,
            to: from,
            rewritten: vec![],
        });
    }
    if target != 13 || from < 7 {
        return Err(format!(
            "upgrading opset {from} to {target} is not supported (only 7..=12 to 13)"
        ));
    }
    let graph = model.graph.as_mut().ok_or("the model has no graph")?;
    let mut names = NameGen::new(graph);
    let mut rewritten = Vec::new();
    let mut constants: Vec<TensorProto> = Vec::new();
    for i in 0..graph.node.len() {
        let node = &graph.node[i];
        if !matches!(node.domain(), "" | "ai.onnx") {
            continue;
        }
        if node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            return Err(format!(
                "node {:?} ({}) has subgraphs; their upgrade is not supported",
                node.name(),
                node.op_type()
            ));
        }
        let op = node.op_type().to_string();
        match op.as_str() {
            "Upsample" => {
                return Err(format!(
                    "node {:?}: Upsample no longer exists at opset 13 (use Resize)",
                    node.name()
                ));
            }
            "Squeeze" | "Unsqueeze" | "ReduceSum" => {
                if let Some(axes) = take_ints(&mut graph.node[i], "axes") {
                    let name = names.fresh(&format!("{}_axes", sanitize(&op)));
                    constants.push(int64s(&name, &axes));
                    let n = &mut graph.node[i];
                    n.input.truncate(1);
                    n.input.push(name);
                    rewritten.push(op);
                }
            }
            "Split" => {
                if let Some(split) = take_ints(&mut graph.node[i], "split") {
                    let name = names.fresh("split_sizes");
                    constants.push(int64s(&name, &split));
                    graph.node[i].input.truncate(1);
                    graph.node[i].input.push(name);
                    rewritten.push(op);
                }
            }
            "Dropout" if from < 12 => {
                let ratio = graph.node[i]
                    .attribute
                    .iter()
                    .position(|a| a.name() == "ratio")
                    .map(|p| graph.node[i].attribute.remove(p).f());
                if let Some(r) = ratio {
                    let name = names.fresh("dropout_ratio");
                    constants.push(TensorProto {
                        name: Some(name.clone()),
                        data_type: Some(DataType::Float as i32),
                        raw_data: Some(r.to_le_bytes().to_vec().into()),
                        ..Default::default()
                    });
                    graph.node[i].input.truncate(1);
                    graph.node[i].input.push(name);
                    rewritten.push(op);
                }
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                // Before 13 the input is coerced to 2-D at `axis` (default 1); from 13 the
                // operator runs along `axis` (default -1). Equal when `axis` is the last axis.
                let axis = graph.node[i]
                    .attribute
                    .iter()
                    .find(|a| a.name() == "axis")
                    .map(|a| a.i());
                // Softmax keeps its input's shape: the output's declared rank serves too.
                let input = &graph.node[i].input[0];
                let rank = rank_of(graph, input)
                    .or_else(|| rank_of(graph, &graph.node[i].output[0]))
                    .or_else(|| known_ranks.get(input).copied());
                let last = match (axis, rank) {
                    (Some(-1), _) => true,
                    (Some(a), Some(r)) => a == r - 1,
                    (None, Some(r)) => r == 2,
                    _ => false,
                };
                if !last {
                    return Err(format!(
                        "node {:?}: {op} over axis {} of an input of {} rank changes meaning at opset 13",
                        graph.node[i].name(),
                        axis.unwrap_or(1),
                        rank.map_or("unknown".to_string(), |r| r.to_string())
                    ));
                }
                set_int(&mut graph.node[i], "axis", -1);
                rewritten.push(op);
            }
            _ => {}
        }
    }
    graph.initializer.extend(constants);
    for o in model
        .opset_import
        .iter_mut()
        .filter(|o| matches!(o.domain(), "" | "ai.onnx"))
    {
        o.version = Some(target);
    }
    if model.ir_version() < 7 {
        model.ir_version = Some(7);
    }
    rewritten.sort();
    rewritten.dedup();
    Ok(Upgraded {
        from,
        to: target,
        rewritten,
    })
}

fn take_ints(node: &mut NodeProto, name: &str) -> Option<Vec<i64>> {
    let pos = node.attribute.iter().position(|a| a.name() == name)?;
    Some(node.attribute.remove(pos).ints)
}

fn set_int(node: &mut NodeProto, name: &str, value: i64) {
    node.attribute.retain(|a| a.name() != name);
    node.attribute.push(AttributeProto {
        name: Some(name.into()),
        r#type: Some(super::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    });
}

fn int64s(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![values.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn rank_of(g: &GraphProto, name: &str) -> Option<i64> {
    let vi = graph::value_info(g, name)?;
    match vi.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len() as i64),
        _ => None,
    }
}

fn sanitize(s: &str) -> String {
    s.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{DimSpec, GraphBuilder};

    fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(super::super::proto::attribute_proto::AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn axes_attributes_become_inputs_and_the_opset_moves() {
        let mut m = GraphBuilder::new("old")
            .opset("", 11)
            .input("x", DataType::Float, &[DimSpec::Fixed(2), DimSpec::Fixed(3)])
            .output("y", DataType::Float, &[DimSpec::Fixed(2), DimSpec::Fixed(3)])
            .node("Unsqueeze", &["x"], &["u"], vec![ints_attr("axes", &[0])])
            .node("Squeeze", &["u"], &["s"], vec![ints_attr("axes", &[0])])
            .node(
                "Softmax",
                &["s"],
                &["y"],
                vec![crate::onnx::builder::attr_int("axis", -1)],
            )
            .build();
        let up = to_opset(&mut m, 13, &Default::default()).unwrap();
        assert_eq!((up.from, up.to), (11, 13));
        assert_eq!(up.rewritten, vec!["Softmax", "Squeeze", "Unsqueeze"]);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].input.len(), 2);
        assert!(g.node[0].attribute.is_empty());
        assert_eq!(opset_version(&m, ""), Some(13));
    }

    #[test]
    fn a_softmax_whose_meaning_would_change_is_refused() {
        let mut m = GraphBuilder::new("old")
            .opset("", 11)
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
            .node("Softmax", &["x"], &["y"], vec![])
            .build();
        let err = to_opset(&mut m, 13, &Default::default()).unwrap_err();
        assert!(err.contains("changes meaning"), "{err}");
    }
}
