//! Tensor bookkeeping: how many bytes a tensor's data must take, checks that declared sizes match the
//! data actually present (so nothing downstream allocates or reads on a lie), and a walk over every
//! tensor a model stores, wherever it sits (initializers, sparse initializers, `Constant` attributes,
//! subgraphs, functions, training graphs).

use std::fmt;

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use super::{MAX_SUBGRAPH_DEPTH, OnnxError, Result};

/// Larger declared tensors are refused as absurd (2^40 elements is 4 TiB of float32).
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// Bytes `elements` values of `data_type` occupy in `raw_data` (sub-byte types are packed), or
/// `None` for strings and unknown types.
pub fn raw_byte_len(data_type: i32, elements: u64) -> Option<u64> {
    use DataType as D;
    let bits: u64 = match DataType::try_from(data_type).ok()? {
        D::Float | D::Int32 | D::Uint32 => 32,
        D::Uint8 | D::Int8 | D::Bool => 8,
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 16,
        D::Int64 | D::Uint64 | D::Double | D::Complex64 => 64,
        D::Complex128 => 128,
        D::Float8e4m3fn | D::Float8e4m3fnuz | D::Float8e5m2 | D::Float8e5m2fnuz | D::Float8e8m0 => 8,
        D::Uint4 | D::Int4 | D::Float4e2m1 => 4,
        D::Uint2 | D::Int2 => 2,
        D::String | D::Undefined => return None,
    };
    Some((elements.checked_mul(bits)?).div_ceil(8))
}

/// Elements a tensor declares, refusing negative and absurd dimensions.
pub fn checked_elements(t: &TensorProto, at: impl fmt::Display) -> Result<u64> {
    let mut n: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(invalid(&at, t, format!("has a negative dimension ({d})")));
        }
        n = n
            .checked_mul(d as u64)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| invalid(&at, t, format!("declares absurd dimensions {:?}", t.dims)))?;
    }
    Ok(n)
}

fn invalid(at: impl fmt::Display, t: &TensorProto, what: String) -> OnnxError {
    OnnxError::Invalid(format!("{at}: tensor {:?} {what}", t.name()))
}

pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// Checks that the data a tensor carries inline matches its declared shape and type. External
/// tensors are checked against their files by `external::check`.
pub fn check_inline(t: &TensorProto, at: impl fmt::Display) -> Result<()> {
    let n = checked_elements(t, &at)?;
    if is_external(t) {
        return Ok(());
    }
    let data_type = t.data_type();
    if let Some(raw) = &t.raw_data {
        return match raw_byte_len(data_type, n) {
            Some(expected) if expected == raw.len() as u64 => Ok(()),
            Some(expected) => Err(invalid(
                at,
                t,
                format!(
                    "declares {n} elements ({expected} bytes) of {} but holds {} bytes",
                    super::dtype::name(data_type),
                    raw.len()
                ),
            )),
            None => Err(invalid(
                at,
                t,
                format!("of type {} cannot use raw_data", super::dtype::name(data_type)),
            )),
        };
    }
    use DataType as D;
    // Typed fields: how many entries the declared shape needs, where that is unambiguous.
    let (field, have, want) = match DataType::try_from(data_type) {
        Ok(D::Float) => ("float_data", t.float_data.len() as u64, Some(n)),
        Ok(D::Complex64) => ("float_data", t.float_data.len() as u64, n.checked_mul(2)),
        Ok(D::Double) => ("double_data", t.double_data.len() as u64, Some(n)),
        Ok(D::Complex128) => ("double_data", t.double_data.len() as u64, n.checked_mul(2)),
        Ok(D::Int64) => ("int64_data", t.int64_data.len() as u64, Some(n)),
        Ok(D::Uint32 | D::Uint64) => ("uint64_data", t.uint64_data.len() as u64, Some(n)),
        Ok(D::String) => ("string_data", t.string_data.len() as u64, Some(n)),
        Ok(D::Int32 | D::Int16 | D::Int8 | D::Uint16 | D::Uint8 | D::Bool | D::Float16 | D::Bfloat16) => {
            ("int32_data", t.int32_data.len() as u64, Some(n))
        }
        // Packed sub-byte and float8 types in int32_data: the packing rules differ by IR version;
        // ONNX Runtime checks these when it loads the model.
        _ => return Ok(()),
    };
    match want {
        Some(want) if want == have => Ok(()),
        _ if n == 0 => Ok(()),
        Some(want) => Err(invalid(
            at,
            t,
            format!("declares {n} elements but {field} holds {have} (expected {want})"),
        )),
        None => Err(invalid(at, t, "declares too many elements".into())),
    }
}

