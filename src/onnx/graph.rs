//! Graph editing helpers the compression passes share. A [`GraphIndex`] is built from a graph
//! once (who produces and who consumes each value, which names are initializers) and answers
//! lookups; edits go through free functions on the `GraphProto`, after which the index is rebuilt.
//! Shapes come from the model's declared `value_info`/inputs/outputs only; where a pass needs
//! shapes the model does not declare, it asks ONNX Runtime (`eval`), not an inference engine here.

use std::collections::VecDeque;

// foldhash, not the standard SipHash: indexing a graph hashes every value name, and SipHash was
// about a third of building an index. foldhash seeds every map with secret random values, so no list
// of names collides in every run: a model, written once and never shown a hash, cannot be crafted
// to make the maps quadratic. (It claims no more than that; a job also has a wall-clock limit.)
use foldhash::{HashMap, HashSet, HashSetExt};

use super::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};
use super::{OnnxError, Result};

/// Lookups over one graph (not its subgraphs, whose names are scoped by their node).
#[derive(Debug, Default)]
pub struct GraphIndex {
    /// value name → index of the node that produces it.
    pub producer: HashMap<String, usize>,
    /// value name → indices of the nodes that read it, in node order.
    pub consumers: HashMap<String, Vec<usize>>,
    pub initializers: HashMap<String, usize>,
    pub graph_inputs: HashSet<String>,
    pub graph_outputs: HashSet<String>,
}

