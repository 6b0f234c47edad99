//! AFL++ target: `densemesh_placement::fuzzing::model_id` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_placement::fuzzing::model_id(data));
}
