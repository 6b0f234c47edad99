//! What a loaded model costs in memory, and the figure capacity is charged for it.
//!
//! The charge used to be the process's resident-set growth while the session was built. That reading
//! is the whole process's, so under traffic it takes in whatever requests on other threads hold at
//! either end of the build, and glibc's per-thread caches of freed memory come and go between two
//! readings: ~100 KB models were charged 233–320 KB loading one at a time and 389–430 KB while eight
//! clients sent requests. No reading of process memory tells one thread's allocations from another's,
//! and ONNX Runtime allocates through plain `malloc`, so a quieter reading does not exist.
//!
//! So a model is charged an estimate of what its session holds, calibrated against the resident set
//! measured while the process is quiet ([`SessionCost`]):
//! - the model file's bytes: ONNX Runtime copies the weights into tensors of its own and keeps the
//!   nodes' attributes, about once each, and frees the parsed protobuf once the session is built;
//! - a cost per graph node: the node, its kernel (with any pre-packed weights), its values and its
//!   place in the execution plan;
//! - a fixed cost per session: session state, allocators, what the optimiser leaves behind.
//!
//! The last two depend on the library's version and on the session options, so [`calibrate`] measures
//! them when the runtime starts, before it serves anything, from copies of two synthetic models that
//! differ only in their number of nodes. The same model is then charged the same figure whatever else
//! the process does, and that figure is real memory measured on this library.
//!
//! The growth is still measured around every build (serialised, on the anonymous resident set, after
//! giving free heap pages back): where it exceeds the estimate by more than other threads can explain,
//! twice in a row ([`charge`]), the estimate missed something real (a tree ensemble expands its
//! attributes into tables several times the file's size; constants may fold into large tensors) and
//! the measured figure is charged instead.

/// How much memory a session costs beyond its model file, for one set of session options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCost {
    /// Fixed bytes per session.
    pub per_session: u64,
    /// Bytes per node of the model's graph (subgraphs and local functions included).
    pub per_node: u64,
}

impl SessionCost {
    /// What a session of a model of `file_bytes` with `nodes` graph nodes holds.
    pub fn estimate(&self, file_bytes: u64, nodes: u64) -> u64 {
        file_bytes.saturating_add(self.per_session).saturating_add(nodes.saturating_mul(self.per_node))
    }

    /// Costs from the quiet per-session growth of two calibration models, clamped to plausible
    /// ranges so one disturbed reading cannot make every model free or enormous.
    fn fit(small: Calibrated, large: Calibrated, fallback: SessionCost) -> SessionCost {
        let beyond_file = |c: Calibrated| c.grown_per_session.saturating_sub(c.file_bytes);
        let per_node = (beyond_file(large).saturating_sub(beyond_file(small)))
            / large.nodes.saturating_sub(small.nodes).max(1);
        if per_node == 0 {
            // The larger model cost no more than the smaller: the readings are not usable.
            return fallback;
        }
        let per_node = per_node.clamp(256, 64 << 10);
        let per_session = beyond_file(small).saturating_sub(small.nodes * per_node).clamp(4 << 10, 1 << 20);
        SessionCost { per_session, per_node }
    }
}

/// Over-measurement that other threads' allocations can explain, beyond the estimate itself. Eight
/// clients on small tensors moved a reading by ~0.2 MiB; requests with large tensors hold more.
const NOISE_ALLOWANCE: u64 = 1 << 20;

/// The bytes capacity is charged for a session: the estimate, unless the growth measured around the
/// build (`grown`) exceeds it by more than the estimate again and [`NOISE_ALLOWANCE`], and so does
/// the growth around a second build of the same model (`confirm`, called only then): then the
/// estimate missed memory the session really holds, and the smaller growth is charged. One reading
/// that high can be other threads' requests in flight at one end of the build; two rarely are.
pub fn charge(estimate: u64, grown: Option<u64>, confirm: impl FnOnce() -> Option<u64>) -> u64 {
    let beyond_noise = |grown: u64| grown > estimate.saturating_add(estimate.max(NOISE_ALLOWANCE));
    match grown {
        Some(first) if beyond_noise(first) => match confirm() {
            Some(second) if beyond_noise(second) => first.min(second),
            _ => estimate,
        },
        _ => estimate,
    }
}

