//! Arithmetic on tensors: numpy broadcasting, matrix products, activations, softmax and argmax.
//! Plain loops on the calling thread: for tiny shapes they beat any library's dispatch overhead
//! (see bench/README.md, "Tiny models").

use crate::error::{TinyError, eval};
use crate::value::{Data, Value, count};

/// The elementwise binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// The elementwise unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Relu,
    Sigmoid,
    Tanh,
}

/// The shape two shapes broadcast to, numpy's rule.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, TinyError> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(eval(format!("shapes {a:?} and {b:?} do not broadcast"))),
        })
        .collect()
}

/// Strides of `shape` laid against `out` (0 where `shape` is broadcast).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let mut stride = 1;
    for i in (0..shape.len()).rev() {
        let o = i + out.len() - shape.len();
        strides[o] = if shape[i] == 1 { 0 } else { stride };
        stride *= shape[i];
    }
    strides
}

/// `f(a, b)` elementwise under broadcasting.
fn zip<T: Copy>(
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    f: impl Fn(T, T) -> T,
) -> Result<(Vec<T>, Vec<usize>), TinyError> {
    let out = broadcast_shape(ash, bsh)?;
    let n = count(&out);
    if ash == bsh {
        return Ok((a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect(), out));
    }
    // The common case: a bias row (or scalar) against a full tensor.
    if ash == out.as_slice() && out.ends_with(bsh) && !b.is_empty() {
        return Ok((a.iter().enumerate().map(|(i, x)| f(*x, b[i % b.len()])).collect(), out));
    }
    if bsh == out.as_slice() && out.ends_with(ash) && !a.is_empty() {
        return Ok((b.iter().enumerate().map(|(i, y)| f(a[i % a.len()], *y)).collect(), out));
    }
    let (sa, sb) = (broadcast_strides(ash, &out), broadcast_strides(bsh, &out));
    let mut index = vec![0usize; out.len()];
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut result = Vec::with_capacity(n);
    for _ in 0..n {
        result.push(f(a[ia], b[ib]));
        // Advance the multi-index like an odometer, keeping both offsets current.
        for d in (0..out.len()).rev() {
            index[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if index[d] < out[d] {
                break;
            }
            ia -= sa[d] * out[d];
            ib -= sb[d] * out[d];
            index[d] = 0;
        }
    }
    Ok((result, out))
}

pub(crate) fn binary(op: Binary, a: &Value, b: &Value) -> Result<Value, TinyError> {
    macro_rules! apply {
        ($x:expr, $y:expr, $variant:ident, $div:expr) => {{
            let (v, shape) = match op {
                Binary::Add => zip($x, &a.shape, $y, &b.shape, |p, q| p + q)?,
                Binary::Sub => zip($x, &a.shape, $y, &b.shape, |p, q| p - q)?,
                Binary::Mul => zip($x, &a.shape, $y, &b.shape, |p, q| p * q)?,
                Binary::Div => zip($x, &a.shape, $y, &b.shape, $div)?,
            };
            Ok(Value::new(shape, Data::$variant(v)))
        }};
    }
    match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => apply!(x, y, F32, |p, q| p / q),
        (Data::F64(x), Data::F64(y)) => apply!(x, y, F64, |p, q| p / q),
        // Integer division by zero is undefined in ONNX; 0 here rather than a panic.
        (Data::I64(x), Data::I64(y)) => apply!(x, y, I64, |p: i64, q: i64| p.checked_div(q).unwrap_or(0)),
        (Data::I32(x), Data::I32(y)) => apply!(x, y, I32, |p: i32, q: i32| p.checked_div(q).unwrap_or(0)),
        (x, y) => Err(eval(format!("{op:?} of {:?} and {:?}", x.elem(), y.elem()))),
    }
}

