//! The `ai.onnx.ml` operators skl2onnx emits for linear models and scalers, computed as ONNX Runtime
//! computes them (its `ml_common.h`), binary-class quirks included, so labels and scores match.

use bytes::Bytes;

use crate::error::{TinyError, eval, invalid, unsupported};
use crate::heap::HeapSize;
use crate::onnx::Attributes;
use crate::value::{Data, Value};

/// What is applied to raw scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl PostTransform {
    pub(crate) fn parse(attrs: &Attributes<'_>) -> Result<Self, TinyError> {
        Ok(match attrs.string("post_transform", "NONE").as_str() {
            "NONE" => PostTransform::None,
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX" => PostTransform::Softmax,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            "PROBIT" => PostTransform::Probit,
            other => return Err(invalid(format!("post_transform {other}"))),
        })
    }
}

pub(crate) fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 { 1.0 - v } else { v }
}

/// ONNX Runtime's approximation of the inverse error function, kept so probit scores agree.
fn erf_inv(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    sign * (-v + (v * v - v2).sqrt()).sqrt()
}

pub(crate) fn probit(x: f32) -> f32 {
    std::f32::consts::SQRT_2 * erf_inv(2.0 * x - 1.0)
}

pub(crate) fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(-f32::MAX, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

/// Softmax that leaves (near-)zero scores at zero.
pub(crate) fn softmax_zero_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(-f32::MAX, f32::max);
    let exp_neg_max = (-max).exp();
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        if *s > 0.000_000_1 || *s < -0.000_000_1 {
            *s = (*s - max).exp();
            sum += *s;
        } else {
            *s *= exp_neg_max;
        }
    }
    scores.iter_mut().for_each(|s| *s /= sum);
}

/// ONNX Runtime's `write_scores`: the transform over a row of two or more scores; a single score
/// becomes two by `second` (0 or 1: `1 - s, s`; 2 or 3: `-s, s` or their logistic; `None`: as is).
pub(crate) fn write_scores(scores: &mut Vec<f32>, post: PostTransform, second: Option<u8>) {
    if scores.len() >= 2 {
        match post {
            PostTransform::None => {}
            PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
            PostTransform::Softmax => softmax_in_place(scores),
            PostTransform::SoftmaxZero => softmax_zero_in_place(scores),
            PostTransform::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
        }
    } else if let [s] = scores[..] {
        if post == PostTransform::Probit {
            scores[0] = probit(s);
            return;
        }
        match second {
            Some(0 | 1) => *scores = vec![1.0 - s, s],
            Some(2 | 3) if post == PostTransform::Logistic => *scores = vec![logistic(-s), logistic(s)],
            Some(2 | 3) => *scores = vec![-s, s],
            _ => {}
        }
    }
}

/// Rows and columns of a 1-D (one row) or 2-D input.
fn rows_cols(x: &Value, op: &str) -> Result<(usize, usize), TinyError> {
    match x.shape[..] {
        [c] => Ok((1, c)),
        [r, c] => Ok((r, c)),
        _ => Err(eval(format!("{op} takes a 1-D or 2-D input, got shape {:?}", x.shape))),
    }
}

/// `x · coefficientsᵀ + intercepts`, row by row.
fn scores(
    x: &[f32],
    rows: usize,
    cols: usize,
    coefficients: &[f32],
    intercepts: &[f32],
    targets: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * targets);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        for t in 0..targets {
            let w = &coefficients[t * cols..(t + 1) * cols];
            let dot: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum();
            out.push(dot + intercepts.get(t).copied().unwrap_or(0.0));
        }
    }
    out
}

/// Class labels: integers or strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    Ints(Vec<i64>),
    Strings(Vec<Bytes>),
}

impl Labels {
    pub(crate) fn parse(attrs: &Attributes<'_>, ints: &str, strings: &str) -> Labels {
        let s = attrs.strings(strings);
        if s.is_empty() { Labels::Ints(attrs.ints(ints)) } else { Labels::Strings(s) }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Labels::Ints(v) => v.len(),
            Labels::Strings(v) => v.len(),
        }
    }

    /// The labels at `indices` as a tensor of `shape`.
    pub(crate) fn pick(&self, indices: &[usize]) -> Data {
        match self {
            Labels::Ints(v) => Data::I64(indices.iter().map(|i| v.get(*i).copied().unwrap_or(0)).collect()),
            Labels::Strings(v) => {
                Data::Str(indices.iter().map(|i| v.get(*i).cloned().unwrap_or_default()).collect())
            }
        }
    }
}