/// Session copies per calibration model: enough that page granularity (4 KiB) and what the builds
/// before them left free in the heap stay a few percent of the growth.
const CALIBRATION_COPIES: usize = 8;
/// Layers of the larger calibration model; the smaller has one.
const CALIBRATION_LAYERS: usize = 4;

/// One calibration model's quiet growth per session.
#[derive(Debug, Clone, Copy)]
struct Calibrated {
    file_bytes: u64,
    nodes: u64,
    grown_per_session: u64,
}

/// Measures what sessions built by `build` cost: builds copies of a [`CALIBRATION_LAYERS`]-layer and
/// a one-layer MLP (`MatMul`, `Add`, `Relu` per layer, the shape of most small served models) and
/// fits [`SessionCost`] to their growth. Call it while no other thread allocates much (at start-up);
/// `fallback` is returned where the resident set cannot be read. With pip onnxruntime 1.32 it finds
/// ~30 KiB per session and ~4.1 KiB per node with lean options, ~66 KiB and ~3.7 KiB with the
/// defaults, the same within 2% from one start to the next, in 0.1–0.3 s on two busy cores.
///
/// Every session built is pushed to `kept`, for the caller to drop once all calibration is done:
/// memory a dropped session leaves free in the heap (in pages `malloc_trim` cannot return, as other
/// allocations share them) would be reused by the next sessions and hide part of their cost.
pub fn calibrate<S, E>(
    mut build: impl FnMut(&[u8]) -> Result<S, E>,
    fallback: SessionCost,
    kept: &mut Vec<S>,
) -> Result<SessionCost, E> {
    let mut measure = |layers: usize| -> Result<Option<Calibrated>, E> {
        let model = calibration_model(layers);
        // The first build of a kernel type makes one-time allocations that no session owns.
        kept.push(build(&model)?);
        let before = settled_anonymous_bytes();
        for _ in 0..CALIBRATION_COPIES {
            kept.push(build(&model)?);
        }
        let after = settled_anonymous_bytes();
        Ok(before.zip(after).map(|(before, after)| Calibrated {
            file_bytes: model.len() as u64,
            nodes: 3 * layers as u64,
            grown_per_session: after.saturating_sub(before) / CALIBRATION_COPIES as u64,
        }))
    };
    let (large, small) = (measure(CALIBRATION_LAYERS)?, measure(1)?);
    Ok(match small.zip(large) {
        Some((small, large)) => SessionCost::fit(small, large, fallback),
        None => fallback,
    })
}

/// Anonymous resident bytes (heap, not mapped files) after giving free heap pages back to the kernel.
///
/// Anonymous only: a model file mapped by another load in the meantime is not this session's memory.
/// Freed pages are given back first, or pages freed during the build (the parsed protobuf) would count.
pub fn settled_anonymous_bytes() -> Option<u64> {
    release_free_heap();
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut pages = statm.split_whitespace().skip(1).map(|field| field.parse::<u64>().ok());
    let (resident, file_backed) = (pages.next()??, pages.next()??);
    Some(resident.saturating_sub(file_backed) * page_size())
}

/// Returns free heap pages to the kernel, so memory freed by an unloaded model leaves the process.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a plain integer, walks glibc's arenas under their own locks and
        // only releases pages no allocation uses; it is safe to call from any thread at any time.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

fn page_size() -> u64 {
    4096
}

/// The facts about an ONNX graph that its memory cost and its session options depend on, read from
/// the protobuf's wire format without decoding the rest (weights are skipped, not copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphSummary {
    /// Nodes of the main graph, of its subgraphs and of model-local functions.
    pub nodes: u64,
    /// Whether every node is an operator that ONNX Runtime's extended and layout optimisations leave
    /// alone on CPU (see [`SIMPLE_OPS`]), so basic optimisation runs it as fast.
    pub only_simple_ops: bool,
}

