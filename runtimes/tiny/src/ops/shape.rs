//! Operators that move elements without arithmetic: reshapes, concatenation, casts.

use crate::error::{TinyError, eval};
use crate::ops::math::axis;
use crate::value::{Data, Elem, Value, count};

/// Reshape to `target` (0 copies the input's dimension unless `allow_zero`, -1 is inferred).
pub(crate) fn reshape(x: &Value, target: &[i64], allow_zero: bool) -> Result<Value, TinyError> {
    let total = count(&x.shape);
    let mut shape = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, d) in target.iter().enumerate() {
        match *d {
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            0 if !allow_zero => shape.push(*x.shape.get(i).ok_or_else(|| {
                eval(format!("Reshape to {target:?} copies dimension {i} of {:?}", x.shape))
            })?),
            d if d >= 0 => shape.push(d as usize),
            _ => return Err(eval(format!("Reshape to {target:?}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = shape.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(eval(format!("Reshape of {:?} to {target:?}", x.shape)));
        }
        shape[i] = total / known;
    }
    if shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)) != Some(total) {
        return Err(eval(format!("Reshape of {:?} ({total} elements) to {target:?}", x.shape)));
    }
    Ok(Value::new(shape, x.data.clone()))
}

/// Flatten to 2-D at `axis`.
pub(crate) fn flatten(x: &Value, axis_attr: i64) -> Result<Value, TinyError> {
    let rank = x.shape.len();
    let a = if axis_attr < 0 { axis_attr + rank as i64 } else { axis_attr };
    if a < 0 || a as usize > rank {
        return Err(eval(format!("Flatten axis {axis_attr} for rank {rank}")));
    }
    let a = a as usize;
    Ok(Value::new(vec![x.shape[..a].iter().product(), x.shape[a..].iter().product()], x.data.clone()))
}

/// Squeeze `axes` (every dimension of size 1 when `None`).
pub(crate) fn squeeze(x: &Value, axes: Option<&[i64]>) -> Result<Value, TinyError> {
    let shape = match axes {
        None => x.shape.iter().copied().filter(|d| *d != 1).collect(),
        Some(axes) => {
            let drop: Vec<usize> = axes.iter().map(|a| axis(*a, x.shape.len())).collect::<Result<_, _>>()?;
            if let Some(d) = drop.iter().find(|d| x.shape[**d] != 1) {
                return Err(eval(format!("Squeeze of dimension {d} of shape {:?}", x.shape)));
            }
            x.shape.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, d)| *d).collect()
        }
    };
    Ok(Value::new(shape, x.data.clone()))
}

/// Insert dimensions of size 1 at `axes` (positions in the output).
pub(crate) fn unsqueeze(x: &Value, axes: &[i64]) -> Result<Value, TinyError> {
    let rank = x.shape.len() + axes.len();
    let mut at: Vec<usize> = axes.iter().map(|a| axis(*a, rank)).collect::<Result<_, _>>()?;
    at.sort_unstable();
    at.dedup();
    if at.len() != axes.len() {
        return Err(eval(format!("Unsqueeze axes {axes:?} repeat")));
    }
    let mut dims = x.shape.iter();
    let shape =
        (0..rank).map(|i| if at.contains(&i) { 1 } else { dims.next().copied().unwrap_or(1) }).collect();
    Ok(Value::new(shape, x.data.clone()))
}