impl GraphIndex {
    pub fn new(g: &GraphProto) -> Self {
        let mut ix = GraphIndex::default();
        for (i, node) in g.node.iter().enumerate() {
            for out in node.output.iter().filter(|o| !o.is_empty()) {
                ix.producer.insert(out.clone(), i);
            }
            for input in node.input.iter().filter(|o| !o.is_empty()) {
                ix.consumers.entry(input.clone()).or_default().push(i);
            }
            // Values a subgraph reads from the enclosing scope count as read by this node.
            for name in outer_scope_reads(node) {
                ix.consumers.entry(name).or_default().push(i);
            }
        }
        ix.initializers = g
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name().to_string(), i))
            .collect();
        ix.graph_inputs = g.input.iter().map(|v| v.name().to_string()).collect();
        ix.graph_outputs = g.output.iter().map(|v| v.name().to_string()).collect();
        ix
    }

    pub fn initializer<'g>(&self, g: &'g GraphProto, name: &str) -> Option<&'g TensorProto> {
        self.initializers.get(name).map(|&i| &g.initializer[i])
    }

    pub fn consumers_of(&self, name: &str) -> &[usize] {
        self.consumers.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Names read inside a node's subgraphs that those subgraphs do not define themselves.
fn outer_scope_reads(node: &NodeProto) -> Vec<String> {
    let mut reads = Vec::new();
    for attr in &node.attribute {
        for g in attr.g.iter().chain(&attr.graphs) {
            let mut defined: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
            defined.extend(g.initializer.iter().map(|t| t.name()));
            for n in &g.node {
                defined.extend(n.output.iter().map(String::as_str));
            }
            for n in &g.node {
                for i in n
                    .input
                    .iter()
                    .filter(|i| !i.is_empty() && !defined.contains(i.as_str()))
                {
                    reads.push(i.clone());
                }
                reads.extend(
                    outer_scope_reads(n)
                        .into_iter()
                        .filter(|r| !defined.contains(r.as_str())),
                );
            }
            for o in g.output.iter().filter(|o| !defined.contains(o.name())) {
                reads.push(o.name().to_string());
            }
        }
    }
    reads
}

/// Node indices in an order where every node comes after the producers of its inputs. Errors on a
/// cycle, naming a node on it.
pub fn topological_order(g: &GraphProto) -> Result<Vec<usize>> {
    let ix = GraphIndex::new(g);
    let mut pending: Vec<usize> = vec![0; g.node.len()];
    for (i, node) in g.node.iter().enumerate() {
        let mut deps: HashSet<usize> = HashSet::new();
        for input in node.input.iter().chain(outer_scope_reads(node).iter()) {
            if let Some(&p) = ix.producer.get(input)
                && p != i
            {
                deps.insert(p);
            }
        }
        pending[i] = deps.len();
    }
    let mut ready: VecDeque<usize> = (0..g.node.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(g.node.len());
    let mut released: HashSet<(usize, usize)> = HashSet::new();
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for out in &g.node[i].output {
            for &c in ix.consumers_of(out) {
                if released.insert((i, c)) {
                    pending[c] -= 1;
                    if pending[c] == 0 {
                        ready.push_back(c);
                    }
                }
            }
        }
    }
    if order.len() != g.node.len() {
        let stuck = (0..g.node.len()).find(|i| pending[*i] > 0).unwrap_or(0);
        return Err(OnnxError::Invalid(format!(
            "graph {:?} has a cycle through node {:?} ({})",
            g.name(),
            g.node[stuck].name(),
            g.node[stuck].op_type()
        )));
    }
    Ok(order)
}

/// Sorts the graph's nodes topologically in place (ONNX requires it).
pub fn sort_topologically(g: &mut GraphProto) -> Result<()> {
    let order = topological_order(g)?;
    let mut nodes: Vec<Option<NodeProto>> = std::mem::take(&mut g.node).into_iter().map(Some).collect();
    g.node = order
        .into_iter()
        .map(|i| nodes[i].take().expect("each index once"))
        .collect();
    Ok(())
}

/// Generates names not yet used for any value, node or initializer in the graph.
pub struct NameGen {
    used: HashSet<String>,
}

impl NameGen {
    pub fn new(g: &GraphProto) -> Self {
        let mut used: HashSet<String> = HashSet::new();
        for n in &g.node {
            used.extend(n.output.iter().cloned());
            used.extend(n.input.iter().cloned());
            used.insert(n.name().to_string());
        }
        used.extend(g.initializer.iter().map(|t| t.name().to_string()));
        used.extend(
            g.input
                .iter()
                .chain(&g.output)
                .chain(&g.value_info)
                .map(|v| v.name().to_string()),
        );
        NameGen { used }
    }

    /// `base`, or `base_1`, `base_2`, ... whichever is free; the name is then taken.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.used.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

/// Replaces every read of value `from` with `to` (node inputs and graph outputs).
pub fn rename_uses(g: &mut GraphProto, from: &str, to: &str) {
    for node in &mut g.node {
        for input in node.input.iter_mut().filter(|i| *i == from) {
            *input = to.to_string();
        }
    }
    for out in g.output.iter_mut().filter(|o| o.name() == from) {
        out.name = Some(to.to_string());
    }
}

/// Removes node `index`, rewiring readers of its `output_slot` output to read `replacement`
/// instead (for passes that bypass a node, e.g. an identity or a folded op).
pub fn bypass_node(g: &mut GraphProto, index: usize, output_slot: usize, replacement: &str) -> Result<()> {
    let node = g
        .node
        .get(index)
        .ok_or_else(|| OnnxError::Invalid(format!("no node at index {index}")))?;
    let out = node
        .output
        .get(output_slot)
        .cloned()
        .ok_or_else(|| OnnxError::Invalid(format!("node {:?} has no output {output_slot}", node.name())))?;
    g.node.remove(index);
    rename_uses(g, &out, replacement);
    Ok(())
}

/// Inserts `node` before the first node that reads any of its outputs (or at the end), keeping the
/// graph topologically sorted when the node's inputs are already available there.
pub fn insert_node(g: &mut GraphProto, node: NodeProto) {
    let outputs: HashSet<&str> = node.output.iter().map(String::as_str).collect();
    let at = g
        .node
        .iter()
        .position(|n| n.input.iter().any(|i| outputs.contains(i.as_str())))
        .unwrap_or(g.node.len());
    g.node.insert(at, node);
}

/// Removes nodes whose outputs nobody needs (not graph outputs, not read by any remaining node),
/// repeatedly, then initializers nobody reads. Returns (nodes removed, initializers removed).
pub fn eliminate_dead(g: &mut GraphProto) -> (usize, usize) {
    let ix = GraphIndex::new(g);
    // Live reads of each value. A node is dead when none of its outputs is read or is a graph
    // output; removing it takes its reads away, which can kill its producers in turn. One index
    // and a worklist, instead of re-indexing the graph until nothing changes (each index build
    // hashes every name: the larger part of a weight-only pass on a model of many small nodes).
    let mut reads: HashMap<&str, usize> = ix.consumers.iter().map(|(n, c)| (n.as_str(), c.len())).collect();
    let mut dead = vec![false; g.node.len()];
    let mut work: Vec<usize> = (0..g.node.len()).rev().collect();
    while let Some(i) = work.pop() {
        let node = &g.node[i];
        let live = |o: &String| {
            !o.is_empty() && (ix.graph_outputs.contains(o) || reads.get(o.as_str()).is_some_and(|&n| n > 0))
        };
        if dead[i] || node.output.iter().any(live) {
            continue;
        }
        dead[i] = true;
        let subgraph_reads = outer_scope_reads(node);
        for name in node.input.iter().filter(|n| !n.is_empty()).chain(&subgraph_reads) {
            if let Some(n) = reads.get_mut(name.as_str()) {
                *n -= 1;
                if *n == 0
                    && let Some(&p) = ix.producer.get(name)
                {
                    work.push(p);
                }
            }
        }
    }
    let before = g.initializer.len();
    g.initializer
        .retain(|t| reads.get(t.name()).is_some_and(|&n| n > 0) || ix.graph_outputs.contains(t.name()));
    let removed_initializers = before - g.initializer.len();
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
    (dead.iter().filter(|&&d| d).count(), removed_initializers)
}

/// Replaces the initializer named like `tensor` (or adds it).
pub fn set_initializer(g: &mut GraphProto, tensor: TensorProto) {
    match g.initializer.iter_mut().find(|t| t.name() == tensor.name()) {
        Some(slot) => *slot = tensor,
        None => g.initializer.push(tensor),
    }
}

/// The declared type and shape of a value, from the graph's inputs, outputs or value_info.
pub fn value_info<'g>(g: &'g GraphProto, name: &str) -> Option<&'g ValueInfoProto> {
    g.input
        .iter()
        .chain(&g.output)
        .chain(&g.value_info)
        .find(|v| v.name() == name)
}

