//! AFL++ target: `densemesh_mesh::fuzzing::wire_frame` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_mesh::fuzzing::wire_frame(data));
}
