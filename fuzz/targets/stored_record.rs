//! AFL++ target: `densemesh_placement::fuzzing::stored_record` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_placement::fuzzing::stored_record(data));
}
