//! What a model is charged does not move with other threads' allocations, and is real memory.
//!
//! Its own test binary, its tests one at a time (`SERIAL`): they read the process's memory, so no
//! other test may load models alongside. Nothing is timed: the noise runs for as long as the loads
//! take, however long that is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};

use densemesh_runtime_core::{DataType, InferRequest, LoadedModel, Tensor, TensorData};
use densemesh_runtime_ort::{OrtConfig, OrtRuntime};

static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// ONNX Runtime allows one environment per process, so the tests share one runtime.
fn runtime() -> &'static OrtRuntime {
    static RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        OrtRuntime::new(&OrtConfig { intra_threads: 1, ..OrtConfig::default() }).expect("onnxruntime")
    })
}

/// ONNX protobuf, written by hand (field numbers from onnx.proto) so the test needs no model files.
mod onnx {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
    fn scalar(out: &mut Vec<u8>, field: u64, v: u64) {
        varint(out, field << 3);
        varint(out, v);
    }

    /// A pseudo-random sequence in [-0.5, 0.5).
    pub struct Noise(pub u64);
    impl Noise {
        pub fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// NodeProto: input = 1, output = 2, op_type = 4, attribute = 5, domain = 7.
    fn node(
        graph: &mut Vec<u8>,
        op: &str,
        domain: &str,
        inputs: &[&str],
        output: &str,
        attributes: &[Vec<u8>],
    ) {
        let mut n = Vec::new();
        inputs.iter().for_each(|i| bytes(&mut n, 1, i.as_bytes()));
        bytes(&mut n, 2, output.as_bytes());
        bytes(&mut n, 4, op.as_bytes());
        attributes.iter().for_each(|a| bytes(&mut n, 5, a));
        bytes(&mut n, 7, domain.as_bytes());
        bytes(graph, 1, &n);
    }

    /// TensorProto (dims = 1, data_type = 2, name = 8, raw_data = 9) as an initializer (graph field 5).
    fn initializer(graph: &mut Vec<u8>, name: &str, dims: &[u64], noise: &mut Noise) {
        let mut t = Vec::new();
        dims.iter().for_each(|d| scalar(&mut t, 1, *d));
        scalar(&mut t, 2, 1);
        bytes(&mut t, 8, name.as_bytes());
        let raw: Vec<u8> = (0..dims.iter().product()).flat_map(|_: u64| noise.next().to_le_bytes()).collect();
        bytes(&mut t, 9, &raw);
        bytes(graph, 5, &t);
    }

    /// A float `[N, width]` ValueInfoProto as a graph input (11) or output (12).
    fn io(graph: &mut Vec<u8>, field: u64, name: &str, width: u64) {
        let (mut batch, mut features, mut shape, mut tensor, mut ty, mut info) = Default::default();
        bytes(&mut batch, 2, b"N");
        scalar(&mut features, 1, width);
        bytes(&mut shape, 1, &batch);
        bytes(&mut shape, 1, &features);
        scalar(&mut tensor, 1, 1);
        bytes(&mut tensor, 2, &shape);
        bytes(&mut ty, 1, &tensor);
        bytes(&mut info, 1, name.as_bytes());
        bytes(&mut info, 2, &ty);
        bytes(graph, field, &info);
    }

    /// ModelProto at IR 8 with the standard opset 17 and `ai.onnx.ml` 3.
    fn model(graph: &[u8]) -> Vec<u8> {
        let mut model = Vec::new();
        scalar(&mut model, 1, 8);
        bytes(&mut model, 7, graph);
        for (domain, version) in [("", 17), ("ai.onnx.ml", 3)] {
            let mut opset = Vec::new();
            bytes(&mut opset, 1, domain.as_bytes());
            scalar(&mut opset, 2, version);
            bytes(&mut model, 8, &opset);
        }
        model
    }