pub(crate) fn unary(op: Unary, x: &Value) -> Result<Value, TinyError> {
    macro_rules! apply {
        ($v:expr, $variant:ident, $t:ty) => {{
            let f: fn($t) -> $t = match op {
                Unary::Relu => |x| if x > 0.0 { x } else { 0.0 },
                Unary::Sigmoid => |x| 1.0 / (1.0 + (-x).exp()),
                Unary::Tanh => |x| x.tanh(),
            };
            Ok(Value::new(x.shape.clone(), Data::$variant($v.iter().map(|x| f(*x)).collect())))
        }};
    }
    match &x.data {
        Data::F32(v) => apply!(v, F32, f32),
        Data::F64(v) => apply!(v, F64, f64),
        other => Err(eval(format!("{op:?} of {:?}", other.elem()))),
    }
}

/// `out[m×n] += a[m×k] · b[k×n]`, row-major, summing over `k` in order.
fn matmul_into<T: Copy + std::ops::Mul<Output = T> + std::ops::AddAssign>(
    a: &[T],
    b: &[T],
    out: &mut [T],
    m: usize,
    k: usize,
    n: usize,
) {
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        for p in 0..k {
            let x = a[i * k + p];
            for (o, y) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o += x * *y;
            }
        }
    }
}

/// numpy's `matmul`: 1-D operands are promoted and the promoted axis dropped; batch axes broadcast.
pub(crate) fn matmul(a: &Value, b: &Value) -> Result<Value, TinyError> {
    let (mut ash, mut bsh) = (a.shape.clone(), b.shape.clone());
    if ash.is_empty() || bsh.is_empty() {
        return Err(eval("MatMul of a scalar"));
    }
    let (a_vec, b_vec) = (ash.len() == 1, bsh.len() == 1);
    if a_vec {
        ash.insert(0, 1);
    }
    if b_vec {
        bsh.push(1);
    }
    let (m, k, k2, n) = (ash[ash.len() - 2], ash[ash.len() - 1], bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return Err(eval(format!("MatMul of shapes {:?} and {:?}", a.shape, b.shape)));
    }
    let batch = broadcast_shape(&ash[..ash.len() - 2], &bsh[..bsh.len() - 2])?;
    let batches = count(&batch);
    let (sa, sb) =
        (broadcast_strides(&ash[..ash.len() - 2], &batch), broadcast_strides(&bsh[..bsh.len() - 2], &batch));
    let offset = |strides: &[usize], mut flat: usize| {
        let mut at = 0;
        for d in (0..batch.len()).rev() {
            at += (flat % batch[d]) * strides[d];
            flat /= batch[d];
        }
        at
    };
    let mut shape = batch.clone();
    if !a_vec {
        shape.push(m);
    }
    if !b_vec {
        shape.push(n);
    }
    macro_rules! run {
        ($x:expr, $y:expr, $variant:ident) => {{
            let mut out = vec![Default::default(); batches * m * n];
            for t in 0..batches {
                let (oa, ob) = (offset(&sa, t) * m * k, offset(&sb, t) * k * n);
                matmul_into(
                    &$x[oa..oa + m * k],
                    &$y[ob..ob + k * n],
                    &mut out[t * m * n..(t + 1) * m * n],
                    m,
                    k,
                    n,
                );
            }
            Ok(Value::new(shape, Data::$variant(out)))
        }};
    }
    match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => run!(x, y, F32),
        (Data::F64(x), Data::F64(y)) => run!(x, y, F64),
        (x, y) => Err(eval(format!("MatMul of {:?} and {:?}", x.elem(), y.elem()))),
    }
}

