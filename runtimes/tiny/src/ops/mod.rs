//! The operators the evaluator implements, parsed from a node once at load, type-checked against
//! their inputs' element types at load, and run on values.
//!
//! Standard domain (opsets 7–21): `Add`, `Sub`, `Mul`, `Div`, `MatMul`, `Gemm` (with or without C),
//! `Relu`, `Sigmoid`, `Tanh`, `Softmax` (both the pre-13 and the 13+ reading of `axis`), `Identity`,
//! `Reshape`, `Flatten`, `Squeeze`, `Unsqueeze` (axes as attribute before 13, as input from 13),
//! `Cast`, `ArgMax`, `Concat`, and `Constant` (folded into an initializer at load).
//! `ai.onnx.ml` (opsets 1–4): `LinearClassifier`, `LinearRegressor`, `Normalizer`, `Scaler`,
//! `TreeEnsembleClassifier`, `TreeEnsembleRegressor`. `ZipMap` is refused: its output is a sequence of
//! maps, which the V2 protocol cannot carry; convert scikit-learn classifiers with
//! `options={'zipmap': False}`, as ONNX Runtime's path requires too.

pub(crate) mod math;
pub(crate) mod ml;
pub(crate) mod shape;
pub(crate) mod trees;

use crate::error::{TinyError, eval, unsupported};
use crate::heap::HeapSize;
use crate::onnx::{Attributes, NodeProto};
use crate::value::{Elem, Value};

pub use math::{Binary, Gemm, Unary};
pub use ml::{LinearClassifier, LinearRegressor, Norm, Scaler};
pub use trees::TreeEnsemble;

/// The standard-domain opsets the evaluator reads correctly.
pub const STANDARD_OPSETS: std::ops::RangeInclusive<i64> = 7..=21;
/// The `ai.onnx.ml` opsets the evaluator reads correctly (5 deprecates the tree ensembles used here).
pub const ML_OPSETS: std::ops::RangeInclusive<i64> = 1..=4;

/// One parsed operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Binary(Binary),
    Unary(Unary),
    MatMul,
    Gemm(Gemm),
    Softmax {
        axis: i64,
        legacy: bool,
    },
    Identity,
    /// `allow_zero`: a 0 in the shape means 0, not "copy".
    Reshape {
        allow_zero: bool,
    },
    Flatten {
        axis: i64,
    },
    /// `None`: axes come from the second input (opset 13+), or squeeze every 1.
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Cast {
        to: Elem,
    },
    ArgMax {
        axis: i64,
        keepdims: bool,
        select_last: bool,
    },
    Concat {
        axis: i64,
    },
    LinearClassifier(Box<LinearClassifier>),
    LinearRegressor(Box<LinearRegressor>),
    Normalizer(Norm),
    Scaler(Box<Scaler>),
    TreeEnsemble(Box<TreeEnsemble>),
}

impl HeapSize for Op {
    fn heap_bytes(&self) -> u64 {
        let boxed = |inner: u64, size: usize| crate::heap::chunk(size) + inner;
        match self {
            Op::Squeeze { axes } | Op::Unsqueeze { axes } => axes.as_ref().map_or(0, HeapSize::heap_bytes),
            Op::LinearClassifier(c) => boxed(c.heap_bytes(), std::mem::size_of::<LinearClassifier>()),
            Op::LinearRegressor(r) => boxed(r.heap_bytes(), std::mem::size_of::<LinearRegressor>()),
            Op::Scaler(s) => boxed(s.heap_bytes(), std::mem::size_of::<Scaler>()),
            Op::TreeEnsemble(t) => boxed(t.heap_bytes(), std::mem::size_of::<TreeEnsemble>()),
            _ => 0,
        }
    }
}