    /// An MLP `dims[0]` → … → `dims[n]` (MatMul, Add, Relu per layer, no Relu on the last), x → y.
    pub fn mlp(dims: &[u64]) -> Vec<u8> {
        let (mut graph, mut input, mut noise) = (Vec::new(), "x".to_owned(), Noise(7));
        for (i, pair) in dims.windows(2).enumerate() {
            let last = i + 2 == dims.len();
            let output = if last { "y".to_owned() } else { format!("h{i}") };
            let sum = if last { output.clone() } else { format!("a{i}") };
            node(&mut graph, "MatMul", "", &[&input, &format!("w{i}")], &format!("mm{i}"), &[]);
            node(&mut graph, "Add", "", &[&format!("mm{i}"), &format!("b{i}")], &sum, &[]);
            if !last {
                node(&mut graph, "Relu", "", &[&sum], &output, &[]);
            }
            initializer(&mut graph, &format!("w{i}"), pair, &mut noise);
            initializer(&mut graph, &format!("b{i}"), &pair[1..], &mut noise);
            input = output;
        }
        io(&mut graph, 11, "x", dims[0]);
        io(&mut graph, 12, "y", dims[dims.len() - 1]);
        model(&graph)
    }

    /// AttributeProto: name = 1, i = 3, floats = 7 (packed), ints = 8 (packed), strings = 9, type = 20.
    fn attribute(name: &str, kind: u64, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut a = Vec::new();
        bytes(&mut a, 1, name.as_bytes());
        fill(&mut a);
        scalar(&mut a, 20, kind);
        a
    }
    fn ints(name: &str, values: &[u64]) -> Vec<u8> {
        attribute(name, 7, |a| {
            let mut packed = Vec::new();
            values.iter().for_each(|v| varint(&mut packed, *v));
            bytes(a, 8, &packed);
        })
    }
    fn floats(name: &str, values: &[f32]) -> Vec<u8> {
        attribute(name, 6, |a| bytes(a, 7, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()))
    }

