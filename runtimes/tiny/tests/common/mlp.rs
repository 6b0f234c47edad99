//! ONNX MLPs written byte by byte (field numbers from onnx.proto), so the accounting test and the
//! density bench can make thousands of distinct models without Python or a protobuf library.

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

/// A pseudo-random sequence in [-0.5, 0.5), so every model has its own weights.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// NodeProto: input = 1, output = 2, op_type = 4.
fn node(graph: &mut Vec<u8>, op: &str, inputs: &[&str], output: &str) {
    let mut n = Vec::new();
    inputs.iter().for_each(|i| bytes(&mut n, 1, i.as_bytes()));
    bytes(&mut n, 2, output.as_bytes());
    bytes(&mut n, 4, op.as_bytes());
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

/// An MLP `dims[0]` → … → `dims[n]` (MatMul, Add, Relu per layer, no Relu after the last), x → y,
/// at IR 8 and opset 17, with weights drawn from `seed`.
pub fn mlp(dims: &[u64], seed: u64) -> Vec<u8> {
    let (mut graph, mut input, mut noise) = (Vec::new(), "x".to_owned(), Noise(seed));
    for (i, pair) in dims.windows(2).enumerate() {
        let last = i + 2 == dims.len();
        let output = if last { "y".to_owned() } else { format!("h{i}") };
        let sum = if last { output.clone() } else { format!("a{i}") };
        node(&mut graph, "MatMul", &[&input, &format!("w{i}")], &format!("mm{i}"));
        node(&mut graph, "Add", &[&format!("mm{i}"), &format!("b{i}")], &sum);
        if !last {
            node(&mut graph, "Relu", &[&sum], &output);
        }
        initializer(&mut graph, &format!("w{i}"), pair, &mut noise);
        initializer(&mut graph, &format!("b{i}"), &pair[1..], &mut noise);
        input = output;
    }
    io(&mut graph, 11, "x", dims[0]);
    io(&mut graph, 12, "y", dims[dims.len() - 1]);
    let mut model = Vec::new();
    scalar(&mut model, 1, 8);
    bytes(&mut model, 7, &graph);
    let mut opset = Vec::new();
    bytes(&mut opset, 1, b"");
    scalar(&mut opset, 2, 17);
    bytes(&mut model, 8, &opset);
    model
}

/// A `[rows, width]` FP32 request tensor named `x` of values from `seed`.
pub fn input(rows: usize, width: usize, seed: u64) -> densemesh_runtime_core::Tensor {
    let mut noise = Noise(seed);
    let raw: Vec<u8> = (0..rows * width).flat_map(|_| noise.next().to_le_bytes()).collect();
    densemesh_runtime_core::Tensor {
        name: "x".into(),
        datatype: densemesh_runtime_core::DataType::Fp32,
        shape: vec![rows as i64, width as i64],
        data: densemesh_runtime_core::TensorData::Raw(bytes::Bytes::from(raw)),
    }
}

/// A one-node model `y = op(x)` of `[N, 4]` floats, the node's domain imported at `opset`.
pub fn single_node(op: &str, domain: &str, opset: u64) -> Vec<u8> {
    let mut graph = Vec::new();
    let mut n = Vec::new();
    bytes(&mut n, 1, b"x");
    bytes(&mut n, 2, b"y");
    bytes(&mut n, 4, op.as_bytes());
    bytes(&mut n, 7, domain.as_bytes());
    bytes(&mut graph, 1, &n);
    io(&mut graph, 11, "x", 4);
    io(&mut graph, 12, "y", 4);
    let mut model = Vec::new();
    scalar(&mut model, 1, 8);
    bytes(&mut model, 7, &graph);
    let mut import = Vec::new();
    bytes(&mut import, 1, domain.as_bytes());
    scalar(&mut import, 2, opset);
    bytes(&mut model, 8, &import);
    model
}