impl Op {
    /// Parses `node` given the opset its domain is imported at; anything not implemented, or not
    /// implemented at that opset, is [`TinyError::Unsupported`] naming the operator.
    pub(crate) fn parse(node: &NodeProto, opset: i64) -> Result<Op, TinyError> {
        let a = Attributes::of(node);
        let op = node.op_type();
        let refuse = || unsupported(format!("operator {op} (domain {:?}, opset {opset})", node.domain()));
        Ok(match node.domain() {
            "" | "ai.onnx" => match op {
                "Add" => Op::Binary(Binary::Add),
                "Sub" => Op::Binary(Binary::Sub),
                "Mul" => Op::Binary(Binary::Mul),
                "Div" => Op::Binary(Binary::Div),
                "Relu" => Op::Unary(Unary::Relu),
                "Sigmoid" => Op::Unary(Unary::Sigmoid),
                "Tanh" => Op::Unary(Unary::Tanh),
                "MatMul" => Op::MatMul,
                "Gemm" => Op::Gemm(Gemm {
                    alpha: a.float("alpha", 1.0),
                    beta: a.float("beta", 1.0),
                    trans_a: a.int("transA", 0) != 0,
                    trans_b: a.int("transB", 0) != 0,
                }),
                "Softmax" => {
                    let legacy = opset < 13;
                    Op::Softmax { axis: a.int("axis", if legacy { 1 } else { -1 }), legacy }
                }
                "Identity" => Op::Identity,
                "Reshape" => Op::Reshape { allow_zero: a.int("allowzero", 0) != 0 },
                "Flatten" => Op::Flatten { axis: a.int("axis", 1) },
                "Squeeze" => Op::Squeeze { axes: (opset < 13 && a.has("axes")).then(|| a.ints("axes")) },
                "Unsqueeze" if opset < 13 => Op::Unsqueeze { axes: Some(a.ints("axes")) },
                "Unsqueeze" => Op::Unsqueeze { axes: None },
                "Cast" => {
                    let to = a.int("to", 0);
                    match i32::try_from(to).ok().and_then(Elem::from_onnx) {
                        Some(to @ (Elem::F32 | Elem::F64 | Elem::I64 | Elem::I32)) => Op::Cast { to },
                        _ => return Err(unsupported(format!("Cast to element type {to}"))),
                    }
                }
                "ArgMax" => Op::ArgMax {
                    axis: a.int("axis", 0),
                    keepdims: a.int("keepdims", 1) != 0,
                    select_last: a.int("select_last_index", 0) != 0,
                },
                "Concat" => Op::Concat {
                    axis: if a.has("axis") { a.int("axis", 0) } else { return Err(a.missing("axis")) },
                },
                _ => return Err(refuse()),
            },
            "ai.onnx.ml" => match op {
                "LinearClassifier" => Op::LinearClassifier(Box::new(LinearClassifier::parse(&a)?)),
                "LinearRegressor" => Op::LinearRegressor(Box::new(LinearRegressor::parse(&a)?)),
                "Normalizer" => Op::Normalizer(Norm::parse(&a)?),
                "Scaler" => Op::Scaler(Box::new(Scaler::parse(&a)?)),
                "TreeEnsembleClassifier" => Op::TreeEnsemble(Box::new(TreeEnsemble::parse(&a, true)?)),
                "TreeEnsembleRegressor" => Op::TreeEnsemble(Box::new(TreeEnsemble::parse(&a, false)?)),
                "ZipMap" => {
                    return Err(unsupported(
                        "operator ZipMap (its output is a sequence of maps; convert with options={'zipmap': False})",
                    ));
                }
                _ => return Err(refuse()),
            },
            _ => return Err(refuse()),
        })
    }

