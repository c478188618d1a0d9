//! Operator domains an uploaded model may use. ONNX Runtime implements the standard domains and
//! its own contrib domains natively; any other domain could only be served by a custom-op library,
//! which this service never loads from user input. Such models are refused at upload with the
//! domain named, instead of failing later inside a job.

use std::collections::BTreeSet;

use super::proto::{GraphProto, ModelProto};
use super::{OnnxError, Result, for_each_graph};

/// Domains ONNX Runtime's CPU and CUDA builds implement without any library being loaded.
pub const BUILT_IN: [&str; 6] = [
    "",
    "ai.onnx",
    "ai.onnx.ml",
    "ai.onnx.preview.training",
    "com.microsoft",
    "com.microsoft.nchwc",
];

/// Refuses nodes and opset imports in a domain that is neither built into ONNX Runtime nor
/// defined by one of the model's own functions.
pub fn check(model: &ModelProto) -> Result<()> {
    let local: BTreeSet<(&str, &str)> = model.functions.iter().map(|f| (f.domain(), f.name())).collect();
    let local_domains: BTreeSet<&str> = local.iter().map(|(d, _)| *d).collect();
    let refuse = |domain: &str, what: String| {
        Err(OnnxError::Invalid(format!(
            "{what} uses the operator domain {domain:?}, which needs a custom-op library; only ONNX \
             Runtime's built-in domains ({}) are accepted",
            BUILT_IN[1..].join(", ")
        )))
    };
    for o in &model.opset_import {
        if !BUILT_IN.contains(&o.domain()) && !local_domains.contains(o.domain()) {
            return refuse(o.domain(), "the model's opset_import".into());
        }
    }
    let mut bad = None;
    let mut visit = |g: &GraphProto| {
        for node in &g.node {
            let d = node.domain();
            if bad.is_none() && !BUILT_IN.contains(&d) && !local.contains(&(d, node.op_type())) {
                bad = Some((d.to_string(), format!("node {:?} ({})", node.name(), node.op_type())));
            }
        }
    };
    if let Some(graph) = model.graph.as_ref() {
        for_each_graph(graph, &mut visit);
    }
    for f in &model.functions {
        let g = GraphProto {
            node: f.node.clone(),
            ..Default::default()
        };
        for_each_graph(&g, &mut visit);
    }
    match bad {
        Some((domain, what)) => refuse(&domain, what),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder;

    #[test]
    fn custom_domains_are_refused_and_built_in_ones_accepted() {
        let mut model = builder::tiny_mlp(1);
        check(&model).unwrap();
        model.graph.as_mut().unwrap().node[0].domain = Some("com.microsoft".into());
        check(&model).unwrap();
        model.graph.as_mut().unwrap().node[0].domain = Some("com.evil.ops".into());
        let e = check(&model).unwrap_err().to_string();
        assert!(e.contains("com.evil.ops"), "{e}");
        let mut model = builder::tiny_mlp(1);
        model.opset_import.push(crate::onnx::proto::OperatorSetIdProto {
            domain: Some("my.custom".into()),
            version: Some(1),
        });
        assert!(check(&model).is_err());
    }
}