/// Gemm's attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// `alpha · A' · B' + beta · C`, C broadcast to the result (and optional).
pub(crate) fn gemm(g: &Gemm, a: &Value, b: &Value, c: Option<&Value>) -> Result<Value, TinyError> {
    let [ar, ac] = two_d(&a.shape, "A")?;
    let [br, bc] = two_d(&b.shape, "B")?;
    let (m, k) = if g.trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if g.trans_b { (bc, br) } else { (br, bc) };
    if k != k2 {
        return Err(eval(format!("Gemm of shapes {:?} and {:?}", a.shape, b.shape)));
    }
    macro_rules! run {
        ($x:expr, $y:expr, $variant:ident, $t:ty) => {{
            let (alpha, beta) = (g.alpha as $t, g.beta as $t);
            // Products into a zeroed buffer in the layout `matmul_into` wants, transposing first.
            let at: Vec<$t>;
            let a_rows: &[$t] = if g.trans_a {
                at = transpose($x, ar, ac);
                &at
            } else {
                $x
            };
            let bt: Vec<$t>;
            let b_rows: &[$t] = if g.trans_b {
                bt = transpose($y, br, bc);
                &bt
            } else {
                $y
            };
            let mut out = vec![0 as $t; m * n];
            matmul_into(a_rows, b_rows, &mut out, m, k, n);
            if alpha != 1.0 {
                out.iter_mut().for_each(|o| *o *= alpha);
            }
            if let Some(c) = c {
                let Data::$variant(cv) = &c.data else {
                    return Err(eval(format!("Gemm's C is {:?}", c.elem())));
                };
                if broadcast_shape(&[m, n], &c.shape)? != [m, n] {
                    return Err(eval(format!(
                        "Gemm's C of shape {:?} does not broadcast to [{m}, {n}]",
                        c.shape
                    )));
                }
                out = zip(&out, &[m, n], cv, &c.shape, |o, c| o + beta * c)?.0;
            }
            Ok(Value::new(vec![m, n], Data::$variant(out)))
        }};
    }
    match (&a.data, &b.data) {
        (Data::F32(x), Data::F32(y)) => run!(x, y, F32, f32),
        (Data::F64(x), Data::F64(y)) => run!(x, y, F64, f64),
        (x, y) => Err(eval(format!("Gemm of {:?} and {:?}", x.elem(), y.elem()))),
    }
}

fn two_d(shape: &[usize], what: &str) -> Result<[usize; 2], TinyError> {
    match shape {
        [r, c] => Ok([*r, *c]),
        _ => Err(eval(format!("Gemm's {what} has shape {shape:?}, not 2-D"))),
    }
}

fn transpose<T: Copy>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for c in 0..cols {
        for r in 0..rows {
            out.push(x[r * cols + c]);
        }
    }
    out
}

/// A normalised axis in `0..rank`.
pub(crate) fn axis(axis: i64, rank: usize) -> Result<usize, TinyError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|a| *a < rank.max(1))
        .ok_or_else(|| eval(format!("axis {axis} out of range for rank {rank}")))
}

/// Softmax over `axis`; before opset 13 over every axis from `axis` on (the input seen as 2-D).
pub(crate) fn softmax(x: &Value, axis_attr: i64, legacy: bool) -> Result<Value, TinyError> {
    let a = axis(axis_attr, x.shape.len())?;
    let outer: usize = x.shape[..a].iter().product();
    let (len, inner) = if legacy {
        (x.shape[a..].iter().product(), 1)
    } else {
        (x.shape.get(a).copied().unwrap_or(1), x.shape[(a + 1).min(x.shape.len())..].iter().product())
    };
    macro_rules! run {
        ($v:expr, $variant:ident, $t:ty) => {{
            let mut out = $v.clone();
            for o in 0..outer {
                for i in 0..inner {
                    let at = |j: usize| o * len * inner + j * inner + i;
                    let max = (0..len).map(|j| out[at(j)]).fold(<$t>::NEG_INFINITY, <$t>::max);
                    let mut sum = 0.0;
                    for j in 0..len {
                        let e = (out[at(j)] - max).exp();
                        out[at(j)] = e;
                        sum += e;
                    }
                    for j in 0..len {
                        out[at(j)] /= sum;
                    }
                }
            }
            Ok(Value::new(x.shape.clone(), Data::$variant(out)))
        }};
    }
    match &x.data {
        Data::F32(v) => run!(v, F32, f32),
        Data::F64(v) => run!(v, F64, f64),
        other => Err(eval(format!("Softmax of {:?}", other.elem()))),
    }
}