/// Standard-domain operators that ONNX Runtime's level-2 and level-3 CPU optimisations do not rewrite
/// for speed (those fuse convolutions, pooling, normalisation, attention and GELU patterns, and change
/// convolution layouts), or only into fusions measured as no faster on small models (Gemm with its
/// activation). Sorted for binary search. Every `ai.onnx.ml` operator counts as simple too.
#[rustfmt::skip]
const SIMPLE_OPS: &[&str] = &[
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Div", "Equal", "Exp", "Flatten", "Floor", "Gather", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or",
    "Reciprocal", "ReduceMax", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Round", "Shape", "Sigmoid", "Sign",
    "Slice", "Softmax", "Softplus", "Squeeze", "Sub", "Sum", "Tanh", "Unsqueeze", "Where", "Xor",
];

/// Subgraphs nested deeper than this are counted as one node each, so a hostile file cannot recurse
/// without bound.
const MAX_DEPTH: usize = 16;

/// Reads `model` (ONNX `ModelProto` bytes); `None` if it is not one (ONNX Runtime will say why).
pub fn summarize(model: &[u8]) -> Option<GraphSummary> {
    let mut summary = GraphSummary { nodes: 0, only_simple_ops: true };
    let mut has_graph = false;
    // ModelProto: graph = 7, functions = 25 (FunctionProto: node = 7).
    for_each_field(model, |field, value| match (field, value) {
        (7, Field::Bytes(graph)) => {
            has_graph = true;
            summary.add_graph(graph, 0)
        }
        (25, Field::Bytes(function)) => for_each_field(function, |field, value| match (field, value) {
            (7, Field::Bytes(node)) => summary.add_node(node, 0),
            _ => Some(()),
        }),
        _ => Some(()),
    })?;
    has_graph.then_some(summary)
}

impl GraphSummary {
    /// GraphProto: node = 1.
    fn add_graph(&mut self, graph: &[u8], depth: usize) -> Option<()> {
        for_each_field(graph, |field, value| match (field, value) {
            (1, Field::Bytes(node)) => self.add_node(node, depth),
            _ => Some(()),
        })
    }

    /// NodeProto: op_type = 4, attribute = 5, domain = 7; AttributeProto: g = 6, graphs = 11.
    fn add_node(&mut self, node: &[u8], depth: usize) -> Option<()> {
        self.nodes += 1;
        let (mut op_type, mut domain): (&[u8], &[u8]) = (b"", b"");
        for_each_field(node, |field, value| match (field, value) {
            (4, Field::Bytes(bytes)) => {
                op_type = bytes;
                Some(())
            }
            (7, Field::Bytes(bytes)) => {
                domain = bytes;
                Some(())
            }
            (5, Field::Bytes(attribute)) => for_each_field(attribute, |field, value| match (field, value) {
                (6 | 11, Field::Bytes(subgraph)) => {
                    self.only_simple_ops = false;
                    if depth < MAX_DEPTH { self.add_graph(subgraph, depth + 1) } else { Some(()) }
                }
                _ => Some(()),
            }),
            _ => Some(()),
        })?;
        let simple = match domain {
            b"" | b"ai.onnx" => {
                std::str::from_utf8(op_type).is_ok_and(|op| SIMPLE_OPS.binary_search(&op).is_ok())
            }
            b"ai.onnx.ml" => true,
            _ => false,
        };
        self.only_simple_ops &= simple;
        Some(())
    }
}

/// One field's value in protobuf's wire format; only length-delimited contents are looked into.
enum Field<'a> {
    Bytes(&'a [u8]),
    Scalar,
}

/// Calls `visit` with each field of a protobuf message; `None` if the bytes are malformed or `visit`
/// returned `None`.
fn for_each_field<'a>(
    mut bytes: &'a [u8],
    mut visit: impl FnMut(u64, Field<'a>) -> Option<()>,
) -> Option<()> {
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes)?;
        let value = match key & 7 {
            0 => read_varint(&mut bytes).map(|_| Field::Scalar)?,
            1 => skip(&mut bytes, 8).map(|_| Field::Scalar)?,
            2 => {
                let len = usize::try_from(read_varint(&mut bytes)?).ok()?;
                Field::Bytes(skip(&mut bytes, len)?)
            }
            5 => skip(&mut bytes, 4).map(|_| Field::Scalar)?,
            _ => return None, // groups (3, 4) are not used by ONNX; anything else is corrupt
        };
        visit(key >> 3, value)?;
    }
    Some(())
}

fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn skip<'a>(bytes: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if len > bytes.len() {
        return None;
    }
    let (taken, rest) = bytes.split_at(len);
    *bytes = rest;
    Some(taken)
}

/// Width of the calibration MLP's layers.
const CALIBRATION_WIDTH: usize = 16;

/// An MLP of `layers` × (`MatMul`, `Add`, `Relu`) over [`CALIBRATION_WIDTH`] features as ONNX
/// (`ModelProto`) bytes, encoded here so calibration needs no model file and no protobuf library.
pub fn calibration_model(layers: usize) -> Vec<u8> {
    let mut graph = Vec::new();
    let mut input = "x".to_owned();
    for layer in 0..layers {
        let [weights, bias, product, sum, output] =
            ["w", "b", "mm", "add", "relu"].map(|name| format!("{name}{layer}"));
        encode::node(&mut graph, "MatMul", &[&input, &weights], &product);
        encode::node(&mut graph, "Add", &[&product, &bias], &sum);
        encode::node(&mut graph, "Relu", &[&sum], &output);
        let values =
            |n: usize| (0..n).map(|i| ((i * 7 + layer) % 13) as f32 / 13.0 - 0.5).collect::<Vec<_>>();
        let side = CALIBRATION_WIDTH as u64;
        encode::float_initializer(
            &mut graph,
            &weights,
            &[side, side],
            &values(CALIBRATION_WIDTH * CALIBRATION_WIDTH),
        );
        encode::float_initializer(&mut graph, &bias, &[side], &values(CALIBRATION_WIDTH));
        input = output;
    }
    encode::float_matrix_io(&mut graph, 11, "x", CALIBRATION_WIDTH as u64);
    encode::float_matrix_io(&mut graph, 12, &input, CALIBRATION_WIDTH as u64);
    encode::model(&graph)
}

/// The few ONNX protobuf messages the calibration model needs (field numbers from onnx.proto).
mod encode {
    fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn scalar(out: &mut Vec<u8>, field: u64, value: u64) {
        varint(out, field << 3);
        varint(out, value);
    }