/// The opset version the model imports for `domain` ("" and "ai.onnx" are the default domain).
pub fn opset_version(model: &ModelProto, domain: &str) -> Option<i64> {
    let norm = |d: &str| if d == "ai.onnx" { String::new() } else { d.to_string() };
    let want = norm(domain);
    model
        .opset_import
        .iter()
        .find(|o| norm(o.domain()) == want)
        .map(|o| o.version())
}

/// Makes sure the model imports `domain` at `min_version` or later. A missing non-default domain
/// (e.g. `com.microsoft` for `MatMulNBits`) is added; the default domain is never silently
/// upgraded, because operator semantics change between opsets: that is an error naming both
/// versions, and the pass must convert or refuse.
pub fn require_opset(model: &mut ModelProto, domain: &str, min_version: i64) -> Result<()> {
    match opset_version(model, domain) {
        Some(v) if v >= min_version => Ok(()),
        Some(v) if domain.is_empty() || domain == "ai.onnx" => Err(OnnxError::Invalid(format!(
            "needs opset {min_version} of the default domain; the model imports opset {v}"
        ))),
        Some(_) => {
            for o in model.opset_import.iter_mut().filter(|o| o.domain() == domain) {
                o.version = Some(min_version);
            }
            Ok(())
        }
        None => {
            model.opset_import.push(OperatorSetIdProto {
                domain: Some(domain.to_string()),
                version: Some(min_version),
            });
            Ok(())
        }
    }
}

