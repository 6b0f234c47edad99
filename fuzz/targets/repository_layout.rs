//! AFL++ target: `densemesh_mesh::fuzzing::repository_layout` (docs/fuzzing.md).
fn main() {
    afl::fuzz!(|data: &[u8]| densemesh_mesh::fuzzing::repository_layout(data));
}
