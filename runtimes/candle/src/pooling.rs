//! From token vectors to one sentence vector, as sentence-transformers' `Pooling` and `Normalize`
//! modules compute it.
//!
//! A batch is padded to its longest sentence, so every mode weighs tokens by the attention mask:
//! a padding position's vector is whatever the encoder made of `[PAD]`, and counting it would move
//! a short sentence's embedding by how long its neighbours in the batch happen to be.

use candle_core::{D, DType, Result, Tensor};

/// One way of pooling; several are concatenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's (`[CLS]`) vector.
    Cls,
    /// The element-wise maximum over the sentence's tokens.
    Max,
    /// The mean over the sentence's tokens.
    Mean,
    /// The sum over the sentence's tokens divided by the square root of their count.
    MeanSqrtLen,
}

/// The pooling modes of a model, in sentence-transformers' order (CLS, max, mean, mean-sqrt-len).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    modes: Vec<PoolingMode>,
    hidden_size: usize,
}

/// What a padding position is set to before a max: below any real activation, as in
/// sentence-transformers (which uses -1e9).
const MASKED_MAX: f64 = -1e9;

impl Pooling {
    /// Pooling by `modes` (at least one) over vectors of `hidden_size`.
    pub fn new(modes: Vec<PoolingMode>, hidden_size: usize) -> Self {
        Self { modes, hidden_size }
    }

    /// The pooled vector's length: one hidden vector per mode.
    pub fn output_dim(&self) -> usize {
        self.hidden_size * self.modes.len()
    }

    /// Pools `hidden` (`[batch, tokens, hidden]`, F32) under `mask` (`[batch, tokens]`, 1 for a
    /// real token and 0 for padding) into `[batch, output_dim]`.
    pub fn apply(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_dtype(DType::F32)?;
        let expanded = mask.unsqueeze(D::Minus1)?.broadcast_as(hidden.shape())?;
        // Every sentence has at least [CLS] and [SEP], so no count is zero.
        let counts = mask.sum_keepdim(1)?;
        let mut parts = Vec::with_capacity(self.modes.len());
        for mode in &self.modes {
            let part = match mode {
                PoolingMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
                PoolingMode::Max => {
                    let floor = ((expanded.ones_like()? - &expanded)? * MASKED_MAX)?;
                    (hidden * &expanded)?.add(&floor)?.max(1)?
                }
                PoolingMode::Mean => (hidden * &expanded)?.sum(1)?.broadcast_div(&counts)?,
                PoolingMode::MeanSqrtLen => (hidden * &expanded)?.sum(1)?.broadcast_div(&counts.sqrt()?)?,
            };
            parts.push(part);
        }
        Tensor::cat(&parts, 1)
    }
}

/// Scales each row of `[batch, dim]` to unit length, as `torch.nn.functional.normalize` does (a zero
/// row stays zero rather than becoming NaN).
pub fn normalize(embeddings: &Tensor) -> Result<Tensor> {
    let norms = embeddings.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    embeddings.broadcast_div(&norms)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two sentences of 3 and 2 tokens (the second padded), hidden size 2.
    fn batch() -> (Tensor, Tensor) {
        let hidden = Tensor::new(
            &[[[1f32, -4.], [3., 2.], [5., 0.]], [[2., 2.], [4., -6.], [100., 100.]]],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        (hidden, mask)
    }

    fn pool(modes: Vec<PoolingMode>) -> Vec<Vec<f32>> {
        let (hidden, mask) = batch();
        Pooling::new(modes, 2).apply(&hidden, &mask).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn every_mode_ignores_padding() {
        assert_eq!(pool(vec![PoolingMode::Mean]), vec![vec![3., -2. / 3.], vec![3., -2.]]);
        assert_eq!(pool(vec![PoolingMode::Max]), vec![vec![5., 2.], vec![4., 2.]]);
        assert_eq!(pool(vec![PoolingMode::Cls]), vec![vec![1., -4.], vec![2., 2.]]);
        let sqrt = pool(vec![PoolingMode::MeanSqrtLen]);
        assert!((sqrt[1][0] - 6. / 2f32.sqrt()).abs() < 1e-6, "{sqrt:?}");
        assert!((sqrt[0][1] - (-2. / 3f32.sqrt())).abs() < 1e-6, "{sqrt:?}");
    }

    #[test]
    fn several_modes_concatenate_in_the_order_given() {
        let pooled = pool(vec![PoolingMode::Cls, PoolingMode::Mean]);
        assert_eq!(pooled[1], vec![2., 2., 3., -2.]);
        assert_eq!(Pooling::new(vec![PoolingMode::Cls, PoolingMode::Mean], 2).output_dim(), 4);
    }

    #[test]
    fn normalize_gives_unit_rows_and_leaves_zero_rows_zero() {
        let x = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu).unwrap();
        assert_eq!(normalize(&x).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.6, 0.8], vec![0., 0.]]);
    }
}