/// The model, encoded, with `names` added as graph outputs so a session returns those
/// intermediate tensors too (calibration, sensitivity, reconstruction). Graph inputs and existing
/// outputs are skipped: the caller reads those from its feeds and the normal outputs.
pub fn exposing_outputs<S: AsRef<str>>(model: &ModelProto, names: &[S]) -> Vec<u8> {
    let mut m = model.clone();
    if let Some(g) = m.graph.as_mut() {
        let taken: HashSet<String> = g.input.iter().chain(&g.output).map(|v| v.name().to_string()).collect();
        let mut added = HashSet::new();
        for n in names.iter().map(AsRef::as_ref) {
            if !taken.contains(n) && added.insert(n.to_string()) {
                g.output.push(ValueInfoProto {
                    name: Some(n.to_string()),
                    ..Default::default()
                });
            }
        }
    }
    super::encode(&m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{self, tiny_mlp};
    use crate::onnx::proto::AttributeProto;

    #[test]
    fn the_index_knows_producers_consumers_and_initializers() {
        let m = tiny_mlp(1);
        let g = m.graph.as_ref().unwrap();
        let ix = GraphIndex::new(g);
        assert_eq!(ix.producer["h0"], 0);
        assert_eq!(ix.consumers_of("h0"), &[1]);
        assert_eq!(ix.consumers_of("input"), &[0]);
        assert_eq!(ix.initializer(g, "w2").unwrap().dims, vec![32, 10]);
        assert!(ix.graph_outputs.contains("logits"));
    }

    #[test]
    fn a_shuffled_graph_sorts_back_and_a_cycle_is_named() {
        let mut m = tiny_mlp(1);
        let g = m.graph.as_mut().unwrap();
        let original: Vec<String> = g.node.iter().map(|n| n.name().to_string()).collect();
        g.node.reverse();
        sort_topologically(g).unwrap();
        let sorted: Vec<String> = g.node.iter().map(|n| n.name().to_string()).collect();
        assert_eq!(sorted, original);
        g.node[0].input[0] = "logits".into();
        let err = topological_order(g).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn bypassing_a_node_rewires_its_readers_and_dead_code_goes() {
        let mut m = tiny_mlp(1);
        let g = m.graph.as_mut().unwrap();
        // Drop the Relu: its reader (the second MatMul) now reads the Add's output.
        bypass_node(g, 2, 0, "h1").unwrap();
        assert_eq!(g.node[2].input[0], "h1");
        // An orphaned chain and an unused initializer are eliminated.
        g.node.push(
            builder::GraphBuilder::new("x")
                .node("Neg", &["h1"], &["unused"], vec![])
                .build()
                .graph
                .unwrap()
                .node[0]
                .clone(),
        );
        g.initializer.push(TensorProto {
            name: Some("orphan".into()),
            ..Default::default()
        });
        assert_eq!(eliminate_dead(g), (1, 1));
        assert_eq!(g.node.len(), 4);
        topological_order(g).unwrap();
    }

    #[test]
    fn dead_chains_go_in_one_pass_but_what_a_subgraph_or_the_outputs_read_stays() {
        let node = |op: &str, inputs: &[&str], outputs: &[&str]| NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let init = |name: &str| TensorProto {
            name: Some(name.into()),
            ..Default::default()
        };
        // An If whose branch reads "kept" from the enclosing graph.
        let branch = GraphProto {
            node: vec![node("Identity", &["kept"], &["z"])],
            output: vec![ValueInfoProto {
                name: Some("z".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut iff = node("If", &["x"], &["y"]);
        iff.attribute.push(AttributeProto {
            name: Some("then_branch".into()),
            g: Some(branch),
            ..Default::default()
        });
        let mut g = GraphProto {
            // A dead chain listed before its producers: a → b → c, c read by nothing; b reads
            // "a_out" twice and the initializer "w", which only the chain reads.
            node: vec![
                node("Neg", &["b_out"], &["c_out"]),
                node("Mul", &["a_out", "a_out", "w"], &["b_out"]),
                node("Neg", &["x"], &["a_out"]),
                node("Neg", &["x"], &["kept"]),
                iff,
            ],
            initializer: vec![init("w"), init("to_output")],
            input: vec![ValueInfoProto {
                name: Some("x".into()),
                ..Default::default()
            }],
            output: ["y", "to_output"]
                .iter()
                .map(|n| ValueInfoProto {
                    name: Some(n.to_string()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(eliminate_dead(&mut g), (3, 1));
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Neg", "If"]);
        assert_eq!(g.node[0].output[0], "kept");
        assert_eq!(g.initializer.len(), 1);
        assert_eq!(g.initializer[0].name(), "to_output");
        assert_eq!(eliminate_dead(&mut g), (0, 0), "nothing left to remove");
    }

    #[test]
    fn fresh_names_never_collide() {
        let m = tiny_mlp(1);
        let mut names = NameGen::new(m.graph.as_ref().unwrap());
        assert_eq!(names.fresh("w1"), "w1_1");
        assert_eq!(names.fresh("w1"), "w1_2");
        assert_eq!(names.fresh("scale"), "scale");
    }

    #[test]
    fn opsets_are_added_for_new_domains_but_never_silently_upgraded() {
        let mut m = tiny_mlp(1);
        assert_eq!(opset_version(&m, "ai.onnx"), Some(17));
        require_opset(&mut m, "", 13).unwrap();
        require_opset(&mut m, "com.microsoft", 1).unwrap();
        assert_eq!(opset_version(&m, "com.microsoft"), Some(1));
        let err = require_opset(&mut m, "", 21).unwrap_err().to_string();
        assert!(err.contains("opset 21") && err.contains("opset 17"), "{err}");
    }

    #[test]
    fn value_info_finds_declared_signatures() {
        let m = tiny_mlp(1);
        let g = m.graph.as_ref().unwrap();
        assert!(value_info(g, "input").is_some());
        assert!(value_info(g, "h0").is_none());
    }
}
