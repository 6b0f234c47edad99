//! AFL++ target: `densemesh_puller::fuzzing::storage_config` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_puller::fuzzing::storage_config(data));
}