impl HeapSize for Labels {
    fn heap_bytes(&self) -> u64 {
        match self {
            Labels::Ints(v) => v.heap_bytes(),
            Labels::Strings(v) => v.heap_bytes(),
        }
    }
}

/// `LinearClassifier`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearClassifier {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    labels: Labels,
    post: PostTransform,
}

impl LinearClassifier {
    pub(crate) fn parse(attrs: &Attributes<'_>) -> Result<Self, TinyError> {
        let coefficients = attrs.floats("coefficients");
        let intercepts = attrs.floats("intercepts");
        if coefficients.is_empty() {
            return Err(attrs.missing("coefficients"));
        }
        let labels = Labels::parse(attrs, "classlabels_ints", "classlabels_strings");
        // ONNX Runtime counts classes by intercepts; without them the scores are undefined.
        if intercepts.is_empty() || !coefficients.len().is_multiple_of(intercepts.len()) {
            return Err(invalid(format!(
                "LinearClassifier with {} coefficients and {} intercepts",
                coefficients.len(),
                intercepts.len()
            )));
        }
        if intercepts.len() > 1 && labels.len() < intercepts.len() {
            return Err(invalid(format!(
                "LinearClassifier with {} classes and {} labels",
                intercepts.len(),
                labels.len()
            )));
        }
        Ok(Self { coefficients, intercepts, labels, post: PostTransform::parse(attrs)? })
    }

    pub(crate) fn label_is_string(&self) -> bool {
        matches!(self.labels, Labels::Strings(_))
    }

    pub(crate) fn run(&self, x: &Value) -> Result<Vec<Value>, TinyError> {
        let (rows, cols) = rows_cols(x, "LinearClassifier")?;
        let classes = self.intercepts.len();
        if cols * classes != self.coefficients.len() {
            return Err(eval(format!(
                "LinearClassifier has {} coefficients for {cols} features",
                self.coefficients.len()
            )));
        }
        let raw = scores(&x.to_f32()?, rows, cols, &self.coefficients, &self.intercepts, classes);
        let add_second = classes == 1 && self.labels.len() == 2;
        let (mut labels, mut z) = (Vec::with_capacity(rows), Vec::with_capacity(rows * classes.max(2)));
        for row in raw.chunks(classes) {
            if classes == 1 {
                // Only the positive score: its sign picks the label (the second of two, else 1 / 0).
                labels.push(usize::from(row[0] > 0.0));
            } else {
                let best =
                    row.iter().enumerate().fold(0, |best, (j, s)| if *s > row[best] { j } else { best });
                labels.push(best);
            }
            let mut scores = row.to_vec();
            write_scores(&mut scores, self.post, add_second.then_some(1));
            z.extend_from_slice(&scores);
        }
        let label = if classes == 1 && self.labels.len() != 2 {
            // No two labels to choose from: ONNX Runtime answers 1 or 0 (or "1" / "0").
            match &self.labels {
                Labels::Ints(_) => Data::I64(labels.iter().map(|l| *l as i64).collect()),
                Labels::Strings(_) => Data::Str(labels.iter().map(|l| Bytes::from(l.to_string())).collect()),
            }
        } else {
            self.labels.pick(&labels)
        };
        let width = z.len() / rows.max(1);
        Ok(vec![Value::new(vec![rows], label), Value::new(vec![rows, width], Data::F32(z))])
    }
}

impl HeapSize for LinearClassifier {
    fn heap_bytes(&self) -> u64 {
        self.coefficients.heap_bytes() + self.intercepts.heap_bytes() + self.labels.heap_bytes()
    }
}

/// `LinearRegressor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearRegressor {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    targets: usize,
    post: PostTransform,
}

impl LinearRegressor {
    pub(crate) fn parse(attrs: &Attributes<'_>) -> Result<Self, TinyError> {
        let coefficients = attrs.floats("coefficients");
        let targets = usize::try_from(attrs.int("targets", 1))
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| invalid("LinearRegressor targets < 1"))?;
        let intercepts = attrs.floats("intercepts");
        if !coefficients.len().is_multiple_of(targets)
            || !(intercepts.is_empty() || intercepts.len() == targets)
        {
            return Err(invalid(format!(
                "LinearRegressor with {} coefficients, {} intercepts for {targets} targets",
                coefficients.len(),
                intercepts.len()
            )));
        }
        let post = PostTransform::parse(attrs)?;
        if post != PostTransform::None && post != PostTransform::Probit {
            return Err(unsupported(format!("LinearRegressor post_transform {post:?}")));
        }
        Ok(Self { coefficients, intercepts, targets, post })
    }

    pub(crate) fn run(&self, x: &Value) -> Result<Value, TinyError> {
        let (rows, cols) = rows_cols(x, "LinearRegressor")?;
        if cols * self.targets != self.coefficients.len() {
            return Err(eval(format!(
                "LinearRegressor has {} coefficients for {cols} features",
                self.coefficients.len()
            )));
        }
        let mut y = scores(&x.to_f32()?, rows, cols, &self.coefficients, &self.intercepts, self.targets);
        if self.post == PostTransform::Probit {
            y.iter_mut().for_each(|s| *s = probit(*s));
        }
        Ok(Value::new(vec![rows, self.targets], Data::F32(y)))
    }
}