    fn bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
        varint(out, (field << 3) | 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    /// Appends a NodeProto (input = 1, output = 2, op_type = 4) to a GraphProto (node = 1).
    pub(super) fn node(graph: &mut Vec<u8>, op_type: &str, inputs: &[&str], output: &str) {
        let mut node = Vec::new();
        for input in inputs {
            bytes(&mut node, 1, input.as_bytes());
        }
        bytes(&mut node, 2, output.as_bytes());
        bytes(&mut node, 4, op_type.as_bytes());
        bytes(graph, 1, &node);
    }

    /// Appends a float TensorProto (dims = 1, data_type = 2, name = 8, raw_data = 9) as an initializer
    /// (GraphProto field 5).
    pub(super) fn float_initializer(graph: &mut Vec<u8>, name: &str, dims: &[u64], values: &[f32]) {
        let mut tensor = Vec::new();
        for &dim in dims {
            scalar(&mut tensor, 1, dim);
        }
        scalar(&mut tensor, 2, 1); // FLOAT
        bytes(&mut tensor, 8, name.as_bytes());
        bytes(&mut tensor, 9, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        bytes(graph, 5, &tensor);
    }

    /// Appends a ValueInfoProto for a float `[N, width]` tensor as a graph input (11) or output (12).
    pub(super) fn float_matrix_io(graph: &mut Vec<u8>, field: u64, name: &str, width: u64) {
        // TensorShapeProto.Dimension: dim_value = 1, dim_param = 2.
        let (mut batch, mut features) = (Vec::new(), Vec::new());
        bytes(&mut batch, 2, b"N");
        scalar(&mut features, 1, width);
        let mut shape = Vec::new();
        bytes(&mut shape, 1, &batch);
        bytes(&mut shape, 1, &features);
        // TypeProto.Tensor: elem_type = 1, shape = 2; TypeProto: tensor_type = 1.
        let mut tensor_type = Vec::new();
        scalar(&mut tensor_type, 1, 1);
        bytes(&mut tensor_type, 2, &shape);
        let mut type_proto = Vec::new();
        bytes(&mut type_proto, 1, &tensor_type);
        // ValueInfoProto: name = 1, type = 2.
        let mut value_info = Vec::new();
        bytes(&mut value_info, 1, name.as_bytes());
        bytes(&mut value_info, 2, &type_proto);
        bytes(graph, field, &value_info);
    }

    /// A ModelProto (ir_version = 1, graph = 7, opset_import = 8) at IR 8, opset 17.
    pub(super) fn model(graph: &[u8]) -> Vec<u8> {
        let mut opset = Vec::new();
        bytes(&mut opset, 1, b"");
        scalar(&mut opset, 2, 17);
        let mut model = Vec::new();
        scalar(&mut model, 1, 8);
        bytes(&mut model, 7, graph);
        bytes(&mut model, 8, &opset);
        model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simple_operator_list_is_sorted_for_binary_search() {
        assert!(SIMPLE_OPS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_summary_counts_nodes_and_tells_simple_graphs_from_others() {
        let mlp = calibration_model(3);
        assert_eq!(summarize(&mlp), Some(GraphSummary { nodes: 9, only_simple_ops: true }));

        let mut graph = Vec::new();
        encode::node(&mut graph, "Conv", &["x", "w"], "c");
        encode::node(&mut graph, "Relu", &["c"], "y");
        assert_eq!(
            summarize(&encode::model(&graph)),
            Some(GraphSummary { nodes: 2, only_simple_ops: false })
        );

        assert_eq!(summarize(b"this is not a protobuf"), None);
        assert_eq!(summarize(&[]), None, "no graph");
        assert_eq!(summarize(&mlp[..mlp.len() - 3]), None, "truncated");
    }

    #[test]
    fn the_estimate_is_the_file_plus_the_session_and_its_nodes() {
        let cost = SessionCost { per_session: 20_000, per_node: 3_000 };
        assert_eq!(cost.estimate(100_000, 5), 135_000);
        assert_eq!(cost.estimate(u64::MAX, 5), u64::MAX);
    }

    #[test]
    fn the_measured_growth_is_charged_only_past_what_other_threads_explain_twice() {
        let mib = 1 << 20;
        // (estimate, first growth, whether a second build is asked for, its growth, charged)
        for (estimate, first, rebuilt, second, charged) in [
            (100_000, None, false, None, 100_000),
            (100_000, Some(0), false, None, 100_000),
            // A busy process: a small model measured at several times its size is still the estimate.
            (100_000, Some(mib), false, None, 100_000),
            (100_000, Some(100_000 + mib), false, None, 100_000),
            // Twice beyond the noise: an estimate that missed memory the session holds.
            (100_000, Some(100_001 + mib), true, Some(3 * mib), 100_001 + mib),
            (100_000, Some(3 * mib), true, Some(2 * mib), 2 * mib),
            // Once only: other threads' requests at one end of the first build.
            (100_000, Some(3 * mib), true, Some(200_000), 100_000),
            (100_000, Some(3 * mib), true, None, 100_000),
            // Large models: the allowance grows with the estimate.
            (100 * mib, Some(180 * mib), false, None, 100 * mib),
            (100 * mib, Some(201 * mib), true, Some(202 * mib), 201 * mib),
        ] {
            let mut asked = false;
            let got = charge(estimate, first, || {
                asked = true;
                second
            });
            assert_eq!(got, charged, "estimate {estimate}, measured {first:?} then {second:?}");
            assert_eq!(asked, rebuilt, "estimate {estimate}, measured {first:?}");
        }
    }

    #[test]
    fn calibration_fits_costs_and_falls_back_on_unusable_readings() {
        let fallback = SessionCost { per_session: 1, per_node: 1 };
        let at = |file_bytes, nodes, grown_per_session| Calibrated { file_bytes, nodes, grown_per_session };
        let fitted = SessionCost::fit(at(1_000, 3, 31_000), at(10_000, 30, 121_000), fallback);
        assert_eq!(fitted, SessionCost { per_session: 21_000, per_node: 3_000 });
        assert_eq!(SessionCost::fit(at(1_000, 3, 31_000), at(10_000, 30, 20_000), fallback), fallback);
        let absurd = SessionCost::fit(at(0, 3, 0), at(0, 30, 27 << 30), fallback);
        assert_eq!(absurd, SessionCost { per_session: 4 << 10, per_node: 64 << 10 });
    }
}
