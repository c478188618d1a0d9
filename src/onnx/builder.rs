//! A small graph builder: the test suite, fixtures and benchmarks make their ONNX models with it
//! instead of committing binaries.

use rand::{Rng, SeedableRng};

use super::proto::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
};

pub const MLP_IN: usize = 16;
pub const MLP_HIDDEN: usize = 32;
pub const MLP_OUT: usize = 10;

/// Dimension of a graph input or output when building a model.
#[derive(Debug, Clone)]
pub enum DimSpec {
    Fixed(i64),
    Symbolic(&'static str),
}

#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    opsets: Vec<(String, i64)>,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: Some(name.to_string()),
                ..Default::default()
            },
            opsets: vec![(String::new(), 17)],
        }
    }

    pub fn opset(mut self, domain: &str, version: i64) -> Self {
        if let Some(o) = self.opsets.iter_mut().find(|(d, _)| d == domain) {
            o.1 = version;
        } else {
            self.opsets.push((domain.to_string(), version));
        }
        self
    }

    pub fn input(mut self, name: &str, elem: DataType, dims: &[DimSpec]) -> Self {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    pub fn output(mut self, name: &str, elem: DataType, dims: &[DimSpec]) -> Self {
        self.graph.output.push(value_info(name, elem, dims));
        self
    }

    pub fn initializer_f32(mut self, name: &str, dims: &[i64], data: Vec<f32>) -> Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "initializer {name}");
        self.graph.initializer.push(TensorProto {
            name: Some(name.to_string()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        self
    }

    pub fn initializer_i64(mut self, name: &str, dims: &[i64], data: Vec<i64>) -> Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "initializer {name}");
        self.graph.initializer.push(TensorProto {
            name: Some(name.to_string()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        self
    }

    pub fn node(mut self, op: &str, inputs: &[&str], outputs: &[&str], attributes: Vec<AttributeProto>) -> Self {
        let index = self.graph.node.len();
        self.graph.node.push(NodeProto {
            name: Some(format!("{op}_{index}")),
            op_type: Some(op.to_string()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..Default::default()
        });
        self
    }

    pub fn build(self) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            producer_name: Some("modelpress".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(self.graph),
            opset_import: self
                .opsets
                .into_iter()
                .map(|(domain, version)| OperatorSetIdProto {
                    domain: Some(domain),
                    version: Some(version),
                })
                .collect(),
            ..Default::default()
        }
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[DimSpec]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                DimSpec::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                DimSpec::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(proto::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn random_weights(rng: &mut rand::rngs::StdRng, n: usize, fan_in: usize) -> Vec<f32> {
    let scale = (2.0 / fan_in as f32).sqrt();
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// input[batch,16] → MatMul → Add → Relu → MatMul → Add → logits[batch,10], random weights from `seed`.
pub fn tiny_mlp(seed: u64) -> ModelProto {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (i, h, o) = (MLP_IN, MLP_HIDDEN, MLP_OUT);
    let batch = DimSpec::Symbolic("batch");
    GraphBuilder::new("tiny_mlp")
        .input("input", DataType::Float, &[batch.clone(), DimSpec::Fixed(i as i64)])
        .output("logits", DataType::Float, &[batch, DimSpec::Fixed(o as i64)])
        .initializer_f32("w1", &[i as i64, h as i64], random_weights(&mut rng, i * h, i))
        .initializer_f32("b1", &[h as i64], random_weights(&mut rng, h, h))
        .initializer_f32("w2", &[h as i64, o as i64], random_weights(&mut rng, h * o, h))
        .initializer_f32("b2", &[o as i64], random_weights(&mut rng, o, o))
        .node("MatMul", &["input", "w1"], &["h0"], vec![])
        .node("Add", &["h0", "b1"], &["h1"], vec![])
        .node("Relu", &["h1"], &["h2"], vec![])
        .node("MatMul", &["h2", "w2"], &["h3"], vec![])
        .node("Add", &["h3", "b2"], &["logits"], vec![])
        .build()
}

/// A model that decodes and validates but that ONNX Runtime refuses to load: its only node is an
/// operator that exists in no opset.
pub fn unloadable_model() -> ModelProto {
    let batch = DimSpec::Symbolic("batch");
    GraphBuilder::new("unloadable")
        .input("x", DataType::Float, &[batch.clone(), DimSpec::Fixed(4)])
        .output("y", DataType::Float, &[batch, DimSpec::Fixed(4)])
        .node("NoSuchOperator", &["x"], &["y"], vec![])
        .build()
}

/// A few hundred bytes that ask ONNX Runtime for `side * side` floats at run time (4 GiB at the
/// default 32768): the poison model for memory limits.
pub fn memory_hog_model(side: i64) -> ModelProto {
    GraphBuilder::new("memory_hog")
        .input("x", DataType::Float, &[DimSpec::Fixed(1)])
        .output("y", DataType::Float, &[DimSpec::Fixed(side), DimSpec::Fixed(side)])
        .initializer_i64("shape", &[2], vec![side, side])
        .node("Expand", &["x", "shape"], &["y"], vec![])
        .build()
}