impl HeapSize for LinearRegressor {
    fn heap_bytes(&self) -> u64 {
        self.coefficients.heap_bytes() + self.intercepts.heap_bytes()
    }
}

/// `Normalizer`'s norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    Max,
    L1,
    L2,
}

impl Norm {
    pub(crate) fn parse(attrs: &Attributes<'_>) -> Result<Self, TinyError> {
        match attrs.string("norm", "MAX").as_str() {
            "MAX" => Ok(Norm::Max),
            "L1" => Ok(Norm::L1),
            "L2" => Ok(Norm::L2),
            other => Err(invalid(format!("Normalizer norm {other}"))),
        }
    }

    /// Each row divided by its norm; a row whose norm is zero is left as it is.
    pub(crate) fn run(self, x: &Value) -> Result<Value, TinyError> {
        let (rows, cols) = rows_cols(x, "Normalizer")?;
        let mut out = x.to_f32()?.into_owned();
        for row in out.chunks_mut(cols.max(1)).take(rows) {
            match self {
                Norm::Max => {
                    let max = row.iter().copied().fold(f32::MIN, f32::max);
                    if max != 0.0 {
                        row.iter_mut().for_each(|v| *v /= max);
                    }
                }
                Norm::L1 => {
                    let sum: f32 = row.iter().map(|v| v.abs()).sum();
                    if sum != 0.0 {
                        row.iter_mut().for_each(|v| *v /= sum);
                    }
                }
                Norm::L2 => {
                    let sum: f32 = row.iter().map(|v| v * v).sum();
                    if sum != 0.0 {
                        row.iter_mut().for_each(|v| {
                            let r = (*v * *v / sum).sqrt();
                            *v = if *v < 0.0 { -r } else { r };
                        });
                    }
                }
            }
        }
        Ok(Value::new(x.shape.clone(), Data::F32(out)))
    }
}

/// `Scaler`: `(x - offset) · scale`, per feature or one for all.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Scaler {
    pub(crate) fn parse(attrs: &Attributes<'_>) -> Result<Self, TinyError> {
        let (offset, scale) = (attrs.floats("offset"), attrs.floats("scale"));
        if offset.is_empty() || scale.is_empty() {
            return Err(invalid("Scaler without offset or scale"));
        }
        Ok(Self { offset, scale })
    }

    pub(crate) fn run(&self, x: &Value) -> Result<Value, TinyError> {
        let cols = x.shape.last().copied().unwrap_or(1);
        for v in [&self.offset, &self.scale] {
            if v.len() != 1 && v.len() != cols {
                return Err(eval(format!("Scaler has {} values for {cols} features", v.len())));
            }
        }
        let at = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i % cols] };
        let out = x
            .to_f32()?
            .iter()
            .enumerate()
            .map(|(i, v)| (v - at(&self.offset, i)) * at(&self.scale, i))
            .collect();
        Ok(Value::new(x.shape.clone(), Data::F32(out)))
    }
}

impl HeapSize for Scaler {
    fn heap_bytes(&self) -> u64 {
        self.offset.heap_bytes() + self.scale.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_score_becomes_two_as_onnx_runtime_writes_them() {
        let mut s = vec![0.3];
        write_scores(&mut s, PostTransform::None, Some(1));
        assert_eq!(s, vec![0.7, 0.3]);
        let mut s = vec![2.0];
        write_scores(&mut s, PostTransform::Logistic, Some(3));
        assert!((s[0] - logistic(-2.0)).abs() < 1e-7 && (s[1] - logistic(2.0)).abs() < 1e-7);
        let mut s = vec![1.0, 1.0];
        write_scores(&mut s, PostTransform::Softmax, None);
        assert_eq!(s, vec![0.5, 0.5]);
        assert!((probit(0.975) - 1.96).abs() < 0.01);
    }
}
