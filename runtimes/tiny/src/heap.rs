//! What a loaded model holds on the heap, counted allocation by allocation.
//!
//! Each heap allocation costs its bytes rounded up to glibc's malloc chunk: the request plus an
//! 8-byte header, in 16-byte steps, 32 bytes at least. Counting that way (rather than summing
//! lengths) is what makes a model's charge match the process's growth when tens of thousands of
//! small models are loaded (`tests/accounting.rs`).

/// Heap bytes that `T` owns beyond its own `size_of`.
pub(crate) trait HeapSize {
    /// Bytes of the allocations `self` owns, as malloc takes them.
    fn heap_bytes(&self) -> u64;
}

/// Bytes malloc takes for a request of `requested` bytes; none for an empty request, which Rust's
/// collections never make.
pub(crate) fn chunk(requested: usize) -> u64 {
    if requested == 0 {
        return 0;
    }
    (requested as u64 + 8).next_multiple_of(16).max(32)
}

impl<T: HeapSize> HeapSize for Vec<T> {
    fn heap_bytes(&self) -> u64 {
        chunk(self.capacity() * std::mem::size_of::<T>()) + self.iter().map(HeapSize::heap_bytes).sum::<u64>()
    }
}

impl<T: HeapSize> HeapSize for Box<[T]> {
    fn heap_bytes(&self) -> u64 {
        chunk(std::mem::size_of_val::<[T]>(self)) + self.iter().map(HeapSize::heap_bytes).sum::<u64>()
    }
}

impl HeapSize for String {
    fn heap_bytes(&self) -> u64 {
        chunk(self.capacity())
    }
}

impl HeapSize for bytes::Bytes {
    /// A `Bytes` made from a `Vec` owns one buffer and, once shared, a small header; counted as the
    /// buffer, which is what dominates.
    fn heap_bytes(&self) -> u64 {
        chunk(self.len())
    }
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl HeapSize for $t {
            fn heap_bytes(&self) -> u64 {
                0
            }
        }
    )*};
}
plain!(f32, f64, i64, i32, u32, u8, usize, bool);

impl HeapSize for Option<u32> {
    fn heap_bytes(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_to_glibc_sizes() {
        assert_eq!(chunk(0), 0);
        assert_eq!(chunk(1), 32);
        assert_eq!(chunk(24), 32);
        assert_eq!(chunk(25), 48);
        assert_eq!(chunk(2_048), 2_064);
        let v: Vec<f32> = Vec::with_capacity(10);
        assert_eq!(v.heap_bytes(), 48);
    }
}