/// Index of the largest element along `axis`: the first on ties, or the last with `select_last`.
pub(crate) fn argmax(
    x: &Value,
    axis_attr: i64,
    keepdims: bool,
    select_last: bool,
) -> Result<Value, TinyError> {
    let a = axis(axis_attr, x.shape.len())?;
    let len = *x.shape.get(a).ok_or_else(|| eval("ArgMax of a scalar"))?;
    if len == 0 {
        return Err(eval("ArgMax over an empty axis"));
    }
    let outer: usize = x.shape[..a].iter().product();
    let inner: usize = x.shape[a + 1..].iter().product();
    let values = x.to_f64_for_compare()?;
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for j in 1..len {
                let (v, b) =
                    (values[o * len * inner + j * inner + i], values[o * len * inner + best * inner + i]);
                if v > b || (select_last && v == b) {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    let mut shape = x.shape.clone();
    if keepdims {
        shape[a] = 1;
    } else {
        shape.remove(a);
    }
    Ok(Value::new(shape, Data::I64(out)))
}

impl Value {
    /// Numeric elements widened to `f64`, which orders every supported type exactly.
    fn to_f64_for_compare(&self) -> Result<Vec<f64>, TinyError> {
        Ok(match &self.data {
            Data::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Data::F64(v) => v.clone(),
            Data::I64(v) => v.iter().map(|x| *x as f64).collect(),
            Data::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            other => return Err(eval(format!("ArgMax of {:?}", other.elem()))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(shape: &[usize], v: &[f32]) -> Value {
        Value::new(shape.to_vec(), Data::F32(v.to_vec()))
    }

    #[test]
    fn broadcasting_follows_numpy() {
        let a = f32s(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = f32s(&[2, 1], &[10., 20.]);
        let sum = binary(Binary::Add, &a, &b).unwrap();
        assert_eq!(sum.shape, vec![2, 2, 3]);
        assert_eq!(sum.data, Data::F32(vec![11., 12., 13., 21., 22., 23., 14., 15., 16., 24., 25., 26.]));
        let row = binary(Binary::Sub, &f32s(&[2, 2], &[1., 2., 3., 4.]), &f32s(&[2], &[1., 1.])).unwrap();
        assert_eq!(row.data, Data::F32(vec![0., 1., 2., 3.]));
        assert!(binary(Binary::Add, &f32s(&[2], &[1., 2.]), &f32s(&[3], &[1., 2., 3.])).is_err());
    }

    #[test]
    fn matmul_and_gemm_agree_with_hand_results() {
        let a = f32s(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = f32s(&[3, 2], &[1., 0., 0., 1., 1., 1.]);
        assert_eq!(matmul(&a, &b).unwrap().data, Data::F32(vec![4., 5., 10., 11.]));
        let v = matmul(&f32s(&[3], &[1., 1., 1.]), &b).unwrap();
        assert_eq!((v.shape, v.data), (vec![2], Data::F32(vec![2., 2.])));
        let g = Gemm { alpha: 2.0, beta: 0.5, trans_a: true, trans_b: false };
        let at = f32s(&[3, 2], &[1., 4., 2., 5., 3., 6.]);
        let c = f32s(&[2], &[2., 4.]);
        assert_eq!(gemm(&g, &at, &b, Some(&c)).unwrap().data, Data::F32(vec![9., 12., 21., 24.]));
        assert!(gemm(&g, &a, &b, None).is_err(), "A' is 3×2 against B 3×2");
    }

    #[test]
    fn softmax_and_argmax_over_an_axis() {
        let x = f32s(&[2, 2], &[0., 0., 1., 3.]);
        let Data::F32(s) = softmax(&x, -1, false).unwrap().data else { panic!() };
        assert!((s[0] - 0.5).abs() < 1e-7 && (s[3] - 0.880_797).abs() < 1e-6);
        let m = argmax(&f32s(&[2, 3], &[1., 3., 3., 2., 1., 0.]), 1, false, false).unwrap();
        assert_eq!((m.shape, m.data), (vec![2], Data::I64(vec![1, 0])));
        let last = argmax(&f32s(&[1, 3], &[1., 3., 3.]), -1, true, true).unwrap();
        assert_eq!((last.shape, last.data), (vec![1, 1], Data::I64(vec![2])));
    }
}