    /// The element types of this operator's outputs given its inputs' (`None` for an omitted
    /// optional input); an input type it does not compute with is [`TinyError::Unsupported`].
    pub(crate) fn output_types(&self, name: &str, inputs: &[Option<Elem>]) -> Result<Vec<Elem>, TinyError> {
        let refuse = |why: String| unsupported(format!("{name}: {why}"));
        let first = inputs.first().copied().flatten().ok_or_else(|| refuse("no first input".into()))?;
        let numeric = |e: Elem| matches!(e, Elem::F32 | Elem::F64 | Elem::I64 | Elem::I32);
        let float = |e: Elem| matches!(e, Elem::F32 | Elem::F64);
        let need =
            |ok: bool, what: &str| if ok { Ok(()) } else { Err(refuse(format!("{what}, got {inputs:?}"))) };
        let same = inputs.iter().flatten().all(|e| *e == first);
        let label = |string: bool| if string { Elem::Str } else { Elem::I64 };
        Ok(match self {
            Op::Binary(_) => {
                need(inputs.len() == 2 && same && numeric(first), "two inputs of one numeric type")?;
                vec![first]
            }
            Op::Unary(_) | Op::Softmax { .. } => {
                need(float(first), "a float input")?;
                vec![first]
            }
            Op::MatMul | Op::Gemm(_) => {
                need(inputs.len() >= 2 && same && float(first), "float inputs of one type")?;
                vec![first]
            }
            Op::Identity
            | Op::Flatten { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Reshape { .. } => {
                let index_ok =
                    inputs.get(1).copied().flatten().is_none_or(|e| matches!(e, Elem::I64 | Elem::I32));
                need(index_ok, "an integer shape or axes input")?;
                vec![first]
            }
            Op::Cast { to } => {
                need(numeric(first), "a numeric input")?;
                vec![*to]
            }
            Op::ArgMax { .. } => {
                need(numeric(first), "a numeric input")?;
                vec![Elem::I64]
            }
            Op::Concat { .. } => {
                need(same && !matches!(first, Elem::Other(_)), "inputs of one computed type")?;
                vec![first]
            }
            Op::LinearClassifier(c) => {
                need(numeric(first), "a numeric input")?;
                vec![label(c.label_is_string()), Elem::F32]
            }
            Op::TreeEnsemble(t) => {
                need(numeric(first), "a numeric input")?;
                match t.label_is_string() {
                    _ if t.is_regressor() => vec![Elem::F32],
                    string => vec![label(string), Elem::F32],
                }
            }
            Op::LinearRegressor(_) | Op::Normalizer(_) | Op::Scaler(_) => {
                need(numeric(first), "a numeric input")?;
                vec![Elem::F32]
            }
        })
    }

    /// Runs the operator; `inputs` as the node lists them (`None` where an optional one is omitted).
    pub(crate) fn run(&self, inputs: &[Option<&Value>]) -> Result<Vec<Value>, TinyError> {
        let arg =
            |i: usize| inputs.get(i).copied().flatten().ok_or_else(|| eval(format!("input {i} is missing")));
        let x = arg(0)?;
        let one = |v: Value| Ok(vec![v]);
        match self {
            Op::Binary(op) => one(math::binary(*op, x, arg(1)?)?),
            Op::Unary(op) => one(math::unary(*op, x)?),
            Op::MatMul => one(math::matmul(x, arg(1)?)?),
            Op::Gemm(g) => one(math::gemm(g, x, arg(1)?, inputs.get(2).copied().flatten())?),
            Op::Softmax { axis, legacy } => one(math::softmax(x, *axis, *legacy)?),
            Op::Identity => one(x.clone()),
            Op::Reshape { allow_zero } => one(shape::reshape(x, &arg(1)?.to_i64()?, *allow_zero)?),
            Op::Flatten { axis } => one(shape::flatten(x, *axis)?),
            Op::Squeeze { axes: Some(axes) } => one(shape::squeeze(x, Some(axes))?),
            Op::Squeeze { axes: None } => match inputs.get(1).copied().flatten() {
                Some(axes) => one(shape::squeeze(x, Some(&axes.to_i64()?))?),
                None => one(shape::squeeze(x, None)?),
            },
            Op::Unsqueeze { axes: Some(axes) } => one(shape::unsqueeze(x, axes)?),
            Op::Unsqueeze { axes: None } => one(shape::unsqueeze(x, &arg(1)?.to_i64()?)?),
            Op::Cast { to } => one(shape::cast(x, *to)?),
            Op::ArgMax { axis, keepdims, select_last } => {
                one(math::argmax(x, *axis, *keepdims, *select_last)?)
            }
            Op::Concat { axis } => {
                let all: Vec<&Value> = inputs.iter().flatten().copied().collect();
                one(shape::concat(&all, *axis)?)
            }
            Op::LinearClassifier(c) => c.run(x),
            Op::LinearRegressor(r) => one(r.run(x)?),
            Op::Normalizer(n) => one(n.run(x)?),
            Op::Scaler(s) => one(s.run(x)?),
            Op::TreeEnsemble(t) => t.run(x),
        }
    }
}