/// Share of stored floating-point weight elements that are exactly zero (inline data only; call
/// after `external::internalize` for models with external data).
pub fn zero_fraction(model: &ModelProto) -> f64 {
    let (mut zeros, mut total) = (0u64, 0u64);
    let _ = for_each_tensor(model, &mut |t, _| {
        let raw = t.raw_data.as_deref().unwrap_or(&[]);
        match DataType::try_from(t.data_type()) {
            Ok(DataType::Float) => {
                if t.raw_data.is_some() {
                    total += (raw.len() / 4) as u64;
                    zeros += raw
                        .chunks_exact(4)
                        .filter(|c| f32::from_le_bytes((*c).try_into().unwrap()) == 0.0)
                        .count() as u64;
                } else {
                    total += t.float_data.len() as u64;
                    zeros += t.float_data.iter().filter(|v| **v == 0.0).count() as u64;
                }
            }
            Ok(DataType::Float16 | DataType::Bfloat16) => {
                total += (raw.len() / 2) as u64;
                // ±0 in both formats: all bits but the sign are zero.
                zeros += raw
                    .chunks_exact(2)
                    .filter(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7fff) == 0)
                    .count() as u64;
            }
            Ok(DataType::Double) => {
                total += (raw.len() / 8) as u64;
                zeros += raw
                    .chunks_exact(8)
                    .filter(|c| f64::from_le_bytes((*c).try_into().unwrap()) == 0.0)
                    .count() as u64;
            }
            _ => {}
        }
        Ok(())
    });
    if total == 0 { 0.0 } else { zeros as f64 / total as f64 }
}

/// Where a tensor sits in a model, for error messages. A walk builds it on the way down at no cost;
/// it is spelled out only when a check fails. (Formatting the path for every attribute of every
/// node was a tenth of loading a model of many small nodes.)
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    Graph,
    Function(&'a str),
    TrainingInfo(usize),
    /// A node (by name) in the graph at the first place.
    Node(&'a Place<'a>, &'a str),
    /// A subgraph attribute (by name) of the node at the first place.
    Subgraph(&'a Place<'a>, &'a str),
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Graph => f.write_str("graph"),
            Place::Function(name) => write!(f, "function {name}"),
            Place::TrainingInfo(i) => write!(f, "training_info[{i}]"),
            Place::Node(graph, name) => write!(f, "{graph}/node {name:?}"),
            Place::Subgraph(node, attribute) => write!(f, "{node}/{attribute}"),
        }
    }
}

/// The callback of [`for_each_tensor`].
pub type TensorVisitor<'v> = dyn FnMut(&TensorProto, &Place<'_>) -> Result<()> + 'v;

/// Calls `f(tensor, where)` on every tensor the model stores.
pub fn for_each_tensor(model: &ModelProto, f: &mut TensorVisitor<'_>) -> Result<()> {
    if let Some(g) = &model.graph {
        walk_graph(g, &Place::Graph, 0, f)?;
    }
    for func in &model.functions {
        walk_nodes(&func.node, &Place::Function(func.name()), 0, f)?;
    }
    for (i, info) in model.training_info.iter().enumerate() {
        for g in [&info.initialization, &info.algorithm].into_iter().flatten() {
            walk_graph(g, &Place::TrainingInfo(i), 0, f)?;
        }
    }
    Ok(())
}

fn walk_graph(g: &GraphProto, at: &Place<'_>, depth: usize, f: &mut TensorVisitor<'_>) -> Result<()> {
    if depth > MAX_SUBGRAPH_DEPTH {
        return Err(OnnxError::Invalid(format!(
            "{at}: subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels"
        )));
    }
    for t in &g.initializer {
        f(t, at)?;
    }
    for s in &g.sparse_initializer {
        for t in [&s.values, &s.indices].into_iter().flatten() {
            f(t, at)?;
        }
    }
    walk_nodes(&g.node, at, depth, f)
}

fn walk_nodes(nodes: &[NodeProto], at: &Place<'_>, depth: usize, f: &mut TensorVisitor<'_>) -> Result<()> {
    for node in nodes {
        let here = Place::Node(at, node.name());
        for attr in &node.attribute {
            walk_attribute(attr, &here, depth, f)?;
        }
    }
    Ok(())
}

fn walk_attribute(attr: &AttributeProto, at: &Place<'_>, depth: usize, f: &mut TensorVisitor<'_>) -> Result<()> {
    for t in attr.t.iter().chain(&attr.tensors) {
        f(t, at)?;
    }
    for s in attr.sparse_tensor.iter().chain(&attr.sparse_tensors) {
        for t in [&s.values, &s.indices].into_iter().flatten() {
            f(t, at)?;
        }
    }
    for g in attr.g.iter().chain(&attr.graphs) {
        walk_graph(g, &Place::Subgraph(at, attr.name()), depth + 1, f)?;
    }
    Ok(())
}