    /// A `TreeEnsembleRegressor` of `trees` full trees of `depth` over 8 features: the kind of model
    /// whose session holds several times its file (ONNX Runtime expands the trees into tables).
    pub fn trees(trees: u64, depth: u32) -> Vec<u8> {
        let (internal, all) = ((1u64 << depth) - 1, (1u64 << (depth + 1)) - 1);
        let mut noise = Noise(11);
        let (mut tree_ids, mut node_ids, mut features, mut thresholds, mut modes, mut yes, mut no) =
            <(Vec<u64>, Vec<u64>, Vec<u64>, Vec<f32>, Vec<&str>, Vec<u64>, Vec<u64>)>::default();
        let (mut leaf_trees, mut leaf_nodes, mut weights) = <(Vec<u64>, Vec<u64>, Vec<f32>)>::default();
        for tree in 0..trees {
            for n in 0..all {
                tree_ids.push(tree);
                node_ids.push(n);
                let branch = n < internal;
                features.push(if branch { (noise.next().abs() * 16.0) as u64 % 8 } else { 0 });
                thresholds.push(if branch { noise.next() } else { 0.0 });
                modes.push(if branch { "BRANCH_LEQ" } else { "LEAF" });
                yes.push(if branch { 2 * n + 1 } else { 0 });
                no.push(if branch { 2 * n + 2 } else { 0 });
                if !branch {
                    leaf_trees.push(tree);
                    leaf_nodes.push(n);
                    weights.push(noise.next());
                }
            }
        }
        let attributes = [
            attribute("n_targets", 2, |a| scalar(a, 3, 1)),
            ints("nodes_treeids", &tree_ids),
            ints("nodes_nodeids", &node_ids),
            ints("nodes_featureids", &features),
            floats("nodes_values", &thresholds),
            attribute("nodes_modes", 8, |a| modes.iter().for_each(|m| bytes(a, 9, m.as_bytes()))),
            ints("nodes_truenodeids", &yes),
            ints("nodes_falsenodeids", &no),
            ints("target_treeids", &leaf_trees),
            ints("target_nodeids", &leaf_nodes),
            ints("target_ids", &vec![0; leaf_nodes.len()]),
            floats("target_weights", &weights),
        ];
        let mut graph = Vec::new();
        node(&mut graph, "TreeEnsembleRegressor", "ai.onnx.ml", &["x"], "y", &attributes);
        io(&mut graph, 11, "x", 8);
        io(&mut graph, 12, "y", 1);
        model(&graph)
    }
}

/// Anonymous resident bytes after handing free heap back, as the runtime reads them.
fn anonymous_resident_bytes() -> u64 {
    densemesh_runtime_ort::release_free_heap();
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux");
    let pages: Vec<u64> = statm.split_whitespace().map(|f| f.parse().unwrap()).collect();
    (pages[1] - pages[2]) * 4096
}

/// What `copies` sessions of `model`, held together, add to the process per copy, while nothing else
/// runs (after one unmeasured load, whose one-time allocations belong to no copy).
fn real_cost(model: &[u8], copies: usize) -> u64 {
    let first = runtime().load_from_memory("first", model.to_vec()).unwrap();
    let before = anonymous_resident_bytes();
    let held: Vec<_> = (0..copies)
        .map(|i| runtime().load_from_memory(&format!("held-{i}"), model.to_vec()).unwrap())
        .collect();
    let real = anonymous_resident_bytes().saturating_sub(before) / copies as u64;
    drop((first, held));
    real
}

fn charged(id: &str, model: &[u8]) -> u64 {
    runtime().load_from_memory(id, model.to_vec()).expect("the model loads").size_bytes()
}

fn assert_honest(what: &str, charged: u64, real: u64) {
    let ratio = charged as f64 / real as f64;
    assert!((0.75..=1.5).contains(&ratio), "{what}: charged {charged} bytes for a session that holds {real}");
}

#[test]
fn a_model_is_charged_the_same_while_other_threads_allocate_and_free_heavily() {
    let _serial = SERIAL.lock();
    // ~100 KB: the size whose charge moved from 233–320 KB alone to 389–430 KB under traffic.
    let model = onnx::mlp(&[128, 160, 32]);
    let busy: Arc<dyn LoadedModel> =
        runtime().load_from_memory("busy", onnx::mlp(&[16, 32, 4])).unwrap().into();
    let quiet: Vec<u64> = (0..5).map(|i| charged(&format!("quiet-{i}"), &model)).collect();
    let reference = quiet[2];
    assert_honest("a 128→160→32 MLP", reference, real_cost(&model, 16));

    // Four threads that each keep four or five buffers of 16–48 KiB alive, freed and allocated again
    // without pause, and two that run inferences on another model: enough to move the resident set
    // by hundreds of KiB between two readings, which is all a charge by measured growth would see.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(7));
    let mut noise = Vec::new();
    for t in 0..4 {
        let (stop, started) = (stop.clone(), started.clone());
        noise.push(std::thread::spawn(move || {
            let (mut live, mut random) = (Vec::<Vec<u8>>::new(), onnx::Noise(t + 1));
            started.wait();
            while !stop.load(Ordering::Relaxed) {
                let len = (16 << 10) + ((random.next() + 0.5) * (32 << 10) as f32) as usize;
                live.push(vec![t as u8; len]);
                if live.len() > 4 {
                    live.remove(((random.next() + 0.5) * 4.99) as usize);
                }
            }
        }));
    }
    for _ in 0..2 {
        let (stop, started, busy) = (stop.clone(), started.clone(), busy.clone());
        noise.push(std::thread::spawn(move || {
            let data = TensorData::Raw(bytes::Bytes::from(vec![0u8; 8 * 16 * 4]));
            let x = Tensor { name: "x".into(), datatype: DataType::Fp32, shape: vec![8, 16], data };
            started.wait();
            while !stop.load(Ordering::Relaxed) {
                busy.infer(InferRequest { inputs: vec![x.clone()], outputs: vec![] }).unwrap();
            }
        }));
    }
    started.wait();
    let under_noise: Vec<u64> = (0..20).map(|i| charged(&format!("noisy-{i}"), &model)).collect();
    stop.store(true, Ordering::Relaxed);
    noise.into_iter().for_each(|t| t.join().unwrap());

    for charge in quiet.iter().chain(&under_noise) {
        let off = (*charge as f64 / reference as f64 - 1.0).abs();
        assert!(
            off <= 0.15,
            "charged {charge} bytes against {reference} quiet: {quiet:?} then {under_noise:?}"
        );
    }
}

#[test]
fn a_model_that_holds_several_times_its_file_is_charged_what_it_holds() {
    let _serial = SERIAL.lock();
    // ~0.6 MB of attributes that ONNX Runtime turns into ~3 MB of tables: more than an estimate from
    // the file and the node count says, and more than other threads' noise could explain.
    let model = onnx::trees(300, 5);
    assert_honest("a 300-tree ensemble", charged("trees", &model), real_cost(&model, 4));
}