/// Concatenate along `axis`; every input of one element type and otherwise equal shapes.
pub(crate) fn concat(inputs: &[&Value], axis_attr: i64) -> Result<Value, TinyError> {
    let first = inputs.first().ok_or_else(|| eval("Concat of nothing"))?;
    let a = axis(axis_attr, first.shape.len())?;
    let mut shape = first.shape.clone();
    shape[a] = 0;
    for v in inputs {
        let same = v.shape.len() == first.shape.len()
            && v.shape.iter().zip(&first.shape).enumerate().all(|(i, (x, y))| i == a || x == y);
        if !same || v.elem() != first.elem() {
            return Err(eval(format!(
                "Concat of {:?} {:?} and {:?} {:?}",
                first.elem(),
                first.shape,
                v.elem(),
                v.shape
            )));
        }
        shape[a] += v.shape[a];
    }
    let outer: usize = first.shape[..a].iter().product();
    let inner: usize = first.shape[a + 1..].iter().product();
    macro_rules! run {
        ($variant:ident) => {{
            let mut out = Vec::with_capacity(count(&shape));
            for o in 0..outer {
                for v in inputs {
                    let Data::$variant(d) = &v.data else { unreachable!("checked above") };
                    let block = v.shape[a] * inner;
                    out.extend_from_slice(&d[o * block..(o + 1) * block]);
                }
            }
            Data::$variant(out)
        }};
    }
    let data = match first.elem() {
        Elem::F32 => run!(F32),
        Elem::F64 => run!(F64),
        Elem::I64 => run!(I64),
        Elem::I32 => run!(I32),
        Elem::Str => run!(Str),
        Elem::Other(d) => return Err(eval(format!("Concat of {d}"))),
    };
    Ok(Value::new(shape, data))
}

/// Cast between the numeric types (floats to integers truncate toward zero, as C++'s cast does).
pub(crate) fn cast(x: &Value, to: Elem) -> Result<Value, TinyError> {
    macro_rules! to {
        ($v:expr) => {
            match to {
                Elem::F32 => Data::F32($v.iter().map(|x| *x as f32).collect()),
                Elem::F64 => Data::F64($v.iter().map(|x| *x as f64).collect()),
                Elem::I64 => Data::I64($v.iter().map(|x| *x as i64).collect()),
                Elem::I32 => Data::I32($v.iter().map(|x| *x as i32).collect()),
                other => return Err(eval(format!("Cast to {other:?}"))),
            }
        };
    }
    let data = match &x.data {
        Data::F32(v) => to!(v),
        Data::F64(v) => to!(v),
        Data::I64(v) => to!(v),
        Data::I32(v) => to!(v),
        other if other.elem() == to => other.clone(),
        other => return Err(eval(format!("Cast of {:?}", other.elem()))),
    };
    Ok(Value::new(x.shape.clone(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(shape: &[usize], n: usize) -> Value {
        Value::new(shape.to_vec(), Data::F32((0..n).map(|i| i as f32).collect()))
    }

    #[test]
    fn reshapes_copy_and_infer_dimensions() {
        let x = f32s(&[2, 3, 4], 24);
        assert_eq!(reshape(&x, &[0, -1], false).unwrap().shape, vec![2, 12]);
        assert_eq!(reshape(&x, &[-1], false).unwrap().shape, vec![24]);
        assert!(reshape(&x, &[5, -1], false).is_err());
        assert!(reshape(&x, &[-1, -1], false).is_err());
        assert_eq!(flatten(&x, 2).unwrap().shape, vec![6, 4]);
        assert_eq!(flatten(&x, 0).unwrap().shape, vec![1, 24]);
        assert_eq!(unsqueeze(&x, &[0, -1]).unwrap().shape, vec![1, 2, 3, 4, 1]);
        assert_eq!(squeeze(&f32s(&[1, 3, 1], 3), None).unwrap().shape, vec![3]);
        assert!(squeeze(&x, Some(&[0])).is_err());
    }

    #[test]
    fn concat_interleaves_blocks_along_the_axis() {
        let (a, b) = (f32s(&[2, 1], 2), f32s(&[2, 2], 4));
        let c = concat(&[&a, &b], 1).unwrap();
        assert_eq!((c.shape, c.data), (vec![2, 3], Data::F32(vec![0., 0., 1., 1., 2., 3.])));
        assert!(concat(&[&a, &f32s(&[3, 1], 3)], 1).is_err());
    }

    #[test]
    fn casts_truncate_toward_zero() {
        let x = Value::new(vec![3], Data::F32(vec![-1.7, 0.5, 2.9]));
        assert_eq!(cast(&x, Elem::I64).unwrap().data, Data::I64(vec![-1, 0, 2]));
    }
}