/// Mutable twin of [`for_each_tensor`], for rewriting where tensor data lives.
pub fn for_each_tensor_mut(model: &mut ModelProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    fn graph(g: &mut GraphProto, depth: usize, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
        if depth > MAX_SUBGRAPH_DEPTH {
            return Err(OnnxError::Invalid(format!(
                "subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels"
            )));
        }
        for t in &mut g.initializer {
            f(t)?;
        }
        for s in &mut g.sparse_initializer {
            for t in [&mut s.values, &mut s.indices].into_iter().flatten() {
                f(t)?;
            }
        }
        nodes(&mut g.node, depth, f)
    }
    fn nodes(ns: &mut [NodeProto], depth: usize, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
        for node in ns {
            for attr in &mut node.attribute {
                for t in attr.t.iter_mut().chain(attr.tensors.iter_mut()) {
                    f(t)?;
                }
                for s in attr.sparse_tensor.iter_mut().chain(attr.sparse_tensors.iter_mut()) {
                    for t in [&mut s.values, &mut s.indices].into_iter().flatten() {
                        f(t)?;
                    }
                }
                for g in attr.g.iter_mut().chain(attr.graphs.iter_mut()) {
                    graph(g, depth + 1, f)?;
                }
            }
        }
        Ok(())
    }
    if let Some(g) = &mut model.graph {
        graph(g, 0, f)?;
    }
    for func in &mut model.functions {
        nodes(&mut func.node, 0, f)?;
    }
    for info in &mut model.training_info {
        for g in [&mut info.initialization, &mut info.algorithm].into_iter().flatten() {
            graph(g, 0, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[i64], data_type: DataType, raw: Option<Vec<u8>>) -> TensorProto {
        TensorProto {
            name: Some("w".into()),
            dims: dims.to_vec(),
            data_type: Some(data_type as i32),
            raw_data: raw.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn raw_sizes_follow_the_element_type() {
        assert_eq!(raw_byte_len(DataType::Float as i32, 10), Some(40));
        assert_eq!(raw_byte_len(DataType::Int4 as i32, 3), Some(2));
        assert_eq!(raw_byte_len(DataType::Uint2 as i32, 5), Some(2));
        assert_eq!(raw_byte_len(DataType::Complex128 as i32, 2), Some(32));
        assert_eq!(raw_byte_len(DataType::String as i32, 2), None);
    }

    #[test]
    fn data_that_does_not_match_the_declared_shape_is_refused_naming_the_tensor() {
        check_inline(&tensor(&[2, 3], DataType::Float, Some(vec![0; 24])), "graph").unwrap();
        let err = check_inline(&tensor(&[2, 3], DataType::Float, Some(vec![0; 20])), "graph").unwrap_err();
        assert!(
            err.to_string().contains("\"w\"") && err.to_string().contains("20 bytes"),
            "{err}"
        );
        let mut typed = tensor(&[4], DataType::Float, None);
        typed.float_data = vec![1.0; 3];
        assert!(
            check_inline(&typed, "graph")
                .unwrap_err()
                .to_string()
                .contains("float_data holds 3")
        );
    }

    #[test]
    fn negative_and_absurd_dimensions_are_refused() {
        let err = check_inline(&tensor(&[-1], DataType::Float, Some(vec![])), "g").unwrap_err();
        assert!(err.to_string().contains("negative"), "{err}");
        let huge = tensor(&[1 << 30, 1 << 30, 1 << 30], DataType::Float, Some(vec![]));
        assert!(check_inline(&huge, "g").unwrap_err().to_string().contains("absurd"));
    }

    #[test]
    fn a_bad_tensor_deep_in_a_subgraph_is_named_by_its_path() {
        use super::super::proto::{AttributeProto, GraphProto};
        let node = |name: &str, attribute: AttributeProto| NodeProto {
            name: Some(name.into()),
            attribute: vec![attribute],
            ..Default::default()
        };
        let constant = node(
            "c",
            AttributeProto {
                name: Some("value".into()),
                t: Some(tensor(&[2], DataType::Float, Some(vec![0; 5]))),
                ..Default::default()
            },
        );
        let branch = node(
            "if",
            AttributeProto {
                name: Some("then_branch".into()),
                g: Some(GraphProto {
                    node: vec![constant],
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let model = ModelProto {
            graph: Some(GraphProto {
                node: vec![branch],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = for_each_tensor(&model, &mut |t, at| check_inline(t, at)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(r#"invalid ONNX model: graph/node "if"/then_branch/node "c": tensor "w" declares 2"#),
            "{err}"
        );
    }
}
